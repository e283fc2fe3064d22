"""Block-sparse selection and attention, the naive fp32 twins of the Triton kernels (``triton.py``).

Letters: B batch, H query heads, G key/value heads (KV groups), T queries, S keys, D head_dim, d gate dim,
b the block size, NB key blocks, NQ query blocks, n selected blocks per query block. Queries sit at absolute
positions q_offset .. q_offset + T - 1 and belong to the block of their position.
"""

from __future__ import annotations

import torch


def n_blocks(k: int, block: int) -> int:
    """Blocks selected per query block for a budget of k keys (the diagonal block included)."""
    return max(1, -(-k // block))


def query_blocks(q_offset: int, t: int, block: int) -> torch.Tensor:
    """Absolute block index of each of the T queries at positions q_offset .. q_offset + T - 1, (T,) long."""
    return torch.arange(q_offset, q_offset + t) // block


def pool_bound(gq: torch.Tensor, gk: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block summaries for an upper bound of the block's largest gate score (per channel min and max, as
    Quest does): max_j gq . gk_j <= sum_c max(gq_c max_j gk_jc, gq_c min_j gk_jc) = [gq+, gq-] . [kmax, kmin].
    Returns (B, H, T, 2d) queries and (B, H, NB, 2d) block keys, so the bound is one dot product."""
    b, h, s, d = gk.shape
    nb = -(-s // block)
    pad = nb * block - s
    kmax = torch.nn.functional.pad(gk, (0, 0, 0, pad), value=float("-inf")).view(b, h, nb, block, d).amax(3)
    kmin = torch.nn.functional.pad(gk, (0, 0, 0, pad), value=float("inf")).view(b, h, nb, block, d).amin(3)
    return torch.cat((gq.clamp(min=0), gq.clamp(max=0)), -1), torch.cat((kmax, kmin), -1)


def _candidates(q_offset: int, t: int, nb: int, block: int, device) -> torch.Tensor:
    """(T, NB) bool: key block j is a candidate for the query at q_offset + t when it lies before t's block."""
    return torch.arange(nb, device=device)[None, :] < query_blocks(q_offset, t, block).to(device)[:, None]


def _sum_rows_into_blocks(p: torch.Tensor, q_offset: int, block: int) -> torch.Tensor:
    """(B, H, T, NB) per-query masses -> (B, H, NQ, NB) summed over each query block's rows (fp32)."""
    qb = query_blocks(q_offset, p.shape[2], block).to(p.device)
    qb = qb - qb[0]
    out = torch.zeros(*p.shape[:2], int(qb[-1]) + 1, p.shape[3], dtype=torch.float32, device=p.device)
    return out.index_add_(2, qb, p.float())


def block_mass_reference(gq: torch.Tensor, gkp: torch.Tensor, block: int, q_offset: int = 0) -> torch.Tensor:
    """Per-head gate mass of each candidate key block, summed over each query block: (B, H, NQ, NB) fp32.

    gq (B, H, T, d') gate-query summaries at positions q_offset..; gkp (B, H, NB, d') block summaries
    (``pool_bound``). For each query: softmax over its candidate blocks of gq . gkp; non-candidates get 0."""
    t, nb = gq.shape[2], gkp.shape[2]
    s = torch.matmul(gq.float(), gkp.float().transpose(-1, -2))  # (B, H, T, NB)
    cand = _candidates(q_offset, t, nb, block, gq.device)
    p = torch.softmax(s.masked_fill(~cand, float("-inf")), -1).nan_to_num(0.0)
    return _sum_rows_into_blocks(p, q_offset, block)


def block_mass_from_probs(p: torch.Tensor, q_offset: int, block: int) -> torch.Tensor:
    """Exact per-head mass of each candidate key block from per-token probabilities p (B, H, T, S):
    (B, H, NQ, NB) fp32, the oracle's block scores. Callers chunk the queries and add the results to bound
    memory (``OracleSelector.block_mass``)."""
    b, h, t, s = p.shape
    nb = -(-s // block)
    per_key_block = torch.nn.functional.pad(p.float(), (0, nb * block - s)).view(b, h, t, nb, block).sum(-1)
    per_key_block = per_key_block.masked_fill(~_candidates(q_offset, t, nb, block, p.device), 0.0)
    return _sum_rows_into_blocks(per_key_block, q_offset, block)


def group_sum(mass: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, NQ, NB) per-head masses -> (B, G, NQ, NB): one score per KV group (sum over its heads)."""
    b, h, nq, nb = mass.shape
    return mass.view(b, groups, h // groups, nq, nb).sum(2)


def select_blocks(mass: torch.Tensor, n: int, q_offset: int, block: int) -> torch.Tensor:
    """The selected key blocks of each query block, (B, G, NQ, min(n - 1, NB) + 1) int32: the n - 1 candidate
    blocks with the largest mass, then the diagonal block; -1 where a query block has fewer than n - 1 earlier
    blocks (always after the valid ones). A NaN mass counts as 0, so every candidate stays a valid choice.

    mass: (B, G, NQ, NB) with NQ the query blocks of queries q_offset.. (first one q_offset // block)."""
    b, g, nq, nb = mass.shape
    qb = torch.arange(nq, device=mass.device) + q_offset // block  # absolute query block
    diag = qb.to(torch.int32).view(1, 1, nq, 1).expand(b, g, nq, 1)
    kk = min(n - 1, nb)
    if kk <= 0:
        return diag.contiguous()
    cand = torch.arange(nb, device=mass.device)[None, :] < qb[:, None]  # (NQ, NB)
    masked = mass.float().nan_to_num(nan=0.0).masked_fill(~cand, float("-inf"))
    top = masked.topk(kk, dim=-1)
    idx = top.indices.to(torch.int32).masked_fill(~torch.isfinite(top.values), -1)
    return torch.cat((idx, diag), dim=-1).contiguous()


def block_keep(idx: torch.Tensor, block: int, s: int, q_offset: int, n_rep: int, a: int = 0,
               e: int | None = None, t: int | None = None) -> torch.Tensor:
    """Keys kept by the selection for query rows a:e, bool (B, H, C, S) (causality is not applied here).

    idx: (B, G, NQ, n) from ``select_blocks``; query row r sits at position q_offset + r."""
    bsz, g, nq, n = idx.shape
    e = (t if t is not None else nq * block) if e is None else e
    nb = -(-s // block)
    sel = torch.zeros(bsz, g, nq, nb + 1, dtype=torch.bool, device=idx.device)
    sel.scatter_(-1, idx.long().masked_fill(idx < 0, nb), True)  # -1 lands in a spare column
    qb = query_blocks(q_offset, e, block)[a:].to(idx.device)
    qb = qb - q_offset // block
    rows = sel[:, :, qb, :nb]  # (B, G, C, NB)
    keep = rows.repeat_interleave(block, dim=-1)[..., :s]  # (B, G, C, S)
    return keep.repeat_interleave(n_rep, dim=1)


def block_attention_reference(q, k, v, idx, block: int, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of each query over the keys of its block's selection, fp32 (B, H, T, D), the obvious
    way (a (T, S) matrix per head). Queries sit at the last T of S positions."""
    t, s_len = q.shape[2], k.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    s = torch.matmul(q.float(), k.float().repeat_interleave(n_rep, 1).transpose(-1, -2)) * scaling  # (B, H, T, S)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    keep = block_keep(idx, block, s_len, s_len - t, n_rep, t=t)
    causal = torch.arange(s_len, device=q.device)[None, :] <= torch.arange(s_len - t, s_len, device=q.device)[:, None]
    p = torch.softmax(s.masked_fill(~(keep & causal), float("-inf")), -1).nan_to_num(0.0)
    return torch.matmul(p, v.float().repeat_interleave(n_rep, 1))
