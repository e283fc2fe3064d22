"""Per-head top-k selection and attention over selected keys, the naive fp32 twins of ``triton.py``.

Letters: B batch, H query heads, G key/value heads, T queries = keys (prefill from position 0), D head_dim,
d the selection dimension (the gate's d, or D for the oracle), k keys kept per row, n kept slots per row.
"""

from __future__ import annotations

import torch


def head_topk_reference(a: torch.Tensor, b: torch.Tensor, k: int, scale: float = 1.0) -> torch.Tensor:
    """a (B, H, T, d), b (B, H or G, T, d): the k causal keys of largest ``a . b * scale`` per row, by
    ``torch.topk`` on fp32 scores, (B, H, T, k) int32 sorted by descending score, -1 past a row's causal keys."""
    bsz, h, t, _ = a.shape
    b = b.repeat_interleave(h // b.shape[1], dim=1) if b.shape[1] != h else b
    s = torch.matmul(a.float(), b.float().transpose(-1, -2)) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=a.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    kk = min(k, t)
    val, idx = s.topk(kk, dim=-1)
    idx = idx.masked_fill(val == float("-inf"), -1).to(torch.int32)
    if kk < k:
        idx = torch.cat((idx, idx.new_full((bsz, h, t, k - kk), -1)), dim=-1)
    return idx


def index_attention_reference(q, k, v, idx, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention of each query row over the keys ``idx`` (B, H, T, n) names (-1: none), in fp32:
    (B, H, T, D). q (B, H, T, D); k, v (B, G, S, D)."""
    h, s_len = q.shape[1], k.shape[2]
    rep = h // k.shape[1]
    kk, vv = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    slot = idx.long().masked_fill(idx < 0, s_len)  # -1 -> a spare column, dropped
    keep = torch.zeros(*s.shape[:-1], s_len + 1, dtype=torch.bool, device=q.device).scatter_(-1, slot, True)
    keep = keep[..., :s_len]
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1), nan=0.0)
    return torch.matmul(p, vv)
