"""Fused distillation loss: per-row KL(softmax(s) || softmax(g)) and its gradient to the gate, causal.

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
Distillation calls ``kl_grad_fused`` with the teacher's lse taken from the model's own attention forward
(``flash_attention_lse``: no teacher pass of its own), so a layer costs a gate-only lse pass and one gradient
pass that also yields the KL; without it the forward computes lse_s. ``gate_rope`` applies a "hidden" gate's
rotary embedding (and takes gradients back through it). ``kl_rows_fused`` is the autograd form (forward, then
the gradient pass as backward). ``kl_rows_reference`` is the naive fp32 twin all of them must equal (tests
hold them equal, on the CPU through TRITON_INTERPRET=1 and on the GPU).
"""

from __future__ import annotations

import math

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
    def _kl_grad(Q, K, GQ, GK, W, LSE_S, LSE_G, KL, DGQ, DGK, ROWS,
                 sqb, sqh, sqt, skb, skh, skt, sgb, sgh, sgt, sob, soh, sdb, sdh, sdt, srb,
                 H, T, n_rep, scaling, w_all,
                 D: tl.constexpr, DG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WITH_KL: tl.constexpr, LOW: tl.constexpr, ROW_W: tl.constexpr, SAMPLED: tl.constexpr,
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
        if ROW_W:  # a weight per row (autograd's upstream gradient), else w_all for every row
            w = tl.load(W + rows, mask=row_ok, other=0.0)
        else:
            w = tl.where(row_ok, w_all, 0.0)
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


    @triton.jit
    def _gate_rope(A, G, C, S, F, sab, sat, sah, sg0, sgb, sgh, sgt, scb, sct, n_tab, per_f, H, T, scale,
                   HALF: tl.constexpr, BLOCK_T: tl.constexpr, ROPE: tl.constexpr, INVERSE: tl.constexpr):
        # A: the raw projection (B, T, 2H, d) (queries in heads 0..H-1, keys after); G: (2, B, H, T, d); C, S:
        # the model's rotary tables (n_tab, T, rotary_dim) (sequence b uses b % n_tab), of which the gate uses
        # columns F (sequence b uses row b // per_f of F, (rows, d/2)).
        # Forward: G = rotary(A) * scale. INVERSE: A = rotary^T(G) * scale, the gradient through the rotation.
        pid_t = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // (2 * H)
        h2 = bh % (2 * H)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.arange(0, HALF)
        m = offs_t[:, None] < T
        a = A + b * sab + h2 * sah + offs_t[:, None] * sat + offs_c[None, :]
        g = G + (h2 // H) * sg0 + b * sgb + (h2 % H) * sgh + offs_t[:, None] * sgt + offs_c[None, :]
        src, dst = (g, a) if INVERSE else (a, g)
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        if ROPE:
            tab = (b % n_tab) * scb + offs_t[:, None] * sct + tl.load(F + (b // per_f) * HALF + offs_c)[None, :]
            c = tl.load(C + tab, mask=m, other=0.0).to(tl.float32)
            s = tl.load(S + tab, mask=m, other=0.0).to(tl.float32)
            if INVERSE:
                s = -s
            x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
        tl.store(dst, (x1 * scale).to(dst.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * scale).to(dst.dtype.element_ty), mask=m)


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


ROW_BLOCK = 128  # rows are sampled (``row_blocks``) in blocks of this many consecutive query positions


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
    """The gradients (2, B, H, T, d) fp32 ([0] to gq, [1] to gk) for row weights w (B, H, T), or one weight for
    all rows (a float), and the rows' KL when ``with_kl`` (else None). With ``row_blocks`` only those rows take
    part (the KL of the others is 0)."""
    b, h, t, d = q.shape
    dg2 = torch.zeros((2, *gq.shape), device=q.device, dtype=torch.float32)  # [0] dgq, [1] dgk
    dgq, dgk = dg2[0], dg2[1]
    kl = (torch.empty_like(lse_s) if row_blocks is None else torch.zeros_like(lse_s)) if with_kl else lse_s
    launch = _launch("grad", t, q.dtype)
    low = bool(TUNING["low"]) and q.is_cuda
    grid, sampling = _grid(t, b * h, launch["BLOCK_M"], row_blocks)
    row_w = isinstance(w, torch.Tensor)
    _kl_grad[grid](q, k, gq, gk, w if row_w else lse_s, lse_s, lse_g, kl, dgq, dgk,
                   kl if row_blocks is None else row_blocks, *q.stride()[:3], *k.stride()[:3], *gq.stride()[:3],
                   *lse_s.stride()[:2], *dgq.stride()[:3], _row_stride(row_blocks), h, t, h // k.shape[1], scaling,
                   0.0 if row_w else float(w),
                   D=d, DG=gq.shape[-1], WITH_KL=with_kl, LOW=low, ROW_W=row_w, SEM=TUNING["sem"], **sampling,
                   **launch)
    return dg2, (kl if with_kl else None)


def _prepare(q, k, gq, gk, lse=None):
    """Contiguous inputs; gq and gk keep a half dtype only together with a half q (else fp32)."""
    half = q.dtype in (torch.float16, torch.bfloat16) and gq.dtype == q.dtype and gk.dtype == q.dtype
    dt = q.dtype if half else torch.float32
    out = [q.contiguous(), k.contiguous(), gq.detach().contiguous().to(dt), gk.detach().contiguous().to(dt)]
    return out + ([None] if lse is None else [lse.detach().float().contiguous()])


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, gq, gk, scaling):
        q, k, gq_c, gk_c, _ = _prepare(q, k, gq, gk)
        kl, lse_s, lse_g = _forward(q, k, gq_c, gk_c, scaling, teacher=True)
        ctx.save_for_backward(q, k, gq_c, gk_c, lse_s, lse_g)
        ctx.scaling = scaling
        ctx.dtypes = (gq.dtype, gk.dtype)
        return kl

    @staticmethod
    def backward(ctx, dkl):
        q, k, gq, gk, lse_s, lse_g = ctx.saved_tensors
        dg2, _ = _gradient(q, k, gq, gk, dkl.contiguous().float(), lse_s, lse_g, ctx.scaling, with_kl=False)
        return None, None, dg2[0].to(ctx.dtypes[0]), dg2[1].to(ctx.dtypes[1]), None


def fused_available(q: torch.Tensor) -> bool:
    """Whether the fused path is chosen automatically: CUDA tensors with Triton installed. (On the CPU the
    kernels run only when called directly under TRITON_INTERPRET=1, as the tests do.)"""
    return triton is not None and q.is_cuda


def kl_rows_fused(q, k, gq, gk, scaling: float) -> torch.Tensor:
    """Per-row causal KL (B, H, T) fp32; differentiable in gq and gk (q, k are the frozen teacher's)."""
    return _FusedKL.apply(q, k, gq, gk, float(scaling))


def kl_grad_fused(q, k, gq, gk, scaling: float, weight: float, lse_s: torch.Tensor | None = None,
                  row_blocks: torch.Tensor | None = None):
    """The rows' KL (B, H, T) fp32 and the gradient of ``weight * KL.sum()`` to gq and gk, without autograd.

    ``lse_s`` (B, H, T): the teacher's log-sum-exp of q . k * scaling over causal keys, as a flash forward
    returns it; given, no teacher pass runs before the gradient pass. ``row_blocks``: int32 indices of the
    ``ROW_BLOCK``-row query blocks that take part (``sample_row_blocks``), None for every row; the KL of the
    other rows is 0 and they add nothing to the gradient. Returns (kl, dg) with dg the gradients as one
    (2, B, H, T, d) fp32 tensor, [0] to gq and [1] to gk."""
    q, k, gq, gk, lse_s = _prepare(q, k, gq, gk, lse_s)
    w = float(weight)
    if lse_s is None:
        kl, lse_s, lse_g = _forward(q, k, gq, gk, scaling, teacher=True, row_blocks=row_blocks)
        dg2, _ = _gradient(q, k, gq, gk, w, lse_s, lse_g, scaling, with_kl=False, row_blocks=row_blocks)
    else:
        _, _, lse_g = _forward(q, k, gq, gk, scaling, teacher=False, row_blocks=row_blocks)
        dg2, kl = _gradient(q, k, gq, gk, w, lse_s, lse_g, scaling, with_kl=True, row_blocks=row_blocks)
    return kl, dg2


def sample_row_blocks(n: int, t: int, fraction: float, generator: torch.Generator) -> torch.Tensor | None:
    """For each of ``n`` layers, a uniform random choice of ceil(fraction * nb) of the nb ``ROW_BLOCK``-row
    query blocks of a T-token window, as (n, m) int32 on the generator's device, each row sorted longest
    blocks first; None when that is every block (``fraction`` 1, or a short window)."""
    nb = -(-t // ROW_BLOCK)
    m = max(1, math.ceil(fraction * nb - 1e-9))
    if m >= nb:
        return None
    keys = torch.rand(n, nb, generator=generator, device=generator.device)
    return keys.argsort(1)[:, :m].sort(1, descending=True).values.to(torch.int32)


def flash_lse_ok(q, k, v, mask, softcap, dropout: float, kwargs: dict) -> bool:
    """Whether ``flash_attention_lse`` computes this attention call exactly as the model's own SDPA call would:
    CUDA half precision, plain causal prefill (no mask, no soft-capping, no sliding window or sink logits), no
    dropout, head dims flash supports."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and mask is None and softcap is None and not dropout and q.shape[2] == k.shape[2] > 1
            and q.shape[-1] == k.shape[-1] == v.shape[-1] <= 256 and q.shape[-1] % 8 == 0
            and kwargs.get("sliding_window") is None and kwargs.get("s_aux") is None
            and kwargs.get("is_causal", True) is not False)


def flash_attention_lse(q, k, v, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention that also returns the rows' log-sum-exp: (out (B, T, H, D), lse (B, H, T) fp32).

    Runs the kernels SDPA dispatches to for the model's own forward, through their ATen ops, which return the
    log-sum-exp they compute anyway: cuDNN attention where it takes the call (SDPA's choice on Hopper; 1.8x
    faster than flash attention there at T = 4096), else flash attention. Key/value heads fewer than query heads
    (GQA) are passed as they are, as SDPA's enable_gqa does."""
    key = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1])
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if (_CUDNN_OK.get(key, True) and torch.backends.cuda.cudnn_sdp_enabled()
            and not (capturing and not CUDNN_IN_CAPTURE)):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                          scale=scaling)[:2]
            _CUDNN_OK[key] = True
            return out.transpose(1, 2).contiguous(), lse.reshape(q.shape[:3])
        except RuntimeError:  # cuDNN (or this build) does not take the shape: flash attention does
            if capturing:  # the capture is spoiled: StepGraphs retries it with CUDNN_IN_CAPTURE = False
                raise
            _CUDNN_OK[key] = False
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scaling)[:2]
    return out.transpose(1, 2).contiguous(), lse[..., :q.shape[2]]


_CUDNN_OK: dict = {}  # (device, dtype, heads, kv heads, head dim) -> whether cuDNN attention took the call
CUDNN_IN_CAPTURE = True  # whether a CUDA-graph capture may use cuDNN attention (False: the flash-attention op
# serves while a stream captures; distill.loop.StepGraphs retries a failed capture so)


def gate_rope(a: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, freq_idx: torch.Tensor,
              g: torch.Tensor | None = None, inverse: bool = False, scale: float = 1.0) -> torch.Tensor:
    """The rotary embedding of a "hidden" gate's raw projection ``a`` (B, T, 2H, d) (``LayerGate.hidden_projection``):
    ``cos``, ``sin`` are the model's tables (1 or B, T, rotary_dim) (None: no rotation) and ``freq_idx`` (d/2,)
    the columns the gate uses (``LayerGate.freq_idx``). Writes one (2, B, H, T, d) buffer: [0] the gate queries,
    [1] the gate keys, each contiguous, in a's dtype. With ``inverse`` it runs backwards: the gradient ``g``
    (2, B, H, T, d) taken back through the rotation into ``a`` (overwritten and returned). Outputs are multiplied
    by ``scale``. ``LayerGate._rope`` is the reference.

    Several layers at once: ``a`` holds L layers' batches one after the other (L * B sequences), the tables
    serve every layer (sequence i uses table i % their batch) and ``freq_idx`` is (L, d/2), one row a layer."""
    b, t, h2, d = a.shape
    h = h2 // 2
    if a.stride(-1) != 1:
        raise ValueError("the projection's last dimension must be contiguous")
    if g is None:
        g = torch.empty(2, b, h, t, d, dtype=a.dtype, device=a.device)
    rope = cos is not None and freq_idx.numel() > 0
    if rope:
        if cos.shape[-2] != t or b % cos.shape[0]:
            raise ValueError(f"rotary tables of shape {tuple(cos.shape)} do not fit {b} sequences of {t} positions")
        cos, sin = cos.contiguous(), sin.contiguous()
        freq_idx = freq_idx.to(a.device).contiguous()
        per_f = b // freq_idx.shape[0] if freq_idx.dim() == 2 else b
    else:
        cos = sin = freq_idx = a  # unused
        per_f = b
    block_t = 64
    _gate_rope[(triton.cdiv(t, block_t), b * h2)](a, g, cos, sin, freq_idx, a.stride(0), a.stride(1), a.stride(2),
                                                  *g.stride()[:4], cos.stride(0), cos.stride(-2),
                                                  cos.shape[0] if rope else 1, per_f, h, t, float(scale),
                                                  HALF=d // 2, BLOCK_T=block_t, ROPE=rope, INVERSE=inverse,
                                                  num_warps=4)
    return a if inverse else g
