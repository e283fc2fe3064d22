"""Per-head top-k (the method's selection): ``head_topk`` and ``index_attention`` (Triton) beside their naive
twins ``head_topk_reference`` and ``index_attention_reference``."""

from __future__ import annotations

import torch

from .. import on_gpu, tile_dims_ok
from .naive import head_topk_reference, index_attention_reference
from .triton import TUNING, head_topk, index_attention

__all__ = ["MAX_K", "TUNING", "head_topk", "head_topk_reference", "index_attention", "index_attention_reference",
           "kernels_ok", "supports"]

# candidates are ranked in registers: (rows, 2 * next_pow2(k)) int64 words per program; larger k (and group
# selection) take ops.token_select
MAX_K = 128


def supports(q: torch.Tensor, key: torch.Tensor, k: int, sel_dim: int) -> bool:
    """Shapes the kernels take: queries and keys of one length, power-of-two dims of at least 16, k <= MAX_K."""
    return q.shape[2] == key.shape[2] and 0 < k <= MAX_K and tile_dims_ok(q.shape[-1], sel_dim)


def kernels_ok(q: torch.Tensor, key: torch.Tensor, k: int, sel_dim: int) -> bool:
    """Whether the Triton path serves this call: CUDA with Triton, and shapes it takes (``supports``)."""
    return on_gpu(q) and supports(q, key, k, sel_dim)
