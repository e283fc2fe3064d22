"""Attention of each query row over the keys a bitmask keeps, and the bitmask of an index set: the naive fp32
twins of ``triton.py``.

Letters: B batch, H query heads, G key/value heads, T queries = keys (prefill from position 0), D head_dim,
W = ceil(T / 32) words per row. A kept-key bitmask (B, H', T, W) int32 holds key j of row t in bit j % 32 of word
j // 32 (bit 31 is the sign bit); H' is H (a set per head) or a divisor of it (one set shared by each group of
H // H' consecutive query heads, as group selection shares its KV group's).
"""

from __future__ import annotations

import torch


def words_per_row(t: int) -> int:
    """Words of a bitmask row over ``t`` keys."""
    return (t + 31) // 32


def bits_from_keep(keep: torch.Tensor) -> torch.Tensor:
    """keep (..., T) bool -> (..., W) int32 bitmask (bit j % 32 of word j // 32)."""
    t = keep.shape[-1]
    pad = words_per_row(t) * 32 - t
    keep = torch.nn.functional.pad(keep, (0, pad)).view(*keep.shape[:-1], -1, 32).long()
    words = (keep << torch.arange(32, device=keep.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def keep_from_bits(bits: torch.Tensor, t: int) -> torch.Tensor:
    """(..., W) int32 bitmask -> (..., T) bool, the keys past ``t`` dropped."""
    shift = torch.arange(32, device=bits.device, dtype=torch.int32)
    keep = ((bits[..., None] >> shift) & 1).bool()
    return keep.flatten(-2)[..., :t]


def bits_from_indices(idx: torch.Tensor, t: int) -> torch.Tensor:
    """Index sets (..., n) int32 (-1: none) over ``t`` keys -> their bitmask (..., W) int32."""
    slot = idx.long().masked_fill(idx < 0, t)  # -1 -> a spare column, dropped
    keep = torch.zeros(*idx.shape[:-1], t + 1, dtype=torch.bool, device=idx.device).scatter_(-1, slot, True)
    return bits_from_keep(keep[..., :t])


def mask_attention_reference(q, k, v, bits, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention of each query row over the causal keys ``bits`` keeps, in fp32: (B, H, T, D). q (B, H, T,
    D); k, v (B, G, T, D); bits (B, H', T, W), H' dividing H. A row that keeps no key gets zeros."""
    h, t = q.shape[1], q.shape[2]
    keep = keep_from_bits(bits, t)
    keep = keep.repeat_interleave(h // keep.shape[1], dim=1) if keep.shape[1] != h else keep
    keep = keep & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    rep = h // k.shape[1]
    kk, vv = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1), nan=0.0)
    return torch.matmul(p, vv)
