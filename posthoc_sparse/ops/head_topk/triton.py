"""Triton kernels of per-head deployed top-k (the method's selection): each query row of each head keeps
the k causal keys with the largest selection scores, then attends to exactly those keys.

Letters: B batch, H query heads, G key/value heads, T queries = keys (prefill from position 0), D head_dim,
d the selection dimension (the gate's d, or D for the oracle), k keys kept per row.

Two kernels, each with a naive twin in ``naive.py``:

    ``head_topk``        per (head, block of rows): a lower bound of each row's k-th largest score
                         ``a . b * scale`` (the k-th largest of the maxima of NC interleaved key classes), the
                         keys at or above it collected (about k of them) and ranked against each other. Scores
                         travel packed with their key index in sortable int64 words (score bits above, the
                         complement of the index below, so equal scores keep the lower index). No sorting
                         network: a bisection, comparisons and prefix sums. Returns the kept indices
                         (B, H, T, k) int32, -1 where a row has fewer than k keys. No (T, T) tensor.
    ``index_attention``  attention of each row over its kept keys (gathered by index, online softmax), GQA-aware.

The kernels are tested against their twins on the CPU through TRITON_INTERPRET=1, and on the GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None

# Launch settings (rows per program, warps) of each kernel; benchmarks/perf.py --parts head_tuning times others.
TUNING = {"topk_rows": 16, "topk_warps": 4, "attn_rows": 32, "attn_warps": 4}


if triton is not None:
    MIN_WORD = tl.constexpr(-(2**63))

    @triton.jit
    def _program_rows(H, T, BLOCK_M: tl.constexpr):
        # program (row block, batch x head) -> batch, head, their flat index, the block's rows and which exist
        bh = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        return bh // H, bh % H, bh, rows, rows < T

    @triton.jit
    def _mono(s):
        # fp32 -> int64 of the same order: the bits as a signed int32, negative floats' magnitude bits flipped
        bits = s.to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)

    @triton.jit
    def _packed(s, cols):
        # sortable words ordered as (score, -index): the score's order above the complement of the column
        return (_mono(s) << 32) | (4294967295 - cols.to(tl.int64))

    @triton.jit
    def _scores(a, bbase, cols, sbt, scale, T, DS: tl.constexpr, IEEE: tl.constexpr):
        offs_d = tl.arange(0, DS)
        kb = tl.load(bbase + cols[:, None] * sbt + offs_d[None, :], mask=(cols < T)[:, None], other=0.0)
        if IEEE:
            return tl.dot(a, tl.trans(kb), input_precision="ieee") * scale
        return tl.dot(a, tl.trans(kb)) * scale

    @triton.jit
    def _kth_largest(m, k):
        # per row of m (rows, n) int64 mono values: the k-th largest, by bisection over the int32 range
        # (invariant: at least k values >= lo, fewer than k >= hi)
        lo = tl.full([m.shape[0]], -2147483648, tl.int64)
        hi = tl.full([m.shape[0]], 2147483648, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            ok = tl.sum((m >= mid[:, None]).to(tl.int32), 1) >= k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        return lo

    @triton.jit
    def _head_topk(A, B, IDX, CAND, sab, sah, sat, sbb, sbh, sbt, sib, sih, sit,
                   H, T, n_rep, scale, k,
                   DS: tl.constexpr, NC: tl.constexpr, C: tl.constexpr, RC: tl.constexpr, BLOCK_M: tl.constexpr,
                   IEEE: tl.constexpr):
        # One program: BLOCK_M query rows of one head; sweeps over their causal keys, no sorting.
        # 1. Class maxima: key j belongs to class j mod NC; each row keeps the largest score of each class (an
        #    elementwise max per tile). The k-th largest class maximum L (bisection over the row's NC values)
        #    is a lower bound of the row's k-th largest score: k keys of distinct classes reach it.
        # 2. Candidates: the keys scoring at least L, as packed words, into the row's C slots of CAND.
        # 3. Each candidate's rank (how many candidates beat it, by pairwise comparison); rank < k is kept and
        #    written at its rank, so rows come out by descending score, equal scores by lower index.
        # A block where some row has more than C candidates (many equal or crowded scores) instead finds each
        # row's k-th largest score by bisection over all its keys (32 sweeps), then keeps the keys above it and
        # the lowest-index keys equal to it.
        b, h, bh, rows, row_ok = _program_rows(H, T, BLOCK_M)
        offs_d = tl.arange(0, DS)
        a = tl.load(A + b * sab + h * sah + rows[:, None] * sat + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        bbase = B + b * sbb + (h // n_rep) * sbh
        out = IDX + b * sib + h * sih + rows * sit
        end = tl.minimum((tl.program_id(0) + 1) * BLOCK_M, T)  # causal: no key past the block's last row
        cmax = tl.full([BLOCK_M, NC], float("-inf"), tl.float32)
        for start in range(0, end, NC):
            cols = start + tl.arange(0, NC)
            s = _scores(a, bbase, cols, sbt, scale, T, DS, IEEE)
            cmax = tl.maximum(cmax, tl.where(cols[None, :] <= rows[:, None], s, float("-inf")))
        low = _kth_largest(_mono(cmax), k)
        cbase = CAND + (bh * T + rows) * C  # (B, H, T, C) contiguous
        count = tl.zeros([BLOCK_M], tl.int32)
        for start in range(0, end, NC):
            cols = start + tl.arange(0, NC)
            s = _scores(a, bbase, cols, sbt, scale, T, DS, IEEE)
            keep = (cols[None, :] <= rows[:, None]) & (_mono(s) >= low[:, None]) & row_ok[:, None]
            pos = count[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
            tl.store(cbase[:, None] + pos, _packed(s, cols[None, :]), mask=keep & (pos < C))
            count += tl.sum(keep.to(tl.int32), 1)
        jk = tl.arange(0, C)
        tl.store(out[:, None] + jk[None, :], -1, mask=row_ok[:, None] & (jk[None, :] >= count[:, None])
                 & (jk[None, :] < k))  # rows with fewer than k keys
        if tl.max(count, 0) <= C:
            tl.debug_barrier()  # the candidates other threads stored
            word = tl.load(cbase[:, None] + jk[None, :], mask=jk[None, :] < count[:, None], other=MIN_WORD)
            rank = tl.zeros([BLOCK_M, C], tl.int32)
            for c0 in range(0, C, RC):
                jc = c0 + tl.arange(0, RC)
                other = tl.load(cbase[:, None] + jc[None, :], mask=jc[None, :] < count[:, None], other=MIN_WORD)
                rank += tl.sum((other[:, None, :] > word[:, :, None]).to(tl.int32), 2)
            col = (4294967295 - (word & 4294967295)).to(tl.int32)
            tl.store(out[:, None] + rank, col, mask=(jk[None, :] < count[:, None]) & (rank < k))
        else:
            lo = tl.full([BLOCK_M], -2147483648, tl.int64)
            hi = tl.full([BLOCK_M], 2147483648, tl.int64)
            for _ in range(32):
                mid = (lo + hi) >> 1
                n_at_least = tl.zeros([BLOCK_M], tl.int32)
                for start in range(0, end, NC):
                    cols = start + tl.arange(0, NC)
                    s = _scores(a, bbase, cols, sbt, scale, T, DS, IEEE)
                    hit = (cols[None, :] <= rows[:, None]) & (_mono(s) >= mid[:, None])
                    n_at_least += tl.sum(hit.to(tl.int32), 1)
                ok = n_at_least >= k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            above = tl.zeros([BLOCK_M], tl.int32)  # keys strictly above the k-th largest score
            for start in range(0, end, NC):
                cols = start + tl.arange(0, NC)
                s = _scores(a, bbase, cols, sbt, scale, T, DS, IEEE)
                above += tl.sum(((cols[None, :] <= rows[:, None]) & (_mono(s) > lo[:, None])).to(tl.int32), 1)
            quota = k - above  # keys equal to it to keep, the lowest indices first
            equal = tl.zeros([BLOCK_M], tl.int32)
            kept = tl.zeros([BLOCK_M], tl.int32)
            for start in range(0, end, NC):
                cols = start + tl.arange(0, NC)
                s = _scores(a, bbase, cols, sbt, scale, T, DS, IEEE)
                causal = cols[None, :] <= rows[:, None]
                eq = causal & (_mono(s) == lo[:, None])
                eq_rank = equal[:, None] + tl.cumsum(eq.to(tl.int32), 1) - 1
                keep = (causal & (_mono(s) > lo[:, None])) | (eq & (eq_rank < quota[:, None]))
                pos = kept[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
                tl.store(out[:, None] + pos, cols[None, :].to(tl.int32) + tl.zeros([BLOCK_M, NC], tl.int32),
                         mask=keep & row_ok[:, None])
                equal += tl.sum(eq.to(tl.int32), 1)
                kept += tl.sum(keep.to(tl.int32), 1)

    @triton.jit
    def _index_attn_fwd(Q, K, V, IDX, O, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sib, sih, sit,
                        sob, soh, sot, H, T, n_rep, k, scaling, softcap,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, SOFTCAP: tl.constexpr):
        # One program: BLOCK_M rows of one head; each row gathers its own k keys, one per step.
        b, h, _, rows, row_ok = _program_rows(H, T, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0).to(tl.float32)
        kbase = K + b * skb + (h // n_rep) * skh
        vbase = V + b * svb + (h // n_rep) * svh
        sel = IDX + b * sib + h * sih + rows * sit
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for j in range(0, k):
            idx = tl.load(sel + j, mask=row_ok, other=-1)
            ok = idx >= 0
            pos = tl.where(ok, idx, 0)
            kj = tl.load(kbase + pos[:, None] * skt + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q * kj, 1) * scaling
            if SOFTCAP:
                s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # tanh
            s = tl.where(ok, s, -1.0e30)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            p = tl.where(ok, tl.exp(s - m_new), 0.0)
            vj = tl.load(vbase + pos[:, None] * svt + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            l = l * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vj
            m = m_new
        out = acc / tl.maximum(l, 1e-30)[:, None]
        tl.store(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])


def head_topk(a: torch.Tensor, b: torch.Tensor, k: int, scale: float = 1.0) -> torch.Tensor:
    """Triton twin of ``head_topk_reference`` (the same sets where scores are distinct; of equal scores the
    lower indices). a (B, H, T, d) and b (B, H or G, T, d) in one dtype, last dimensions contiguous. Rows come
    out by descending score, except in blocks that took the exact fallback (key order)."""
    bsz, h, t, ds = a.shape
    c = 2 * max(16, triton.next_power_of_2(k))  # candidate slots per row
    idx = torch.empty(bsz, h, t, k, dtype=torch.int32, device=a.device)
    cand = torch.empty(bsz, h, t, c, dtype=torch.int64, device=a.device)
    rows = TUNING["topk_rows"]
    _head_topk[(triton.cdiv(t, rows), bsz * h)](
        a, b, idx, cand, *a.stride()[:3], *b.stride()[:3], *idx.stride()[:3], h, t, h // b.shape[1], float(scale),
        k, DS=ds, NC=256, C=c, RC=8, BLOCK_M=rows, IEEE=a.dtype == torch.float32, num_warps=TUNING["topk_warps"])
    return idx


def index_attention(q, k, v, idx, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Triton twin of ``index_attention_reference``; forward only. Returns (B, T, H, D) in q's dtype, the layout
    transformers' attention functions return."""
    bsz, h, t, d = q.shape
    out = torch.empty(bsz, t, h, d, dtype=q.dtype, device=q.device)
    rows = TUNING["attn_rows"]
    _index_attn_fwd[(triton.cdiv(t, rows), bsz * h)](
        q, k, v, idx, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:3],
        out.stride(0), out.stride(2), out.stride(1), h, t, h // k.shape[1], idx.shape[-1], float(scaling),
        float(softcap or 1.0), D=d, BLOCK_M=rows, SOFTCAP=bool(softcap), num_warps=TUNING["attn_warps"])
    return out
