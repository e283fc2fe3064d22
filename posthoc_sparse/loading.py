"""Load a causal LM frozen: a hub id, a local folder, a ``.gguf`` file, or the embedded SmolLM2-135M.

Every model, GGUF or not, is loaded from a checkpoint folder (a GGUF file is converted once and cached, see
``gguf.py``), so the first load and the cached ones give the same model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DEVICE_MAPS, EMBEDDED_MODEL
from .devices import input_device, parse_max_memory, resolve_device
from .errors import UserError, first_line
from .gguf import EMBEDDED_HUB_ID, convert_gguf, embedded_model_path

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
    hub_id: str | None = None  # the model's hub id: the one loaded, or the embedded GGUF's original; None if local


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else one of float32/fp32, bfloat16/bf16, float16/fp16."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"--dtype must be auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16), got {dtype!r}")
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
        why = f"offline or not found: {first_line(err)}"
    return UserError(f"could not load model {source!r} from the Hugging Face hub ({why}): download it "
                     "elsewhere and pass its local folder, e.g. --model ./path")


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
            checkpoint = str(convert_gguf(path, cache_dir))
        elif path.is_dir() and (path / "config.json").is_file():
            checkpoint = resolved
            _check_weights_format(path, source, trust_remote_code)
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
        raise UserError(f"could not read the config of model {source}: {first_line(e)}") from None
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
        raise UserError(f"could not load the weights of model {source}: {first_line(e)}") from None
    except pickle.UnpicklingError as e:  # pickle weights (only with --trust-remote-code) that weights_only refuses
        raise UserError(f"could not load the pickle weights of model {source}: {first_line(e)}") from None
    except ValueError as e:
        if "attn_implementation" in str(e):
            raise UserError(f"model {source} does not support attn_implementation={attn_implementation!r}: "
                            f"{first_line(e)}") from None
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
        raise UserError(f"could not load the tokenizer of model {source}: {first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype_name = str(torch_dtype).removeprefix("torch.")
    return LoadedModel(model=lm, tokenizer=tokenizer, source=source, resolved=resolved,
                       revision=revision if hub else None,
                       dtype=dtype_name, device=str(input_device(lm)),
                       hub_id=name if hub else (EMBEDDED_HUB_ID if source == EMBEDDED_MODEL else None))


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_weights_format(path: Path, source: str, trust_remote_code: bool) -> None:
    """Refuse a local model folder whose weights are only pickles (``pytorch_model.bin``), which can run code
    when loaded, unless the user opts in with ``--trust-remote-code``."""
    names = [p.name for p in path.iterdir()]
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if pickles and not trust_remote_code and not any(n.endswith((".safetensors", ".safetensors.index.json"))
                                                     for n in names):
        raise UserError(f"model {source} has only pickle weights ({pickles[0]}), which can run code when loaded; "
                        "convert them to safetensors, or pass --trust-remote-code to load them")


def check_positions(model: nn.Module, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model has positions (``max_position_embeddings``)."""
    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise UserError(f"{flag} {seq_len} exceeds the model's {limit} positions (max_position_embeddings); use "
                        f"{flag} {limit} or less")


def positions_are_learned(model: nn.Module) -> bool:
    """Whether the model's positions are a learned table (GPT-2's), which no position past its end can index, as
    opposed to rotary embeddings, which run past ``max_position_embeddings`` (with what quality the user judges)."""
    cfg = text_config(model.config)
    return getattr(cfg, "rope_parameters", None) is None and getattr(cfg, "rope_theta", None) is None


def decoder_of(model: nn.Module) -> nn.Module:
    """The model without its LM head (what a forward that needs attention inputs, not logits, runs)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def text_config(config):
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
    cfg = text_config(config)
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
    cfg = text_config(getattr(model, "config", model))
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


__all__ = ["DEVICE_MAPS", "EMBEDDED_MODEL", "LoadedModel", "assert_frozen", "check_positions", "describe_attention",
           "load_model", "model_fingerprint", "decoder_of", "resolve_dtype", "text_config", "uses_attention_interface"]
