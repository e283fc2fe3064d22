"""Gated top-k decoding (ops.decode): the kernels against their naive twins, on the CPU through TRITON_INTERPRET=1
(fp32 and fp16: the interpreter's bf16 products are wrong), and on the GPU in bf16 and fp16 at long lengths."""

from __future__ import annotations

import pytest
import torch

from posthoc_sparse.ops import HAVE_TRITON
from posthoc_sparse.ops import decode as dc

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def _data(b=2, h=4, g=2, hs=None, s=150, d=16, ds=16, seed=0, dtype=torch.float32, device="cpu"):
    """Selection query and keys (Hs heads), q, k, v, and a left-padding mask: sequence i has its first 23 * i keys
    invalid."""
    gen = torch.Generator().manual_seed(seed)
    hs = hs or h

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    valid = torch.arange(s)[None, :] >= 23 * torch.arange(b)[:, None]  # (B, S)
    return rnd(b, h, ds), rnd(b, hs, s, ds), rnd(b, h, d), rnd(b, g, s, d), rnd(b, g, s, d), valid.to(device)


def _mass(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The summed score of each row's kept keys (idx -1: none): sets compared by what they carry (ties)."""
    return scores.gather(-1, idx.long().clamp(min=0)).masked_fill(idx < 0, 0).sum(-1)


@pytest.mark.parametrize("hs, cap, products", [(4, None, False), (4, None, True), (4, 3.0, True), (2, None, False),
                                               (2, 3.0, False)])
def test_score_kernel_equals_the_reference(monkeypatch, hs, cap, products):
    """Selection keys per query head (a hidden gate's: by tl.dot, or by products summed) or per KV head (the
    oracle's, GQA), softcap, padding."""
    monkeypatch.setitem(dc.TUNING, "score_products", products)
    sq, sk, *_, valid = _data(hs=hs, s=131)
    sc, pm, pl = dc.decode_scores(sq, sk, valid, 0.5, cap, stats=True)
    want = dc.decode_scores_reference(sq, sk, valid, 0.5, cap)
    assert torch.equal(torch.isinf(sc), ~valid[:, None, :].expand_as(sc))
    torch.testing.assert_close(sc, want, atol=1e-5, rtol=1e-5)
    lse = (pm + pl.log()).logsumexp(-1)  # the split statistics give each head's log-sum-exp
    torch.testing.assert_close(lse, want.logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s, k", [(150, 13), (77, 64), (40, 40), (40, 200), (50, 1)])
@pytest.mark.parametrize("group", [False, True])
def test_select_kernel_keeps_the_reference_sets(s, k, group):
    """S not a multiple of the tile, k not a power of two, k at and above the valid keys (all of them kept,
    the rest -1), k = 1 (which Triton compiles as a constant), padding, per head and per KV group (the group's
    mean softmax, as attention.reference)."""
    sq, sk, *_, valid = _data(s=s, seed=s)
    sc, pm, pl = dc.decode_scores(sq, sk, valid, stats=group)
    got = dc.decode_topk(sc, k, 2 if group else None, pm, pl)
    ref_scores = dc.decode_scores_reference(sq, sk, valid, groups=2 if group else None)
    want = dc.decode_topk_reference(ref_scores, k)
    assert got.shape == want.shape == (2, 2 if group else 4, k) and got.dtype == torch.int32
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    n_valid = valid.sum(-1)[:, None]
    assert ((got >= 0).sum(-1) == n_valid.clamp(max=k)).all()


def test_select_kernel_keeps_the_lowest_indices_of_equal_scores():
    """Scores on a coarse grid: many keys tie at the k-th score. The kernel keeps those of lower index; the kept
    score mass equals torch.topk's."""
    gen = torch.Generator().manual_seed(3)
    sc = torch.randint(-3, 4, (2, 3, 200), generator=gen).float()
    sc[1, :, :50] = float("-inf")  # padding
    got = dc.decode_topk(sc, 37)
    want = dc.decode_topk_reference(sc, 37)
    assert torch.equal(_mass(sc, got), _mass(sc, want))
    kth = sc.topk(37, -1).values[..., -1]  # (B, H): the k-th score
    for s, kept, t in zip(sc.flatten(0, 1), got.flatten(0, 1).long(), kth.flatten()):
        tied = (s == t).nonzero().flatten()  # every key at the k-th score, by index
        kept_tied = kept[s[kept] == t]
        assert torch.equal(kept_tied, tied[: len(kept_tied)])  # the lowest indices of them
    assert (got[0].sort(-1).values == got[0]).all()  # written in key order


def _both_selects(monkeypatch, sc, k, groups=None, pm=None, pl=None):
    """decode_topk with one program per row, then split over the keys (tiles of 16 keys, about 64 programs: several
    splits a row even at these lengths)."""
    monkeypatch.setitem(dc.TUNING, "select", "single")
    single = dc.decode_topk(sc, k, groups, pm, pl)
    monkeypatch.setitem(dc.TUNING, "select", "split")
    monkeypatch.setitem(dc.TUNING, "select_block", 16)
    monkeypatch.setitem(dc.TUNING, "programs", 64)
    return single, dc.decode_topk(sc, k, groups, pm, pl)


@pytest.mark.parametrize("s, k, most", [(150, 13, 64), (150, 13, 2), (40, 200, 64), (50, 1, 64)])
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("sparse, carry", [(4, True), (64, True), (4, False)])
def test_split_select_writes_what_the_single_program_select_writes(monkeypatch, s, k, most, group, sparse, carry):
    """The split select (few rows: batch 1) against the one-program select: the same indices in the same slots,
    over splits that cut the padding, k above the valid keys, k = 1, per head and per KV group; and with the
    splits capped (``most``: longer splits of several tiles). Tiles of 16 keys: after pass 0 those with at most
    ``sparse`` keys on the prefix count them by atomics (64: every tile; 4: some by the histogram); each pass's radix
    state carried from the pass before, or (``carry`` off) worked out again from every earlier histogram."""
    monkeypatch.setitem(dc.TUNING, "select_splits", most)
    monkeypatch.setitem(dc.TUNING, "sparse_keys", sparse)
    monkeypatch.setitem(dc.TUNING, "carry_state", carry)
    sq, sk, *_, valid = _data(s=s, seed=s)
    sc, pm, pl = dc.decode_scores(sq, sk, valid, stats=group)
    single, split = _both_selects(monkeypatch, sc, k, 2 if group else None, pm, pl)
    assert torch.equal(single, split)
    ref_scores = dc.decode_scores_reference(sq, sk, valid, groups=2 if group else None)
    assert torch.equal(split.sort(-1).values, dc.decode_topk_reference(ref_scores, k).sort(-1).values)


@pytest.mark.parametrize("sparse, carry", [(-1, True), (4, True), (64, True), (4, False)])
def test_split_select_keeps_the_lowest_indices_of_equal_scores(monkeypatch, sparse, carry):
    """Many keys tie at the k-th score, across splits: the earlier splits' equal keys are taken first; every tile
    histogrammed (``sparse`` -1), some, or none after pass 0; each pass's radix state carried from the pass before
    or worked out again from every histogram (``carry``)."""
    monkeypatch.setitem(dc.TUNING, "sparse_keys", sparse)
    monkeypatch.setitem(dc.TUNING, "carry_state", carry)
    gen = torch.Generator().manual_seed(3)
    sc = torch.randint(-3, 4, (2, 3, 200), generator=gen).float()
    sc[1, :, :50] = float("-inf")
    single, split = _both_selects(monkeypatch, sc, 37)
    assert torch.equal(single, split)


@pytest.mark.parametrize("group", [False, True])
def test_split_select_reads_no_scratch_it_did_not_write(monkeypatch, group):
    """Every scratch buffer of the select (the radix states, the per-split histograms and counts, the group scores,
    the output) comes from torch.empty: filled with garbage here, the split select (some tiles by histogram, some
    by atomics; the state carried) still writes what the one-program select writes."""
    from posthoc_sparse.ops.decode import radix

    empty = torch.empty

    def garbage(*shape, **kw):  # torch.empty, the memory filled (every torch.empty of the call: the scores' too)
        t = empty(*shape, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else 12345)

    monkeypatch.setattr(radix.torch, "empty", garbage)
    monkeypatch.setitem(dc.TUNING, "sparse_keys", 4)
    sq, sk, *_, valid = _data(s=150, seed=7)
    sc, pm, pl = dc.decode_scores(sq, sk, valid, stats=group)
    single, split = _both_selects(monkeypatch, sc, 13, 2 if group else None, pm, pl)
    assert torch.equal(single, split)


def test_few_rows_take_the_split_select(monkeypatch):
    """TUNING["select"] = "radix" splits the keys when the rows are fewer than TUNING["split_rows"]."""
    from posthoc_sparse.ops.decode import radix as kernels

    calls = []
    real = kernels._split_select
    monkeypatch.setattr(kernels, "_split_select", lambda *a: calls.append(a[4].shape) or real(*a))
    sc = torch.randn(1, 4, 70)
    dc.decode_topk(sc, 5)  # 4 rows
    monkeypatch.setitem(dc.TUNING, "split_rows", 4)
    dc.decode_topk(sc, 5)  # not fewer than 4
    assert calls == [(1, 4, 5)]


@pytest.mark.parametrize("group, cap", [(False, None), (True, None), (False, 5.0)])
def test_attention_kernel_equals_the_reference_over_the_same_keys(group, cap):
    """GQA (2 query heads per KV head), sets per head or per KV group, -1 slots, softcap; several splits."""
    _, _, q, k, v, valid = _data(s=90, seed=4)
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 2 if group else 4, 90, generator=gen).masked_fill(~valid[:, None], float("-inf"))
    idx = dc.decode_topk_reference(scores, 80)  # row 1 has 67 valid keys: 13 slots of -1
    got = dc.decode_attention(q, k, v, idx, 0.3, cap)
    assert got.shape == (2, 1, 4, 16) and got.dtype == q.dtype
    torch.testing.assert_close(got, dc.decode_attention_reference(q, k, v, idx, 0.3, cap), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_oracle_decoding_with_every_key_equals_dense_attention(dtype, tol):
    """k >= the valid keys: every key is kept, so the output is dense attention over the valid keys."""
    sq, sk, q, k, v, valid = _data(s=101, dtype=dtype, seed=7)
    got = dc.gated_decode(q, k, q, k, v, valid, 101, 0.25, sel_scale=0.25, group=True)
    qf, kf, vf = (t.float() for t in (q, k, v))
    mask = valid[:, None, None, :]  # (B, 1, 1, S)
    dense = torch.nn.functional.scaled_dot_product_attention(qf[:, :, None], kf, vf, attn_mask=mask, scale=0.25,
                                                             enable_gqa=True)  # (B, H, 1, D)
    torch.testing.assert_close(got.float(), dense.transpose(1, 2), atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["gate", "oracle", "random"])
@pytest.mark.parametrize("group", [False, True])
def test_gated_decode_equals_the_reference(mode, group):
    """The three selection sources as the policy passes them: a gate's own keys per query head (d 32), the
    model's keys by the true scores (the oracle: GQA selection keys, the model's scaling and softcap), and a
    random gate's keys. k = 21 of 150 keys, padding."""
    sq, sk, q, k, v, valid = _data(s=150, ds=32, seed=11)
    if mode == "oracle":
        sq, sk, kw = q, k, dict(sel_scale=0.25, sel_softcap=4.0, softcap=4.0)
    elif mode == "random":
        gen = torch.Generator().manual_seed(12)
        sk, kw = torch.randn(sk.shape, generator=gen), {}
    else:
        kw = {}
    got = dc.gated_decode(sq, sk, q, k, v, valid, 21, 0.25, group=group, **kw)
    want = dc.gated_decode_reference(sq, sk, q, k, v, valid, 21, 0.25, group=group, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_torch_topk_selection_is_the_same_set():
    """TUNING["select"] = "torch" (torch.topk on the scores, for the benchmark's comparison) keeps the same sets."""
    sq, sk, *_, valid = _data(s=120)
    sc, _, _ = dc.decode_scores(sq, sk, valid)
    radix = dc.decode_topk(sc, 30)
    dc.TUNING["select"] = "torch"
    try:
        by_torch = dc.decode_topk(sc, 30)
    finally:
        dc.TUNING["select"] = "radix"
    assert torch.equal(radix.sort(-1).values, by_torch.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("b, s, k, group", [(1, 33001, 2048, False), (1, 33001, 2048, True), (3, 4099, 1, True),
                                            (8, 65536, 256, False)])
@pytest.mark.parametrize("sparse", [-1, 64, 1024])
def test_split_select_on_the_gpu(monkeypatch, b, s, k, group, sparse):
    """At long contexts in bf16 the split select writes exactly what the one-program select writes, whether its
    passes after the first count a tile's keys by histogram (``sparse`` -1), by atomics (1024: every tile of 1024
    keys), or by which the tile needs."""
    monkeypatch.setitem(dc.TUNING, "sparse_keys", sparse)
    sq, sk, *_, valid = _data(b=b, h=16, g=8, s=s, d=128, ds=32, seed=s, dtype=torch.bfloat16, device="cuda")
    sc, pm, pl = dc.decode_scores(sq, sk, valid, stats=group)
    monkeypatch.setitem(dc.TUNING, "select", "single")
    single = dc.decode_topk(sc, k, 8 if group else None, pm, pl)
    monkeypatch.setitem(dc.TUNING, "select", "split")
    assert torch.equal(single, dc.decode_topk(sc, k, 8 if group else None, pm, pl))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s, k, group", [(4099, 256, False), (33001, 2048, False), (33001, 2048, True),
                                         (2000, 4096, True), (4099, 1, True)])
def test_gated_decode_on_the_gpu(dtype, s, k, group):
    """Qwen3-1.7B's head shapes (16 query heads, 8 KV heads, head dim 128, gate dim 32), batch 3 with padding,
    long contexts: the kept sets carry the reference's score mass, and the output equals the reference's over
    the kernel's own sets (and over the reference's where k covers every key)."""
    sq, sk, q, k_, v, valid = _data(b=3, h=16, g=8, s=s, d=128, ds=32, seed=s, dtype=dtype, device="cuda")
    sc, pm, pl = dc.decode_scores(sq, sk, valid, stats=group)
    groups = 8 if group else None
    ref_scores = dc.decode_scores_reference(sq, sk, valid, groups=groups)
    got = dc.decode_topk(sc, k, groups, pm, pl)
    want = dc.decode_topk_reference(ref_scores, k)
    torch.testing.assert_close(_mass(ref_scores, got), _mass(ref_scores, want), atol=1e-3, rtol=1e-5)
    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1))
    out = dc.decode_attention(q, k_, v, got, 0.088)
    torch.testing.assert_close(out.float(), dc.decode_attention_reference(q, k_, v, got, 0.088), atol=2e-2, rtol=2e-2)
    if k >= s:
        full = dc.gated_decode(sq, sk, q, k_, v, valid, k, 0.088, group=group)
        torch.testing.assert_close(full.float(), dc.gated_decode_reference(sq, sk, q, k_, v, valid, k, 0.088),
                                   atol=2e-2, rtol=2e-2)


# every mode, gate input and selection once (the kernels run through the interpreter: a few seconds a case)
_POLICY_CASES = [("gate", "hidden", "head"), ("random", "qk", "group"), ("oracle", "hidden", "group")]


def _decode_runs(model, bank, mode, selection, fused: bool, monkeypatch, device="cpu"):
    """Greedy static-cache generation of a left-padded batch under ``apply_gates`` at k = 6 (of up to 13 keys);
    with ``fused`` the
    decode steps take ops.decode (on the CPU: its kernels through the interpreter). Returns the tokens, the
    logits and how many attention calls took the fused path."""
    from posthoc_sparse.attention import policies
    from posthoc_sparse.deploy import apply_gates

    from .tiny import random_ids

    calls, original = [], dc.gated_decode
    if fused:
        def counted(*args, **kw):
            calls.append(1)
            return original(*args, **kw)

        monkeypatch.setattr(policies.dc, "gated_decode", counted)
        if device == "cpu":
            monkeypatch.setattr(policies.dc, "kernels_ok", dc.supports)
    else:
        monkeypatch.setattr(policies.dc, "kernels_ok", lambda *a: False)
    ids = random_ids(2, 11, seed=2).to(device)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # row 0: 8 tokens after 3 of padding
    with torch.no_grad(), apply_gates(model, bank, k=6, mode=mode, selection=selection):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             cache_implementation="static", disable_compile=True, return_dict_in_generate=True,
                             output_logits=True)
    monkeypatch.undo()
    return out.sequences, torch.stack(out.logits, 1), len(calls)


@pytest.mark.parametrize("mode, gate_input, selection", _POLICY_CASES)
def test_policy_decode_path_generates_like_the_reference_path(monkeypatch, mode, gate_input, selection):
    """The deployed policy's fused decode path (forced on the CPU) against its chunked reference path: a tiny
    Qwen3 (head dim 16, gate dim 16), static cache, left padding; every mode and input, per head and per group.
    The qk input's query is folded through the gate (q Wq Wk^T / sqrt(d)), which scores the same bilinear form;
    random is the random control gate."""
    from posthoc_sparse.attention.gate_cache import GateKeyCache
    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank

    from .tiny import tiny_model

    model = tiny_model("qwen3")
    bank = GateBank(gate_spec_for_model(model, d_g=16, gate_input=gate_input)).reset_random(0)
    ref, ref_logits, n_ref = _decode_runs(model, bank, mode, selection, False, monkeypatch)
    direct, real = [], GateKeyCache.static_mirror
    monkeypatch.setattr(GateKeyCache, "static_mirror", lambda *a: direct.append(real(*a)) or direct[-1])
    got, got_logits, n_fused = _decode_runs(model, bank, mode, selection, True, monkeypatch)
    assert n_ref == 0 and n_fused == 2 * 2  # 2 layers x 2 decode steps (the first token comes from the prefill)
    # a hidden gate's keys written into its static cache by the rotary kernel, at every fused step
    assert sum(m is not None for m in direct) == (n_fused if mode != "oracle" and gate_input == "hidden" else 0)
    assert torch.equal(got, ref)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, gate_input, selection",
                         _POLICY_CASES + [("gate", "qk", "head"), ("gate", "hidden", "group")])
def test_policy_decode_path_on_the_gpu(monkeypatch, mode, gate_input, selection):
    """The same comparison on CUDA, where the policy picks the fused path itself (fp32 tiny Qwen3)."""
    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank

    from .tiny import tiny_model

    model = tiny_model("qwen3").cuda()
    bank = GateBank(gate_spec_for_model(model, d_g=16, gate_input=gate_input)).reset_random(0)
    ref, ref_logits, _ = _decode_runs(model, bank, mode, selection, False, monkeypatch, device="cuda")
    got, got_logits, n_fused = _decode_runs(model, bank, mode, selection, True, monkeypatch, device="cuda")
    assert n_fused == 2 * 2 and torch.equal(got, ref)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_compiled_static_generate_runs_the_fused_path():
    """model.generate with a static cache on CUDA compiles its decode step (transformers' default: torch.compile,
    reduce-overhead); under a hidden gate the compiled steps generate what the eager ones do (fp32; compiled
    kernels round otherwise, so a near-tie may part them late: at least 7 of 8 tokens agree)."""
    from posthoc_sparse.deploy import apply_gates
    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank

    from .tiny import random_ids, tiny_model

    model = tiny_model("qwen3").cuda()
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0)
    ids = random_ids(2, 24, seed=9).cuda()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad(), apply_gates(model, bank, k=6):
        eager = model.generate(ids, disable_compile=True, **kw)
        compiled = model.generate(ids, **kw)
    assert compiled.shape == eager.shape == (2, 32)
    assert torch.equal(compiled[:, 24], eager[:, 24]) and (compiled[:, 24:] == eager[:, 24:]).float().mean() >= 7 / 8



def test_the_radix_select_kernels_compile_for_hopper(tmp_path):
    """The split select's atomics and 256-bin histograms, the one-program select and the group scores compile
    down to sm_90 machine code (which the interpreter does not check), without spilling to local memory."""
    from benchmarks.hopper import DECODE_TYPES, compile_for_hopper

    pytest.importorskip("triton.backends.nvidia")

    cases = [("_split_pass", {"P": p, "BLOCK": 1024, "SPARSE": 64, "CARRY": True}, 8) for p in range(4)] + [
        ("_split_write", {"NSP_P": 64, "BLOCK": 1024, "KP": 1024, "CARRY": True}, 8),
        ("_group_split", {"R": 2, "RP": 2, "NSP_P": 64, "BLOCK": 1024}, 8),
        ("_select", {"R": 2, "RP": 2, "NSP_P": 64, "GROUP": True, "BLOCK": 1024, "KP": 1024}, 8)]
    got = compile_for_hopper(tmp_path, "posthoc_sparse.ops.decode.radix", cases, DECODE_TYPES)
    assert [g["kernel"] for g in got] == [c[0] for c in cases]
    assert all(g["local"] == 0 and 0 < g["regs"] <= 255 for g in got), got


def test_the_score_kernel_compiles_for_hopper(tmp_path):
    """``_score`` at the default launch (tiles of 256 keys, 8 warps) compiles to sm_90 without spilling: one row by
    products (a hidden gate's keys), per head and with the split statistics (per group), and two rows by tl.dot on
    head_dim keys (the oracle's, GQA)."""
    from benchmarks.hopper import compile_for_hopper

    pytest.importorskip("triton.backends.nvidia")
    types = {"SQ": "*bf16", "SK": "*bf16", "VALID": "*u8", "SC": "*fp32", "PM": "*fp32", "PL": "*fp32",
             "sel_scale": "fp32", "sel_cap": "fp32"}
    common = dict(BLOCK_S=dc.TUNING["block_s"], HAS_MASK=True, SOFTCAP=False, IEEE=False)
    cases = [("_score", common | dict(R=1, RP=1, DS=32, STATS=stats), dc.TUNING["score_warps"])
             for stats in (False, True)]
    cases.append(("_score", common | dict(R=2, RP=16, DS=128, STATS=True), dc.TUNING["score_warps"]))
    got = compile_for_hopper(tmp_path, "posthoc_sparse.ops.decode.triton", cases, types)
    assert len(got) == 3 and all(g["local"] == 0 and 0 < g["regs"] <= 255 for g in got), got


@pytest.mark.parametrize("pos, t", [(0, 1), (5, 1), (7, 3), (9, 1), (8, 3), (10, 1)])
def test_gate_rope_writes_keys_into_a_static_cache(pos, t):
    """``gate_rope(..., keys_into=(cache, pos))``: the queries as the reference's, the keys written into the cache
    at positions pos .. pos + t - 1 read on the device, those past its end (10 here) dropped, nothing else touched,
    pos not advanced."""
    from posthoc_sparse.ops.rope import gate_rope, gate_rope_reference

    gen = torch.Generator().manual_seed(pos)
    b, h, d, n = 2, 3, 16, 10
    a = torch.randn(b, t, 2 * h, d, generator=gen)
    cos, sin = torch.randn(1, t, 24, generator=gen), torch.randn(1, t, 24, generator=gen)
    freq = torch.tensor([0, 2, 3, 5, 7, 11, 13, 17])
    cache = torch.randn(b, h, n, d, generator=gen)
    before, at = cache.clone(), torch.tensor(pos)
    got = gate_rope(a, cos, sin, freq, keys_into=(cache, at))
    want = gate_rope_reference(a, cos, sin, freq)
    torch.testing.assert_close(got[0], want[0])
    end = min(pos + t, n)
    torch.testing.assert_close(cache[:, :, pos:end], want[1][:, :, : end - pos])
    assert torch.equal(cache[:, :, :pos], before[:, :, :pos]) and torch.equal(cache[:, :, end:], before[:, :, end:])
    assert at.item() == pos
