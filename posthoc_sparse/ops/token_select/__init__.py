"""Token-level top-k for any k, per head or per KV group: ``token_select`` and ``gather_attention`` (Triton)
beside their naive twins ``token_select_reference`` and ``gather_attention_reference``. Prefill takes them
where ``head_topk`` (k <= its MAX_K, per head) does not serve; at large k the kept sets go as a bitmask
(``token_select(..., bits=True)``) to ``ops.mask_attention`` instead of the gather."""

from __future__ import annotations

import torch

from .. import on_gpu, tile_dims_ok
from .naive import gather_attention_reference, selection_scores_reference, token_select_reference
from .gather import gather_attention
from .triton import TUNING, token_select

__all__ = ["TUNING", "gather_attention", "gather_attention_reference", "kernels_ok", "selection_scores_reference",
           "supports", "token_select", "token_select_reference"]


def supports(q: torch.Tensor, key: torch.Tensor, k: int, sel_dim: int) -> bool:
    """Shapes the kernels take: queries and keys of one length, power-of-two dims of at least 16, any k > 0."""
    return q.shape[2] == key.shape[2] and k > 0 and tile_dims_ok(q.shape[-1], sel_dim)


def kernels_ok(q: torch.Tensor, key: torch.Tensor, k: int, sel_dim: int) -> bool:
    """Whether the Triton path serves this call: CUDA with Triton, and shapes it takes (``supports``)."""
    return on_gpu(q) and supports(q, key, k, sel_dim)
