"""Fused distillation loss: per-row KL(softmax(s) || softmax(g)) and its gradient to the gate, causal.

Letters: B batch, H query heads, Hkv key/value heads, T tokens, D head_dim, d gate dim.
    s[i, j] = q_i . k_j * scaling          (teacher; query head h uses key head h // (H / Hkv))
    g[i, j] = gq_i . gk_j                   (student; the gate's projections, already scaled)
    KL_i    = sum_j p_ij (s_ij - g_ij) - lse_s_i + lse_g_i,   p = softmax(s), over causal j <= i
    dKL_i/dg_ij = softmax(g)_ij - p_ij
Flash-style: the forward streams key blocks with two online softmaxes and never holds a (T, T) tensor;
the backward streams query blocks per key block, accumulates dgk locally and adds dgq atomically.
``kl_rows_reference`` is the naive fp32 twin the kernels must equal (tests hold them equal, on the CPU
through TRITON_INTERPRET=1 and on the GPU).
"""

from __future__ import annotations

import torch


try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path serves
    triton = None

def kl_rows_reference(q, k, gq, gk, scaling: float) -> torch.Tensor:
    """Per-row causal KL (B, H, T) in fp32, the obvious way."""
    t = q.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    s = torch.matmul(q.float(), k.float().repeat_interleave(n_rep, 1).transpose(-1, -2)) * scaling  # (B, H, T, T)
    g = torch.matmul(gq.float(), gk.float().transpose(-1, -2))  # (B, H, T, T)
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    logp = torch.log_softmax(s.masked_fill(future, float("-inf")), -1)
    logq = torch.log_softmax(g.masked_fill(future, float("-inf")), -1)
    return torch.where(future, 0.0, logp.exp() * (logp - logq)).sum(-1)


if triton is not None:
    NEG = tl.constexpr(-1.0e30)  # a finite "minus infinity": keeps the online softmax free of inf - inf

    @triton.jit
    def _kl_fwd(Q, K, GQ, GK, KL, LSE_S, LSE_G,
                sqb, sqh, sqt, skb, skh, skt, sgb, sgh, sgt, sob, soh,
                H, T, n_rep, scaling,
                D: tl.constexpr, DG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kh = h // n_rep
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_g = tl.arange(0, DG)
        row_ok = offs_m < T
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        gq = tl.load(GQ + b * sgb + h * sgh + offs_m[:, None] * sgt + offs_g[None, :], mask=row_ok[:, None], other=0.0)
        m_s = tl.full([BLOCK_M], NEG, tl.float32)
        l_s = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M], tl.float32)
        m_g = tl.full([BLOCK_M], NEG, tl.float32)
        l_g = tl.zeros([BLOCK_M], tl.float32)
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < T
            k = tl.load(K + b * skb + kh * skh + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            gk = tl.load(GK + b * sgb + h * sgh + offs_n[:, None] * sgt + offs_g[None, :], mask=col_ok[:, None],
                         other=0.0)
            s = tl.dot(q, tl.trans(k)) * scaling
            g = tl.dot(gq, tl.trans(gk))
            valid = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :]
            s = tl.where(valid, s, NEG)
            g = tl.where(valid, g, NEG)
            m_s_new = tl.maximum(m_s, tl.max(s, 1))
            alpha = tl.exp(m_s - m_s_new)
            e = tl.exp(s - m_s_new[:, None])
            l_s = l_s * alpha + tl.sum(e, 1)
            acc = acc * alpha + tl.sum(tl.where(valid, e * (s - g), 0.0), 1)
            m_g_new = tl.maximum(m_g, tl.max(g, 1))
            l_g = l_g * tl.exp(m_g - m_g_new) + tl.sum(tl.exp(g - m_g_new[:, None]), 1)
            m_s = m_s_new
            m_g = m_g_new
        lse_s = m_s + tl.log(l_s)
        lse_g = m_g + tl.log(l_g)
        kl = acc / l_s - lse_s + lse_g
        out = b * sob + h * soh + offs_m
        tl.store(KL + out, kl, mask=row_ok)
        tl.store(LSE_S + out, lse_s, mask=row_ok)
        tl.store(LSE_G + out, lse_g, mask=row_ok)

    @triton.jit
    def _kl_bwd(Q, K, GQ, GK, W, LSE_S, LSE_G, DGQ, DGK,
                sqb, sqh, sqt, skb, skh, skt, sgb, sgh, sgt, sob, soh,
                H, T, n_rep, scaling,
                D: tl.constexpr, DG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kh = h // n_rep
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        offs_g = tl.arange(0, DG)
        col_ok = offs_n < T
        k = tl.load(K + b * skb + kh * skh + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        gk = tl.load(GK + b * sgb + h * sgh + offs_n[:, None] * sgt + offs_g[None, :], mask=col_ok[:, None], other=0.0)
        dgk = tl.zeros([BLOCK_N, DG], tl.float32)
        lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None],
                        other=0.0)
            gq = tl.load(GQ + b * sgb + h * sgh + offs_m[:, None] * sgt + offs_g[None, :], mask=row_ok[:, None],
                         other=0.0)
            rows = b * sob + h * soh + offs_m
            lse_s = tl.load(LSE_S + rows, mask=row_ok, other=0.0)
            lse_g = tl.load(LSE_G + rows, mask=row_ok, other=0.0)
            w = tl.load(W + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scaling
            g = tl.dot(gq, tl.trans(gk))
            valid = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :] & row_ok[:, None]
            p = tl.where(valid, tl.exp(s - lse_s[:, None]), 0.0)
            qg = tl.where(valid, tl.exp(g - lse_g[:, None]), 0.0)
            dg = w[:, None] * (qg - p)  # (BLOCK_M, BLOCK_N)
            dgk += tl.dot(tl.trans(dg), gq)
            dgq = tl.dot(dg, gk)
            tl.atomic_add(DGQ + b * sgb + h * sgh + offs_m[:, None] * sgt + offs_g[None, :], dgq, mask=row_ok[:, None])
        tl.store(DGK + b * sgb + h * sgh + offs_n[:, None] * sgt + offs_g[None, :], dgk, mask=col_ok[:, None])


# Launch settings (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; benchmarks/perf.py --parts kernel
# times the alternatives on a GPU. Small windows use 16 x 16 blocks (tl.dot's minimum).
TUNING = {"fwd": (64, 64, 4, 2), "bwd": (64, 64, 4, 2)}


def _launch(kind: str, t: int) -> dict:
    bm, bn, warps, stages = TUNING[kind] if t > 64 else (16, 16, 4, 1)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, gq, gk, scaling):
        b, h, t, d = q.shape
        q, k = q.contiguous(), k.contiguous()
        gq, gk = gq.contiguous().float(), gk.contiguous().float()
        kl = torch.empty(b, h, t, device=q.device, dtype=torch.float32)  # (B, H, T)
        lse_s, lse_g = torch.empty_like(kl), torch.empty_like(kl)
        launch = _launch("fwd", t)
        grid = (triton.cdiv(t, launch["BLOCK_M"]), b * h)
        _kl_fwd[grid](q, k, gq, gk, kl, lse_s, lse_g, *q.stride()[:3], *k.stride()[:3], *gq.stride()[:3],
                      *kl.stride()[:2], h, t, h // k.shape[1], scaling, D=d, DG=gq.shape[-1], **launch)
        ctx.save_for_backward(q, k, gq, gk, lse_s, lse_g)
        ctx.scaling = scaling
        return kl

    @staticmethod
    def backward(ctx, dkl):
        q, k, gq, gk, lse_s, lse_g = ctx.saved_tensors
        b, h, t, d = q.shape
        dgq = torch.zeros_like(gq)
        dgk = torch.empty_like(gk)
        w = dkl.contiguous().float()
        launch = _launch("bwd", t)
        grid = (triton.cdiv(t, launch["BLOCK_N"]), b * h)
        _kl_bwd[grid](q, k, gq, gk, w, lse_s, lse_g, dgq, dgk, *q.stride()[:3], *k.stride()[:3], *gq.stride()[:3],
                      *lse_s.stride()[:2], h, t, h // k.shape[1], ctx.scaling, D=d, DG=gq.shape[-1], **launch)
        return None, None, dgq, dgk, None


def fused_available(q: torch.Tensor) -> bool:
    """Whether the fused path is chosen automatically: CUDA tensors with Triton installed. (On the CPU the
    kernels run only when called directly under TRITON_INTERPRET=1, as the tests do.)"""
    return triton is not None and q.is_cuda


def kl_rows_fused(q, k, gq, gk, scaling: float) -> torch.Tensor:
    """Per-row causal KL (B, H, T) fp32; differentiable in gq and gk (q, k are the frozen teacher's)."""
    return _FusedKL.apply(q, k, gq, gk, float(scaling))
