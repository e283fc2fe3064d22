"""Triton radix select of gated decoding: the exact top k of each row of the selection scores that
``triton.py``'s ``_score`` wrote (per query head, or per KV group from the group's mean softmax).

  ``_select``   grid (B x R). One program per selection row finds the row's exact k-th largest score by radix
                select over its fp32 scores read as order-preserving 32-bit keys: four passes of 8-bit digits,
                each pass a 256-bin ``tl.histogram`` of the keys still matching the digits found so far (no
                reduction per tile: keys off the prefix go to digit 0, corrected once per pass). Scores at or
                below -2^127 count as invalid, like -inf (none arise from finite keys). Then
                one pass writes the kept indices in key order: the keys above the k-th score and the lowest-index
                keys equal to it, exactly min(k, valid keys), -1 after. Per-group selection first writes the
                group's mean softmax over its heads (from the scores and the split statistics).
                With few rows (batch 1: 16 heads or 8 groups, for 132 SMs) one program per row leaves the GPU
                idle, so below TUNING["split_rows"] rows the same select runs split over the keys instead:
                ``_split_pass`` x 4 (grid (splits, rows): each program histograms its split's keys that match
                the prefix (256 bins, the keys off it taken off digit 0) and adds the counts to the row's by
                integer atomics, exact in any order; each finds the prefix by one radix step on the last pass's
                row histogram from the state the last pass's first split stored (TUNING["carry_state"]; off: from
                all earlier row histograms); after pass 0 a tile with few keys on the prefix, at most
                TUNING["sparse_keys"], adds them one atomic each instead of histogramming the whole tile) and
                ``_split_write`` (each split's first
                slot from the kept and equal keys of the splits before it, known from the last pass's per-split
                histograms), after ``_group_split`` for per-group selection: five or six launches, the same
                indices in the same slots as ``_select`` (tested).

Why radix select rather than ``torch.topk``: for k = 2048 of S = 32768 keys, ``torch.topk`` runs its multi-block
radix select as about ten launches (a histogram and a digit kernel per 8-bit pass, a gather, and a segmented
sort unless unsorted), each a few microseconds on a GPU at these sizes, which is the order of the whole
dense decode step of a layer at batch 1 (about 35 us to read 134 MB of KV at 32k). ``_select`` is one launch:
4 histogram passes and one output pass over a row's S scores (128 KB at 32k, L2-resident after ``_score``
wrote them), with warp ballots for the histogram instead of a sort. It is exact: ties at the k-th score keep
the lower indices. (``TUNING["select"] = "torch"`` switches to ``torch.topk``, also capturable; the benchmark
times both.)
"""

from __future__ import annotations

import torch

from .tuning import TUNING, _splits

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None

if triton is not None:
    from ..head_topk.triton import _mono  # fp32 -> int64 of the same order

    NEG = tl.constexpr(-1.0e30)

    @triton.jit
    def _group_rows(SC, PM, PL, GS, b, g, H, G, S, NSP, lo, hi, R: tl.constexpr, RP: tl.constexpr,
                    NSP_P: tl.constexpr, BLOCK: tl.constexpr):
        # GS[b, g, lo:hi] = mean over the group's R heads of softmax(SC[b, h]) over the valid keys, -inf where
        # invalid (hi - lo: a multiple of BLOCK, or the keys from lo to S)
        r = tl.arange(0, RP)
        heads = (b * H + g * R + r).to(tl.int64)
        offs = tl.arange(0, NSP_P)
        part = (r < R)[:, None] & (offs < NSP)[None, :]
        pm = tl.load(PM + heads[:, None] * NSP + offs[None, :], mask=part, other=NEG)  # (RP, NSP_P)
        mx = tl.max(pm, 1)
        lse = mx + tl.log(tl.sum(tl.load(PL + heads[:, None] * NSP + offs[None, :], mask=part, other=0.0)
                                 * tl.exp(pm - mx[:, None]), 1))
        for start in range(lo, hi, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s = tl.load(SC + heads[:, None] * S + cols[None, :], mask=(r < R)[:, None] & (cols < S)[None, :],
                        other=float("-inf"))  # (RP, BLOCK)
            mean = tl.sum(tl.exp(s - lse[:, None]), 0) / R
            tl.store(GS + (b * G + g) * S + cols, tl.where(tl.max(s, 0) > float("-inf"), mean, float("-inf")),
                     mask=cols < S)

    @triton.jit
    def _keys(src, cols, S):
        # the scores at cols as 32-bit keys of the same order, 0 .. 2**32 - 1 (-inf past S: top digit 0)
        return _mono(tl.load(src + cols, mask=cols < S, other=float("-inf"))) + 2147483648

    @triton.jit
    def _first(hist, bins, k):
        # after pass 0: its histogram without digit 0 (the invalid keys, and the padding of the last tile), the
        # valid keys, and min(k, valid keys)
        hist = tl.where(bins == 0, 0, hist)
        total = tl.sum(hist, 0)
        return hist, total, tl.minimum(total, k)

    @triton.jit
    def _digit(hist, bins, total, want):
        # one radix step: of the ``total`` keys matching the prefix (``hist``: their counts by the next 8-bit
        # digit), ``want`` must be kept; the k-th largest key's digit, the keys with it, and how many of them to keep
        at_least = total - tl.cumsum(hist, 0) + hist  # matching keys of digit >= d
        d = tl.max(tl.where(at_least >= want, bins, 0), 0)
        return d, tl.sum(tl.where(bins == d, hist, 0), 0), want - tl.sum(tl.where(bins > d, hist, 0), 0)

    @triton.jit
    def _select(SC, PM, PL, GS, IDX, H, G, S, NSP, k, R: tl.constexpr, RP: tl.constexpr, NSP_P: tl.constexpr,
                GROUP: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr):
        row = tl.program_id(0)  # b * H + h per head; b * G + g per group
        if GROUP:
            _group_rows(SC, PM, PL, GS, row // G, row % G, H, G, S, NSP, 0, S, R, RP, NSP_P, BLOCK)
            tl.debug_barrier()  # the group scores other threads stored
            src = GS + row.to(tl.int64) * S
        else:
            src = SC + row.to(tl.int64) * S
        # Keys of 32 bits, order-preserving: u = the fp32 bits, negatives' magnitude bits flipped, plus 2^31. Invalid
        # keys (-inf) have top digit 0, which no finite score above -2^127 has: pass 0 drops that digit.
        bins = tl.arange(0, 256)
        n_read = tl.cdiv(S, BLOCK) * BLOCK  # keys a pass reads, the padding of its last tile included
        zero = row * 0  # an int32 scalar (k may be the constant 1, which Triton specialises)
        prefix = zero.to(tl.int64)  # the digits of the k-th largest key found so far
        total = zero  # keys matching the prefix (the valid keys, after pass 0)
        want = zero  # how many of them must still be taken
        kk = zero  # min(k, valid keys)
        for p in tl.static_range(4):  # 8-bit digits, most significant first
            shift = 24 - 8 * p
            hist = tl.zeros([256], tl.int32)
            for start in range(0, S, BLOCK):
                u = _keys(src, start + tl.arange(0, BLOCK), S)
                match = (u >> (shift + 8)) == prefix  # every key in pass 0
                hist += tl.histogram(tl.where(match, ((u >> shift) & 255).to(tl.int32), 0), 256)
            if p == 0:
                hist, total, kk = _first(hist, bins, k)
                want = kk
            else:
                hist -= tl.where(bins == 0, n_read - total, 0)  # keys off the prefix were counted as digit 0
            d, total, want = _digit(hist, bins, total, want)
            prefix = prefix * 256 + d
        out = IDX + row.to(tl.int64) * k
        _write_kept(src, out, 0, S, S, prefix, want, zero, zero, BLOCK)
        _fill_rest(out, kk, k, KP)

    @triton.jit
    def _write_kept(src, out, lo, hi, S, thr, want, kept, equal, BLOCK: tl.constexpr):
        # the kept indices among keys lo .. hi (in tiles of BLOCK) of a row whose k-th largest key is thr: the keys
        # above it and, while fewer than ``want`` equal keys are taken (``equal`` seen before lo), those equal to
        # it; written in key order from slot ``kept``
        for start in range(lo, hi, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            u = _keys(src, cols, S)
            eq = u == thr
            n_eq = tl.sum(eq.to(tl.int32), 0)
            keep = u > thr
            if n_eq > 0:  # few tiles hold keys equal to the k-th: only they need the prefix sum of ties
                keep = keep | (eq & (equal + tl.cumsum(eq.to(tl.int32), 0) <= want))
            pos = kept + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(out + pos, cols, mask=keep)
            kept += tl.sum(keep.to(tl.int32), 0)
            equal += n_eq

    @triton.jit
    def _fill_rest(out, kk, k, KP: tl.constexpr):
        # slots kk .. k of a row: -1 (no key)
        for start in range(0, k, KP):
            slot = start + tl.arange(0, KP)
            tl.store(out + slot, tl.full([KP], -1, tl.int32), mask=(slot >= kk) & (slot < k))

    @triton.jit
    def _chain(HSUM, row, k, P: tl.constexpr):
        # the radix state after passes 0 .. P-1 from all their row histograms, step by step (TUNING["carry_state"]
        # off: every program of a pass redoes the steps of the passes before)
        bins = tl.arange(0, 256)
        zero = row * 0
        prefix = zero.to(tl.int64)
        total = zero
        want = zero
        kk = zero
        for q in tl.static_range(P):
            hist = tl.load(HSUM + (row.to(tl.int64) * 4 + q) * 256 + bins)
            if q == 0:
                hist, total, kk = _first(hist, bins, k)
                want = kk
            d, total, want = _digit(hist, bins, total, want)
            prefix = prefix * 256 + d
        return prefix, want, kk

    @triton.jit
    def _state(HSUM, ST, row, sp, k, P: tl.constexpr):
        # the radix state after passes 0 .. P-1 of the split select (P >= 1): the digits found (the prefix), the
        # keys matching it, how many of them to keep, min(k, valid keys). One radix step, on pass P-1's row
        # histogram in HSUM (rows, 4, 256), from the state after passes 0 .. P-2 that pass P-1's first split
        # stored in ST (rows, 4, 4); this pass's first split stores the new one for the next (not the write's)
        bins = tl.arange(0, 256)
        hist = tl.load(HSUM + (row.to(tl.int64) * 4 + P - 1) * 256 + bins)
        if P == 1:
            prefix = (row * 0).to(tl.int64)
            hist, total, kk = _first(hist, bins, k)
            want = kk
        else:
            rec = ST + (row.to(tl.int64) * 4 + P - 1) * 4
            prefix = tl.load(rec)
            total = tl.load(rec + 1).to(tl.int32)
            want = tl.load(rec + 2).to(tl.int32)
            kk = tl.load(rec + 3).to(tl.int32)
        d, total, want = _digit(hist, bins, total, want)
        prefix = prefix * 256 + d
        if P < 4:
            if sp == 0:
                rec = ST + (row.to(tl.int64) * 4 + P) * 4
                tl.store(rec, prefix)
                tl.store(rec + 1, total.to(tl.int64))
                tl.store(rec + 2, want.to(tl.int64))
                tl.store(rec + 3, kk.to(tl.int64))
        return prefix, want, kk

    @triton.jit
    def _split_pass(SRC, HSUM, ST, H3, A24, S, chunk, k, P: tl.constexpr, BLOCK: tl.constexpr,
                    SPARSE: tl.constexpr, CARRY: tl.constexpr):
        # pass P of the split select, program (split, row): the histogram of the next digit over its split's keys
        # that match the prefix (keys off it counted in digit 0, then taken off: 256 bins, not 512 with a bin for
        # them, halve the histogram's work), added to the row's (its nonzero bins); the last pass also keeps its
        # split's own histogram and the count of its keys above the 24-bit prefix, for the write's offsets. After
        # pass 0 a tile with at most SPARSE keys on the prefix adds them to the row's histogram (and the split's, in
        # the last pass) one atomic each instead of by tl.histogram, whose work is per key of the tile
        sp = tl.program_id(0)
        row = tl.program_id(1)
        prefix = (row * 0).to(tl.int64)  # pass 0: no digit found yet
        if P > 0:
            if CARRY:
                prefix, want, kk = _state(HSUM, ST, row, sp, k, P)
            else:
                prefix, want, kk = _chain(HSUM, row, k, P)
        shift = 24 - 8 * P
        src = SRC + row.to(tl.int64) * S
        row_hist = HSUM + (row.to(tl.int64) * 4 + P) * 256
        nsp = tl.num_programs(0)
        split_hist = H3 + (row.to(tl.int64) * nsp + sp) * 256
        bins = tl.arange(0, 256)
        if P == 2:
            tl.store(split_hist + bins, tl.zeros([256], tl.int32))  # the last pass adds into it
        hist = tl.zeros([256], tl.int32)
        off = row * 0  # keys off the prefix, among those histogrammed
        above = row * 0
        for start in range(sp * chunk, sp * chunk + chunk, BLOCK):  # chunk: a multiple of BLOCK
            u = _keys(src, start + tl.arange(0, BLOCK), S)
            match = (u >> (shift + 8)) == prefix  # every key in pass 0
            digit = ((u >> shift) & 255).to(tl.int32)
            if P == 0:
                hist += tl.histogram(digit, 256)
            else:
                on = tl.sum(match.to(tl.int32), 0)
                if on > SPARSE:
                    hist += tl.histogram(tl.where(match, digit, 0), 256)
                    off += BLOCK - on
                else:
                    one = tl.full([BLOCK], 1, tl.int32)
                    tl.atomic_add(row_hist + digit, one, mask=match, sem="relaxed")
                    if P == 3:
                        tl.atomic_add(split_hist + digit, one, mask=match, sem="relaxed")
            if P == 3:
                above += tl.sum(((u >> 8) > prefix).to(tl.int32), 0)
        hist -= tl.where(bins == 0, off, 0)
        tl.atomic_add(row_hist + bins, hist, mask=hist != 0, sem="relaxed")
        if P == 3:
            tl.atomic_add(split_hist + bins, hist, mask=hist != 0, sem="relaxed")
            tl.store(A24 + row * nsp + sp, above)

    @triton.jit
    def _split_write(SRC, HSUM, ST, H3, A24, IDX, S, chunk, k, NSP_P: tl.constexpr, BLOCK: tl.constexpr,
                     KP: tl.constexpr, CARRY: tl.constexpr):
        # the kept indices of a split, in key order: its keys above the k-th score, and those equal to it while
        # the row still takes equal keys; its first slot from the kept and equal keys of the splits before it
        sp = tl.program_id(0)
        row = tl.program_id(1)
        nsp = tl.num_programs(0)
        if CARRY:  # the k-th largest key, how many keys equal to it to keep
            thr, want, kk = _state(HSUM, ST, row, sp, k, 4)
        else:
            thr, want, kk = _chain(HSUM, row, k, 4)
        d = (thr & 255).to(tl.int32)
        bins = tl.arange(0, 256)
        splits = tl.arange(0, NSP_P)
        before = splits < sp
        h3 = tl.load(H3 + (row.to(tl.int64) * nsp + splits)[:, None] * 256 + bins[None, :], mask=before[:, None],
                     other=0)  # (NSP_P, 256): the last digit of the earlier splits' keys on the 24-bit prefix
        above = tl.sum(tl.load(A24 + row * nsp + splits, mask=before, other=0), 0)
        above += tl.sum(tl.sum(tl.where(bins[None, :] > d, h3, 0), 1), 0)
        equal = tl.sum(tl.sum(tl.where(bins[None, :] == d, h3, 0), 1), 0)
        out = IDX + row.to(tl.int64) * k
        _write_kept(SRC + row.to(tl.int64) * S, out, sp * chunk, sp * chunk + chunk, S, thr, want,
                    above + tl.minimum(equal, want), equal, BLOCK)
        if sp == 0:
            _fill_rest(out, kk, k, KP)

    @triton.jit
    def _group_split(SC, PM, PL, GS, H, G, S, NSP, chunk, R: tl.constexpr, RP: tl.constexpr, NSP_P: tl.constexpr,
                     BLOCK: tl.constexpr):
        # the group scores of one split of keys (the split select's rows, per KV group)
        sp = tl.program_id(0)
        row = tl.program_id(1)
        _group_rows(SC, PM, PL, GS, row // G, row % G, H, G, S, NSP, sp * chunk, sp * chunk + chunk, R, RP, NSP_P,
                    BLOCK)


def radix_topk(sc: torch.Tensor, k: int, groups: int | None, pm: torch.Tensor | None,
               pl: torch.Tensor | None) -> torch.Tensor:
    """``decode_topk`` by radix select: one program per row (``_select``), or split over the keys below
    TUNING["split_rows"] rows (``_split_select``), as TUNING["select"] says ("radix": by the rows)."""
    bsz, h, s_len = sc.shape
    rows = h if groups is None else groups
    idx = torch.empty(bsz, rows, k, dtype=torch.int32, device=sc.device)
    gs = sc if groups is None else torch.empty(bsz, groups, s_len, dtype=torch.float32, device=sc.device)
    pm = sc if pm is None else pm
    pl = sc if pl is None else pl
    nsp = pm.shape[-1]
    if TUNING["select"] == "split" or (TUNING["select"] == "radix" and bsz * rows < TUNING["split_rows"]):
        _split_select(sc, pm, pl, gs, idx, groups)
        return idx
    _select[(bsz * rows,)](sc, pm, pl, gs, idx, h, rows, s_len, nsp, k, R=h // rows,
                           RP=triton.next_power_of_2(h // rows), NSP_P=triton.next_power_of_2(nsp),
                           GROUP=groups is not None, BLOCK=TUNING["select_block"],
                           KP=min(1024, triton.next_power_of_2(k)), num_warps=TUNING["select_warps"])
    return idx


def _split_select(sc: torch.Tensor, pm: torch.Tensor, pl: torch.Tensor, gs: torch.Tensor, idx: torch.Tensor,
                  groups: int | None) -> None:
    """``decode_topk`` for few rows (batch 1: 16 query heads, or 8 KV groups, against 132 SMs): each row's keys split
    over about TUNING["programs"] programs. Five launches over the same grid (six per group, which first writes the
    group scores into ``gs``): four radix passes, whose programs add their split's histogram into the row's with
    integer atomics (an exact sum in any order), and the write, each split's first slot counted from the kept keys
    of the splits before it. The same sets, in the same key order, as ``_select``."""
    bsz, h, s_len = sc.shape
    rows = bsz * idx.shape[1]
    block = TUNING["select_block"]
    # at most select_splits: the write pass holds a (splits, 256) tile of the last pass's histograms
    nsp, chunk = _splits(s_len, rows, block, most=TUNING["select_splits"])
    src = sc
    if groups is not None:
        src = gs
        _group_split[(nsp, rows)](sc, pm, pl, gs, h, groups, s_len, pm.shape[-1], chunk, R=h // groups,
                                  RP=triton.next_power_of_2(h // groups), NSP_P=triton.next_power_of_2(pm.shape[-1]),
                                  BLOCK=block, num_warps=TUNING["select_warps"])
    hsum = torch.zeros(rows, 4, 256, dtype=torch.int32, device=sc.device)  # the rows' histograms, by pass
    st = torch.empty(rows, 4, 4, dtype=torch.int64, device=sc.device)  # the radix state after each pass
    h3 = torch.empty(rows, nsp, 256, dtype=torch.int32, device=sc.device)  # the last pass's, by split
    a24 = torch.empty(rows, nsp, dtype=torch.int32, device=sc.device)
    k = idx.shape[-1]
    for p in range(4):
        _split_pass[(nsp, rows)](src, hsum, st, h3, a24, s_len, chunk, k, P=p, BLOCK=block,
                                 SPARSE=TUNING["sparse_keys"], CARRY=TUNING["carry_state"],
                                 num_warps=TUNING["select_warps"])
    _split_write[(nsp, rows)](src, hsum, st, h3, a24, idx, s_len, chunk, k, NSP_P=triton.next_power_of_2(nsp),
                              BLOCK=block, KP=min(1024, triton.next_power_of_2(k)), CARRY=TUNING["carry_state"],
                              num_warps=TUNING["select_warps"])
