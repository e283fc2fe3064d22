"""The bitmask write of ``token_select(..., bits=True)`` without per-key running offsets (Triton).

``_token_write`` ranks every key of a row's band [lo, hi) by a running offset (``tl.cumsum`` over each tile),
which made its sweep cost about four counting sweeps. A bitmask needs no offsets for most keys: the keys at or
above hi are all kept, and where the band fits in the row's quota (k less the keys above it), the band's keys
too, so a tile's bits are two compares. Only two kinds of row need more:

- a band larger than the quota and at most BAND keys: the band's keys go to the row's BAND-slot scratch, taken
  from each tile best first, one a row per step (a row reduction for the score, one for the index), and a second
  kernel, ``_bits_rank``, ranks the scratch by (score, -index) as ``_token_write`` does and sets the quota's best
  keys' bits by atomic or. A row's band holds a few dozen of its thousands of keys, so a tile mostly holds none or
  one or two of a row's;
- a band larger than the quota and than BAND: the counting stopped there because it holds one value, so the
  lowest indices are kept: whole tiles while they fit in the quota, then, in the tile where it ends, the keys
  before a position found by bisection (row sums).

No tile-sized scan (``tl.cumsum``) and no ranking in the sweep's kernel: compiled for sm_90 those needed about 255
registers a thread, 2 programs an SM, where the sweep alone needs fewer. ``TUNING["bits_band"]`` picks how a ranked
row's band keys reach the scratch:

- ``"words"``, the default: the tile's band bits of the row packed into words, as its kept bits are, and each
  nonzero word stored with its index to the row's next slot (a scan over the tile's NC / 32 words, no atomics, no
  tile-wide step). ``_bits_rank`` then takes the words' keys lowest bit first (``_band_keys``), scores each again
  (``_key_scores``: a row sum in fp32) and ranks those. The sweep compiles to 128 registers instead of the atomic
  slots' 229 (sm_90, Triton 3.9: docs/data/kernel-registers-sm90-words.json), and the whole bitmask selection per
  head at T = 32768, k = 2048 took 36.7 ms against 51.4 on an H200 (docs/data/sweep-probe-h200-32k-words.json; at
  8192: 3.28 against 3.97). The scores it ranks by are summed in another order than the tile's product, so where
  band keys tie within rounding another of them may be kept than by the other ways: measured by
  ``benchmarks/perf.py`` (prefill_topk, ``select_bits_words_topk_gap``) and held to the reference by the kept
  scores in the GPU tests;
- ``"atomic"``: each band key takes the slot an atomic add on the row's counter returns (the ranking orders them
  anyway): 0.3 to 18% less time than best first (docs/data/perf-h200-prefill-topk-threshold.json);
- ``"rows"``: each row's first and last band key of a tile by row reductions, the keys between them one a row per
  step: 1.5 to 2% faster than atomic at T = 32768, 1.5 to 7% slower at 8192
  (docs/data/perf-h200-prefill-topk-rows.json);
- ``"extract"``: best first, as above.

The sets are ``_token_write``'s (and ``token_select_reference``'s, up to rounding): exactly min(k, causal keys) per
row, equal scores by the lower index. Chosen by ``TUNING["bits_kernel"]``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None

if triton is not None:
    from ..head_topk.triton import _packed
    from .scores import _capped, _tile
    from .triton import _band_ranks, _block, _thresholds, _unmono

    @triton.jit
    def _row_kinds(BR, T, rows, row_ok, k, BAND: tl.constexpr):
        # each row's thresholds and how its band is kept: whole, ranked in the scratch, or tied (lowest indices)
        lo, hi, cnt_hi, quota, band_n = _thresholds(BR, T, rows, row_ok, k)
        whole = band_n <= quota
        return lo, hi, quota, band_n, whole, row_ok & ~whole & (band_n <= BAND), row_ok & ~whole & (band_n > BAND)

    @triton.jit
    def _token_bits(A, Bk, LSE, BR, OUT, WORDS, NB, sab, sah, sat, sbb, sbh, sbt, sib, sih, sit,
                    H, G, T, n_rep_b, scale, softcap, k,
                    DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, NC: tl.constexpr, BAND: tl.constexpr, LOG_NC: tl.constexpr,
                    ATOMIC: tl.constexpr, ROWS: tl.constexpr, BAND_WORDS: tl.constexpr):
        # One program: BLOCK_M rows, with the thresholds _token_bracket stored (lo, hi, keys at or above each).
        # No tile-sized scan (tl.cumsum): its registers would bound the sweep's occupancy. ATOMIC: a ranked row's
        # band keys take their scratch slots from a counter per row (NB, zeroed) by atomic add, in no order. ROWS:
        # each row's first and last band key of the tile by row reductions, the keys between them (a row with three
        # or more in one tile) one a row per step. BAND_WORDS: the tile's band bits as words (index, bits), whose keys
        # the ranking kernel scores again.
        rb, bz, g, rows, row_ok, a, end = _block(A, sab, sah, sat, G, T, DS, BLOCK_M)
        lo, hi, quota, band_n, whole, ranked, tied = _row_kinds(BR, T, rows, row_ok, k, BAND)
        any_ranked = tl.max(ranked.to(tl.int32), 0) > 0
        any_tied = tl.max(tied.to(tl.int32), 0) > 0
        lval, hval = _unmono(lo), _unmono(hi)
        out = OUT + bz.to(tl.int64) * sib + g.to(tl.int64) * sih + rows.to(tl.int64) * sit  # > 2**31 at 128k
        wbase = WORDS + (tl.program_id(1) * T + rows) * BAND  # (B x H or G, T, BAND) contiguous
        pos = tl.arange(0, NC)
        seen = tl.zeros([BLOCK_M], tl.int32)  # band keys so far, of tied rows
        nb = tl.zeros([BLOCK_M], tl.int32)  # and of ranked rows
        for start in range(0, end, NC):
            cols = start + pos
            s = _tile(A, Bk, LSE, a, bz, g, rows, row_ok, start, rb * BLOCK_M, cols, sab, sah, sat, sbb, sbh, sbt,
                      H, T, n_rep_b, scale, softcap, DS, GROUP, SOFTCAP, IEEE, BLOCK_M, NC)
            above = s >= hval[:, None]
            band = (s >= lval[:, None]) & ~above
            take = above | (band & whole[:, None])
            if any_tied:  # a tied row keeps its band's first keys: whole tiles, then the tile its quota ends in
                n_t = tl.sum((band & tied[:, None]).to(tl.int32), 1)
                need = quota - seen
                take = take | (band & (tied & (n_t <= need))[:, None])
                part = tied & (need > 0) & (need < n_t)
                if tl.max(part.to(tl.int32), 0) > 0:  # the least p with need band keys before it, by bisection
                    p_lo = tl.zeros([BLOCK_M], tl.int32)
                    p_hi = tl.full([BLOCK_M], NC, tl.int32)
                    for _ in tl.static_range(LOG_NC):
                        mid = (p_lo + p_hi) // 2
                        c = tl.sum((band & (pos[None, :] < mid[:, None])).to(tl.int32), 1)
                        p_hi = tl.where(c >= need, mid, p_hi)
                        p_lo = tl.where(c >= need, p_lo, mid)
                    take = take | (band & part[:, None] & (pos[None, :] < p_hi[:, None]))
                seen += n_t
            wcols = start // 32 + tl.arange(0, NC // 32)  # the tile's words: distinct powers of two, summed
            words = tl.sum(tl.reshape(take.to(tl.int32) << (cols % 32)[None, :], [BLOCK_M, NC // 32, 32]), 2)
            tl.store(out[:, None] + wcols[None, :], words, mask=row_ok[:, None] & (wcols * 32 < T)[None, :])
            if any_ranked and BAND_WORDS:  # a ranked row's band bits of the tile as words: each nonzero one, with its
                rest = band & ranked[:, None]  # index, to the row's next scratch slot (entries, not keys, counted)
                bw = tl.sum(tl.reshape(rest.to(tl.int32) << (cols % 32)[None, :], [BLOCK_M, NC // 32, 32]), 2)
                nz = (bw != 0).to(tl.int32)
                slot = nb[:, None] + tl.cumsum(nz, 1) - nz  # a scan over the tile's NC / 32 words only
                entry = (wcols.to(tl.int64)[None, :] << 32) | (bw.to(tl.int64) & 4294967295)
                tl.store(wbase[:, None] + slot, entry, mask=(nz > 0) & (slot < BAND))
                nb += tl.sum(nz, 1)
            elif any_ranked:  # a ranked row's band keys to its scratch (the count per row unused with ATOMIC)
                rest = band & ranked[:, None]
                n_put = tl.sum(rest.to(tl.int32), 1)
                if ATOMIC:  # each to the slot an atomic add on its row's counter returns, in one masked step
                    if tl.max(rest.to(tl.int32)) > 0:  # flat: Triton 3.9's layout pass fails on an atomic's
                        put = tl.reshape(rest, [BLOCK_M * NC])  # result in the tile's layout (for sm_90)
                        ctr = tl.broadcast_to((NB + tl.program_id(1) * T + rows)[:, None], [BLOCK_M, NC])
                        slot = tl.atomic_add(tl.reshape(ctr, [BLOCK_M * NC]), 1, mask=put, sem="relaxed")
                        word = tl.reshape(_packed(tl.where(s == 0.0, 0.0, s), cols[None, :]), [BLOCK_M * NC])
                        dst = tl.reshape(tl.broadcast_to(wbase[:, None], [BLOCK_M, NC]), [BLOCK_M * NC]) + slot
                        tl.store(dst, word, mask=put & (slot < BAND))
                elif ROWS:  # a row's first and last band key by row reductions: no tile-sized conversion, no atomics
                    first = tl.min(tl.where(rest, cols[None, :], T), 1)
                    last = tl.max(tl.where(rest, cols[None, :], -1), 1)
                    # one term each: the sums are exact (and +0.0 for -0.0, as the other ways put it)
                    sc = tl.sum(tl.where(rest & (cols[None, :] == first[:, None]), s, 0.0), 1)
                    tl.store(wbase + nb, _packed(sc + 0.0, first), mask=(n_put > 0) & (nb < BAND))
                    sc = tl.sum(tl.where(rest & (cols[None, :] == last[:, None]), s, 0.0), 1)
                    tl.store(wbase + nb + 1, _packed(sc + 0.0, last), mask=(n_put > 1) & (nb + 1 < BAND))
                    if tl.max(n_put, 0) > 2:  # the keys between them
                        rest = rest & (cols[None, :] > first[:, None]) & (cols[None, :] < last[:, None])
                        for j in range(2, tl.max(n_put, 0)):
                            col = tl.min(tl.where(rest, cols[None, :], T), 1)
                            sc = tl.sum(tl.where(rest & (cols[None, :] == col[:, None]), s, 0.0), 1)
                            tl.store(wbase + nb + j, _packed(sc + 0.0, col), mask=(j < n_put) & (nb + j < BAND))
                            rest = rest & (cols[None, :] != col[:, None])
                else:  # best first, one a row per step
                    for j in range(0, tl.max(n_put, 0)):  # mostly 0 to 2: a row's band is a few dozen of its keys
                        best = tl.max(tl.where(rest, s, float("-inf")), 1)
                        col = tl.min(tl.where(rest & (s == best[:, None]), cols[None, :], T), 1)  # ties: lower index
                        tl.store(wbase + nb + j, _packed(tl.where(best == 0.0, 0.0, best), col),
                                 mask=(j < n_put) & (nb + j < BAND))
                        rest = rest & (cols[None, :] != col[:, None])
                nb += n_put
        if not ATOMIC:
            tl.store(NB + tl.program_id(1) * T + rows, nb, mask=row_ok)

    @triton.jit
    def _key_scores(A, Bk, LSE, bz, g, rows, key, live, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b, scale, softcap,
                    DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr):
        # each row's selection score at one key of its own (live rows), as _tile scores it, in fp32 by a row sum
        offs_d = tl.arange(0, DS)
        s = tl.zeros(rows.shape, tl.float32)
        for i in tl.static_range(GROUP):
            h = g * GROUP + i
            a = tl.load(A + bz * sab + h * sah + rows[:, None] * sat + offs_d[None, :], mask=live[:, None], other=0.0)
            kb = tl.load(Bk + bz * sbb + (h // n_rep_b) * sbh + key[:, None] * sbt + offs_d[None, :],
                         mask=live[:, None], other=0.0)
            si = tl.sum(a.to(tl.float32) * kb.to(tl.float32), 1) * scale
            if GROUP == 1:
                s = si
            else:  # the group's summed softmax probabilities
                lse = tl.load(LSE + (bz * H + h) * T + rows, mask=live, other=0.0)
                s += tl.exp(_capped(si, softcap, SOFTCAP) - lse)
        return s

    @triton.jit
    def _band_keys(A, Bk, LSE, WORDS, KEYS, n, bz, g, rows, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b, scale,
                   softcap, DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                   BAND: tl.constexpr):
        # the keys of each row's first n scratch entries (word index above, bits below), lowest bit first, scored
        # again and stored as packed words (score, index) to KEYS; returns how many each row has
        wbase = WORDS + (tl.program_id(1) * T + rows) * BAND
        kbase = KEYS + (tl.program_id(1) * T + rows) * BAND
        m = tl.zeros([BLOCK_M], tl.int32)
        for j in range(0, tl.max(n, 0)):
            e = tl.load(wbase + j, mask=j < n, other=0)
            w, base = e & 4294967295, (e >> 32) * 32
            while tl.max(w, 0) > 0:  # mostly one bit: a row's band is a few dozen of its thousands of keys
                low = w & -w
                bit = ((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 127  # exact: a power of two
                live = w != 0
                key = (base + bit).to(tl.int32)
                s = _key_scores(A, Bk, LSE, bz, g, rows, key, live, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b,
                                scale, softcap, DS, GROUP, SOFTCAP)
                tl.store(kbase + m, _packed(tl.where(s == 0.0, 0.0, s), key), mask=live & (m < BAND))
                m += live.to(tl.int32)
                w = w ^ low
        return tl.minimum(m, BAND)

    @triton.jit
    def _bits_rank(A, Bk, LSE, BR, OUT, WORDS, KEYS, NB, sab, sah, sat, sbb, sbh, sbt, sib, sih, sit, H, G, T,
                   n_rep_b, scale, softcap, k, DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BAND: tl.constexpr, RC: tl.constexpr, BAND_WORDS: tl.constexpr):
        # One program: BLOCK_M rows; a ranked row's scratch ranked, the quota's best keys set in its bitmask.
        # BAND_WORDS: the scratch holds band words, whose keys _band_keys scores into KEYS first
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        bz, g = tl.program_id(1) // G, tl.program_id(1) % G
        lo, hi, quota, band_n, whole, ranked, tied = _row_kinds(BR, T, rows, row_ok, k, BAND)
        if tl.max(ranked.to(tl.int32), 0) > 0:
            # the slots filled: band_n, unless a score came out otherwise than in the counting
            nb = tl.where(ranked, tl.minimum(tl.load(NB + tl.program_id(1) * T + rows, mask=row_ok, other=0), BAND), 0)
            wbase = WORDS + (tl.program_id(1) * T + rows) * BAND
            if BAND_WORDS:
                nb = _band_keys(A, Bk, LSE, WORDS, KEYS, nb, bz, g, rows, sab, sah, sat, sbb, sbh, sbt, H, T, n_rep_b,
                                scale, softcap, DS, GROUP, SOFTCAP, BLOCK_M, BAND)
                wbase = KEYS + (tl.program_id(1) * T + rows) * BAND
            inb, rank, col = _band_ranks(wbase, nb, ranked, BLOCK_M, BAND, RC)
            out = OUT + bz.to(tl.int64) * sib + g.to(tl.int64) * sih + rows.to(tl.int64) * sit
            tl.atomic_or(out[:, None] + col // 32, 1 << (col % 32), mask=inb & (rank < quota[:, None]))


def bits_write(tuning: dict, group: int, t: int) -> str:
    """Which write ``token_select(..., bits=True)`` takes for T = ``t`` under ``tuning["bits_kernel"]``:
    "offsets" (``_token_write``) or "reduce" (this module's); "auto" is reduce per group, and per head from
    ``tuning["bits_reduce_head_from"]`` keys (on an H200, with its band keys by atomic slots, reduce was faster per
    head at T = 8192 and 32768, docs/data/perf-h200-prefill-topk-threshold.json; shorter lengths were not
    timed)."""
    choice = tuning["bits_kernel"]
    if choice not in ("auto", "offsets", "reduce"):
        raise ValueError(f"TUNING['bits_kernel'] is 'auto', 'offsets' or 'reduce', not {choice!r}")
    if choice != "auto":
        return choice
    return "reduce" if group > 1 or t >= tuning["bits_reduce_head_from"] else "offsets"


def write_bits(a: torch.Tensor, b: torch.Tensor, k: int, scale: float, group: int, softcap: float | None,
               bracket: torch.Tensor, lse: torch.Tensor, tuning: dict, kernel_args: dict) -> torch.Tensor | None:
    """The kept sets of ``token_bracket``'s thresholds as ``token_select``'s bitmask, (B, H // group, T,
    ceil(T / 32)) int32 (words past a row's causal keys are not written); None where ``tuning["bits_kernel"]``
    picks the offsets write ("offsets", or "auto" per head below ``bits_reduce_head_from`` keys)."""
    if bits_write(tuning, group, a.shape[2]) == "offsets":
        return None
    if tuning["bits_band"] not in ("extract", "atomic", "rows", "words"):
        raise ValueError(f"TUNING['bits_band'] is 'extract', 'atomic', 'rows' or 'words', not {tuning['bits_band']!r}")
    atomic, in_words = tuning["bits_band"] == "atomic", tuning["bits_band"] == "words"
    bsz, h, t = a.shape[:3]
    g = h // group
    out = torch.empty(bsz, g, t, (t + 31) // 32, dtype=torch.int32, device=a.device)
    words = torch.empty(bsz, g, t, kernel_args["BAND"], dtype=torch.int64, device=a.device)
    keys = torch.empty_like(words) if in_words else words  # the band words' keys, scored again
    filled = (torch.zeros if atomic else torch.empty)(bsz * g, t, dtype=torch.int32, device=a.device)
    rows, nc = tuning["bits_rows"], max(tuning["bits_keys"], 32)
    strides = (*a.stride()[:3], *b.stride()[:3])
    _token_bits[(triton.cdiv(t, rows), bsz * g)](
        a, b, lse, bracket, out, words, filled, *strides, *out.stride()[:3], h, g, t,
        h // b.shape[1], float(scale), float(softcap or 1.0), k, **kernel_args, BLOCK_M=rows, NC=nc,
        LOG_NC=nc.bit_length() - 1, ATOMIC=atomic, ROWS=tuning["bits_band"] == "rows", BAND_WORDS=in_words,
        num_warps=tuning["bits_warps"])
    rank_rows = tuning["write_rows"]  # the old write's ranking block: where its ranking needs the fewest registers
    _bits_rank[(triton.cdiv(t, rank_rows), bsz * g)](
        a, b, lse, bracket, out, words, keys, filled, *strides, *out.stride()[:3], h, g, t, h // b.shape[1],
        float(scale), float(softcap or 1.0), k, DS=kernel_args["DS"], GROUP=group, SOFTCAP=kernel_args["SOFTCAP"],
        BLOCK_M=rank_rows, BAND=kernel_args["BAND"], RC=tuning["select_rank_chunk"], BAND_WORDS=in_words,
        num_warps=tuning["write_warps"])
    return out
