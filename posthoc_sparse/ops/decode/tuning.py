"""Launch settings of the decode kernels (``triton.py``, ``radix.py``) and how they split work over programs."""

from __future__ import annotations

# Launch settings. "programs": about how many programs the split kernels aim for (a few per SM of an H100/H200).
# "select": "radix" (one program per row, or split over the keys when fewer than "split_rows" rows), "single",
# "split" (forced), or "torch" (torch.topk).
TUNING = {"block_s": 64, "block_n": 32, "select_block": 1024, "programs": 512, "score_warps": 4,
          "select_warps": 8, "attn_warps": 4, "select": "radix", "split_rows": 64, "select_splits": 64}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _splits(n: int, rows: int, block: int, most: int | None = None) -> tuple[int, int]:
    """(splits, items per split): about TUNING["programs"] programs over ``rows`` rows of ``n`` items, each split a
    multiple of ``block`` items, at most ``most`` splits."""
    want = max(1, min(_cdiv(TUNING["programs"], max(rows, 1)), _cdiv(n, block), most or n))
    chunk = _cdiv(_cdiv(n, want), block) * block
    return _cdiv(n, chunk), chunk
