"""The bitmask write of ``token_select(..., bits=True)`` without per-key running offsets (Triton).

``_token_write`` ranks every key of a row's band [lo, hi) by a running offset (``tl.cumsum`` over each tile),
which made its sweep cost about four counting sweeps. A bitmask needs no offsets for most keys: the keys at or
above hi are all kept, and where the band fits in the row's quota (k less the keys above it), the band's keys
too, so a tile's bits are two compares. Only two kinds of row need more:

- a band larger than the quota and at most BAND keys: the band's keys go to the row's BAND-slot scratch in
  order of arrival, and after the sweep they are ranked against each other by (score, -index) as in
  ``_token_write``; the quota's best get their bits by atomic or. A row's band holds a few dozen of its thousands
  of keys, so a tile mostly holds none or one of them: each tile stores its best and worst band key of each row
  (row reductions, as a counting sweep's), and only where a row has more than two in one tile are they placed by a
  running offset (``tl.cumsum``, in that tile alone);
- a band larger than the quota and than BAND: the counting stopped there because it holds one value, so the
  lowest indices are kept, by a running count (``tl.cumsum``) taken only in the blocks that hold such a row.

Same sets as ``_token_write`` (and ``token_select_reference``): exactly min(k, causal keys) per row, equal scores
by the lower index. Chosen by ``TUNING["bits_kernel"]``.
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
    from .triton import _band_ranks, _block, _thresholds, _tile, _unmono

    @triton.jit
    def _token_bits(A, Bk, LSE, BR, OUT, WORDS, sab, sah, sat, sbb, sbh, sbt, sib, sih, sit,
                    H, G, T, n_rep_b, scale, softcap, k,
                    DS: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, NC: tl.constexpr, BAND: tl.constexpr, RC: tl.constexpr):
        # One program: BLOCK_M rows, with the thresholds _token_bracket stored (lo, hi, keys at or above each).
        rb, bz, g, rows, row_ok, a, end = _block(A, sab, sah, sat, G, T, DS, BLOCK_M)
        lo, hi, cnt_hi, quota, band_n = _thresholds(BR, T, rows, row_ok, k)
        whole = band_n <= quota  # the band's keys all kept
        ranked = row_ok & ~whole & (band_n <= BAND)
        tied = row_ok & ~whole & (band_n > BAND)  # one value: the lowest indices
        any_ranked = tl.max(ranked.to(tl.int32), 0) > 0
        any_tied = tl.max(tied.to(tl.int32), 0) > 0
        lval, hval = _unmono(lo), _unmono(hi)
        out = OUT + bz * sib + g * sih + rows * sit
        wbase = WORDS + (tl.program_id(1) * T + rows) * BAND  # (B x H or G, T, BAND) contiguous
        seen = tl.zeros([BLOCK_M], tl.int32)  # band keys so far, of tied rows
        nb = tl.zeros([BLOCK_M], tl.int32)  # and of ranked rows
        for start in range(0, end, NC):
            cols = start + tl.arange(0, NC)
            s = _tile(A, Bk, LSE, a, bz, g, rows, row_ok, start, rb * BLOCK_M, cols, sab, sah, sat, sbb, sbh, sbt,
                      H, T, n_rep_b, scale, softcap, DS, GROUP, SOFTCAP, IEEE, BLOCK_M, NC)
            above = s >= hval[:, None]
            band = (s >= lval[:, None]) & ~above
            take = above | (band & whole[:, None])
            if any_tied:
                brank = seen[:, None] + tl.cumsum(band.to(tl.int32), 1) - 1
                take = take | (band & tied[:, None] & (brank < quota[:, None]))
                seen += tl.sum(band.to(tl.int32), 1)
            wcols = start // 32 + tl.arange(0, NC // 32)  # the tile's words: distinct powers of two, summed
            words = tl.sum(tl.reshape(take.to(tl.int32) << (cols % 32)[None, :], [BLOCK_M, NC // 32, 32]), 2)
            tl.store(out[:, None] + wcols[None, :], words, mask=row_ok[:, None] & (wcols * 32 < T)[None, :])
            if any_ranked:  # a ranked row's band keys to its slots, in order of arrival
                put = band & ranked[:, None]
                nput = tl.sum(put.to(tl.int32), 1)
                few = nput <= 2  # the tile's best and worst band key of each row (one key: both the same)
                s1 = tl.max(tl.where(put, s, float("-inf")), 1)
                s2 = tl.min(tl.where(put, s, float("inf")), 1)
                c1 = tl.min(tl.where(put & (s == s1[:, None]), cols[None, :], T), 1)  # equal scores: lower index
                c2 = tl.max(tl.where(put & (s == s2[:, None]), cols[None, :], -1), 1)
                tl.store(wbase + nb, _packed(tl.where(s1 == 0.0, 0.0, s1), c1),
                         mask=few & (nput >= 1) & (nb < BAND))
                tl.store(wbase + nb + 1, _packed(tl.where(s2 == 0.0, 0.0, s2), c2),
                         mask=few & (nput == 2) & (nb + 1 < BAND))
                if tl.max(nput, 0) > 2:  # a row with more band keys in this tile: each by a running offset
                    slot = nb[:, None] + tl.cumsum(put.to(tl.int32), 1) - 1
                    col2 = cols[None, :] + tl.zeros([BLOCK_M, NC], tl.int32)
                    tl.store(wbase[:, None] + slot, _packed(tl.where(s == 0.0, 0.0, s), col2),
                             mask=put & ~few[:, None] & (slot < BAND))
                nb += nput
        if any_ranked:
            tl.debug_barrier()  # the words and bits other threads stored
            # the slots filled: band_n, unless a score came out otherwise than in the counting
            inb, rank, col = _band_ranks(wbase, tl.minimum(nb, BAND), ranked, BLOCK_M, BAND, RC)
            tl.atomic_or(out[:, None] + col // 32, 1 << (col % 32), mask=inb & (rank < quota[:, None]))


def write_bits(a: torch.Tensor, b: torch.Tensor, k: int, scale: float, group: int, softcap: float | None,
               bracket: torch.Tensor, lse: torch.Tensor, tuning: dict, kernel_args: dict) -> torch.Tensor:
    """The kept sets of ``token_bracket``'s thresholds as ``token_select``'s bitmask, (B, H // group, T,
    ceil(T / 32)) int32 (words past a row's causal keys are not written)."""
    bsz, h, t = a.shape[:3]
    g = h // group
    out = torch.empty(bsz, g, t, (t + 31) // 32, dtype=torch.int32, device=a.device)
    words = torch.empty(bsz, g, t, kernel_args["BAND"], dtype=torch.int64, device=a.device)
    rows = tuning["bits_rows"]
    _token_bits[(triton.cdiv(t, rows), bsz * g)](
        a, b, lse, bracket, out, words, *a.stride()[:3], *b.stride()[:3], *out.stride()[:3], h, g, t,
        h // b.shape[1], float(scale), float(softcap or 1.0), k, **kernel_args, BLOCK_M=rows,
        NC=max(tuning["bits_keys"], 32), RC=tuning["select_rank_chunk"], num_warps=tuning["bits_warps"])
    return out
