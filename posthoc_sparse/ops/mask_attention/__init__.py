"""Attention over the keys a per-row bitmask keeps (prefill): ``mask_attention`` (Triton) beside its naive twin
``mask_attention_reference``, and the bitmask helpers. ``token_select`` writes the bitmask (``bits=True``); the
policy takes this attention instead of the gather where the kept share of the causal pairs is at least
``TUNING["min_density"]`` (per head ``min_density_head``)."""

from __future__ import annotations

import torch

from .. import tile_dims_ok
from .naive import bits_from_indices, bits_from_keep, keep_from_bits, mask_attention_reference, words_per_row
from .triton import TUNING, mask_attention

__all__ = ["TUNING", "bits_from_indices", "bits_from_keep", "dense_enough", "keep_from_bits", "kept_share",
           "kept_tile_share", "mask_attention", "mask_attention_reference", "supports", "words_per_row"]


def kept_share(t: int, k: int) -> float:
    """The share of the causal (row, key) pairs that top-k keeps in prefill over ``t`` tokens."""
    kk = min(k, t)
    kept = kk * (kk + 1) // 2 + (t - kk) * kk
    return kept / (t * (t + 1) / 2)


def kept_tile_share(bits: torch.Tensor, rows: int, keys: int) -> float:
    """The share of the causal (block of ``rows`` rows, tile of ``keys`` keys) pairs in which some row keeps a key:
    the tiles ``mask_attention`` at that launch computes (it skips the others). bits (B, H', T, W); whole blocks and
    tiles only; words wholly past a row's causal keys are ignored (``token_select`` does not write them)."""
    t, words = bits.shape[2], keys // 32
    nb, nt = t // rows, bits.shape[-1] // words
    causal_word = torch.arange(bits.shape[-1], device=bits.device)[None, :] * 32 <= torch.arange(
        t, device=bits.device)[:, None]
    w = bits.masked_fill(~causal_word, 0)[:, :, : nb * rows, : nt * words].reshape(*bits.shape[:2], nb, rows, nt, words)
    kept = (w != 0).any(-1).any(-2)  # (B, H', blocks, tiles)
    causal = torch.arange(nt, device=bits.device)[None, :] * keys < (torch.arange(nb, device=bits.device)[:, None] + 1) * rows
    return kept.sum().item() / (causal.sum().item() * bits.shape[0] * bits.shape[1])


def dense_enough(t: int, k: int, per_head: bool = False) -> bool:
    """Whether top-k of ``k`` keeps enough of the causal pairs at length ``t`` for the bitmask selection and this
    kernel to beat the index selection and the gather, per KV group or (``per_head``) per head."""
    return kept_share(t, k) >= TUNING["min_density_head" if per_head else "min_density"]


def supports(q: torch.Tensor, k: torch.Tensor, n_sets: int) -> bool:
    """Shapes the kernel takes: queries and keys of one length, a power-of-two head_dim of at least 16, kept sets
    each read by query heads of one KV head."""
    h = q.shape[1]
    return (q.shape[2] == k.shape[2] and tile_dims_ok(q.shape[-1]) and h % n_sets == 0
            and (h // k.shape[1]) % (h // n_sets) == 0)
