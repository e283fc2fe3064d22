"""Distillation losses for one layer, in fp32, over the allowed (causal, unpadded, in-window) keys.

Letters: B batch, H query heads, T (or C, a chunk of) queries, S keys.

KL (the default), per query row r with allowed keys A_r, teacher p = softmax(s) and student q = softmax(G):
    KL_r = sum_{j in A_r} p_rj * (log p_rj - log q_rj)
summed here over rows; the caller divides by the number of rows (rows with no allowed key are skipped).

BCE (optional), against the oracle top-k mask M (1 on the k allowed keys with the largest s):
    BCE_r = sum_{j in A_r} -(M_rj log sigmoid(G_rj) + (1 - M_rj) log(1 - sigmoid(G_rj)))
summed over rows and keys; the caller divides by the number of rows (a per-row mean, over keys it is a sum
so that long rows are not down-weighted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.reference import topk_keep

LOSSES = ("kl", "bce")


def kl_rows(s: torch.Tensor, g: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over rows of KL(softmax(s) || softmax(g)) restricted to allowed keys, and the row count.

    s, g: (B, H, C, S); allowed: (B, 1|H, C, S) bool.
    """
    s, g = s.float(), g.float()
    neg = float("-inf")
    logp = torch.log_softmax(s.masked_fill(~allowed, neg), dim=-1)  # (B, H, C, S)
    logq = torch.log_softmax(g.masked_fill(~allowed, neg), dim=-1)
    allowed = allowed.expand_as(s)
    p = logp.exp()
    terms = torch.where(allowed, p * (logp - logq), torch.zeros((), device=s.device))  # (B, H, C, S)
    rows = allowed.any(-1)  # (B, H, C)
    return terms.sum(), int(rows.sum())


def bce_rows(s: torch.Tensor, g: torch.Tensor, allowed: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Sum over rows of the BCE of sigmoid(g) against the oracle top-k mask of s, and the row count."""
    target = topk_keep(s, allowed, k).float()  # (B, H, C, S)
    allowed = allowed.expand_as(s)
    terms = F.binary_cross_entropy_with_logits(g.float(), target, reduction="none")
    rows = allowed.any(-1)
    return torch.where(allowed, terms, torch.zeros((), device=s.device)).sum(), int(rows.sum())


def loss_rows(kind: str, s: torch.Tensor, g: torch.Tensor, allowed: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    if kind == "kl":
        return kl_rows(s, g, allowed)
    if kind == "bce":
        return bce_rows(s, g, allowed, k)
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
