"""Triton kernel of attention over each row's kept keys, gathered by index (the twin of ``naive.py``'s
``gather_attention_reference``); letters as in ``triton.py``.

    ``_gather_attn_fwd`` attention of each row over its kept keys, KT gathered keys per step (online softmax);
                        the query heads that share an index set (a KV group under group selection) are stacked
                        in one program, so their gathers hit the same addresses.
"""

from __future__ import annotations

import torch

from .triton import TUNING

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None


if triton is not None:
    from .scores import _capped

    @triton.jit
    def _gather_attn_fwd(Q, K, V, IDX, O, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sib, sih, sit,
                         sob, soh, sot, HI, T, n_rep_kv, n_rep_idx, n, scaling, softcap,
                         D: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, KT: tl.constexpr,
                         SOFTCAP: tl.constexpr):
        # One program: BLOCK_M rows of the n_rep_idx query heads that share one index set, stacked (HP the
        # next power of two); KT kept keys per row and step.
        bz, ih = tl.program_id(1) // HI, tl.program_id(1) % HI
        r = tl.arange(0, HP * BLOCK_M)
        hh = r // BLOCK_M
        t = tl.program_id(0) * BLOCK_M + r % BLOCK_M
        h = ih * n_rep_idx + hh
        ok = (hh < n_rep_idx) & (t < T)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + bz * sqb + h[:, None] * sqh + t[:, None] * sqt + offs_d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)
        kbase = K + bz * skb + (h // n_rep_kv) * skh
        vbase = V + bz * svb + (h // n_rep_kv) * svh
        sel = IDX + bz.to(tl.int64) * sib + ih.to(tl.int64) * sih + t.to(tl.int64) * sit  # T x k can pass 2**31
        m = tl.full([HP * BLOCK_M], -1.0e30, tl.float32)
        l = tl.zeros([HP * BLOCK_M], tl.float32)
        acc = tl.zeros([HP * BLOCK_M, D], tl.float32)
        for j0 in range(0, n, KT):
            jj = j0 + tl.arange(0, KT)
            idx = tl.load(sel[:, None] + jj[None, :], mask=ok[:, None] & (jj[None, :] < n), other=-1)
            valid = idx >= 0
            pos = tl.where(valid, idx, 0)
            kj = tl.load(kbase[:, None, None] + pos[:, :, None] * skt + offs_d[None, None, :],
                         mask=valid[:, :, None], other=0.0).to(tl.float32)
            s = _capped(tl.sum(q[:, None, :] * kj, 2) * scaling, softcap, SOFTCAP)
            s = tl.where(valid, s, -1.0e30)
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.where(valid, tl.exp(s - m_new[:, None]), 0.0)
            vj = tl.load(vbase[:, None, None] + pos[:, :, None] * svt + offs_d[None, None, :],
                         mask=valid[:, :, None], other=0.0).to(tl.float32)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vj, 1)
            m = m_new
        out = acc / tl.maximum(l, 1e-30)[:, None]
        tl.store(O + bz * sob + h[:, None] * soh + t[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=ok[:, None])


def gather_attention(q, k, v, idx, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Triton twin of ``gather_attention_reference``; forward only. idx (B, H or G', T, n): per head, or shared
    by groups of H // G' query heads. Returns (B, T, H, D) in q's dtype, the layout transformers' attention
    functions return."""
    bsz, h, t, d = q.shape
    n_rep_idx = h // idx.shape[1]
    hp = triton.next_power_of_2(n_rep_idx)
    rows = max(1, TUNING["attn_rows"] // hp)
    out = torch.empty(bsz, t, h, d, dtype=q.dtype, device=q.device)
    _gather_attn_fwd[(triton.cdiv(t, rows), bsz * idx.shape[1])](
        q, k, v, idx, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:3],
        out.stride(0), out.stride(2), out.stride(1), idx.shape[1], t, h // k.shape[1], n_rep_idx, idx.shape[-1],
        float(scaling), float(softcap or 1.0), D=d, HP=hp, BLOCK_M=rows, KT=TUNING["attn_keys"],
        SOFTCAP=bool(softcap), num_warps=TUNING["attn_warps"])
    return out
