"""Launch settings of the decode kernels (``triton.py``, ``radix.py``) and how they split work over programs."""

from __future__ import annotations

# Launch settings. "programs": about how many programs the split kernels aim for (a few per SM of an H100/H200).
# "select": "radix" (one program per row, or split over the keys when fewer than "split_rows" rows), "single",
# "split" (forced), or "torch" (torch.topk). "score_products": score one query row per selection-key head (a
# hidden gate's) by products summed instead of a tl.dot padded to 16 rows. "sparse_keys": after its first pass, a
# split select tile with at most this many keys on the prefix counts them by atomics, not by tl.histogram (-1: never).
# "keys_in_rope": a hidden gate's rotary kernel writes its new keys straight into a static gate key cache
# (``GateSelector.decode_inputs``), not through the cache layer's update (four launches). "carry_state": each split
# select pass takes one radix step from the state the pass before stored, instead of redoing every earlier step.
# Chosen on an H200 at 32k keys, k = 2048 (docs/data/perf-h200-decode-profile-variants.json): scoring by products
# in tiles of 256 keys with 8 warps (13.6 against 23.8 us per group at batch 1, 81 against 102 us per head at batch
# 8), and the split select up to 256 rows (at batch 8, 128 rows per head: 143 against 166 us for the selection).
# "sparse_keys" 64 (docs/data/perf-h200-decode-profile-sparse.json): the last two passes at batch 8 per head 9.8 and
# 13.6 us against 28.6 and 32.3 by histogram; 256 or 1024 also sped up the second pass per group at batch 8 but
# slowed it per head at batch 1 (9.6 and 10.8 us against 6.0).
TUNING = {"block_s": 256, "block_n": 32, "select_block": 1024, "programs": 512, "score_warps": 8,
          "select_warps": 8, "attn_warps": 4, "select": "radix", "split_rows": 256, "select_splits": 64,
          "score_products": True,
          "sparse_keys": 64, "keys_in_rope": True, "carry_state": True}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _splits(n: int, rows: int, block: int, most: int | None = None) -> tuple[int, int]:
    """(splits, items per split): about TUNING["programs"] programs over ``rows`` rows of ``n`` items, each split a
    multiple of ``block`` items, at most ``most`` splits."""
    want = max(1, min(_cdiv(TUNING["programs"], max(rows, 1)), _cdiv(n, block), most or n))
    chunk = _cdiv(_cdiv(n, want), block) * block
    return _cdiv(n, chunk), chunk
