"""Triton kernels of the distillation KL per causal query row, and its gradient to the gate.

Letters: B batch, H query heads, Hkv key/value heads, T tokens, D head_dim, d gate dim.
    s[i, j] = q_i . k_j * scaling          (teacher; query head h uses key head h // (H / Hkv))
    g[i, j] = gq_i . gk_j                   (student; the gate's projections, already scaled)
    KL_i    = sum_j p_ij (s_ij - g_ij) - lse_s_i + lse_g_i,   p = softmax(s), over causal j <= i
    dKL_i/dg_ij = softmax(g)_ij - p_ij
Flash-style, never a (T, T) tensor. Two kernels, both one program per (query block, head), heaviest blocks
first; only the diagonal key block is causally masked:
    _kl_fwd   streams key blocks with online softmaxes: the rows' lse_g, and with TEACHER also lse_s and KL;
    _kl_grad  given both lse, streams key blocks once more: p and softmax(g) tile by tile, dgq accumulated
              in the program, dgk added atomically, and with WITH_KL the rows' sum_j p (s - g).
Distillation calls ``kl_grad_fused`` with the teacher's lse from the model's own attention forward
(ops.attention_lse), so a layer costs a gate-only lse pass and one gradient pass that also yields the KL.
``naive.kl_rows_reference`` is the twin (tests hold them equal, through TRITON_INTERPRET=1 on the CPU and on
the GPU).
"""

from __future__ import annotations

import torch

from .naive import ROW_BLOCK

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None


if triton is not None:
    NEG = tl.constexpr(-1.0e30)  # a finite "minus infinity": keeps the online softmax free of inf - inf
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _query_block(ROWS, b, srb, SAMPLED: tl.constexpr, SUB: tl.constexpr):
        # this program's query block: the longest rows first; with SAMPLED, sub-block (program % SUB) of the
        # sampled ROW_BLOCK-row block ROWS[b, program // SUB] (each row of ROWS sorted longest first)
        if SAMPLED:
            i = tl.program_id(0)
            return tl.load(ROWS + b * srb + i // SUB) * SUB + i % SUB
        else:
            return tl.num_programs(0) - 1 - tl.program_id(0)

    @triton.jit
    def _fwd_tile(q, gq, offs_m, start_n, K, GK, k_base, gk_base, skt, sgt, T, qk_scale,
                  m_s, l_s, acc, m_g, l_g,
                  D: tl.constexpr, DG: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  TEACHER: tl.constexpr):
        # one key block of the online softmaxes, in log2 units (exp2); MASK only on the diagonal block
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col = offs_n[:, None] < T
        gk = tl.load(GK + gk_base + offs_n[:, None] * sgt + tl.arange(0, DG)[None, :], mask=col, other=0.0)
        g = tl.dot(gq, tl.trans(gk)) * LOG2E
        if MASK:
            valid = offs_n[None, :] <= offs_m[:, None]
            g = tl.where(valid, g, NEG)
        m_g_new = tl.maximum(m_g, tl.max(g, 1))
        l_g = l_g * tl.exp2(m_g - m_g_new) + tl.sum(tl.exp2(g - m_g_new[:, None]), 1)
        if TEACHER:
            k = tl.load(K + k_base + offs_n[:, None] * skt + tl.arange(0, D)[None, :], mask=col, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if MASK:
                s = tl.where(valid, s, NEG)
            m_s_new = tl.maximum(m_s, tl.max(s, 1))
            alpha = tl.exp2(m_s - m_s_new)
            e = tl.exp2(s - m_s_new[:, None])
            l_s = l_s * alpha + tl.sum(e, 1)
            diff = s - g
            if MASK:
                diff = tl.where(valid, diff, 0.0)
            acc = acc * alpha + tl.sum(e * diff, 1)
            m_s = m_s_new
        return m_s, l_s, acc, m_g_new, l_g

    @triton.jit
    def _kl_fwd(Q, K, GQ, GK, KL, LSE_S, LSE_G, ROWS,
                sqb, sqh, sqt, skb, skh, skt, sgb, sgh, sgt, sob, soh, srb,
                H, T, n_rep, scaling,
                D: tl.constexpr, DG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                TEACHER: tl.constexpr, SAMPLED: tl.constexpr, SUB: tl.constexpr):
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        pid_m = _query_block(ROWS, b, srb, SAMPLED, SUB)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row = offs_m[:, None] < T
        k_base = b * skb + (h // n_rep) * skh
        gk_base = b * sgb + h * sgh
        gq = tl.load(GQ + gk_base + offs_m[:, None] * sgt + tl.arange(0, DG)[None, :], mask=row, other=0.0)
        q = gq
        if TEACHER:
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + tl.arange(0, D)[None, :], mask=row, other=0.0)
        qk_scale = scaling * LOG2E
        m_s = tl.full([BLOCK_M], NEG, tl.float32)
        l_s = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M], tl.float32)
        m_g = tl.full([BLOCK_M], NEG, tl.float32)
        l_g = tl.zeros([BLOCK_M], tl.float32)
        diag = pid_m * BLOCK_M
        for start_n in range(0, diag, BLOCK_N):
            m_s, l_s, acc, m_g, l_g = _fwd_tile(q, gq, offs_m, start_n, K, GK, k_base, gk_base, skt, sgt, T,
                                                qk_scale, m_s, l_s, acc, m_g, l_g, D, DG, BLOCK_N, False, TEACHER)
        for start_n in range(diag, tl.minimum(diag + BLOCK_M, T), BLOCK_N):
            m_s, l_s, acc, m_g, l_g = _fwd_tile(q, gq, offs_m, start_n, K, GK, k_base, gk_base, skt, sgt, T,
                                                qk_scale, m_s, l_s, acc, m_g, l_g, D, DG, BLOCK_N, True, TEACHER)
        out = b * sob + h * soh + offs_m
        row_ok = offs_m < T
        lse_g = (m_g + tl.log2(l_g)) / LOG2E
        tl.store(LSE_G + out, lse_g, mask=row_ok)
        if TEACHER:
            lse_s = (m_s + tl.log2(l_s)) / LOG2E
            tl.store(LSE_S + out, lse_s, mask=row_ok)
            tl.store(KL + out, acc / l_s / LOG2E - lse_s + lse_g, mask=row_ok)

    @triton.jit
    def _grad_tile(q, gq, gq_d, lse_s, lse_g, w, offs_m, start_n, K, GK, DGK, k_base, gk_base, skt, sgt, T,
                   qk_scale, dgq, acc,
                   D: tl.constexpr, DG: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                   WITH_KL: tl.constexpr, SEM: tl.constexpr):
        # one key block: p and softmax(g) from the rows' lse (log2 units), dg = w (softmax(g) - p)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_g = tl.arange(0, DG)
        col = offs_n[:, None] < T
        k = tl.load(K + k_base + offs_n[:, None] * skt + tl.arange(0, D)[None, :], mask=col, other=0.0)
        gk = tl.load(GK + gk_base + offs_n[:, None] * sgt + offs_g[None, :], mask=col, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        g = tl.dot(gq, tl.trans(gk)) * LOG2E
        p = tl.exp2(s - lse_s[:, None])
        qg = tl.exp2(g - lse_g[:, None])
        if MASK:
            valid = offs_n[None, :] <= offs_m[:, None]
            p = tl.where(valid, p, 0.0)
            qg = tl.where(valid, qg, 0.0)
        if WITH_KL:
            acc += tl.sum(p * (s - g), 1)
        dg = (w[:, None] * (qg - p)).to(gq_d.dtype)
        dgq += tl.dot(dg, gk.to(gq_d.dtype))
        tl.atomic_add(DGK + gk_base + offs_n[:, None] * sgt + offs_g[None, :], tl.dot(tl.trans(dg), gq_d), mask=col,
                      sem=SEM)
        return dgq, acc

    @triton.jit
    def _kl_grad(Q, K, GQ, GK, LSE_S, LSE_G, KL, DGQ, DGK, ROWS,
                 sqb, sqh, sqt, skb, skh, skt, sgb, sgh, sgt, sob, soh, sdb, sdh, sdt, srb,
                 H, T, n_rep, scaling, w_all,
                 D: tl.constexpr, DG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WITH_KL: tl.constexpr, LOW: tl.constexpr, SAMPLED: tl.constexpr,
                 SUB: tl.constexpr, SEM: tl.constexpr):
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        pid_m = _query_block(ROWS, b, srb, SAMPLED, SUB)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_g = tl.arange(0, DG)
        row_ok = offs_m < T
        row = row_ok[:, None]
        k_base = b * skb + (h // n_rep) * skh
        gk_base = b * sgb + h * sgh
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + tl.arange(0, D)[None, :], mask=row, other=0.0)
        gq = tl.load(GQ + gk_base + offs_m[:, None] * sgt + offs_g[None, :], mask=row, other=0.0)
        rows = b * sob + h * soh + offs_m
        # rows past T get lse = 1e30: their p and softmax(g) are exactly 0
        lse_s = tl.load(LSE_S + rows, mask=row_ok, other=1.0e30) * LOG2E
        lse_g = tl.load(LSE_G + rows, mask=row_ok, other=1.0e30) * LOG2E
        w = tl.where(row_ok, w_all, 0.0)  # one weight for every row
        # the gradient products run in bf16 when LOW (the flash-backward habit), else in fp32 (tf32 on a GPU)
        if LOW:
            gq_d = gq.to(tl.bfloat16)
        else:
            gq_d = gq.to(tl.float32)
        qk_scale = scaling * LOG2E
        dgq = tl.zeros([BLOCK_M, DG], tl.float32)
        acc = tl.zeros([BLOCK_M], tl.float32)
        diag = pid_m * BLOCK_M
        for start_n in range(0, diag, BLOCK_N):
            dgq, acc = _grad_tile(q, gq, gq_d, lse_s, lse_g, w, offs_m, start_n, K, GK, DGK, k_base, gk_base, skt,
                                  sgt, T, qk_scale, dgq, acc, D, DG, BLOCK_N, False, WITH_KL, SEM)
        for start_n in range(diag, tl.minimum(diag + BLOCK_M, T), BLOCK_N):
            dgq, acc = _grad_tile(q, gq, gq_d, lse_s, lse_g, w, offs_m, start_n, K, GK, DGK, k_base, gk_base, skt,
                                  sgt, T, qk_scale, dgq, acc, D, DG, BLOCK_N, True, WITH_KL, SEM)
        tl.store(DGQ + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_g[None, :], dgq, mask=row)
        if WITH_KL:
            tl.store(KL + rows, acc / LOG2E - lse_s / LOG2E + lse_g / LOG2E, mask=row_ok)


# Launch settings (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, with BLOCK_M a multiple of BLOCK_N:
# "fwd" the teacher-and-gate forward, "lse" the gate-only forward, "grad" the gradient pass; "low" runs the
# gradient products in bf16; "sem" is the memory order of the gradient pass's atomic adds to dgk (only their sum
# at the kernel's end is read, so "relaxed" suffices). benchmarks/perf.py --parts kernel times the alternatives
# on a GPU. Small windows use 16 x 16 blocks (tl.dot's minimum).
TUNING = {"fwd": (64, 64, 4, 2), "lse": (64, 64, 4, 2), "grad": (128, 128, 8, 2), "low": True, "sem": "relaxed"}


def _launch(kind: str, t: int, dtype: torch.dtype) -> dict:
    bm, bn, warps, stages = TUNING[kind] if t > 64 else (16, 16, 4, 1)
    if dtype == torch.float32 and bm * bn > 64 * 64:  # fp32 tiles: twice the shared memory of half ones
        bm, bn, warps, stages = 64, 64, 4, 2
    if bm % bn:
        raise ValueError(f"KL kernel launch {kind}: BLOCK_M {bm} must be a multiple of BLOCK_N {bn}")
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}



def _grid(t: int, bh: int, block_m: int, row_blocks: torch.Tensor | None):
    """The launch grid and the sampling arguments: every query block, or the sub-blocks of the sampled ones
    (``row_blocks`` (m,) for every sequence of the batch, or (B, m) one row per sequence)."""
    if row_blocks is None:
        return (triton.cdiv(t, block_m), bh), {"SAMPLED": False, "SUB": 1}
    if ROW_BLOCK % block_m:
        raise ValueError(f"KL kernel launch: BLOCK_M {block_m} must divide the sampling block {ROW_BLOCK}")
    sub = ROW_BLOCK // block_m
    return (row_blocks.shape[-1] * sub, bh), {"SAMPLED": True, "SUB": sub}


def _row_stride(row_blocks: torch.Tensor | None) -> int:
    return row_blocks.stride(0) if row_blocks is not None and row_blocks.dim() == 2 else 0


def _forward(q, k, gq, gk, scaling, teacher: bool, row_blocks=None):
    """(kl, lse_s, lse_g), each (B, H, T) fp32; without ``teacher`` only lse_g is written. With ``row_blocks``
    only those rows are written (the KL of the others is 0)."""
    b, h, t, d = q.shape
    kl = (torch.empty if row_blocks is None else torch.zeros)(b, h, t, device=q.device, dtype=torch.float32)
    lse_s, lse_g = torch.empty_like(kl), torch.empty_like(kl)
    launch = _launch("fwd" if teacher else "lse", t, q.dtype)
    grid, sampling = _grid(t, b * h, launch["BLOCK_M"], row_blocks)
    _kl_fwd[grid](q, k, gq, gk, kl, lse_s, lse_g, kl if row_blocks is None else row_blocks, *q.stride()[:3],
                  *k.stride()[:3], *gq.stride()[:3], *kl.stride()[:2], _row_stride(row_blocks), h, t,
                  h // k.shape[1], scaling, D=d,
                  DG=gq.shape[-1], TEACHER=teacher, **sampling, **launch)
    return kl, lse_s, lse_g


def _gradient(q, k, gq, gk, w, lse_s, lse_g, scaling, with_kl: bool, row_blocks=None):
    """The gradients (2, B, H, T, d) fp32 ([0] to gq, [1] to gk) of w times the rows' summed KL (w a float), and
    the rows' KL when ``with_kl`` (else None). With ``row_blocks`` only those rows take part (the others' KL is 0)."""
    b, h, t, d = q.shape
    dg2 = torch.zeros((2, *gq.shape), device=q.device, dtype=torch.float32)  # [0] dgq, [1] dgk
    dgq, dgk = dg2[0], dg2[1]
    kl = (torch.empty_like(lse_s) if row_blocks is None else torch.zeros_like(lse_s)) if with_kl else lse_s
    launch = _launch("grad", t, q.dtype)
    low = bool(TUNING["low"]) and q.is_cuda
    grid, sampling = _grid(t, b * h, launch["BLOCK_M"], row_blocks)
    _kl_grad[grid](q, k, gq, gk, lse_s, lse_g, kl, dgq, dgk,
                   kl if row_blocks is None else row_blocks, *q.stride()[:3], *k.stride()[:3], *gq.stride()[:3],
                   *lse_s.stride()[:2], *dgq.stride()[:3], _row_stride(row_blocks), h, t, h // k.shape[1], scaling,
                   float(w),
                   D=d, DG=gq.shape[-1], WITH_KL=with_kl, LOW=low, SEM=TUNING["sem"], **sampling,
                   **launch)
    return dg2, (kl if with_kl else None)


def _prepare(q, k, gq, gk, lse=None):
    """Contiguous inputs; gq and gk keep a half dtype only together with a half q (else fp32)."""
    half = q.dtype in (torch.float16, torch.bfloat16) and gq.dtype == q.dtype and gk.dtype == q.dtype
    dt = q.dtype if half else torch.float32
    out = [q.contiguous(), k.contiguous(), gq.detach().contiguous().to(dt), gk.detach().contiguous().to(dt)]
    return out + ([None] if lse is None else [lse.detach().float().contiguous()])



def kl_grad_fused(q, k, gq, gk, scaling: float, weight: float, lse_s: torch.Tensor | None = None,
                  row_blocks: torch.Tensor | None = None):
    """The rows' KL (B, H, T) fp32 and the gradient dg (2, B, H, T, d) fp32 of ``weight * KL.sum()`` ([0] to gq,
    [1] to gk), without autograd. q (B, H, T, D), k (B, Hkv, T, D), gq and gk (B, H, T, d).

    ``lse_s`` (B, H, T): the teacher's log-sum-exp, as a flash forward returns it (then no teacher pass runs).
    ``row_blocks``: int32 indices of the ``ROW_BLOCK``-row query blocks that take part, None for all; the
    other rows' KL is 0 and they add no gradient."""
    q, k, gq, gk, lse_s = _prepare(q, k, gq, gk, lse_s)
    w = float(weight)
    if lse_s is None:
        kl, lse_s, lse_g = _forward(q, k, gq, gk, scaling, teacher=True, row_blocks=row_blocks)
        dg2, _ = _gradient(q, k, gq, gk, w, lse_s, lse_g, scaling, with_kl=False, row_blocks=row_blocks)
    else:
        _, _, lse_g = _forward(q, k, gq, gk, scaling, teacher=False, row_blocks=row_blocks)
        dg2, kl = _gradient(q, k, gq, gk, w, lse_s, lse_g, scaling, with_kl=True, row_blocks=row_blocks)
    return kl, dg2

