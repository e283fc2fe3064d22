"""How token-level selection scores a tile of (row, key) pairs, in Triton: shared by the counting kernel and the
writes (``triton.py``, ``bits.py``) and by the gather attention's softcap (``gather.py``). Twin: ``naive.py``'s
``selection_scores_reference``.

    ``_scores``   a (rows, d) . keys -> (rows, keys) fp32, times the scale (one tensor-core product)
    ``_capped``   the oracle's softcap, softcap * tanh(s / softcap)
    ``_row_lse``  group selection only: each query head's log-sum-exp over each row's causal keys (online)
    ``_tile``     per head, the scores; per KV group, the sum over its heads of softmax(a . b * scale); -inf where
                  a row may not look

Group scores without a softcap are computed in base 2: log2(e) is folded into the scale and into each row's
log-sum-exp, so a probability costs one multiply-add and an exp2 where it cost two multiplies, a subtraction and
an exp (which compiles to a multiply by log2(e) and an exp2). The values are the same up to rounding.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)  # constexpr: a global a kernel reads
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _capped(s, softcap, SOFTCAP: tl.constexpr):
        if SOFTCAP:
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # tanh
        return s

    @triton.jit
    def _scores(a, bbase, cols, sbt, scale, T, DS: tl.constexpr, IEEE: tl.constexpr):
        # a (rows, DS) . keys cols -> (rows, NC) fp32; the key tile loaded as (DS, NC), the product's right operand
        offs_d = tl.arange(0, DS)
        kb = tl.load(bbase + cols[None, :] * sbt + offs_d[:, None], mask=(cols < T)[None, :], other=0.0)
        if IEEE:
            return tl.dot(a, kb, input_precision="ieee") * scale
        return tl.dot(a, kb) * scale

    @triton.jit
    def _base2(a, bbase, cols, sbt, scale, softcap, T, DS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
        # a head's (softcapped) scores times log2(e): folded into the scale where there is no softcap
        if SOFTCAP:
            return _capped(_scores(a, bbase, cols, sbt, scale, T, DS, IEEE), softcap, True) * LOG2E
        return _scores(a, bbase, cols, sbt, scale * LOG2E, T, DS, IEEE)

    @triton.jit
    def _row_lse(A, Bk, LSE, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b, scale, softcap,
                 DS: tl.constexpr, NC: tl.constexpr, BLOCK_M: tl.constexpr, SOFTCAP: tl.constexpr,
                 IEEE: tl.constexpr):
        # One program: BLOCK_M rows of one query head; log-sum-exp of its (softcapped) scores over causal keys,
        # summed in base 2, stored in base e
        bh = tl.program_id(1)
        bz, h = bh // H, bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        offs_d = tl.arange(0, DS)
        a = tl.load(A + bz * sab + h * sah + rows[:, None] * sat + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        bbase = Bk + bz * sbb + (h // n_rep_b) * sbh
        end = tl.minimum((tl.program_id(0) + 1) * BLOCK_M, T)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, end, NC):  # the first tile holds key 0, which every row sees: m is finite after it
            cols = start + tl.arange(0, NC)
            s = _base2(a, bbase, cols, sbt, scale, softcap, T, DS, SOFTCAP, IEEE)
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < T)[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
        tl.store(LSE + bh * T + rows, (m + tl.log2(l)) * LN2, mask=row_ok)

    @triton.jit
    def _tile(A, Bk, LSE, a, bz, g, rows, row_ok, start, row0, cols, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b, scale,
              softcap, DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, NC: tl.constexpr):
        # the selection scores of the block's rows at keys cols (from start), (BLOCK_M, NC) fp32, -inf where a row
        # may not look: only a tile that reaches the block's first row, row0, needs the causal mask
        if GROUP == 1:
            s = _scores(a, Bk + bz * sbb + (g // n_rep_b) * sbh, cols, sbt, scale, T, DS, IEEE)
        else:  # the group's summed softmax probabilities, exp2 of base-2 scores less base-2 log-sum-exps
            offs_d = tl.arange(0, DS)
            s = tl.zeros([BLOCK_M, NC], tl.float32)
            for i in tl.static_range(GROUP):
                h = g * GROUP + i
                ai = tl.load(A + bz * sab + h * sah + rows[:, None] * sat + offs_d[None, :], mask=row_ok[:, None],
                             other=0.0)
                si = _base2(ai, Bk + bz * sbb + (h // n_rep_b) * sbh, cols, sbt, scale, softcap, T, DS, SOFTCAP, IEEE)
                lse = tl.load(LSE + (bz * H + h) * T + rows, mask=row_ok, other=0.0) * LOG2E
                s += tl.exp2(si - lse[:, None])
        if start + NC > row0:
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < T)[None, :], s, float("-inf"))
        return s
