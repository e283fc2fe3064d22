"""Block-sparse deployed top-k: block scoring, block selection and attention over the selected key blocks.

Keys are cut into blocks of b consecutive positions and queries into blocks of the same b positions
(absolute positions, so a decoding query belongs to its position's block). Every query block selects, per KV
group, n = ceil(k / b) key blocks: its own (diagonal) block, which always holds each query's own key, plus
the n - 1 earlier blocks with the largest score mass. Scores of a block:

    gate (and random gate): softmax over the earlier blocks of an upper bound of max_{j in block} gq_t . gk_j
                            (per-channel min/max of the block's gate keys, as in Quest), summed over the
                            block's queries and the group's heads
    oracle:                 the dense attention mass of the block, sum_{j in block} softmax(s)_tj, summed the same way

Each query then attends, causally, to the keys of its block's selection: at most n * b keys. ``naive.py`` holds
the fp32 twins, ``triton.py`` the kernels (forward only).
"""

from __future__ import annotations

import torch

from .. import on_gpu, tile_dims_ok
from .naive import (block_attention_reference, block_keep, block_mass_from_probs, block_mass_reference, group_sum,
                    n_blocks, pool_bound, query_blocks, select_blocks)
from .triton import (TUNING, block_attention_fused, block_mass_fused, gate_summaries_fused, heads_per_program,
                     oracle_block_mass_fused, select_blocks_fused)

__all__ = ["BLOCK_SIZES", "TUNING", "block_attention_fused", "block_attention_reference", "block_keep",
           "block_mass_from_probs", "block_mass_fused", "block_mass_reference", "gate_summaries_fused", "group_sum",
           "heads_per_program", "kernels_ok", "n_blocks", "oracle_block_mass_fused", "pool_bound", "query_blocks",
           "select", "select_blocks", "select_blocks_fused", "supports"]

BLOCK_SIZES = (16, 32, 64, 128)
MAX_FUSED_PICKS = 64  # the selection kernel takes one pass over a row per pick; torch.topk serves larger budgets


def supports(q: torch.Tensor, k: torch.Tensor, block: int, gate_dim: int | None = None) -> bool:
    """Shapes the kernels take: power-of-two head_dim (and gate dim) of at least 16, a block size of
    ``BLOCK_SIZES``, queries and keys of one length."""
    return (block in BLOCK_SIZES and q.shape[2] == k.shape[2]
            and tile_dims_ok(q.shape[-1], *(() if gate_dim is None else (gate_dim,))))


def kernels_ok(q: torch.Tensor, k: torch.Tensor, block: int, gate_dim: int | None = None) -> bool:
    """Whether the Triton kernels serve this call: CUDA with Triton, and shapes they take (``supports``)."""
    return on_gpu(q) and supports(q, k, block, gate_dim)


def select(mass: torch.Tensor, n: int, q_offset: int, block: int) -> torch.Tensor:
    """``select_blocks``, through the Triton kernel on CUDA when at most ``MAX_FUSED_PICKS`` blocks are picked
    per row, else ``torch.topk``."""
    if on_gpu(mass) and n - 1 <= MAX_FUSED_PICKS:
        return select_blocks_fused(mass, n, q_offset, block)
    return select_blocks(mass, n, q_offset, block)
