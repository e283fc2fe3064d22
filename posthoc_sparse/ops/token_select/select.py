"""Launchers of the token-level selection kernels (``triton.py``): the counting alone (``token_bracket``), the
kept sets as indices or a bitmask (``token_select``), and as one cut per row (``token_thresholds``)."""

from __future__ import annotations

import torch

from .triton import TUNING

try:
    import triton
except ImportError:  # the naive path serves
    triton = None

if triton is not None:
    from .triton import _row_lse, _token_bracket, _token_write


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
    if TUNING["select_cands"] not in (2, 4, 8) or t >= 2**21:
        raise ValueError("token_select counts 2, 4 or 8 candidates per sweep, over fewer than 2**21 keys")
    lse = torch.empty(bsz, h, t if group > 1 else 0, dtype=torch.float32, device=a.device)
    counted = torch.empty(bsz, g, triton.cdiv(t, rows), dtype=torch.int32, device=a.device)
    if group > 1:
        _row_lse[(triton.cdiv(t, rows), bsz * h)](
            a, b, lse, *a.stride()[:3], *b.stride()[:3], h, t, h // b.shape[1], float(scale), float(softcap or 1.0),
            DS=ds, NC=nc, BLOCK_M=rows, SOFTCAP=bool(softcap), IEEE=ieee, num_warps=TUNING["select_warps"])
    bracket = torch.empty(bsz * g, t, 4, dtype=torch.int64, device=a.device)
    _token_bracket[(triton.cdiv(t, rows), bsz * g)](
        a, b, lse, bracket, counted, *a.stride()[:3], *b.stride()[:3], h, g, t, h // b.shape[1], float(scale),
        float(softcap or 1.0), k, **_kernel_args(a, group, softcap), BLOCK_M=rows, NC=nc, R=TUNING["select_cands"],
        GUESS=TUNING["select_guess"], num_warps=TUNING["select_warps"])
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
    shape = (bsz, g, t, (t + 31) // 32 if bits else k)
    idx = torch.empty(shape, dtype=torch.int32, device=a.device)
    w_keys = max(TUNING["write_keys"], 32) if bits else TUNING["write_keys"]
    _write(a, b, k, scale, group, softcap, bracket, lse, idx, TUNING["write_rows"], w_keys, TUNING["write_warps"],
           1 if bits else 0)
    return (idx, counted) if sweeps else idx


def token_thresholds(a: torch.Tensor, b: torch.Tensor, k: int, scale: float = 1.0, group: int = 1,
                     softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_select``'s sets as one cut per row: (B, H // group, T, 2) int32, the least kept (score, -index)
    pair, the score's fp32 bits and the index. A causal key is kept where its selection score is above the cut's
    score, or equal to it with an index at most the cut's (``keep_from_thresholds``): the same set as
    ``token_select``'s, without writing it. Also returns the rows' log-sum-exp (group selection; else empty),
    which a consumer needs to rescore the keys (``ops.mask_attention.threshold_attention``)."""
    bsz, h, t = a.shape[:3]
    bracket, lse, _ = token_bracket(a, b, k, scale, group, softcap)
    cuts = torch.empty(bsz, h // group, t, 2, dtype=torch.int32, device=a.device)
    _write(a, b, k, scale, group, softcap, bracket, lse, cuts, TUNING["cut_rows"], TUNING["select_keys"],
           TUNING["cut_warps"], 2)
    return cuts, lse


def _write(a, b, k, scale, group, softcap, bracket, lse, out, rows: int, keys: int, warps: int, mode: int) -> None:
    """``_token_write`` into ``out`` (B, H // group, T, ...) under one launch and output mode (its OUT)."""
    bsz, h, t = a.shape[:3]
    g = h // group
    words = torch.empty(bsz, g, t, TUNING["select_band"], dtype=torch.int64, device=a.device)
    _token_write[(triton.cdiv(t, rows), bsz * g)](
        a, b, lse, bracket, out, words, *a.stride()[:3], *b.stride()[:3], *out.stride()[:3], h, g, t,
        h // b.shape[1], float(scale), float(softcap or 1.0), k, **_kernel_args(a, group, softcap), BLOCK_M=rows,
        NC=keys, RC=TUNING["select_rank_chunk"], OUT=mode, num_warps=warps)
