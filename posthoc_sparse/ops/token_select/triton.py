"""Triton kernels of token-level top-k selection for any k, per head or per KV group, and of attention over the
selected keys. No (T, T) tensor: scores are recomputed from the selection query and key at every sweep.

Letters: B batch, H query heads, G key/value heads, T queries = keys (prefill from position 0), D head_dim,
d the selection dimension (the gate's d, or D for the oracle), k keys kept per row, n kept slots per row.

Three kernels, twins in ``naive.py``:

    ``_row_lse``        group selection only: each query head's log-sum-exp over each row's causal keys (one
                        sweep, online), so that a later sweep can form softmax probabilities tile by tile.
    ``_token_select``   per (head or group, block of rows), threshold selection by counting, no sorting:
                        (1) one sweep for each row's least and largest score, the bracket [lo, hi) of its k-th
                        largest; (2) counting sweeps, each testing R candidate thresholds spread evenly over
                        the bracket in the monotone int order of fp32 (``head_topk``'s ``_mono``), with one
                        ``tl.sum`` per candidate; the bracket shrinks to the two candidates around the k-th
                        score, until at most BAND keys lie in it (or it holds one value, or exactly k keys lie
                        at or above lo); (3) a last sweep writes the keys at or above hi (all kept) by a
                        running offset per row, and the band's keys either directly (all of them when they
                        fit, or the lowest indices when they all tie) or as packed words (score above,
                        complement of the index below) to a BAND-slot scratch, ranked against each other
                        afterwards. Exactly k keys per row (all causal keys where fewer), equal scores by lower
                        index; indices in key order, not by score. Group selection scores a key by the sum
                        over the group's heads of softmax(a . b * scale) (the mean's order).
    ``_gather_attn_fwd`` attention of each row over its kept keys, KT gathered keys per step (online softmax);
                        the query heads that share an index set (a KV group under group selection) are stacked
                        in one program, so their gathers hit the same addresses.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None

# Launch settings. select: rows per program, keys per tile, candidate thresholds per counting sweep (a power of
# two), band slots ranked in registers (a power of two), warps. attn: rows per program (all stacked heads
# together), gathered keys per step, warps.
# The fastest of the settings benchmarks/perf.py --parts prefill_tuning timed on an H200 at T = 8192, k = 2048
# (docs/data/perf-h200-prefill-tuning.json): select 16 rows x 64 keys (21.0 / 11.4 ms per head / group selection,
# against 36.1 / 17.6 at 32 x 32), attention 8 warps (13.1 / 13.3 ms against 16.0 / 15.2 at 4).
# select_rank_chunk: band slots each step of the ranking compares at once. It sets the selection kernel's registers:
# compiled for sm_90 on the CPU (benchmarks/hopper.py, docs/data/kernel-registers-sm90.json), 255 a thread (the
# most) at 8 and 168 at 1 per head (241 per group) at 16 x 64 and 4 warps. Timed by prefill_tuning on an H200 at
# T = 8192, k = 2048 (docs/data/perf-h200-prefill-rank-chunk.json): chunk 1 takes 19.6 / 9.8 ms per head / group
# selection against 20.6 / 11.5 at 8 (chunk 2: 19.6 / 9.9, within noise), so 1: the fewest registers.
TUNING = {"select_rows": 16, "select_keys": 64, "select_cands": 8, "select_band": 64, "select_warps": 4,
          "select_rank_chunk": 1, "attn_rows": 16, "attn_keys": 8, "attn_warps": 8}


if triton is not None:
    from ..head_topk.triton import MIN_WORD, _mono, _packed, _scores

    @triton.jit
    def _unmono(m):
        # int64 of _mono's order (in the int32 range) -> the fp32 it stands for (_mono's bit flip is an involution)
        m32 = m.to(tl.int32)
        return (m32 ^ ((m32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

    @triton.jit
    def _capped(s, softcap, SOFTCAP: tl.constexpr):
        if SOFTCAP:
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # tanh
        return s

    @triton.jit
    def _row_lse(A, Bk, LSE, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b, scale, softcap,
                 DS: tl.constexpr, NC: tl.constexpr, BLOCK_M: tl.constexpr, SOFTCAP: tl.constexpr,
                 IEEE: tl.constexpr):
        # One program: BLOCK_M rows of one query head; log-sum-exp of its (softcapped) scores over causal keys.
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
            s = _capped(_scores(a, bbase, cols, sbt, scale, T, DS, IEEE), softcap, SOFTCAP)
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < T)[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m = m_new
        tl.store(LSE + bh * T + rows, m + tl.log(l), mask=row_ok)

    @triton.jit
    def _tile(A, Bk, LSE, a, bz, g, rows, row_ok, cols, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b, scale,
              softcap, DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, NC: tl.constexpr):
        # the selection scores of the block's rows at keys cols, (BLOCK_M, NC) fp32, -inf where a row may not look
        if GROUP == 1:
            s = _scores(a, Bk + bz * sbb + (g // n_rep_b) * sbh, cols, sbt, scale, T, DS, IEEE)
        else:  # the group's summed softmax probabilities
            offs_d = tl.arange(0, DS)
            s = tl.zeros([BLOCK_M, NC], tl.float32)
            for i in tl.static_range(GROUP):
                h = g * GROUP + i
                ai = tl.load(A + bz * sab + h * sah + rows[:, None] * sat + offs_d[None, :], mask=row_ok[:, None],
                             other=0.0)
                si = _capped(_scores(ai, Bk + bz * sbb + (h // n_rep_b) * sbh, cols, sbt, scale, T, DS, IEEE),
                             softcap, SOFTCAP)
                lse = tl.load(LSE + (bz * H + h) * T + rows, mask=row_ok, other=0.0)
                s += tl.exp(si - lse[:, None])
        return tl.where((cols[None, :] <= rows[:, None]) & (cols < T)[None, :], s, float("-inf"))

    @triton.jit
    def _token_select(A, Bk, LSE, IDX, WORDS, SWEEPS, sab, sah, sat, sbb, sbh, sbt, sib, sih, sit,
                      H, G, T, n_rep_b, scale, softcap, k,
                      DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, NC: tl.constexpr, R: tl.constexpr, BAND: tl.constexpr,
                      RC: tl.constexpr):
        # One program: BLOCK_M rows of one head (GROUP 1) or one group of GROUP query heads; the last row
        # blocks (the most keys) are launched first. Invariant per row: at least k causal keys score >= lo
        # (cnt_lo of them; all, at the start), fewer than k score >= hi (cnt_hi), thresholds as _mono ints
        # compared through the fp32 they stand for.
        rb = tl.num_programs(0) - 1 - tl.program_id(0)
        bz, g = tl.program_id(1) // G, tl.program_id(1) % G
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        offs_d = tl.arange(0, DS)
        a = tl.load(A + bz * sab + g * sah + rows[:, None] * sat + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        end = tl.minimum((rb + 1) * BLOCK_M, T)  # causal: no key past the block's last row
        # 1. the bracket: each row's least and largest score
        smin = tl.full([BLOCK_M], float("inf"), tl.float32)
        smax = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for start in range(0, end, NC):
            cols = start + tl.arange(0, NC)
            s = _tile(A, Bk, LSE, a, bz, g, rows, row_ok, cols, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b, scale,
                      softcap, DS, GROUP, SOFTCAP, IEEE, BLOCK_M, NC)
            smax = tl.maximum(smax, tl.max(s, 1))
            smin = tl.minimum(smin, tl.min(tl.where(s == float("-inf"), float("inf"), s), 1))
        lo = _mono(smin)
        hi = _mono(smax) + 1
        cnt_lo = rows + 1  # every causal key scores at least the least
        cnt_hi = tl.zeros([BLOCK_M], tl.int32)
        # 2. counting sweeps, R candidates each, until at most BAND keys lie in [lo, hi)
        rr = tl.arange(0, R)
        active = row_ok & (cnt_lo > k) & (hi - lo > 1) & (cnt_lo - cnt_hi > BAND)
        sweeps = rb * 0  # an int32 scalar, carried by the loop
        while tl.max(active.to(tl.int32), 0) > 0:
            sweeps += 1
            cand = lo[:, None] + ((hi - lo)[:, None] * (rr[None, :] + 1)) // (R + 1)  # in [lo, hi), one inside
            cval = _unmono(cand)
            cnt = tl.zeros([BLOCK_M, R], tl.int32)
            for start in range(0, end, NC):
                cols = start + tl.arange(0, NC)
                s = _tile(A, Bk, LSE, a, bz, g, rows, row_ok, cols, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b,
                          scale, softcap, DS, GROUP, SOFTCAP, IEEE, BLOCK_M, NC)
                cnt += tl.sum((s[:, :, None] >= cval[:, None, :]).to(tl.int32), 1)
            ge = cnt >= k  # counts fall as candidates rise: the largest such is the new lo, the least other hi
            new_lo = tl.maximum(lo, tl.max(tl.where(ge, cand, -(2**40)), 1))
            new_cnt_lo = tl.minimum(cnt_lo, tl.min(tl.where(ge, cnt, 2**30), 1))
            new_hi = tl.minimum(hi, tl.min(tl.where(ge, 2**40, cand), 1))
            new_cnt_hi = tl.maximum(cnt_hi, tl.max(tl.where(ge, -1, cnt), 1))
            lo = tl.where(active, new_lo, lo)
            cnt_lo = tl.where(active, new_cnt_lo, cnt_lo)
            hi = tl.where(active, new_hi, hi)
            cnt_hi = tl.where(active, new_cnt_hi, cnt_hi)
            active = row_ok & (cnt_lo > k) & (hi - lo > 1) & (cnt_lo - cnt_hi > BAND)
        tl.store(SWEEPS + tl.program_id(1) * tl.num_programs(0) + rb, sweeps)
        # 3. write: keys >= hi all; band keys [lo, hi) all if they fit, else the lowest indices (they tie: hi is
        # lo + 1) or, where at most BAND, as packed words to rank
        quota = k - cnt_hi
        band_n = cnt_lo - cnt_hi
        ranked = (band_n > quota) & (band_n <= BAND)
        lval, hval = _unmono(lo), _unmono(hi)
        out = IDX + bz * sib + g * sih + rows * sit
        wbase = WORDS + (tl.program_id(1) * T + rows) * BAND  # (B, H or G, T, BAND) contiguous
        kept = tl.zeros([BLOCK_M], tl.int32)
        seen = tl.zeros([BLOCK_M], tl.int32)
        for start in range(0, end, NC):
            cols = start + tl.arange(0, NC)
            s = _tile(A, Bk, LSE, a, bz, g, rows, row_ok, cols, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b, scale,
                      softcap, DS, GROUP, SOFTCAP, IEEE, BLOCK_M, NC)
            above = s >= hval[:, None]
            band = (s >= lval[:, None]) & ~above
            brank = seen[:, None] + tl.cumsum(band.to(tl.int32), 1) - 1
            take = above | (band & ~ranked[:, None] & (brank < quota[:, None]))
            pos = kept[:, None] + tl.cumsum(take.to(tl.int32), 1) - 1
            col2 = cols[None, :] + tl.zeros([BLOCK_M, NC], tl.int32)
            tl.store(out[:, None] + pos, col2, mask=take & row_ok[:, None])
            word = _packed(tl.where(s == 0.0, 0.0, s), col2)  # -0.0 as +0.0: they tie as floats
            tl.store(wbase[:, None] + brank, word, mask=band & ranked[:, None] & row_ok[:, None])
            seen += tl.sum(band.to(tl.int32), 1)
            kept += tl.sum(take.to(tl.int32), 1)
        if rb * BLOCK_M < k:  # rows with fewer than k causal keys: -1 after them
            for j0 in range(rb * BLOCK_M, k, NC):
                jj = j0 + tl.arange(0, NC)
                tl.store(out[:, None] + jj[None, :], -1,
                         mask=row_ok[:, None] & (jj[None, :] > rows[:, None]) & (jj[None, :] < k))
        if tl.max(ranked.to(tl.int32), 0) > 0:
            tl.debug_barrier()  # the words other threads stored
            jb = tl.arange(0, BAND)
            inb = ranked[:, None] & row_ok[:, None] & (jb[None, :] < band_n[:, None])
            word = tl.load(wbase[:, None] + jb[None, :], mask=inb, other=MIN_WORD)
            rank = tl.zeros([BLOCK_M, BAND], tl.int32)
            for c0 in range(0, BAND, RC):
                jc = c0 + tl.arange(0, RC)
                other = tl.load(wbase[:, None] + jc[None, :], other=MIN_WORD,
                                mask=ranked[:, None] & row_ok[:, None] & (jc[None, :] < band_n[:, None]))
                rank += tl.sum((other[:, None, :] > word[:, :, None]).to(tl.int32), 2)
            col = (4294967295 - (word & 4294967295)).to(tl.int32)
            tl.store(out[:, None] + cnt_hi[:, None] + rank, col, mask=inb & (rank < quota[:, None]))

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
        sel = IDX + bz * sib + ih * sih + t * sit
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


def token_select(a: torch.Tensor, b: torch.Tensor, k: int, scale: float = 1.0, group: int = 1,
                 softcap: float | None = None, sweeps: bool = False):
    """Triton twin of ``token_select_reference``: (B, H // group, T, k) int32, each row's kept keys in key order
    (the same set; -1 past a row's causal keys). a (B, H, T, d) and b (B, H or G, T, d) in one dtype, last
    dimensions contiguous. ``sweeps``: also return the counting sweeps each program took, (B, H // group,
    row blocks) int32 (the selection's cost is about 2 + that many sweeps over the causal keys, 3 + for groups)."""
    bsz, h, t, ds = a.shape
    g = h // group
    ieee = a.dtype == torch.float32
    nc, rows = TUNING["select_keys"], TUNING["select_rows"]
    idx = torch.empty(bsz, g, t, k, dtype=torch.int32, device=a.device)
    words = torch.empty(bsz, g, t, TUNING["select_band"], dtype=torch.int64, device=a.device)
    lse = torch.empty(bsz, h, t if group > 1 else 0, dtype=torch.float32, device=a.device)
    counted = torch.empty(bsz, g, triton.cdiv(t, rows), dtype=torch.int32, device=a.device)
    if group > 1:
        _row_lse[(triton.cdiv(t, rows), bsz * h)](
            a, b, lse, *a.stride()[:3], *b.stride()[:3], h, t, h // b.shape[1], float(scale), float(softcap or 1.0),
            DS=ds, NC=nc, BLOCK_M=rows, SOFTCAP=bool(softcap), IEEE=ieee, num_warps=TUNING["select_warps"])
    _token_select[(triton.cdiv(t, rows), bsz * g)](
        a, b, lse, idx, words, counted, *a.stride()[:3], *b.stride()[:3], *idx.stride()[:3], h, g, t, h // b.shape[1],
        float(scale), float(softcap or 1.0), k, DS=ds, GROUP=group, SOFTCAP=bool(softcap) and group > 1, IEEE=ieee,
        BLOCK_M=rows, NC=nc, R=TUNING["select_cands"], BAND=TUNING["select_band"], RC=TUNING["select_rank_chunk"],
        num_warps=TUNING["select_warps"])
    return (idx, counted) if sweeps else idx


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
