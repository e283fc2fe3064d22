"""Triton kernel of attention over the keys a bitmask keeps: flash attention over key tiles on the tensor cores,
each tile's scores masked by the rows' kept bits, a tile no row of the block keeps skipped.

Letters as in ``naive.py``. Against gathering each row's kept keys (``token_select.gather_attention``), which moves
2 x D values per kept key and row and is bound by that traffic (about 10 TB/s on an H200,
docs/data/perf-h200-prefill-topk-chunk1.json), a tile is loaded once for all the rows of a block and its product
runs on the tensor cores: it wins where the kept keys are a large enough share of the causal ones (``TUNING``'s
``min_density``), and where the rows of a block keep keys in few tiles.

    ``_mask_attn_fwd``  one program: BLOCK_M rows of the query heads that share one kept set (stacked, HP the
                        next power of two), BLOCK_N keys per step; online softmax in fp32.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None

# rows per program (all stacked heads together), keys per tile (at least 32: a tile reads whole words), warps,
# software-pipeline stages, whether to test each tile for a kept key (a skipped tile costs its bits; a test keeps its
# loads out of the software pipeline).
# Timed on an H200 at T = 8192, k = 2048 (prefill_tuning in docs/data/perf-h200-prefill-topk-diag.json): with every
# tile kept, as on real selections at this share of keys, testing for skips costs about 2x, so it is off. The causal
# mask applies only to the tiles that reach a block's rows (its loop is split in two). The online softmax runs in
# base 2 with the scale folded into the exponent's multiply-add and one select a key (see _mask_step): 9.87 against
# 14.86 ms per head at T = 32768, k = 2048 (0.65x SDPA's 6.45 instead of 0.43x), 10.54 against 15.55 per group;
# 64 x 64 at 4 warps and 3 stages was the fastest of 9 launches at T = 8192 and 32768 per head and per group but one
# (8192 per head: 2 stages, 2% faster) (benchmarks/tile_attention.py, docs/data/tile-attention-h200.json).
# min_density (per KV group) and min_density_head: the share of causal (row, key) pairs kept from which the policy
# takes this kernel and the bitmask selection rather than the index selection and the gather. At T = 32768, k = 256
# (share 0.016) the bitmask path took 46.0 + 9.93 ms per head against 75.4 + 7.1 (selection + attention), and per
# group 70.7 + 10.6 against 85.4 + 6.6 (docs/data/perf-h200-prefill-topk-lean.json); before the base-2 softmax the
# tile attention took 15 ms and per group the gather path won there (perf-h200-prefill-topk-cuts.json), so groups
# started at 0.04. Shares below 0.015 were not timed: the gather path stays there.
TUNING = {"rows": 64, "keys": 64, "warps": 4, "stages": 3, "skip": False, "min_density": 0.015,
          "min_density_head": 0.015}


if triton is not None:
    from ..decode.triton import _accumulate

    @triton.jit
    def _mask_attn_fwd(Q, K, V, BITS, O, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, swb, swh, swt,
                       sob, soh, sot, HI, T, n_rep_kv, n_rep_idx, scaling, softcap,
                       D: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       SOFTCAP: tl.constexpr, SKIP: tl.constexpr, IEEE: tl.constexpr):
        bz, ih = tl.program_id(1) // HI, tl.program_id(1) % HI
        rb = tl.num_programs(0) - 1 - tl.program_id(0)  # the last row blocks (the most keys) first
        r = tl.arange(0, HP * BLOCK_M)
        hh = r // BLOCK_M
        t = rb * BLOCK_M + r % BLOCK_M
        h = ih * n_rep_idx + hh
        ok = (hh < n_rep_idx) & (t < T)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + bz * sqb + h[:, None] * sqh + t[:, None] * sqt + offs_d[None, :], mask=ok[:, None], other=0.0)
        g = (ih * n_rep_idx) // n_rep_kv  # every stacked head reads this KV head
        kbase = K + bz * skb + g * skh
        vbase = V + bz * svb + g * svh
        wrow = BITS + bz.to(tl.int64) * swb + ih.to(tl.int64) * swh + t.to(tl.int64) * swt  # > 2**31 words at 128k
        m = tl.full([HP * BLOCK_M], -1.0e30, tl.float32)
        l = tl.zeros([HP * BLOCK_M], tl.float32)
        acc = tl.zeros([HP * BLOCK_M, D], tl.float32)
        full = (rb * BLOCK_M // BLOCK_N) * BLOCK_N  # the tiles wholly before the block's first row: no causal mask
        for start in range(0, full, BLOCK_N):
            m, l, acc = _mask_tile(q, kbase, vbase, wrow, ok, t, start, skt, svt, T, scaling, softcap, m, l, acc,
                                   D, HP * BLOCK_M, BLOCK_N, SOFTCAP, SKIP, IEEE, False)
        for start in range(full, tl.minimum((rb + 1) * BLOCK_M, T), BLOCK_N):
            m, l, acc = _mask_tile(q, kbase, vbase, wrow, ok, t, start, skt, svt, T, scaling, softcap, m, l, acc,
                                   D, HP * BLOCK_M, BLOCK_N, SOFTCAP, SKIP, IEEE, True)
        out = acc / tl.maximum(l, 1e-30)[:, None]
        tl.store(O + bz * sob + h[:, None] * soh + t[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=ok[:, None])


    @triton.jit
    def _mask_tile(q, kbase, vbase, wrow, ok, t, start, skt, svt, T, scaling, softcap, m, l, acc,
                   D: tl.constexpr, RP: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                   SKIP: tl.constexpr, IEEE: tl.constexpr, CAUSAL: tl.constexpr):
        # one tile of keys from start: the rows' kept bits (and the causal mask, on tiles that reach the rows: the
        # words past a row's causal keys are not written), then an online-softmax step, skipped with SKIP where
        # no row keeps a key
        cols = start + tl.arange(0, BLOCK_N)
        wc = start // 32 + tl.arange(0, BLOCK_N // 32)  # the tile's words, spread over its keys
        w = tl.load(wrow[:, None] + wc[None, :], mask=ok[:, None] & (wc * 32 < T)[None, :], other=0)
        w = tl.reshape(tl.broadcast_to(w[:, :, None], [RP, BLOCK_N // 32, 32]), [RP, BLOCK_N])
        keep = (w & (1 << (tl.arange(0, BLOCK_N) % 32))[None, :]) != 0  # start is a whole number of words
        if CAUSAL:
            keep = keep & (cols[None, :] <= t[:, None])
        if SKIP:
            if tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0:
                m, l, acc = _mask_step(q, kbase, vbase, keep, cols, skt, svt, T, scaling, softcap, m, l, acc,
                                       D, SOFTCAP, IEEE)
        else:
            m, l, acc = _mask_step(q, kbase, vbase, keep, cols, skt, svt, T, scaling, softcap, m, l, acc,
                                   D, SOFTCAP, IEEE)
        return m, l, acc

    @triton.jit
    def _mask_step(q, kbase, vbase, keep, cols, skt, svt, T, scaling, softcap, m, l, acc,
                   D: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
        # the online softmax in base 2 (m in log2 units): x the raw products (the softcapped logits with SOFTCAP),
        # c their scale to log2 units, folded into the exponent's multiply-add; a key no row keeps gets -inf, so
        # its exp2 is 0 without a second select (m starts finite: no row computes -inf - -inf)
        offs_d = tl.arange(0, D)
        kt = tl.load(kbase + cols[:, None] * skt + offs_d[None, :], mask=(cols < T)[:, None], other=0.0)
        if IEEE:
            x = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            x = tl.dot(q, tl.trans(kt))
        if SOFTCAP:
            x = x * scaling
            x = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0)  # tanh
            c = 1.4426950408889634
        else:
            c = scaling * 1.4426950408889634
        x = tl.where(keep, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1) * c)  # c > 0: the max of the scaled products
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(x * c - m_new[:, None])
        vt = tl.load(vbase + cols[:, None] * svt + offs_d[None, :], mask=(cols < T)[:, None], other=0.0)
        l, acc = _accumulate(p, alpha, vt, l, acc, IEEE)
        return m_new, l, acc


def mask_attention(q, k, v, bits, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Triton twin of ``mask_attention_reference``; forward only. bits (B, H', T, W): a kept set per head, or shared
    by groups of H // H' query heads that read one KV head. Returns (B, T, H, D) in q's dtype, the layout
    transformers' attention functions return."""
    bsz, h, t, d = q.shape
    n_rep_idx, n_rep_kv = h // bits.shape[1], h // k.shape[1]
    if n_rep_kv % n_rep_idx:
        raise ValueError(f"a kept set shared by {n_rep_idx} query heads spans KV heads ({n_rep_kv} per KV head)")
    hp = triton.next_power_of_2(n_rep_idx)
    rows = max(1, TUNING["rows"] // hp)
    out = torch.empty(bsz, t, h, d, dtype=q.dtype, device=q.device)
    _mask_attn_fwd[(triton.cdiv(t, rows), bsz * bits.shape[1])](
        q, k, v, bits, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *bits.stride()[:3],
        out.stride(0), out.stride(2), out.stride(1), bits.shape[1], t, n_rep_kv, n_rep_idx, float(scaling),
        float(softcap or 1.0), D=d, HP=hp, BLOCK_M=rows, BLOCK_N=max(32, TUNING["keys"]), SOFTCAP=bool(softcap),
        SKIP=TUNING["skip"], IEEE=q.dtype == torch.float32, num_warps=TUNING["warps"],
        num_stages=TUNING["stages"])
    return out
