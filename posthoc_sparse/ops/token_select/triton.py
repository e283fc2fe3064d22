"""Triton kernels of token-level top-k selection for any k, per head or per KV group, and of attention over the
selected keys. No (T, T) tensor: scores are recomputed from the selection query and key at every sweep.

Letters: B batch, H query heads, G key/value heads, T queries = keys (prefill from position 0), D head_dim, d the
selection dimension (the gate's d, or D for the oracle), k keys kept per row.

Two kernels, twins in ``naive.py`` (a tile's scores, and group selection's log-sum-exp pass: ``scores.py``):

    ``_token_bracket``  per (head or group, block of rows), threshold selection by counting, no sorting:
                        (1) one sweep for each row's least and largest score, the bracket [lo, hi) of its k-th
                        largest, and a normal guess at it (the mean and variance of its scores; per group of
                        every fourth tile's and the diagonal tile's); (2) counting sweeps, each testing R candidate
                        thresholds (around the guess first, then spread over the bracket in the monotone int
                        order of fp32, ``head_topk``'s ``_mono``), a byte each, one ``tl.sum`` per 4, until at most
                        BAND keys lie in the bracket (or it holds one value, or exactly k keys lie at or above lo).
    ``_token_write``    (3) a last sweep writes the keys at or above hi (all kept) by a running offset per row,
                        and the band's keys either directly (all when they fit, or the lowest indices when they
                        all tie) or as packed words (score above, complement of the index below) to a BAND-slot
                        scratch, ranked afterwards (``bits.py``: the bitmask write without running offsets).
                        Exactly min(k, causal keys) per row, equal scores by lower index, in key order. Group
                        selection scores a key by the sum over its heads of softmax(a . b * scale).

The attention over the kept keys by gathering them is in ``gather.py``; over key tiles, ``ops.mask_attention``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None

# Launch settings. select (the counting kernel, _token_bracket): rows per program, keys per tile (at most 128),
# candidate thresholds per counting sweep (2, 4 or 8), band slots ranked (a power of two), warps, ranking chunk (band
# slots each ranking step compares at once), whether a row's first sweep guesses (a normal guess at its k-th score),
# the guess's innermost thresholds, in sds of the row's scores (the others 4, 16 and 64 times as far out), and which
# tiles its moments take, per head and per group (every n-th before the diagonal, 1: all; a group's moments take a
# logarithm a score: every fourth tile saved 5.6 of 27.2 ms at T = 32768, a head's guess lost more sweeps than the
# moments cost, docs/data/sweep-probe-h200-32k-moments.json). write
# (_token_write): rows, keys per tile, warps. bits: the bitmask's write, "offsets" (_token_write), "reduce" (bits.py)
# or "auto" (reduce per group, and per head from bits_reduce_head_from keys), its rows, keys, warps, and how it puts
# band keys (words, extract: best first, atomic, rows). attn (gather.py): rows, keys, warps. The defaults come from
# sm_90 compiles on the CPU (benchmarks/hopper.py, docs/data/kernel-registers-sm90*.json) and H200 timings at T = 8192
# and 32768, k = 2048 (docs/data/perf-h200-prefill-topk-*.json; docs/performance.md, "Token-level prefill at any
# k"): 64 x 64 at 4 warps and 4 thresholds a sweep the fastest counting launch (4 beat 8: 6.64 against 7.60 ms per
# head at 8192), the write's launches within 2% of each other, band words ahead of atomic slots and those ahead of
# best first; the guess cut the counting sweeps on SmolLM2 (docs/data/selection-structure-smollm2.json).
TUNING = {"select_rows": 64, "select_keys": 64, "select_cands": 4, "select_band": 64, "select_warps": 4,
          "select_rank_chunk": 1, "select_guess": True, "select_guess_step": 0.02, "select_moments_every": 1,
          "select_moments_every_group": 4,
          "write_rows": 16, "write_keys": 64, "write_warps": 4,
          "bits_kernel": "auto", "bits_rows": 64, "bits_keys": 64, "bits_warps": 4, "bits_reduce_head_from": 8192,
          "bits_band": "words", "attn_rows": 16, "attn_keys": 8, "attn_warps": 8}


if triton is not None:
    from ..head_topk.triton import MIN_WORD, _mono, _packed
    from .scores import _row_lse, _tile

    @triton.jit
    def _unmono(m):
        # int64 of _mono's order (in the int32 range) -> the fp32 it stands for (_mono's bit flip is an involution)
        m32 = m.to(tl.int32)
        return (m32 ^ ((m32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

    @triton.jit
    def _upper_quantile(p):
        # z with P(N(0, 1) > z) = p, p in (0, 1): Abramowitz and Stegun 26.2.23 (error below 4.5e-4)
        q = tl.where(p <= 0.5, p, 1.0 - p)
        t = tl.sqrt(-2.0 * tl.log(q))
        z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1.0 + 1.432788 * t + 0.189269 * t * t
                                                                 + 0.001308 * t * t * t)
        return tl.where(p <= 0.5, z, -z)

    @triton.jit
    def _cands(lo, hi, gc, sd, mode, step, R: tl.constexpr, LOG: tl.constexpr):
        # (rows, R) int64 candidates in _mono order, in [lo, hi), rising. mode 1 (a row's first sweep): around its
        # guessed k-th largest score gc, at gc + step sd x (+-1, 4, 16, 64) (the first R of them; of the log of the
        # scores with LOG); mode 2 / 3 (the guess missed above / below): all R further out on that side, at step sd x
        # 4 ** (R / 2), 4 ** (R / 2 + 1), ...; clamped to the bracket. Mode 0: evenly spread over the bracket
        r = tl.arange(0, R)[None, :]
        j = 2 * r - (R - 1)
        sym = tl.exp2(((tl.abs(j) - 1) // 2).to(tl.float32) * 2.0) * tl.where(j < 0, -1.0, 1.0)
        up = tl.exp2((R // 2 + r).to(tl.float32) * 2.0)
        down = -tl.exp2((R // 2 + R - 1 - r).to(tl.float32) * 2.0)
        m = tl.where(mode[:, None] == 1, sym, tl.where(mode[:, None] == 2, up, down))
        v = gc[:, None] + step * sd[:, None] * m
        if LOG:
            v = tl.exp(v)
        guess = tl.minimum(tl.maximum(_mono(v), lo[:, None]), hi[:, None] - 1)
        even = lo[:, None] + ((hi - lo)[:, None] * (r.to(tl.int64) + 1)) // (R + 1)
        return tl.where(mode[:, None] == 0, even, guess)

    @triton.jit
    def _block(A, sab, sah, sat, G, T, DS: tl.constexpr, BLOCK_M: tl.constexpr):
        # a program's rows (the last row blocks, with the most keys, launched first), its batch and head or group,
        # the rows' selection queries (the group's first head's) and the end of their causal keys
        rb = tl.num_programs(0) - 1 - tl.program_id(0)
        bz, g = tl.program_id(1) // G, tl.program_id(1) % G
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        offs_d = tl.arange(0, DS)
        a = tl.load(A + bz * sab + g * sah + rows[:, None] * sat + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        return rb, bz, g, rows, row_ok, a, tl.minimum((rb + 1) * BLOCK_M, T)  # causal: no key past the last row

    @triton.jit
    def _token_bracket(A, Bk, LSE, BR, SWEEPS, sab, sah, sat, sbb, sbh, sbt, H, G, T, n_rep_b, scale, softcap, k,
                       guess_step, DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, NC: tl.constexpr, R: tl.constexpr, BAND: tl.constexpr,
                       GUESS: tl.constexpr, EVERY: tl.constexpr):
        # One program: BLOCK_M rows of one head (GROUP 1) or one group of GROUP query heads; the last row
        # blocks (the most keys) are launched first. Invariant per row: at least k causal keys score >= lo
        # (cnt_lo of them; all, at the start), fewer than k score >= hi (cnt_hi), thresholds as _mono ints
        # compared through the fp32 they stand for. Stores each row's lo, hi, cnt_lo, cnt_hi to BR (B x G, T, 4).
        rb, bz, g, rows, row_ok, a, end = _block(A, sab, sah, sat, G, T, DS, BLOCK_M)
        # 1. the bracket: each row's least and largest score; with GUESS, the mean and variance of its scores (of
        # their log under group selection: probabilities) for a normal guess at its k-th largest
        smin = tl.full([BLOCK_M], float("inf"), tl.float32)
        smax = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s1 = tl.zeros([BLOCK_M], tl.float32)
        s2 = tl.zeros([BLOCK_M], tl.float32)
        full = (rb * BLOCK_M // NC) * NC  # the tiles wholly before the block's first row: no causal mask
        nf = tl.zeros([BLOCK_M], tl.float32)  # the scores the moments took: every EVERY-th tile's, the diagonal's
        ns = tl.zeros([BLOCK_M], tl.float32)  # per group, the causal keys of those tiles (some of p = 0)
        for start in range(0, end, NC):
            cols = start + tl.arange(0, NC)
            s = _tile(A, Bk, LSE, a, bz, g, rows, row_ok, start, rb * BLOCK_M, cols, sab, sah, sat, sbb, sbh, sbt,
                      H, T, n_rep_b, scale, softcap, DS, GROUP, SOFTCAP, IEEE, BLOCK_M, NC)
            smax = tl.maximum(smax, tl.max(s, 1))
            moments = ((start // NC) % EVERY == 0) | (start + NC > rb * BLOCK_M)
            if GROUP == 1 and start < full:  # only the tests a tile needs: fewer operations a score
                smin = tl.minimum(smin, tl.min(s, 1))
                if GUESS and moments:  # a head's scores there: all finite
                    s1, s2, nf = s1 + tl.sum(s, 1), s2 + tl.sum(s * s, 1), nf + NC
            else:
                smin = tl.minimum(smin, tl.min(tl.where(s == float("-inf"), float("inf"), s), 1))
                if GUESS and moments:
                    fin = s > (float("-inf") if GROUP == 1 else 0.0)
                    f = tl.where(fin, s if GROUP == 1 else tl.log(tl.where(fin, s, 1.0)), 0.0)
                    s1 += tl.sum(f, 1)
                    s2 += tl.sum(f * f, 1)
                    nf += tl.sum(fin.to(tl.float32), 1)
                    if GROUP > 1:
                        ns += tl.sum((s > float("-inf")).to(tl.float32), 1)
        lo = _mono(smin)
        hi = _mono(tl.where(smax == 0.0, 0.0, smax)) + 1  # past -0.0 and +0.0 alike: they compare equal
        nf = tl.maximum(nf, 1.0)
        mu = s1 / nf
        sd = tl.sqrt(tl.maximum(s2 / nf - mu * mu, 0.0))
        # k of the row's keys (per group, of those with p > 0: as many as the sampled tiles' share of them)
        keys = (rows + 1).to(tl.float32) * (nf / tl.maximum(ns, 1.0) if GROUP > 1 else 1.0)
        gc = mu + sd * _upper_quantile(tl.minimum(tl.maximum(k / keys, 1e-6), 1.0 - 1e-6))
        cnt_lo = rows + 1  # every causal key scores at least the least
        cnt_hi = tl.zeros([BLOCK_M], tl.int32)
        # 2. counting sweeps, R candidates each, until at most BAND keys lie in [lo, hi)
        rr = tl.arange(0, R)
        active = row_ok & (cnt_lo > k) & (hi - lo > 1) & (cnt_lo - cnt_hi > BAND)
        sweeps = rb * 0  # an int32 scalar, carried by the loop
        mode = tl.full([BLOCK_M], 1 if GUESS else 0, tl.int32)  # _cands: guess, then out past a miss, then even
        while tl.max(active.to(tl.int32), 0) > 0:
            sweeps += 1
            # each candidate's count per row, three to an int64 in 21-bit fields (R <= 9, T < 2**21): per tile a
            # compare and a row sum per candidate, in the tile's own layout (no (rows, keys, R) tensor)
            cand = _cands(lo, hi, gc, sd, mode, guess_step, R, GROUP > 1)
            p0 = tl.zeros([BLOCK_M], tl.int64)
            p1 = tl.zeros([BLOCK_M], tl.int64)
            p2 = tl.zeros([BLOCK_M], tl.int64)
            for start in range(0, end, NC):
                cols = start + tl.arange(0, NC)
                s = _tile(A, Bk, LSE, a, bz, g, rows, row_ok, start, rb * BLOCK_M, cols, sab, sah, sat, sbb, sbh,
                          sbt, H, T, n_rep_b, scale, softcap, DS, GROUP, SOFTCAP, IEEE, BLOCK_M, NC)
                # the candidates' counts a byte each, four to an int32 (a tile's count <= NC <= 128 never carries):
                # they rise, so the last one a key passes sets the bytes of all it passes; one row sum a word
                w0 = tl.zeros([BLOCK_M, NC], tl.int32)
                w1 = tl.zeros([BLOCK_M, NC], tl.int32)
                for r in tl.static_range(R):
                    c = _unmono(tl.sum(tl.where(rr[None, :] == r, cand, 0), 1))[:, None]  # exact: one term
                    w0 = tl.where(s >= c, (256 ** (r + 1) - 1) // 255, w0) if r < 4 else w0
                    w1 = w1 if r < 4 else tl.where(s >= c, (256 ** (r - 3) - 1) // 255, w1)
                x0, x1 = tl.sum(w0, 1), tl.sum(w1, 1)
                for r in tl.static_range(R):
                    v = (((x0 if r < 4 else x1) >> (8 * (r % 4))) & 0xFF).to(tl.int64) << (21 * (r % 3))
                    if r // 3 == 0:
                        p0 += v
                    elif r // 3 == 1:
                        p1 += v
                    else:
                        p2 += v
            cnt = tl.zeros([BLOCK_M, R], tl.int32)
            for r in tl.static_range(R):
                p = p0 if r // 3 == 0 else (p1 if r // 3 == 1 else p2)
                cnt = tl.where(rr[None, :] == r, ((p >> (21 * (r % 3))) & 0x1FFFFF).to(tl.int32)[:, None], cnt)
            ge = cnt >= k  # counts fall as candidates rise: the largest such is the new lo, the least other hi
            new_lo = tl.maximum(lo, tl.max(tl.where(ge, cand, -(2**40)), 1))
            new_cnt_lo = tl.minimum(cnt_lo, tl.min(tl.where(ge, cnt, 2**30), 1))
            new_hi = tl.minimum(hi, tl.min(tl.where(ge, 2**40, cand), 1))
            new_cnt_hi = tl.maximum(cnt_hi, tl.max(tl.where(ge, -1, cnt), 1))
            nge = tl.sum(ge.to(tl.int32), 1)  # after a guess: R, the k-th lies above every candidate; 0, below
            mode = tl.where(mode == 1, tl.where(nge == R, 2, tl.where(nge == 0, 3, 0)), 0)
            lo, cnt_lo = tl.where(active, new_lo, lo), tl.where(active, new_cnt_lo, cnt_lo)
            hi, cnt_hi = tl.where(active, new_hi, hi), tl.where(active, new_cnt_hi, cnt_hi)
            active = row_ok & (cnt_lo > k) & (hi - lo > 1) & (cnt_lo - cnt_hi > BAND)
        tl.store(SWEEPS + tl.program_id(1) * tl.num_programs(0) + rb, sweeps)
        br = BR + (tl.program_id(1) * T + rows) * 4
        tl.store(br, lo, mask=row_ok)
        tl.store(br + 1, hi, mask=row_ok)
        tl.store(br + 2, cnt_lo.to(tl.int64), mask=row_ok)
        tl.store(br + 3, cnt_hi.to(tl.int64), mask=row_ok)

    @triton.jit
    def _thresholds(BR, T, rows, row_ok, k):
        # _token_bracket's thresholds of the rows: lo, hi (_mono ints), the keys at or above hi, the band's quota
        # (k less those) and the keys in the band [lo, hi)
        br = BR + (tl.program_id(1) * T + rows) * 4
        lo = tl.load(br, mask=row_ok, other=0)
        hi = tl.load(br + 1, mask=row_ok, other=1)
        cnt_lo = tl.load(br + 2, mask=row_ok, other=0).to(tl.int32)
        cnt_hi = tl.load(br + 3, mask=row_ok, other=0).to(tl.int32)
        return lo, hi, cnt_hi, k - cnt_hi, cnt_lo - cnt_hi

    @triton.jit
    def _band_ranks(wbase, n, use, BLOCK_M: tl.constexpr, BAND: tl.constexpr, RC: tl.constexpr):
        # the first n packed words of each used row's scratch ranked against each other (0: the largest): which
        # slots hold one, each one's rank and its key
        jb = tl.arange(0, BAND)
        inb = use[:, None] & (jb[None, :] < n[:, None])
        word = tl.load(wbase[:, None] + jb[None, :], mask=inb, other=MIN_WORD)
        rank = tl.zeros([BLOCK_M, BAND], tl.int32)
        for c0 in range(0, BAND, RC):
            jc = c0 + tl.arange(0, RC)
            other = tl.load(wbase[:, None] + jc[None, :], mask=use[:, None] & (jc[None, :] < n[:, None]),
                            other=MIN_WORD)
            rank += tl.sum((other[:, None, :] > word[:, :, None]).to(tl.int32), 2)
        return inb, rank, (4294967295 - (word & 4294967295)).to(tl.int32)

    @triton.jit
    def _token_write(A, Bk, LSE, BR, IDX, WORDS, sab, sah, sat, sbb, sbh, sbt, sib, sih, sit,
                     H, G, T, n_rep_b, scale, softcap, k,
                     DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, NC: tl.constexpr, BAND: tl.constexpr, RC: tl.constexpr,
                     BITS: tl.constexpr):
        # One program: BLOCK_M rows, as _token_bracket's, with the thresholds it stored.
        # 3. write: keys >= hi all; band keys [lo, hi) all if they fit, else the lowest indices (they tie: hi is
        # lo + 1) or, where at most BAND, as packed words to rank
        rb, bz, g, rows, row_ok, a, end = _block(A, sab, sah, sat, G, T, DS, BLOCK_M)
        lo, hi, cnt_hi, quota, band_n = _thresholds(BR, T, rows, row_ok, k)
        ranked = (band_n > quota) & (band_n <= BAND)
        lval, hval = _unmono(lo), _unmono(hi)
        out = IDX + bz.to(tl.int64) * sib + g.to(tl.int64) * sih + rows.to(tl.int64) * sit  # can pass 2**31
        wbase = WORDS + (tl.program_id(1) * T + rows) * BAND  # (B, H or G, T, BAND) contiguous
        kept = tl.zeros([BLOCK_M], tl.int32)
        seen = tl.zeros([BLOCK_M], tl.int32)
        for start in range(0, end, NC):
            cols = start + tl.arange(0, NC)
            s = _tile(A, Bk, LSE, a, bz, g, rows, row_ok, start, rb * BLOCK_M, cols, sab, sah, sat, sbb, sbh, sbt,
                      H, T, n_rep_b, scale, softcap, DS, GROUP, SOFTCAP, IEEE, BLOCK_M, NC)
            above = s >= hval[:, None]
            band = (s >= lval[:, None]) & ~above
            brank = seen[:, None] + tl.cumsum(band.to(tl.int32), 1) - 1
            take = above | (band & ~ranked[:, None] & (brank < quota[:, None]))
            col2 = cols[None, :] + tl.zeros([BLOCK_M, NC], tl.int32)
            if BITS:  # the tile's words: its kept keys' bits (distinct powers of two: their sum is their or)
                wcols = start // 32 + tl.arange(0, NC // 32)
                words = tl.sum(tl.reshape(take.to(tl.int32) << (cols % 32)[None, :], [BLOCK_M, NC // 32, 32]), 2)
                tl.store(out[:, None] + wcols[None, :], words, mask=row_ok[:, None] & (wcols * 32 < T)[None, :])
            else:  # each kept key at the row's running offset
                pos = kept[:, None] + tl.cumsum(take.to(tl.int32), 1) - 1
                tl.store(out[:, None] + pos, col2, mask=take & row_ok[:, None])
            word = _packed(tl.where(s == 0.0, 0.0, s), col2)  # -0.0 as +0.0: they tie as floats
            tl.store(wbase[:, None] + brank, word, mask=band & ranked[:, None] & row_ok[:, None])
            seen += tl.sum(band.to(tl.int32), 1)
            kept += tl.sum(take.to(tl.int32), 1)
        if (rb * BLOCK_M < k) and (not BITS):  # rows with fewer than k causal keys: -1 after them
            for j0 in range(rb * BLOCK_M, k, NC):
                jj = j0 + tl.arange(0, NC)
                tl.store(out[:, None] + jj[None, :], -1,
                         mask=row_ok[:, None] & (jj[None, :] > rows[:, None]) & (jj[None, :] < k))
        if tl.max(ranked.to(tl.int32), 0) > 0:
            tl.debug_barrier()  # the words other threads stored
            inb, rank, col = _band_ranks(wbase, band_n, ranked & row_ok, BLOCK_M, BAND, RC)
            if BITS:
                tl.atomic_or(out[:, None] + col // 32, 1 << (col % 32), mask=inb & (rank < quota[:, None]))
            else:
                tl.store(out[:, None] + cnt_hi[:, None] + rank, col, mask=inb & (rank < quota[:, None]))


def _kernel_args(a: torch.Tensor, group: int, softcap: float | None) -> dict:
    """The constexprs both selection kernels take: gate dim, group size, softcap (group scores only), fp32 inputs,
    band slots."""
    return dict(DS=a.shape[-1], GROUP=group, SOFTCAP=bool(softcap) and group > 1, IEEE=a.dtype == torch.float32,
                BAND=TUNING["select_band"])


def token_bracket(a: torch.Tensor, b: torch.Tensor, k: int, scale: float = 1.0, group: int = 1,
                  softcap: float | None = None):
    """The first two steps of ``token_select``: each row's thresholds (B x H // group, T, 4) int64 (lo, hi, and the
    keys at or above each), the rows' log-sum-exp under group selection (else empty) and the counting sweeps each
    program took (B, H // group, row blocks) int32. Separate so that a benchmark can time the counting alone."""
    bsz, h, t, ds = a.shape
    g = h // group
    ieee = a.dtype == torch.float32
    nc, rows = TUNING["select_keys"], TUNING["select_rows"]
    if TUNING["select_cands"] not in (2, 4, 8) or t >= 2**21 or nc > 128:
        raise ValueError("token_select counts 2, 4 or 8 candidates a sweep, over fewer than 2**21 keys, tiles of "
                         "at most 128")
    lse = torch.empty(bsz, h, t if group > 1 else 0, dtype=torch.float32, device=a.device)
    counted = torch.empty(bsz, g, triton.cdiv(t, rows), dtype=torch.int32, device=a.device)
    if group > 1:
        _row_lse[(triton.cdiv(t, rows), bsz * h)](
            a, b, lse, *a.stride()[:3], *b.stride()[:3], h, t, h // b.shape[1], float(scale), float(softcap or 1.0),
            DS=ds, NC=nc, BLOCK_M=rows, SOFTCAP=bool(softcap), IEEE=ieee, num_warps=TUNING["select_warps"])
    bracket = torch.empty(bsz * g, t, 4, dtype=torch.int64, device=a.device)
    _token_bracket[(triton.cdiv(t, rows), bsz * g)](
        a, b, lse, bracket, counted, *a.stride()[:3], *b.stride()[:3], h, g, t, h // b.shape[1], float(scale),
        float(softcap or 1.0), k, float(TUNING["select_guess_step"]), **_kernel_args(a, group, softcap),
        BLOCK_M=rows, NC=nc, R=TUNING["select_cands"], GUESS=TUNING["select_guess"],
        EVERY=TUNING["select_moments_every_group" if group > 1 else "select_moments_every"],
        num_warps=TUNING["select_warps"])
    return bracket, lse, counted


def token_select(a: torch.Tensor, b: torch.Tensor, k: int, scale: float = 1.0, group: int = 1,
                 softcap: float | None = None, sweeps: bool = False, bits: bool = False):
    """Triton twin of ``token_select_reference``: (B, H // group, T, k) int32, each row's kept keys in key order
    (the same set; -1 past a row's causal keys). a (B, H, T, d) and b (B, H or G, T, d) in one dtype, last
    dimensions contiguous. ``sweeps``: also return the counting sweeps each program took, (B, H // group,
    row blocks) int32 (the selection's cost is about 2 + that many sweeps over the causal keys, 3 + for groups).
    ``bits``: the kept sets as a bitmask instead, (B, H // group, T, ceil(T / 32)) int32 (``ops.mask_attention``'s
    layout; words past a row's causal keys are not written), tiles of at least 32 keys."""
    bsz, h, t = a.shape[:3]
    g = h // group
    bracket, lse, counted = token_bracket(a, b, k, scale, group, softcap)
    if bits:  # bits.py's write where TUNING["bits_kernel"] picks it (None: the offsets write below)
        from .bits import write_bits  # bits.py imports this module
        idx = write_bits(a, b, k, scale, group, softcap, bracket, lse, TUNING, _kernel_args(a, group, softcap))
        if idx is not None:
            return (idx, counted) if sweeps else idx
    shape = (bsz, g, t, (t + 31) // 32 if bits else k)
    idx = torch.empty(shape, dtype=torch.int32, device=a.device)
    words = torch.empty(bsz, g, t, TUNING["select_band"], dtype=torch.int64, device=a.device)
    w_rows, w_keys = TUNING["write_rows"], max(TUNING["write_keys"], 32) if bits else TUNING["write_keys"]
    _token_write[(triton.cdiv(t, w_rows), bsz * g)](
        a, b, lse, bracket, idx, words, *a.stride()[:3], *b.stride()[:3], *idx.stride()[:3], h, g, t,
        h // b.shape[1], float(scale), float(softcap or 1.0), k, **_kernel_args(a, group, softcap), BLOCK_M=w_rows,
        NC=w_keys, RC=TUNING["select_rank_chunk"], BITS=bits, num_warps=TUNING["write_warps"])
    return (idx, counted) if sweeps else idx
