"""Naive, obviously-correct fp32 attention pieces: masks, scores, top-k selection, masked attention.

Letters: B batch, H query heads, Hkv key/value heads, T queries, S keys, C a chunk of queries, D head_dim.
Every optimized path (chunked, Triton) must equal these.
"""

from __future__ import annotations

import torch


def allowed_keys(attention_mask: torch.Tensor | None, b: int, t: int, s: int, device: torch.device,
                 a: int = 0, e: int | None = None) -> torch.Tensor:
    """The keys query rows ``a:e`` (of T) may attend to, as bool (B, 1, C, S).

    ``attention_mask`` is what transformers hands the attention function: None (plain causal, queries at the
    last T of S positions), a bool mask (True = attend) or an additive float mask (0 = attend). Only the
    requested rows are built, so a chunked caller never holds a (T, S) mask.
    """
    e = t if e is None else e
    if attention_mask is None:
        qpos = torch.arange(s - t + a, s - t + e, device=device)[:, None]  # (C, 1)
        kpos = torch.arange(s, device=device)[None, :]  # (1, S)
        return (kpos <= qpos).expand(b, 1, e - a, s)
    mask = attention_mask[..., -t:, :s][..., a:e, :]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(b, mask.shape[1], e - a, s)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D), query head h using key head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """fp32 attention scores ``q . k * scaling`` (B, H, T, S), GQA-aware, with optional tanh softcap."""
    n_rep = q.shape[1] // k.shape[1]
    s = torch.matmul(q.float(), repeat_kv(k, n_rep).float().transpose(-1, -2)) * scaling  # (B, H, T, S)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    return s


def topk_keep(select: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k allowed keys with the largest ``select`` per query row; all allowed if fewer than k.

    select: (B, H, C, S) float; allowed: (B, 1|H, C, S) bool. Returns bool (B, H, C, S) with exactly
    min(k, allowed count) True per row.
    """
    kk = min(k, select.shape[-1])
    masked = select.float().masked_fill(~allowed, float("-inf"))
    idx = masked.topk(kk, dim=-1).indices  # (B, H, C, kk)
    keep = torch.zeros(masked.shape, dtype=torch.bool, device=select.device).scatter_(-1, idx, True)
    return keep & allowed


def group_scores(select: torch.Tensor, allowed: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Selection scores shared by the ``n_rep`` query heads of each KV group: every head gets its group's mean
    softmax of ``select`` over the allowed keys (the group's mean attention distribution for the oracle), so
    top-k of the result picks one set of keys per group. select: (B, H, C, S); allowed: (B, 1|H, C, S) bool.
    Returns (B, H, C, S) fp32 (``select`` itself when n_rep == 1)."""
    if n_rep == 1:
        return select
    p = torch.softmax(select.float().masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    b, h, c, s = p.shape
    mean = p.view(b, h // n_rep, n_rep, c, s).mean(2, keepdim=True)  # (B, Hkv, 1, C, S)
    return mean.expand(b, h // n_rep, n_rep, c, s).reshape(b, h, c, s)


def standardize_rows(g: torch.Tensor, allowed: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(G - mean_i) / std_i`` per query row over its allowed keys (population std; rows with one allowed key,
    or all-equal scores, get 0). Invariant to ``a * G + b`` for any ``a > 0`` and per-row ``b``: a gate cannot
    change its selection's strength by scaling or shifting its scores. g: (B, H, C, S); allowed: (B, 1|H, C, S)
    bool. Returns (B, H, C, S) fp32, 0 at disallowed keys, differentiable in g (mean and std included)."""
    g = g.float()
    w = allowed.to(g.dtype)  # (B, 1|H, C, S)
    n = w.sum(-1, keepdim=True).clamp_min(1.0)  # (B, 1|H, C, 1)
    mean = (g * w).sum(-1, keepdim=True) / n
    centred = (g - mean) * w
    std = (centred.pow(2).sum(-1, keepdim=True) / n + eps * eps).sqrt()
    return centred / std


def soft_topk_bias(g: torch.Tensor, allowed: torch.Tensor, k: int, tau: float, standardize: bool = False
                   ) -> torch.Tensor:
    """The soft relaxation of gate top-k used for end-to-end training (docs/absorb.md, "The soft relaxation").

    ``bias[i, j] = log sigmoid((z[i, j] - z_i(k)) / tau)`` where ``z = G`` (raw) or ``z = standardize_rows(G)``
    (``standardize``: the scores in units of their row's standard deviation, so the bias does not depend on the
    gate's scale and a gate cannot switch itself off by shrinking its scores), and ``z_i(k)`` is the k-th largest
    allowed z of row i, held constant in the backward pass; rows with at most k allowed keys get 0 (they keep
    every key under hard top-k too). Added to the attention scores, it leaves keys well above the threshold
    untouched, halves the weight of a key at the threshold and suppresses keys below it in proportion to their
    distance; as tau -> 0 it becomes the hard top-k mask. Disallowed keys get -inf.
    g: (B, H, C, S) float; allowed: (B, 1|H, C, S) bool. Returns (B, H, C, S) fp32, differentiable in g.
    """
    return soft_topk(g, allowed, k, tau, standardize)[0]


def soft_topk(g: torch.Tensor, allowed: torch.Tensor, k: int, tau: float, standardize: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``soft_topk_bias`` and the hard top-k keep mask of the same scores (as ``topk_keep(g, allowed, k)``: the
    standardized scores have the order of ``g``), from one top-k: (bias, keep), both (B, H, C, S)."""
    z = standardize_rows(g, allowed) if standardize else g.float()
    kk = min(k, z.shape[-1])
    masked = z.detach().masked_fill(~allowed, float("-inf"))
    top = masked.topk(kk, dim=-1, sorted=False)  # unsorted: the k-th largest is the least of them
    kth = top.values.min(-1, keepdim=True).values  # (B, H, C, 1)
    keep = torch.zeros(masked.shape, dtype=torch.bool, device=g.device).scatter_(-1, top.indices, True) & allowed
    full = allowed.sum(-1, keepdim=True) <= k  # (B, 1|H, C, 1): every allowed key is kept
    full = full | (kth == float("-inf"))  # a NaN score stays NaN (and shows in the loss), as with a sorted top-k
    bias = torch.nn.functional.logsigmoid((z - kth.masked_fill(full, 0.0)) / tau)
    return bias.masked_fill(full, 0.0).masked_fill(~allowed, float("-inf")), keep


def mass_outside_topk(p: torch.Tensor, select: torch.Tensor, allowed: torch.Tensor, k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mass ``p`` puts outside the top-k of ``select``, summed over the rows that have more than k
    allowed keys (the others keep every key), and the number of such rows: two 0-dim fp32 tensors, so a
    caller can average over many calls with one device sync. p, select: (B, H, C, S); allowed: (B, 1|H, C, S)."""
    return mass_outside_keep(p, topk_keep(select.detach(), allowed, k), allowed, k)


def mass_outside_keep(p: torch.Tensor, keep: torch.Tensor, allowed: torch.Tensor, k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mass_outside_topk`` from the keep mask of the top-k itself (``soft_topk`` gives it with the bias)."""
    rows = (allowed.sum(-1) > k).expand(p.shape[:-1])  # (B, H, C)
    outside = p.detach().float().masked_fill(keep, 0.0).sum(-1)  # (B, H, C)
    # masked, not indexed: a boolean index would make the host wait for the GPU at every call
    return outside.masked_fill(~rows, 0.0).sum(), rows.sum().float()


def masked_softmax(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax of ``s`` over the kept keys; rows with no kept key give zeros (no NaN). (B, H, C, S) fp32."""
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def attend(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, H, C, S) @ v (B, Hkv, S, D) -> (B, H, C, D) in fp32."""
    return torch.matmul(p, repeat_kv(v, p.shape[1] // v.shape[1]).float())
