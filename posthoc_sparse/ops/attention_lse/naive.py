"""Causal attention with each row's log-sum-exp, the naive fp32 twin of ``aten.py``.

Letters: B batch, H query heads, Hkv key/value heads, T tokens, D head_dim.
"""

from __future__ import annotations

import torch


def attention_lse_reference(q, k, v, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k and v (B, Hkv, T, D): causal softmax attention in fp32, the obvious way. Returns
    (out (B, T, H, D), lse (B, H, T)), lse the log-sum-exp of q . k * scaling over each row's causal keys."""
    t = q.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    s = torch.matmul(q.float(), k.float().repeat_interleave(n_rep, 1).transpose(-1, -2)) * scaling  # (B, H, T, T)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)  # (B, H, T)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.float().repeat_interleave(n_rep, 1))  # (B, H, T, D)
    return out.transpose(1, 2), lse
