"""Triton kernels of gated top-k decoding: one new query per sequence scores the cached selection keys, keeps
the top k per row, and attends over the kept K/V rows. Letters and definitions as in ``naive.py``.

Four launches per layer (eight or nine with the split select), every one free of host synchronisation (fixed
grids, no value read back), so a static-cache step can be captured as a CUDA graph:

    ``_score``    grid (splits of S, B x Hs). Flash-decoding style: each program reads one contiguous split of
                  one selection-key head's cached keys (tiles of BLOCK_S rows, skipping invalid keys: masked
                  loads fetch nothing) and scores the H / Hs query rows that use that head (one ``tl.dot``, the
                  rows padded to 16; or one row, a hidden gate's, by products summed: TUNING). Writes the fp32
                  scores (B, H, S), -inf where invalid; for per-group selection also each split's running max and
                  sum of exp (for the heads' log-sum-exp).
    ``_select``   the exact top k of each row (radix select: ``radix.py``, one launch, or five to six
                  split over the keys when the rows are few).
    ``_attend``   grid (splits of the k slots, B x H or B x G). Each program gathers its slots' K and V rows (one
                  256-byte row per key and head_dim 128 in bf16), online softmax, and writes an unnormalised
                  partial output with its max and sum (flash-decoding). Per-group selection puts the group's heads
                  in one program, so each kept K/V row is read once per group.
    ``_combine``  grid (B x H): merges the splits into the output (B, 1, H, D) in the model's dtype.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None

from . import radix
from .tuning import TUNING, _splits

if triton is not None:
    from .radix import NEG  # the "no score" value of the partial maxima both files read: one definition

    @triton.jit
    def _online_step(s, keep, vt, m, l, acc, IEEE: tl.constexpr):
        # one online-softmax step over a tile of keys: s (RP, N) logits already masked, keep (RP or 1, N) the keys
        # that count, vt (N, D) their values; the running max m, sum l and output acc (fp32) carried
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(keep, tl.exp(s - m_new[:, None]), 0.0)
        l, acc = _accumulate(p, alpha, vt, l, acc, IEEE)
        return m_new, l, acc

    @triton.jit
    def _accumulate(p, alpha, vt, l, acc, IEEE: tl.constexpr):
        # an online-softmax step's sums: the running sum l and output acc rescaled by alpha, plus the tile's
        # weights p (RP, N) and their values vt (N, D)
        l = l * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        return l, acc

    @triton.jit
    def _logits(q, kt, scale, cap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
        # (RP, D) x (N, D) -> (RP, N) fp32: q . k * scale, tanh-capped at cap with SOFTCAP; exact fp32 products
        # for fp32 inputs (IEEE), else the tensor cores' (bf16 / fp16 products, fp32 sums)
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(kt)) * scale
        return _capped(s, cap, SOFTCAP)

    @triton.jit
    def _capped(s, cap, SOFTCAP: tl.constexpr):
        # s tanh-capped at cap with SOFTCAP, as fp32
        if SOFTCAP:
            s = cap * (2.0 / (1.0 + tl.exp(-2.0 * s / cap)) - 1.0)  # tanh
        return s.to(tl.float32)  # inductor passes Python floats (scale, cap) as fp64 scalars, which would promote s

    @triton.jit
    def _score(SQ, SK, VALID, SC, PM, PL, sqb, sqh, skb, skh, sks, svb, svs, H, HS, S, split, sel_scale, sel_cap,
               R: tl.constexpr, RP: tl.constexpr, DS: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
               SOFTCAP: tl.constexpr, STATS: tl.constexpr, IEEE: tl.constexpr):
        sp = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // HS).to(tl.int64)
        g = bg % HS
        r = tl.arange(0, RP)
        rows = g * R + r  # the query heads using selection-key head g
        offs_d = tl.arange(0, DS)
        q = tl.load(SQ + b * sqb + rows[:, None] * sqh + offs_d[None, :], mask=(r < R)[:, None], other=0.0)
        m = tl.full([RP], NEG, tl.float32)
        l = tl.zeros([RP], tl.float32)
        for start in range(sp * split, sp * split + split, BLOCK_S):  # split: a multiple of BLOCK_S
            cols = start + tl.arange(0, BLOCK_S)
            ok = cols < S
            if HAS_MASK:
                ok = ok & (tl.load(VALID + b * svb + cols * svs, mask=ok, other=0) != 0)
            kt = tl.load(SK + b * skb + g * skh + cols[:, None] * sks + offs_d[None, :], mask=ok[:, None], other=0.0)
            if RP == 1:  # one query row (a hidden gate's keys per query head): products summed, no padded tl.dot
                s = _capped(tl.sum(q.to(tl.float32) * kt.to(tl.float32), 1)[None, :] * sel_scale, sel_cap, SOFTCAP)
            else:
                s = _logits(q, kt, sel_scale, sel_cap, SOFTCAP, IEEE)
            s = tl.where(ok[None, :], s, float("-inf"))
            tl.store(SC + (b * H + rows[:, None]) * S + cols[None, :], s, mask=(r < R)[:, None] & (cols < S)[None, :])
            if STATS:
                m_new = tl.maximum(m, tl.max(s, 1))
                l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
                m = m_new
        if STATS:
            nsp = tl.num_programs(0)
            tl.store(PM + (b * H + rows) * nsp + sp, m, mask=r < R)
            tl.store(PL + (b * H + rows) * nsp + sp, l, mask=r < R)

    @triton.jit
    def _attend(Q, K, V, IDX, PO, PM, PL, sqb, sqh, skb, skh, sks, svb, svh, svs, H, NR, k, chunk, scaling, cap,
                R: tl.constexpr, ROWS: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
        # ROWS query heads per program: a KV group's R heads (one kept set per group), or 1 (one per head)
        sp = tl.program_id(0)
        br = tl.program_id(1)
        b = (br // NR).to(tl.int64)
        i = br % NR  # the selection row: a query head, or a KV group
        r = tl.arange(0, RP)
        first = i * ROWS  # the program's first query head
        kvh = first // R
        rows = first + r
        row_ok = r < ROWS
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + rows[:, None] * sqh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m = tl.full([RP], NEG, tl.float32)
        l = tl.zeros([RP], tl.float32)
        acc = tl.zeros([RP, D], tl.float32)
        for start in range(sp * chunk, sp * chunk + chunk, BLOCK_N):  # chunk: a multiple of BLOCK_N
            slots = start + tl.arange(0, BLOCK_N)
            idx = tl.load(IDX + br.to(tl.int64) * k + slots, mask=slots < k, other=-1)
            ok = idx >= 0
            pos = tl.where(ok, idx, 0)
            kt = tl.load(K + b * skb + kvh * skh + pos[:, None] * sks + offs_d[None, :], mask=ok[:, None], other=0.0)
            vt = tl.load(V + b * svb + kvh * svh + pos[:, None] * svs + offs_d[None, :], mask=ok[:, None], other=0.0)
            s = tl.where(ok[None, :], _logits(q, kt, scaling, cap, SOFTCAP, IEEE), NEG)
            m, l, acc = _online_step(s, ok[None, :], vt, m, l, acc, IEEE)
        nsp = tl.num_programs(0)
        part = (b * H + rows) * nsp + sp
        tl.store(PO + part[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(PM + part, m, mask=row_ok)
        tl.store(PL + part, l, mask=row_ok)

    @triton.jit
    def _combine(PO, PM, PL, O, sob, soh, H, NSP, D: tl.constexpr, NSP_P: tl.constexpr):
        bh = tl.program_id(0)
        offs = tl.arange(0, NSP_P)
        offs_d = tl.arange(0, D)
        ok = offs < NSP
        m = tl.load(PM + bh * NSP + offs, mask=ok, other=NEG)
        w = tl.where(ok, tl.exp(m - tl.max(m, 0)), 0.0)
        l = tl.sum(w * tl.load(PL + bh * NSP + offs, mask=ok, other=0.0), 0)
        o = tl.load(PO + (bh * NSP + offs)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.maximum(l, 1e-30)
        tl.store(O + (bh // H) * sob + (bh % H) * soh + offs_d, out.to(O.dtype.element_ty))


def _rows(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot takes at least 16 rows


def one_row(h: int, hs: int) -> bool:
    """Whether ``_score`` scores one query row per selection-key head by products summed (TUNING)."""
    return h == hs and TUNING["score_products"]


def decode_scores(sq: torch.Tensor, sk: torch.Tensor, valid: torch.Tensor | None, sel_scale: float = 1.0,
                  sel_softcap: float | None = None, stats: bool = False):
    """``_score``: the selection scores (B, H, S) fp32 (-inf where invalid) and, with ``stats``, each split's
    max and sum of exp (B, H, splits) for the heads' log-sum-exp. sq (B, H, ds), sk (B, Hs, S, ds) in one
    dtype, last dims contiguous; valid (B, S) bool or None."""
    bsz, h, ds = sq.shape
    hs, s_len = sk.shape[1], sk.shape[2]
    nsp, split = _splits(s_len, bsz * hs, TUNING["block_s"])
    sc = torch.empty(bsz, h, s_len, dtype=torch.float32, device=sq.device)
    pm = torch.empty(bsz, h, nsp if stats else 1, dtype=torch.float32, device=sq.device)
    pl = torch.empty_like(pm)
    # a bool mask read as bytes: a view eagerly (no copy); torch.compile's inductor cannot lower that view
    mask = sc if valid is None else valid.to(torch.uint8) if torch.compiler.is_compiling() else valid.view(torch.uint8)
    _score[(nsp, bsz * hs)](
        sq, sk, mask, sc, pm, pl, sq.stride(0), sq.stride(1), sk.stride(0), sk.stride(1), sk.stride(2),
        mask.stride(0), mask.stride(-1), h, hs, s_len, split, float(sel_scale), float(sel_softcap or 1.0),
        R=h // hs, RP=1 if one_row(h, hs) else _rows(h // hs), DS=ds, BLOCK_S=TUNING["block_s"],
        HAS_MASK=valid is not None, SOFTCAP=bool(sel_softcap), STATS=stats, IEEE=sq.dtype == torch.float32,
        num_warps=TUNING["score_warps"])
    return sc, pm, pl


def decode_topk(sc: torch.Tensor, k: int, groups: int | None = None, pm: torch.Tensor | None = None,
                pl: torch.Tensor | None = None) -> torch.Tensor:
    """The k keys of largest score per row, (B, R, k) int32 in key order, -1 past a row's valid keys (radix select,
    ``radix.py``; or torch.topk per head with TUNING["select"] = "torch"). sc (B, H, S) from ``decode_scores``;
    per KV group (R = ``groups``) it needs that call's ``stats`` (pm, pl)."""
    bsz, h, s_len = sc.shape
    rows = h if groups is None else groups
    if TUNING["select"] == "torch" and groups is None:
        val, idx = sc.topk(min(k, s_len), dim=-1, sorted=False)
        idx = idx.masked_fill(val == float("-inf"), -1).to(torch.int32)
        return torch.cat((idx, idx.new_full((bsz, rows, k - idx.shape[-1]), -1)), dim=-1)
    return radix.radix_topk(sc, k, groups, pm, pl)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scaling: float,
                     softcap: float | None = None) -> torch.Tensor:
    """``_attend`` + ``_combine``: q (B, H, D) over the keys ``idx`` (B, R, n) names (R = H, or G: one set per KV
    group); k, v (B, G, S, D), last dims contiguous. Returns (B, 1, H, D) in q's dtype."""
    bsz, h, d = q.shape
    g = k.shape[1]
    rows, n = idx.shape[1], idx.shape[2]
    group = rows != h
    nsp, chunk = _splits(n, bsz * rows, TUNING["block_n"])
    po = torch.empty(bsz, h, nsp, d, dtype=torch.float32, device=q.device)
    pm = torch.empty(bsz, h, nsp, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    r = h // g
    _attend[(nsp, bsz * rows)](
        q, k, v, idx, po, pm, pl, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), h, rows, n, chunk, float(scaling), float(softcap or 1.0), R=r,
        ROWS=r if group else 1, RP=_rows(r if group else 1), D=d, BLOCK_N=TUNING["block_n"], SOFTCAP=bool(softcap),
        IEEE=q.dtype == torch.float32, num_warps=TUNING["attn_warps"])
    out = torch.empty(bsz, 1, h, d, dtype=q.dtype, device=q.device)
    _combine[(bsz * h,)](po, pm, pl, out, out.stride(0), out.stride(2), h, nsp, D=d,
                         NSP_P=triton.next_power_of_2(nsp), num_warps=4)
    return out


def gated_decode(sq, sk, q, k, v, valid, top_k: int, scaling: float, softcap: float | None = None,
                 sel_scale: float = 1.0, sel_softcap: float | None = None, group: bool = False) -> torch.Tensor:
    """``gated_decode_reference`` through the kernels: (B, 1, H, D) in q's dtype. sq is cast to sk's dtype."""
    sc, pm, pl = decode_scores(sq.to(sk.dtype), sk, valid, sel_scale, sel_softcap, stats=group)
    idx = decode_topk(sc, top_k, k.shape[1] if group else None, pm, pl)
    return decode_attention(q, k, v, idx, scaling, softcap)
