"""The distillation KL per query row, the naive fp32 twin of ``triton.py``.

Letters: B batch, H query heads, Hkv key/value heads, T tokens, D head_dim, d gate dim.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 128  # rows are sampled (``row_blocks``) in blocks of this many consecutive query positions


def kl_rows_reference(q, k, gq, gk, scaling: float) -> torch.Tensor:
    """Per-row causal KL(softmax(s) || softmax(g)) (B, H, T) in fp32, the obvious way:
    q (B, H, T, D), k (B, Hkv, T, D), gq, gk (B, H, T, d); s = q . k * scaling, g = gq . gk, both over causal keys."""
    t = q.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    s = torch.matmul(q.float(), k.float().repeat_interleave(n_rep, 1).transpose(-1, -2)) * scaling  # (B, H, T, T)
    g = torch.matmul(gq.float(), gk.float().transpose(-1, -2))  # (B, H, T, T)
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    logp = torch.log_softmax(s.masked_fill(future, float("-inf")), -1)
    logq = torch.log_softmax(g.masked_fill(future, float("-inf")), -1)
    return torch.where(future, 0.0, logp.exp() * (logp - logq)).sum(-1)


