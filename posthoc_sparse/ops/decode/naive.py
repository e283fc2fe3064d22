"""Gated top-k attention for one decoding query per sequence, the naive fp32 twins of ``triton.py``.

Letters: B batch, H query heads, G key/value heads (a KV group is the H / G query heads of one), Hs heads of the
selection keys (H for a "hidden" gate's own keys, G when selecting by the model's keys: the oracle, the folded
"qk" gate), S cached keys, D head_dim, ds the selection dim, R selection rows (H per head, G per KV group),
k kept keys per row.

    scores   sel[b, h, j] = softcap(sq[b, h] . sk[b, h // (H / Hs), j] * sel_scale), -inf where key j is not valid
    group    (per-KV-group selection) the group's mean over its heads of softmax(sel) over the valid keys
    top-k    the k valid keys of largest score per row (all valid keys when fewer), torch.topk
    attend   softmax over the kept keys of softcap(q . k_j * scaling), times v; GQA: head h reads KV head h // (H / G)
"""

from __future__ import annotations

import torch


def _softcap(s: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(s / cap) * cap if cap else s


def decode_scores_reference(sq: torch.Tensor, sk: torch.Tensor, valid: torch.Tensor | None, sel_scale: float = 1.0,
                            sel_softcap: float | None = None, groups: int | None = None) -> torch.Tensor:
    """Selection scores (B, R, S) fp32: per query head (R = H, ``groups`` None), or per KV group (R = ``groups``).
    sq (B, H, ds); sk (B, Hs, S, ds); valid (B, S) bool or None (every key valid)."""
    h, hs = sq.shape[1], sk.shape[1]
    keys = sk.float().repeat_interleave(h // hs, dim=1)  # (B, H, S, ds)
    sel = _softcap(torch.einsum("bhd,bhsd->bhs", sq.float(), keys) * sel_scale, sel_softcap)
    if valid is not None:
        sel = sel.masked_fill(~valid[:, None, :], float("-inf"))
    if groups is None:
        return sel
    p = torch.softmax(sel, dim=-1)  # (B, H, S)
    mean = p.unflatten(1, (groups, h // groups)).mean(2)  # (B, G, S)
    return mean if valid is None else mean.masked_fill(~valid[:, None, :], float("-inf"))


def decode_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k keys of largest finite score per row of ``scores`` (B, R, S): (B, R, k) int32 by descending score,
    -1 past a row's valid keys."""
    kk = min(k, scores.shape[-1])
    val, idx = scores.topk(kk, dim=-1)
    idx = idx.masked_fill(val == float("-inf"), -1).to(torch.int32)
    return torch.cat((idx, idx.new_full((*idx.shape[:2], k - kk), -1)), dim=-1)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scaling: float,
                               softcap: float | None = None) -> torch.Tensor:
    """q (B, H, D) attending over the keys ``idx`` (B, R, n) names (-1: none; R = H, or G with one set per KV
    group); k, v (B, G, S, D). Returns (B, 1, H, D) fp32, the layout transformers' attention functions return."""
    bsz, h, _ = q.shape
    g, s_len = k.shape[1], k.shape[2]
    sets = idx.long().repeat_interleave(h // idx.shape[1], dim=1)  # (B, H, n)
    keep = torch.zeros(bsz, h, s_len + 1, dtype=torch.bool, device=q.device)
    keep.scatter_(-1, sets.masked_fill(sets < 0, s_len), True)  # -1 -> a spare column, dropped
    kk, vv = (t.float().repeat_interleave(h // g, dim=1) for t in (k, v))  # (B, H, S, D)
    s = _softcap(torch.einsum("bhd,bhsd->bhs", q.float(), kk) * scaling, softcap)
    p = torch.softmax(s.masked_fill(~keep[..., :s_len], float("-inf")), dim=-1)
    return torch.einsum("bhs,bhsd->bhd", p, vv).unsqueeze(1)  # (B, 1, H, D)


def gated_decode_reference(sq, sk, q, k, v, valid, top_k: int, scaling: float, softcap: float | None = None,
                           sel_scale: float = 1.0, sel_softcap: float | None = None, group: bool = False
                           ) -> torch.Tensor:
    """Score, select the top ``top_k`` (per head, or per KV group with ``group``), attend: (B, 1, H, D) fp32."""
    sel = decode_scores_reference(sq, sk, valid, sel_scale, sel_softcap, k.shape[1] if group else None)
    return decode_attention_reference(q, k, v, decode_topk_reference(sel, top_k), scaling, softcap)
