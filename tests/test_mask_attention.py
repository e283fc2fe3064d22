"""ops.mask_attention (attention over the keys a per-row bitmask keeps, on key tiles) against its naive twin, the
bitmask helpers, and ops.token_select's bitmask output against the reference's kept sets (on the CPU through
TRITON_INTERPRET=1, on the GPU in fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from posthoc_sparse.ops import HAVE_TRITON
from posthoc_sparse.ops import mask_attention as ma
from posthoc_sparse.ops import token_select as ts
from posthoc_sparse.ops.token_select import triton as ts_triton

from benchmarks.parts_attention import MASK_LAUNCHES
from benchmarks.tile_attention import LAUNCHES as TILE_LAUNCHES

from .test_head_topk import SMALL, _inputs

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def test_bitmask_helpers_round_trip_every_bit_including_the_sign_bit():
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 5, 70, generator=gen) < 0.5
    keep[..., 31] = keep[..., 63] = True  # bit 31 of words 0 and 1: the sign bit
    bits = ma.bits_from_keep(keep)
    assert bits.shape == (3, 5, 3) and bits.dtype == torch.int32 and (bits < 0).any()
    assert torch.equal(ma.keep_from_bits(bits, 70), keep)
    idx = torch.tensor([[3, 31, -1, 64], [0, -1, -1, -1]], dtype=torch.int32)
    want = torch.zeros(2, 70, dtype=torch.bool)
    want[0, [3, 31, 64]] = want[1, 0] = True
    assert torch.equal(ma.keep_from_bits(ma.bits_from_indices(idx, 70), 70), want)
    assert ma.kept_share(100, 100) == 1.0 and ma.kept_share(100, 1) == pytest.approx(100 / 5050)
    diagonal = ma.bits_from_keep(torch.eye(128, dtype=torch.bool))[None, None]  # each row keeps only itself
    noise = ma.bits_from_keep(torch.ones(128, 128, dtype=torch.bool).triu(1))[None, None]  # past the causal keys
    assert ma.kept_tile_share(diagonal | noise, 64, 64) == pytest.approx(2 / 3)  # 2 of the 3 causal 64 x 64 tiles
    assert ma.kept_tile_share(diagonal, 32, 64) == pytest.approx(4 / 6)  # blocks of 32: 6 causal tiles


def test_the_bitmask_path_is_taken_from_the_same_share_per_head_and_per_group():
    """At T = 32768, k = 256 (a share of 0.016) the bitmask selection and tile attention beat the index selection and
    the gather per head (46.0 + 9.9 against 75.4 + 7.1 ms on an H200) and per group (70.7 + 10.6 against 85.4 + 6.6,
    docs/data/perf-h200-prefill-topk-lean.json); at k = 2048 both; below the share timed, the gather."""
    assert ma.kept_share(32768, 256) == pytest.approx(0.0156, abs=1e-4)
    assert ma.dense_enough(32768, 256, per_head=True) and ma.dense_enough(32768, 256)
    assert ma.dense_enough(32768, 2048) and ma.dense_enough(32768, 2048, per_head=True)
    assert not ma.dense_enough(32768, 64, per_head=True) and not ma.dense_enough(32768, 64)


def _structured(b, n_sets, t, seed):
    """Kept sets with empty tiles: a sink, a local window and a few far keys per row (a real gate's shape)."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.arange(t)[:, None], torch.arange(t)[None, :]
    keep = (cols == 0) | ((rows - cols >= 0) & (rows - cols < 5))
    keep = keep | (torch.rand(b, n_sets, t, t, generator=gen) < 0.02)
    return ma.bits_from_keep(keep & (cols <= rows))


@pytest.mark.parametrize("sets", ["topk", "structured"])
@pytest.mark.parametrize("b, h, g, t, d, n_sets, softcap", [
    (2, 4, 2, 37, 16, 4, None),  # a set per head, GQA, one tile short of two
    (2, 4, 2, 100, 16, 2, 5.0),  # a set per KV group (two query heads stacked), softcap
    (1, 2, 1, 70, 32, 2, None),  # MQA, per head
])
@pytest.mark.parametrize("rows, keys, skip", [(16, 32, True), (64, 32, False), (32, 64, True)])
def test_mask_attention_kernel_equals_the_reference(sets, b, h, g, t, d, n_sets, softcap, rows, keys, skip,
                                                    monkeypatch):
    for key, value in dict(rows=rows, keys=keys, skip=skip).items():
        monkeypatch.setitem(ma.TUNING, key, value)
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(b, n, t, d, generator=gen) for n in (h, g, g))
    if sets == "topk":
        a, keys_ = torch.randn(b, h, t, 16, generator=gen), torch.randn(b, g, t, 16, generator=gen)
        bits = ma.bits_from_indices(ts.token_select_reference(a, keys_, 13, 1.0, h // n_sets), t)
    else:
        bits = _structured(b, n_sets, t, seed=t)
    got = ma.mask_attention(q, k, v, bits, 0.25, softcap)
    assert got.shape == (b, t, h, d)
    want = ma.mask_attention_reference(q, k, v, bits, 0.25, softcap)
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-5, rtol=1e-5)
    if sets == "topk":  # the same as attending over the index sets
        idx = ts.token_select_reference(a, keys_, 13, 1.0, h // n_sets)
        torch.testing.assert_close(want, ts.gather_attention_reference(q, k, v, idx, 0.25, softcap), atol=1e-6,
                                   rtol=1e-6)


def test_mask_attention_ignores_bits_past_a_rows_causal_keys():
    """token_select leaves the words past a row's causal keys unwritten: whatever they hold changes nothing."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    bits = _structured(1, 2, 40, seed=1)
    noisy = bits | ma.bits_from_keep(torch.ones(40, 40, dtype=torch.bool).triu(1))
    torch.testing.assert_close(ma.mask_attention(q, k, v, noisy, 0.3), ma.mask_attention(q, k, v, bits, 0.3))


def test_mask_attention_refuses_a_set_shared_across_kv_heads():
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 4, 8, 16)
    assert not ma.supports(q, k, 2)
    with pytest.raises(ValueError, match="spans KV heads"):
        ma.mask_attention(q, k, k, torch.zeros(1, 2, 8, 1, dtype=torch.int32), 1.0)


BITMASK_CASES = [
    ("randn", 2, 4, 2, 100, 16, 9, 1),  # counting sweeps and the ranked band (set by atomic or)
    ("randn", 2, 4, 2, 77, 32, 12, 2),  # per group
    ("randn", 1, 4, 4, 40, 16, 33, 2),  # k above most rows' keys
    ("grid", 2, 2, 2, 90, 16, 10, 1),  # ties: the lowest indices
    ("dup", 2, 4, 2, 77, 16, 12, 2),
]


@pytest.mark.parametrize("kind, b, h, g, t, d, k, group, kernel", [
    case + (kernel,) for kernel in ("offsets", "reduce-words") for case in BITMASK_CASES  # the two defaults
] + [  # the other ways of putting band keys differ only there: on a ranked band per head, and per group with ties
    BITMASK_CASES[i] + (kernel,) for kernel in ("reduce", "reduce-atomic", "reduce-rows") for i in (0, 4)])
def test_token_select_bitmask_holds_the_reference_sets(kind, b, h, g, t, d, k, group, kernel, monkeypatch):
    """Both bitmask writes (running offsets; row reductions, the band's keys put as words, best first, by atomic
    slots or each row's first and last of a tile by row reductions), on rows of every kind the second one treats
    apart: the band kept whole, ranked in slots, or one tied value kept by lowest index."""
    band = kernel.split("-")[1] if "-" in kernel else "extract"
    for key, value in (SMALL | {"select_keys": 32, "bits_kernel": kernel.split("-")[0], "bits_band": band,
                                "bits_rows": 16, "bits_keys": 32}).items():
        monkeypatch.setitem(ts.TUNING, key, value)
    a, keys = _inputs(kind, b, h, g, t, d, seed=t)
    got = ts.token_select(a, keys, k, 0.5, group, bits=True)
    assert got.shape == (b, h // group, t, (t + 31) // 32) and got.dtype == torch.int32
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    want = ma.keep_from_bits(ma.bits_from_indices(ts.token_select_reference(a, keys, k, 0.5, group), t), t)
    assert torch.equal(ma.keep_from_bits(got, t) & causal, want)
    lo, hi, cnt_lo, cnt_hi = ts_triton.token_bracket(a, keys, k, 0.5, group)[0].unbind(-1)
    band, quota = cnt_lo - cnt_hi, k - cnt_hi
    kinds = {"whole": band <= quota, "ranked": (band > quota) & (band <= SMALL["select_band"]),
             "tied": (band > quota) & (band > SMALL["select_band"])}
    assert kinds["whole"].any() and (kinds["ranked"].any() or kinds["tied"].any())
    assert bool((hi - lo == 1)[kinds["tied"]].all())  # a tied band holds one value
    if kind == "grid":
        assert kinds["tied"].any()
    if kind == "randn" and k < 30:
        assert kinds["ranked"].any()


def test_the_default_bitmask_write_is_by_reductions_per_group_and_for_long_rows_per_head(monkeypatch):
    """TUNING["bits_kernel"] "auto": the reduction write per group (25% faster than the offsets one on an H200 at
    T = 32768, docs/data/perf-h200-prefill-topk-reduce.json), and per head from TUNING["bits_reduce_head_from"]
    keys (with its band keys by atomic slots faster at T = 8192 and 32768,
    docs/data/perf-h200-prefill-topk-threshold.json; as words, the default now, faster again:
    docs/data/sweep-probe-h200-32k-words.json), else the offsets write; both keep the reference's sets; another
    value is refused."""
    from posthoc_sparse.ops.token_select import bits as ts_bits

    for key, value in (SMALL | {"select_keys": 32, "bits_rows": 16, "bits_keys": 32}).items():
        monkeypatch.setitem(ts.TUNING, key, value)
    assert ts.TUNING["bits_kernel"] == "auto" and ts.TUNING["bits_reduce_head_from"] == 8192
    assert ts.TUNING["bits_band"] == "words"
    assert [ts_bits.bits_write(ts.TUNING, g, t) for g, t in ((1, 4096), (1, 8192), (2, 4096), (4, 40))] == [
        "offsets", "reduce", "reduce", "reduce"]
    calls = []

    def spy(*args, f=ts_bits.write_bits):
        out = f(*args)
        if out is not None:  # the reduction write ran
            calls.append(args[4])
        return out

    monkeypatch.setattr(ts_bits, "write_bits", spy)
    a, keys = _inputs("randn", 1, 4, 2, 40, 16, seed=1)
    want = {group: ma.keep_from_bits(ma.bits_from_indices(ts.token_select_reference(a, keys, 7, 0.5, group), 40), 40)
            for group in (1, 2)}
    for head_from, group in ((41, 1), (41, 2), (40, 1)):  # per head: offsets below 41 keys, reduce from 40
        monkeypatch.setitem(ts.TUNING, "bits_reduce_head_from", head_from)
        got = ts.token_select(a, keys, 7, 0.5, group, bits=True)
        assert torch.equal(ma.keep_from_bits(got, 40) & torch.ones(40, 40, dtype=torch.bool).tril(), want[group])
    assert calls == [2, 1]
    monkeypatch.setitem(ts.TUNING, "bits_band", "sorted")
    with pytest.raises(ValueError, match="bits_band"):
        ts.token_select(a, keys, 7, 0.5, 2, bits=True)
    monkeypatch.setitem(ts.TUNING, "bits_kernel", "atomic")
    with pytest.raises(ValueError, match="bits_kernel"):
        ts.token_select(a, keys, 7, 0.5, 2, bits=True)


@pytest.mark.parametrize("kernel", ["index", "offsets", "reduce", "reduce-atomic", "reduce-rows", "reduce-words"])
def test_token_select_where_the_largest_score_is_minus_zero(kernel, monkeypatch):
    """Scores that underflow to -0.0 are a row's largest: -0.0 and +0.0 compare equal, so the bracket must start
    above both (it started at +0.0 and kept every -0.0 key beyond k; found in review)."""
    for key, value in (SMALL | {"select_keys": 32, "bits_rows": 16, "bits_keys": 32}).items():
        monkeypatch.setitem(ts.TUNING, key, value)
    monkeypatch.setitem(ts.TUNING, "bits_kernel", "offsets" if kernel == "index" else kernel.split("-")[0])
    monkeypatch.setitem(ts.TUNING, "bits_band", kernel.split("-")[1] if "-" in kernel else "extract")
    t, k = 40, 3
    a, keys = torch.zeros(1, 1, t, 16), torch.zeros(1, 1, t, 16)
    a[..., 0] = -1e-23
    keys[..., 0] = 1e-22  # a . b * 0.5 underflows to -0.0
    keys[0, 0, 1::3, 0] = 1.0  # every third key scores below it
    want = ts.token_select_reference(a, keys, k, 0.5)
    if kernel == "index":
        got = ts.token_select(a, keys, k, 0.5)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    else:
        got = ma.keep_from_bits(ts.token_select(a, keys, k, 0.5, bits=True), t)
        assert torch.equal(got & torch.ones(t, t, dtype=torch.bool).tril(), ma.keep_from_bits(ma.bits_from_indices(
            want, t), t))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, k, group", [(1000, 200, 1), (1000, 700, 2), (2100, 2048, 1), (2100, 300, 2)])
@pytest.mark.parametrize("kernel", ["offsets", "reduce", "reduce-atomic", "reduce-rows", "reduce-words"])
def test_mask_path_on_gpu(dtype, t, k, group, kernel, monkeypatch):
    """token_select's bitmask (either write, the second with each way of putting band keys) holds the sets of its
    index output, and mask_attention equals the reference on CUDA at the default launch settings. Band keys put as
    words are ranked by scores summed again in another order than the tile's product: there, sets may differ where
    scores tie within rounding, so rows are compared by the scores they keep."""
    monkeypatch.setitem(ts.TUNING, "bits_kernel", kernel.split("-")[0])
    monkeypatch.setitem(ts.TUNING, "bits_band", kernel.split("-")[1] if "-" in kernel else "extract")
    bsz, h, g, d = 2, 4, 2, 32
    gen = torch.Generator().manual_seed(t)
    a = torch.randn(bsz, h, t, d, generator=gen).cuda().to(dtype)
    keys = torch.randn(bsz, g, t, d, generator=gen).cuda().to(dtype)
    bits = ts.token_select(a, keys, k, 0.7, group, bits=True)
    causal = torch.ones(t, t, dtype=torch.bool, device="cuda").tril()
    want = ma.keep_from_bits(ma.bits_from_indices(ts.token_select(a, keys, k, 0.7, group), t), t)
    got = ma.keep_from_bits(bits, t) & causal
    if kernel.endswith("words"):
        assert torch.equal(got.sum(-1), want.sum(-1))  # exactly min(k, causal keys) a row
        assert (got == want).all(-1).float().mean() > 0.99
        s = ts.selection_scores_reference(a, keys, 0.7, group).masked_fill(~causal, 0.0)
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close((s * got).sum(-1), (s * want).sum(-1), atol=tol, rtol=1e-4)
    else:
        assert torch.equal(got, want)
    q = torch.randn(bsz, h, t, 128, generator=gen).cuda().to(dtype)
    k_, v = (torch.randn(bsz, g, t, 128, generator=gen).cuda().to(dtype) for _ in range(2))
    out = ma.mask_attention(q, k_, v, bits, 128**-0.5).transpose(1, 2).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ma.mask_attention_reference(q, k_, v, bits, 128**-0.5), atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("launch", MASK_LAUNCHES + TILE_LAUNCHES)
def test_mask_attention_agrees_with_its_twin_under_every_benchmarked_launch_setting(launch, group, monkeypatch):
    """The settings `benchmarks/perf.py --parts prefill_tuning` and `benchmarks/tile_attention.py` time (rows, keys,
    warps and, for the second, pipeline stages), at T = 1500, k = 600, bf16."""
    for name, value in zip(("rows", "keys", "warps", "stages"), launch):
        monkeypatch.setitem(ma.TUNING, name, value)
    test_mask_path_on_gpu(torch.bfloat16, 1500, 600, group, f"{ts.TUNING['bits_kernel']}-{ts.TUNING['bits_band']}",
                          monkeypatch)


def test_the_bitmask_write_kernels_compile_for_hopper(tmp_path):
    """bits.py's sweep at its default launch, per head and per group, and its ranking compile to sm_90 machine code
    without local memory, the sweep's key tiles pipelined and its registers below the 255 that the ranking and the
    tile scans inside it took (2 programs an SM at 64 rows: docs/data/kernel-registers-sm90.json)."""
    from benchmarks.hopper import TOKEN_SELECT_ALIGNED, TOKEN_SELECT_TYPES, compile_for_hopper, token_bits_cases

    pytest.importorskip("triton.backends.nvidia")
    launch = [(ts.TUNING["bits_rows"], ts.TUNING["bits_keys"], ts.TUNING["bits_warps"])]
    cases = (token_bits_cases(launch) + token_bits_cases(launch, atomic=True)[:2]  # and the atomic slots' sweep
             + token_bits_cases(launch, rows=True)[:2] + token_bits_cases(launch, words=True))  # and the others
    got = compile_for_hopper(tmp_path, "posthoc_sparse.ops.token_select.bits", cases, TOKEN_SELECT_TYPES,
                             TOKEN_SELECT_ALIGNED)
    assert [g["kernel"] for g in got] == (["_token_bits"] * 2 + ["_bits_rank"] + ["_token_bits"] * 6
                                          + ["_bits_rank"])
    assert all(g["local"] == 0 for g in got), got
    assert all(g["async_copies"] > 0 and g["regs"] < 255 for g in got if g["kernel"] == "_token_bits"), got
    assert got[-3]["regs"] < got[3]["regs"], got  # the band as words: far fewer registers than by atomic slots


def test_the_mask_attention_kernel_compiles_for_hopper(tmp_path):
    """The attention kernel at its default launch, a kept set per head and per two heads, compiles to sm_90 machine
    code without local memory (no registers spilled)."""
    from benchmarks.hopper import MASK_ATTENTION_TYPES, compile_for_hopper, mask_attention_cases

    pytest.importorskip("triton.backends.nvidia")
    cases = mask_attention_cases([(ma.TUNING["rows"], ma.TUNING["keys"], ma.TUNING["warps"])])
    got = compile_for_hopper(tmp_path, "posthoc_sparse.ops.mask_attention.triton", cases, MASK_ATTENTION_TYPES)
    assert len(got) == 2 and all(g["local"] == 0 for g in got), got
