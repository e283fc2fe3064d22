"""The distillation KL per query row: ``kl_rows_reference`` (naive) and ``kl_grad_fused`` (Triton).

Also the row sampling both paths share: ``sample_row_blocks`` draws the ``ROW_BLOCK``-row query blocks a
step's loss is estimated from (``distill --row-fraction``).
"""

from __future__ import annotations

import math

import torch

from .. import on_gpu, tile_dims_ok
from .naive import ROW_BLOCK, kl_rows_reference
from .triton import kl_grad_fused

__all__ = ["ROW_BLOCK", "kernels_ok", "kl_grad_fused", "kl_rows_reference", "sample_row_blocks", "supports"]


def supports(head_dim: int, d_g: int) -> bool:
    """Whether the kernels take these dimensions (they run on any device under TRITON_INTERPRET=1)."""
    return tile_dims_ok(head_dim, d_g)


def kernels_ok(q: torch.Tensor, d_g: int) -> bool:
    """Whether the Triton path serves queries ``q`` (B, H, T, D) and a gate of dimension ``d_g``: CUDA with
    Triton, and dimensions the kernels take."""
    return on_gpu(q) and supports(q.shape[-1], d_g)


def sample_row_blocks(n: int, t: int, fraction: float, generator: torch.Generator) -> torch.Tensor | None:
    """For each of ``n`` layers, a uniform random choice of ceil(fraction * nb) of the nb ``ROW_BLOCK``-row
    query blocks of a T-token window, as (n, m) int32 on the generator's device, each row sorted longest
    blocks first; None when that is every block (``fraction`` 1, or a short window)."""
    nb = -(-t // ROW_BLOCK)
    m = max(1, math.ceil(fraction * nb - 1e-9))
    if m >= nb:
        return None
    keys = torch.rand(n, nb, generator=generator, device=generator.device)
    return keys.argsort(1)[:, :m].sort(1, descending=True).values.to(torch.int32)
