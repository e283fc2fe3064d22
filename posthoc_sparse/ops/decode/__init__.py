"""Gated top-k decoding (one new query per sequence): score the cached selection keys, keep the top k per query
head or per KV group, attend over the kept K/V rows. ``gated_decode`` (Triton, ``triton.py``) beside its naive
twin ``gated_decode_reference`` (``naive.py``), and their parts."""

from __future__ import annotations

import torch

from .. import on_gpu, tile_dims_ok
from .naive import decode_attention_reference, decode_scores_reference, decode_topk_reference, gated_decode_reference
from .triton import TUNING, decode_attention, decode_scores, decode_topk, gated_decode

__all__ = ["TUNING", "decode_attention", "decode_attention_reference", "decode_scores", "decode_scores_reference",
           "decode_topk", "decode_topk_reference", "gated_decode", "gated_decode_reference", "kernels_ok",
           "supports"]


def supports(q: torch.Tensor, v: torch.Tensor, sel_dim: int) -> bool:
    """Shapes the kernels take: one query per sequence (q (B, H, 1, D)), values of the head dim, power-of-two
    head and selection dims of at least 16."""
    return q.shape[2] == 1 and v.shape[-1] == q.shape[-1] and tile_dims_ok(q.shape[-1], sel_dim)


def kernels_ok(q: torch.Tensor, v: torch.Tensor, sel_dim: int) -> bool:
    """Whether the Triton path serves this call: CUDA with Triton, and shapes it takes (``supports``)."""
    return on_gpu(q) and supports(q, v, sel_dim)
