"""Token-level top-k selection for any k (per head or per KV group) and attention over the selected keys, the
naive fp32 twins of ``triton.py``.

Letters: B batch, H query heads, G key/value heads, T queries = keys (prefill from position 0), D head_dim,
d the selection dimension (the gate's d, or D for the oracle), k keys kept per row, n kept slots per row.
"""

from __future__ import annotations

import torch

from ..head_topk.naive import index_attention_reference


def selection_scores_reference(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, group: int = 1,
                               softcap: float | None = None) -> torch.Tensor:
    """The scores a row ranks its causal keys by, fp32, -inf past the row (B, H // group, T, T).

    ``group`` 1: ``a . b * scale`` per head (a softcap keeps their order and is not applied). ``group`` > 1: the
    mean over each group of ``group`` consecutive query heads of their softmax over the causal keys of
    ``a . b * scale`` (softcapped with ``softcap``), as ``attention.reference.group_scores`` combines them.
    a (B, H, T, d), b (B, H or G, T, d)."""
    bsz, h, t, _ = a.shape
    b = b.repeat_interleave(h // b.shape[1], dim=1) if b.shape[1] != h else b
    s = torch.matmul(a.float(), b.float().transpose(-1, -2)) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=a.device).tril()
    if group > 1:
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        s = p.view(bsz, h // group, group, t, t).mean(2)
    return s.masked_fill(~causal, float("-inf"))


def token_select_reference(a: torch.Tensor, b: torch.Tensor, k: int, scale: float = 1.0, group: int = 1,
                           softcap: float | None = None) -> torch.Tensor:
    """The k causal keys of largest ``selection_scores_reference`` per row, equal scores by the lower index
    (a stable sort): (B, H // group, T, k) int32 by descending score, -1 past a row's causal keys."""
    s = selection_scores_reference(a, b, scale, group, softcap)
    t = s.shape[-1]
    kk = min(k, t)
    val, idx = s.sort(dim=-1, descending=True, stable=True)
    val, idx = val[..., :kk], idx[..., :kk]
    idx = idx.masked_fill(val == float("-inf"), -1).to(torch.int32)
    if kk < k:
        idx = torch.cat((idx, idx.new_full((*idx.shape[:-1], k - kk), -1)), dim=-1)
    return idx


def gather_attention_reference(q, k, v, idx, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention of each query row over the keys ``idx`` names, in fp32: (B, H, T, D). idx (B, H, T, n)
    per head or (B, G', T, n) shared by each group of H // G' consecutive query heads (-1: none); q (B, H, T, D);
    k, v (B, G, S, D)."""
    h = q.shape[1]
    idx = idx.repeat_interleave(h // idx.shape[1], dim=1) if idx.shape[1] != h else idx
    return index_attention_reference(q, k, v, idx, scaling, softcap)
