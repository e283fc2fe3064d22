"""Prefill top-k kernels against their naive twins (on the CPU through TRITON_INTERPRET=1, on the GPU in fp32 and
bf16): per head at small k (ops.head_topk), per head or per KV group at any k (ops.token_select); and the
policy's kernel paths against the chunked reference."""

from __future__ import annotations

import pytest
import torch

from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.policies import GateSelector, OracleSelector, TopKPolicy
from posthoc_sparse.gates.io import gate_spec_for_model
from posthoc_sparse.gates.modules import GateBank
from posthoc_sparse.ops import HAVE_TRITON
from posthoc_sparse.ops import head_topk as ht
from posthoc_sparse.ops import mask_attention as ma
from posthoc_sparse.ops import token_select as ts

from benchmarks.parts_attention import GATHER_LAUNCHES, SELECT_LAUNCHES, WRITE_LAUNCHES

from .tiny import random_ids, tiny_model

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def _sets(idx: torch.Tensor) -> torch.Tensor:
    return idx.sort(-1).values


@pytest.mark.parametrize("b, h, g, t, d, k", [(1, 2, 1, 45, 16, 8), (2, 4, 2, 37, 16, 12), (1, 2, 2, 40, 32, 33)])
def test_head_topk_kernel_keeps_the_k_largest_causal_scores(b, h, g, t, d, k):
    """Odd lengths, GQA keys (G < H, as the oracle passes them), k not a power of two and k above the early
    rows' key counts (their missing keys are -1)."""
    gen = torch.Generator().manual_seed(t)
    a, keys = torch.randn(b, h, t, d, generator=gen), torch.randn(b, g, t, d, generator=gen)
    got = ht.head_topk(a, keys, k, 0.5)
    want = ht.head_topk_reference(a, keys, k, 0.5)
    assert got.shape == (b, h, t, k) and got.dtype == torch.int32
    assert torch.equal(_sets(got), _sets(want))
    assert ((got >= 0).sum(-1) == torch.arange(1, t + 1).clamp(max=k)).all()  # exactly min(k, causal keys)
    assert (got <= torch.arange(t)[:, None]).all()  # causal


def test_head_topk_kernel_breaks_ties_by_the_lower_index_and_orders_by_score():
    a = torch.zeros(1, 1, 20, 16)
    a[0, 0, :, 0] = 1.0
    keys = torch.zeros(1, 1, 20, 16)
    keys[0, 0, [3, 11], 0] = torch.tensor([2.0, -1.0])  # key 3 scores highest, key 11 lowest, the rest tie at 0
    got = ht.head_topk(a, keys, 4)[0, 0]
    assert got[19].tolist() == [3, 0, 1, 2] and got[12].tolist() == [3, 0, 1, 2]
    assert got[2].tolist() == [0, 1, 2, -1]


def test_head_topk_kernel_is_exact_where_candidates_overflow():
    """Equal scores everywhere make every key a candidate (more than the 2 * 16 slots of k = 4): those blocks
    take the exact fallback (bisection over all keys), which keeps the lowest indices of equal scores. Rows
    with one distinct high score keep it."""
    t = 70
    a = torch.zeros(1, 2, t, 16)
    a[..., 0] = 1.0
    keys = torch.zeros(1, 1, t, 16)
    keys[0, 0, 50, 0] = 1.0  # head rows from 50 on see one key above the rest
    got = ht.head_topk(a, keys, 4)
    want = torch.tensor([0, 1, 2, 3])
    assert (got[0, :, 3:50].sort(-1).values == want).all()
    assert (got[0, :, 50:].sort(-1).values == torch.tensor([0, 1, 2, 50])).all()
    assert got[0, 0, 1].tolist() == [0, 1, -1, -1]
    gen = torch.Generator().manual_seed(1)  # scores on a coarse grid: many ties at the k-th score
    a = torch.randint(0, 3, (1, 2, t, 16), generator=gen).float()
    keys = torch.randint(0, 3, (1, 2, t, 16), generator=gen).float()
    got = ht.head_topk(a, keys, 12)
    want = ht.head_topk_reference(a, keys, 12)
    s = torch.matmul(a, keys.transpose(-1, -2))
    mass = [s.gather(-1, i.long().clamp(min=0)).masked_fill(i < 0, 0).sum(-1) for i in (got, want)]
    assert torch.equal(mass[0], mass[1])  # ties broken otherwise than torch.topk, the same scores kept
    assert ((got >= 0).sum(-1) == torch.arange(1, t + 1).clamp(max=12)).all()
    assert all(len(set(r.tolist()) - {-1}) == min(12, i + 1) for i, r in enumerate(got[0, 0]))  # distinct keys


def test_index_attention_kernel_equals_the_reference_with_gqa_missing_keys_and_softcap():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=gen), torch.randn(2, 2, 37, 16, generator=gen),
               torch.randn(2, 2, 37, 16, generator=gen))
    idx = ht.head_topk_reference(torch.randn(2, 4, 37, 16, generator=gen), torch.randn(2, 4, 37, 16, generator=gen), 8)
    assert (idx < 0).any()  # rows 0..6 keep fewer than 8 keys
    for softcap in (None, 5.0):
        out = ht.index_attention(q, k, v, idx, 0.25, softcap).transpose(1, 2)
        torch.testing.assert_close(out, ht.index_attention_reference(q, k, v, idx, 0.25, softcap), atol=1e-5, rtol=1e-5)


def test_policy_takes_the_head_kernels_only_for_plain_cuda_prefill():
    from .test_block_sparse import _layer_call

    model = tiny_model("qwen3")
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0)
    call = _layer_call(model, bank, random_ids(1, 20))
    assert not TopKPolicy(GateSelector(bank), 8)._head_kernels(call)  # a CPU tensor: the reference
    assert not ht.supports(call.query, call.key, ht.MAX_K + 1, 16)
    assert not ht.supports(call.query, call.key, 8, 8)  # gate dim below tl.dot's 16
    assert ht.supports(call.query, call.key, 8, 16) and not ht.kernels_ok(call.query, call.key, 8, 16)  # CPU


def _run(model, policy, ids):
    with torch.no_grad(), SparseAttention(model, policy):
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, k", [(300, 64), (1000, 100), (517, 16)])
def test_head_topk_kernels_on_gpu(dtype, t, k):
    _kernels_agree_with_their_twins((2, 4, 2, t, 32), k, 0.7, dtype, seed=t)


# the launch settings (rows per program, warps) that `benchmarks/perf.py --parts head_tuning` times
LAUNCHES = [("topk", 16, 4), ("topk", 16, 8), ("topk", 32, 4), ("topk", 32, 8), ("topk", 64, 8),
            ("attn", 32, 4), ("attn", 16, 4), ("attn", 64, 4), ("attn", 64, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, rows, warps", LAUNCHES)
def test_head_kernels_agree_with_their_twins_under_every_benchmarked_launch_setting(kernel, rows, warps,
                                                                                       monkeypatch):
    """At the benchmark's shape (T = 4096, k = 64, 16 heads, bf16; the top-k on gate-sized d = 32 with one gate
    key per head, the attention at head_dim 128 over 8 KV heads)."""
    monkeypatch.setitem(ht.TUNING, f"{kernel}_rows", rows)
    monkeypatch.setitem(ht.TUNING, f"{kernel}_warps", warps)
    _kernels_agree_with_their_twins((1, 16, 16, 4096, 32), 64, 1.0, torch.bfloat16, seed=0, kv_heads=8)


def _kernels_agree_with_their_twins(shape, k: int, scale: float, dtype, seed: int, kv_heads: int | None = None):
    """``head_topk`` and ``index_attention`` against their naive twins on CUDA. shape: (B, H, G, T, d) of the
    selection inputs a (B, H, T, d) and b (B, G, T, d); the attention takes head_dim 128 and ``kv_heads`` (G if
    None) key/value heads."""
    bsz, h, g, t, d = shape
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(bsz, h, t, d, generator=gen).cuda().to(dtype)
    keys = torch.randn(bsz, g, t, d, generator=gen).cuda().to(dtype)
    got = ht.head_topk(a, keys, k, scale)
    want = ht.head_topk_reference(a, keys, k, scale)
    # fp32 sums in another order than cuBLAS's: sets differ only where scores tie within rounding, so they are
    # compared by the score they carry
    same = (_sets(got) == _sets(want)).all(-1).float().mean()
    assert same > (0.99 if dtype == torch.float32 else 0.97)
    s = torch.matmul(a.float(), keys.float().repeat_interleave(h // g, 1).transpose(-1, -2)) * scale
    mass = [s.gather(-1, i.long().clamp(min=0)).masked_fill(i < 0, 0).sum(-1) for i in (got, want)]
    torch.testing.assert_close(mass[0], mass[1], atol=1e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-3)
    q = torch.randn(bsz, h, t, 128, generator=gen).cuda().to(dtype)
    k_, v = (torch.randn(bsz, kv_heads or g, t, 128, generator=gen).cuda().to(dtype) for _ in range(2))
    out = ht.index_attention(q, k_, v, got, 128**-0.5).transpose(1, 2).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ht.index_attention_reference(q, k_, v, got, 128**-0.5), atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("selector", ["oracle", "gate"])
def test_head_kernel_path_of_the_policy_equals_the_reference_path_on_gpu(selector):
    model = tiny_model("qwen3").cuda()  # fp32: the kernels' products are exact fp32 (ieee)
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0).cuda()
    make = {"oracle": OracleSelector, "gate": lambda: GateSelector(bank)}[selector]
    ids = random_ids(2, 200).cuda()
    fast = _run(model, TopKPolicy(make(), 24), ids)
    slow = _run(model, TopKPolicy(make(), 24, observer=lambda *a: None), ids)  # an observer forces the reference
    torch.testing.assert_close(fast, slow, atol=1e-2, rtol=1e-2)


# --- ops.token_select: any k, per head or per KV group --------------------------------------------------------

SMALL = {"select_rows": 16, "select_keys": 16, "select_cands": 4, "select_band": 8,  # counting sweeps even at T < 100
         "select_rank_chunk": 2,  # the band ranked in several chunks
         "write_rows": 32, "write_keys": 16,  # the write kernel's blocks other than the counting kernel's
         "select_moments_every": 1, "select_moments_every_group": 1}  # moments from every tile: 16 keys are few


def _inputs(kind: str, b: int, h: int, g: int, t: int, d: int, seed: int):
    """Selection inputs a (B, H, T, d), b (B, G, T, d): "randn"; "grid" (integer values, so scores tie often);
    "dup" (keys of 9 distinct vectors: under group selection, too, equal keys score exactly alike)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(b, h, t, d, generator=gen), torch.randn(b, g, t, d, generator=gen)
    if kind == "grid":
        return (torch.randint(0, 3, (b, h, t, d), generator=gen).float(),
                torch.randint(0, 3, (b, g, t, d), generator=gen).float())
    keys = torch.zeros(b, g, t, d)
    keys[..., :2] = torch.randint(0, 3, (b, g, t, 2), generator=gen).float()
    return torch.randint(-2, 3, (b, h, t, d), generator=gen).float(), keys


@pytest.mark.parametrize("kind, b, h, g, t, d, k, group, small", [
    ("randn", 1, 2, 1, 45, 16, 20, 1, False),  # GQA keys, one tile short of two, k not a power of two
    ("randn", 2, 4, 2, 100, 16, 9, 1, True),  # counting sweeps and the ranked band
    ("randn", 2, 4, 2, 77, 32, 12, 2, True),  # per group: two heads' softmax summed
    ("randn", 1, 4, 4, 40, 16, 33, 2, False),  # per-head keys under group selection; k above most rows' keys
    ("grid", 1, 2, 1, 90, 16, 10, 1, True),
    ("grid", 2, 2, 2, 64, 16, 24, 1, True),
    ("dup", 2, 4, 2, 77, 16, 12, 2, True),
])
def test_token_select_kernel_keeps_the_k_largest_causal_scores(kind, b, h, g, t, d, k, group, small, monkeypatch):
    """Exactly the reference's sets (a stable sort: equal scores by the lower index), -1 past a row's keys."""
    if small:
        for key, value in SMALL.items():
            monkeypatch.setitem(ts.TUNING, key, value)
    a, keys = _inputs(kind, b, h, g, t, d, seed=t)
    got = ts.token_select(a, keys, k, 0.5, group)
    want = ts.token_select_reference(a, keys, k, 0.5, group)
    assert got.shape == (b, h // group, t, k) and got.dtype == torch.int32
    assert torch.equal(_sets(got), _sets(want))
    assert ((got >= 0).sum(-1) == torch.arange(1, t + 1).clamp(max=k)).all()
    assert (got <= torch.arange(t)[:, None]).all()


def test_token_select_kernel_on_equal_scores_keeps_the_lowest_indices(monkeypatch):
    for key, value in SMALL.items():
        monkeypatch.setitem(ts.TUNING, key, value)
    t = 60
    a = torch.zeros(1, 2, t, 16)
    a[..., 0] = 1.0
    keys = torch.zeros(1, 1, t, 16)
    keys[0, 0, 40, 0] = 1.0  # rows from 40 on see one key above the rest
    got = _sets(ts.token_select(a, keys, 5))
    assert (got[0, :, 4:40] == torch.tensor([0, 1, 2, 3, 4])).all()
    assert (got[0, :, 40:] == torch.tensor([0, 1, 2, 3, 40])).all()
    assert got[0, 0, 1].tolist() == [-1, -1, -1, 0, 1]


def test_token_select_kernel_group_selection_with_softcap(monkeypatch):
    """The oracle's group scores are softmaxes of softcapped scores (the softcap changes them, not only their order)."""
    for key, value in SMALL.items():
        monkeypatch.setitem(ts.TUNING, key, value)
    a, keys = _inputs("randn", 1, 4, 2, 50, 16, seed=3)
    got = ts.token_select(a * 3, keys, 7, 0.5, 2, softcap=2.0)
    assert torch.equal(_sets(got), _sets(ts.token_select_reference(a * 3, keys, 7, 0.5, 2, softcap=2.0)))


@pytest.mark.parametrize("idx_heads", [4, 2])
def test_gather_attention_kernel_equals_the_reference_per_head_and_shared_by_groups(idx_heads):
    """Kept sets per head (4) or per KV group (2, each shared by two query heads), rows with missing keys, k not a
    multiple of the keys gathered per step, softcap."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=gen), torch.randn(2, 2, 37, 16, generator=gen),
               torch.randn(2, 2, 37, 16, generator=gen))
    a, b = torch.randn(2, 4, 37, 16, generator=gen), torch.randn(2, 4, 37, 16, generator=gen)
    idx = ts.token_select_reference(a, b, 13, 1.0, 4 // idx_heads)
    assert idx.shape[1] == idx_heads and (idx < 0).any()
    for softcap in (None, 5.0):
        out = ts.gather_attention(q, k, v, idx, 0.25, softcap).transpose(1, 2)
        want = ts.gather_attention_reference(q, k, v, idx, 0.25, softcap)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["gather", "mask"])
@pytest.mark.parametrize("selection, selector, k", [("head", "gate", 9), ("group", "gate", 9), ("group", "oracle", 6),
                                                    ("head", "oracle", 200)])
def test_token_kernel_path_of_the_policy_equals_the_reference_path(selection, selector, k, attention, monkeypatch):
    """The policy's ops.token_select path (forced on the CPU: the interpreter runs the kernels) against the chunked
    reference, on a tiny model (4 query heads, 2 KV heads: two heads per group), attending by gathering the kept
    keys or over key tiles with the kept sets as a bitmask (ops.mask_attention)."""
    for key, value in SMALL.items():
        monkeypatch.setitem(ts.TUNING, key, value)
    for name in ("min_density", "min_density_head"):
        monkeypatch.setitem(ma.TUNING, name, 0.0 if attention == "mask" else 2.0)
    masked = []
    monkeypatch.setattr(ma, "mask_attention", lambda *a, f=ma.mask_attention: masked.append(1) or f(*a))
    monkeypatch.setattr(ts, "kernels_ok", ts.supports)
    monkeypatch.setattr(TopKPolicy, "_plain_prefill", lambda self, call: self._inference_call(call)
                        and call.attention_mask is None)
    taken = []
    monkeypatch.setattr(TopKPolicy, "_tokens", lambda self, call, f=TopKPolicy._tokens: taken.append(1) or f(self, call))
    model = tiny_model("qwen3")
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0)
    make = {"oracle": OracleSelector, "gate": lambda: GateSelector(bank)}[selector]
    ids = random_ids(2, 40)
    fast = _run(model, TopKPolicy(make(), k, selection=selection), ids)
    assert taken and bool(masked) == (attention == "mask")  # the kernel path ran, with that attention
    slow = _run(model, TopKPolicy(make(), k, observer=lambda *a: None, selection=selection), ids)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def _forced_token_kernels(monkeypatch, note) -> list:
    """ops.token_select's path of the policy forced on the CPU (the interpreter runs the kernels, at SMALL's
    launch); returns the list that gets ``note(call)`` of every call the path serves."""
    for key, value in SMALL.items():
        monkeypatch.setitem(ts.TUNING, key, value)
    monkeypatch.setattr(ts, "kernels_ok", ts.supports)
    monkeypatch.setattr(TopKPolicy, "_plain_prefill", lambda self, call: self._inference_call(call)
                        and call.attention_mask is None)
    seen = []
    monkeypatch.setattr(TopKPolicy, "_tokens", lambda self, call, f=TopKPolicy._tokens:
                        seen.append(note(call)) or f(self, call))
    return seen


@pytest.mark.parametrize("selection", ["head", "group"])
def test_a_static_caches_prefill_takes_the_token_kernels_over_the_prompts_keys(selection, monkeypatch):
    """generate(..., cache_implementation="static") prefills with a mask over the cache's whole preallocated
    length (or, from transformers 5.24, no mask at all), which sent every such prompt to the chunked reference
    (about 40 s for a 32k prompt of Qwen3-1.7B's shape on an H200, docs/data/generate-h200-static-32k.json). The
    policy now serves the prompt's keys alone through ops.token_select (forced on the CPU), with the logits of a
    prefill without a cache, and the gate key cache holds the prompt for the decode step after."""
    from transformers import StaticCache

    seen = _forced_token_kernels(monkeypatch, lambda call: (call.key.shape[2], call.cached_keys))
    model = tiny_model("qwen3")
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0)
    ids = random_ids(2, 40)

    def reference(x):
        return _run(model, TopKPolicy(GateSelector(bank), 9, observer=lambda *a: None, selection=selection), x)

    cache = StaticCache(config=model.config, max_cache_len=48)
    with torch.no_grad(), SparseAttention(model, TopKPolicy(GateSelector(bank), 9, selection=selection)):
        got = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        nxt = got[:, -1:].argmax(-1)
        step = model(input_ids=nxt, past_key_values=cache, use_cache=True,
                     position_ids=torch.full((2, 1), 40)).logits
    assert seen == [(40, 48)] * model.config.num_hidden_layers  # every layer: the prompt's 40 keys of 48
    torch.testing.assert_close(got, reference(ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, reference(torch.cat([ids, nxt], 1))[:, -1:], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, k, group", [(1000, 200, 1), (1000, 700, 2), (517, 130, 2), (2100, 2048, 1)])
def test_token_kernels_on_gpu(dtype, t, k, group):
    """ops.token_select and gather_attention against their twins on CUDA, at the default launch settings; sets
    compared by the score they carry (fp32 sums in another order than cuBLAS's)."""
    bsz, h, g, d = 2, 4, 2, 32
    gen = torch.Generator().manual_seed(t)
    a = torch.randn(bsz, h, t, d, generator=gen).cuda().to(dtype)
    keys = torch.randn(bsz, g, t, d, generator=gen).cuda().to(dtype)
    got = ts.token_select(a, keys, k, 0.7, group)
    want = ts.token_select_reference(a, keys, k, 0.7, group)
    assert ((got >= 0).sum(-1) == torch.arange(1, t + 1, device="cuda").clamp(max=k)).all()
    s = ts.selection_scores_reference(a, keys, 0.7, group)
    s = s.masked_fill(s == float("-inf"), 0.0)
    mass = [s.gather(-1, i.long().clamp(min=0)).masked_fill(i < 0, 0).sum(-1) for i in (got, want)]
    torch.testing.assert_close(mass[0], mass[1], atol=1e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-3)
    q = torch.randn(bsz, h, t, 128, generator=gen).cuda().to(dtype)
    k_, v = (torch.randn(bsz, g, t, 128, generator=gen).cuda().to(dtype) for _ in range(2))
    out = ts.gather_attention(q, k_, v, got, 128**-0.5).transpose(1, 2).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ts.gather_attention_reference(q, k_, v, got, 128**-0.5), atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("launch", [("select", s) for s in SELECT_LAUNCHES] + [("write", s) for s in WRITE_LAUNCHES]
                         + [("attn", s) for s in GATHER_LAUNCHES])
def test_token_kernels_agree_with_their_twins_under_every_benchmarked_launch_setting(launch, group, monkeypatch):
    """The settings `benchmarks/perf.py --parts prefill_tuning` times, at T = 1500, k = 600, bf16."""
    kind, values = launch
    names = {"select": ("select_rows", "select_keys", "select_cands", "select_warps"),
             "write": ("write_rows", "write_keys", "write_warps"),
             "attn": ("attn_rows", "attn_keys", "attn_warps")}[kind]
    for name, value in zip(names, values):
        monkeypatch.setitem(ts.TUNING, name, value)
    test_token_kernels_on_gpu(torch.bfloat16, 1500, 600, group)


@pytest.mark.gpu
@pytest.mark.parametrize("selection, selector, k", [("head", "gate", 150), ("group", "gate", 24),
                                                    ("group", "oracle", 150)])
def test_token_kernel_path_of_the_policy_equals_the_reference_path_on_gpu(selection, selector, k):
    from .test_block_sparse import _layer_call

    model = tiny_model("qwen3").cuda()  # fp32: the kernels' products are exact fp32 (ieee)
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0).cuda()
    make = {"oracle": OracleSelector, "gate": lambda: GateSelector(bank)}[selector]
    ids = random_ids(2, 300).cuda()
    assert TopKPolicy(make(), k, selection=selection)._token_kernels(_layer_call(model, bank, ids))
    fast = _run(model, TopKPolicy(make(), k, selection=selection), ids)
    slow = _run(model, TopKPolicy(make(), k, observer=lambda *a: None, selection=selection), ids)
    torch.testing.assert_close(fast, slow, atol=1e-2, rtol=1e-2)


def test_a_static_caches_explicit_mask_takes_the_token_kernels_over_the_prompts_keys(monkeypatch):
    """Older transformers (5.17) give a static cache's prefill a mask over the whole preallocated length: where it
    is plain causal over the prompt the policy serves the prompt's keys through ops.token_select (forced on the
    CPU), with the reference's output over all the keys and the mask."""
    from posthoc_sparse.attention.call import LayerCall

    taken = _forced_token_kernels(monkeypatch, lambda call: call.key.shape[2])
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, s, 16, generator=gen) for n, s in ((4, 20), (2, 26), (2, 26)))
    mask = torch.zeros(1, 1, 20, 26, dtype=torch.bool)
    mask[..., :20] = torch.ones(20, 20, dtype=torch.bool).tril()

    def run(**kw):
        call = LayerCall(module=None, layer=0, query=q, key=k, value=v, attention_mask=mask, scaling=0.25,
                         dropout=0.0, kwargs={})
        return TopKPolicy(OracleSelector(), 6, selection="group", **kw)(call)

    fast = run()
    assert taken == [20]
    torch.testing.assert_close(fast, run(observer=lambda *a: None), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("selection, cache, kernels", [("head", "dynamic", "_token_attention"),
                                                      ("group", "static", "_token_attention"),
                                                      ("head", "static", "_head_attention")])
def test_a_left_padded_batchs_prefill_takes_the_kernels_one_sequence_at_a_time(selection, cache, kernels,
                                                                                monkeypatch):
    """A batch of prompts of different lengths (left padding) prefilled through the chunked reference: at a 32k
    prompt and batch 8 an H200 had not ended that prefill after 7 minutes (docs/data/compiled-generate-h200-32k-
    b8.json). Each sequence's unpadded queries and keys now take ops.token_select or ops.head_topk (forced on the
    CPU), with the
    reference's logits at every real position, zeros at the rows of padding, and the same generated tokens
    (the gate key cache filled for every row, dynamic and static caches)."""
    _forced_token_kernels(monkeypatch, lambda call: None)
    if kernels == "_head_attention":
        monkeypatch.setattr(ht, "kernels_ok", ht.supports)
    lengths = []
    monkeypatch.setattr(TopKPolicy, kernels, lambda self, call, inputs, f=getattr(TopKPolicy, kernels):
                        lengths.append((call.query.shape[0], call.key.shape[2])) or f(self, call, inputs))
    model = tiny_model("qwen3")
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0)
    ids = random_ids(3, 24)
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, :11] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)

    def run(**kw):
        with torch.no_grad(), SparseAttention(model, TopKPolicy(GateSelector(bank), 6, selection=selection, **kw)):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            new = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 cache_implementation=cache)
        return logits, new

    fast, fast_new = run()
    per_layer = [(1, 24), (1, 19), (1, 13)]  # each sequence over its own tokens
    assert lengths == per_layer * model.config.num_hidden_layers * 2  # the forward, then generate's prefill
    lengths.clear()
    slow, slow_new = run(observer=lambda *a: None)
    assert lengths == []
    real = mask.bool()
    torch.testing.assert_close(fast[real], slow[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(fast_new, slow_new)


@pytest.mark.parametrize("selection, head_kernels", [("head", False), ("group", False), ("head", True)])
def test_a_padded_sequence_of_one_two_or_no_real_tokens_takes_the_kernels_like_the_reference(selection, head_kernels,
                                                                                            monkeypatch):
    """The shortest sequences a padded batch hands the kernels: two real tokens, one, none (all padding: zeros)."""
    from posthoc_sparse.attention.call import LayerCall

    _forced_token_kernels(monkeypatch, lambda call: None)
    if head_kernels:
        monkeypatch.setattr(ht, "kernels_ok", ht.supports)
    padded = []
    monkeypatch.setattr(TopKPolicy, "_padded", lambda self, call, pads, f=TopKPolicy._padded:
                        padded.append(pads) or f(self, call, pads))
    gen = torch.Generator().manual_seed(5)
    t = 10
    q, k, v = (torch.randn(2, n, t, 16, generator=gen) for n in (4, 2, 2))
    for pad in (8, 9, 10):
        mask = torch.ones(t, t, dtype=torch.bool).tril().repeat(2, 1, 1, 1)
        mask[1, 0, :, :pad] = False

        def run(**kw):
            call = LayerCall(module=None, layer=0, query=q, key=k, value=v, attention_mask=mask, scaling=0.25,
                             dropout=0.0, kwargs={})
            return TopKPolicy(OracleSelector(), 3, selection=selection, **kw)(call)

        torch.testing.assert_close(run(), run(observer=lambda *a: None), atol=1e-4, rtol=1e-4)
    assert padded == [[0, 8], [0, 9], [0, 10]]  # the kernels' path each time; the reference not


def test_a_plain_causal_mask_spelt_out_takes_the_token_kernels_for_the_whole_batch(monkeypatch):
    """A prefill handed an explicit plain causal mask (no padding, no cache) takes the kernels on the whole batch at
    once, with the reference's output; before, any mask sent it to the chunked reference."""
    from posthoc_sparse.attention.call import LayerCall

    _forced_token_kernels(monkeypatch, lambda call: None)
    shapes = []
    monkeypatch.setattr(TopKPolicy, "_token_attention", lambda self, call, inputs, f=TopKPolicy._token_attention:
                        shapes.append(tuple(call.query.shape[:3])) or f(self, call, inputs))
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, n, 20, 16, generator=gen) for n in (4, 2, 2))
    mask = torch.ones(20, 20, dtype=torch.bool).tril().expand(3, 1, 20, 20)

    def run(**kw):
        call = LayerCall(module=None, layer=0, query=q, key=k, value=v, attention_mask=mask, scaling=0.25,
                         dropout=0.0, kwargs={})
        return TopKPolicy(OracleSelector(), 6, selection="group", **kw)(call)

    fast = run()
    assert shapes == [(3, 4, 20)]
    torch.testing.assert_close(fast, run(observer=lambda *a: None), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("selection, k", [("head", 150), ("group", 24)])
def test_a_static_caches_prefill_takes_the_token_kernels_on_gpu(selection, k, monkeypatch):
    """A prompt's prefill into a StaticCache on CUDA runs ops.token_select over the prompt's keys (whether
    transformers passes no mask or one over the whole cache), with the logits of a prefill without a cache."""
    from transformers import StaticCache

    taken = []
    monkeypatch.setattr(TopKPolicy, "_tokens", lambda self, call, f=TopKPolicy._tokens: taken.append(1) or f(self, call))
    model = tiny_model("qwen3").cuda()
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0).cuda()
    ids = random_ids(2, 300).cuda()
    with torch.no_grad(), SparseAttention(model, TopKPolicy(GateSelector(bank), k, selection=selection)):
        static = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=320), use_cache=True).logits
    assert len(taken) == model.config.num_hidden_layers
    plain = _run(model, TopKPolicy(GateSelector(bank), k, observer=lambda *a: None, selection=selection), ids)
    torch.testing.assert_close(static, plain, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("selection, k", [("head", 150), ("group", 24), ("head", 16)])
def test_a_left_padded_batchs_prefill_takes_the_kernels_on_gpu(selection, k):
    """On CUDA a left-padded batch's prefill (dynamic and static caches) takes the prefill kernels one sequence at
    a time, with the reference's logits at every real position and its generated tokens."""
    model = tiny_model("qwen3").cuda()  # fp32: the kernels' products are exact fp32 (ieee)
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0).cuda()
    ids = random_ids(3, 300).cuda()
    mask = torch.ones_like(ids)
    mask[1, :37], mask[2, :201] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    policy = TopKPolicy(GateSelector(bank), k, selection=selection)
    assert policy._left_pads(_padded_layer_call(model, bank, ids, mask)) == [0, 37, 201]

    def run(cache, **kw):
        with torch.no_grad(), SparseAttention(model, TopKPolicy(GateSelector(bank), k, selection=selection, **kw)):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            new = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 cache_implementation=cache, disable_compile=True)
        return logits, new

    real = mask.bool()
    for cache in ("dynamic", "static"):
        (fast, fast_new), (slow, slow_new) = run(cache), run(cache, observer=lambda *a: None)
        torch.testing.assert_close(fast[real], slow[real], atol=1e-3, rtol=1e-3)
        assert torch.equal(fast_new, slow_new), cache


def _padded_layer_call(model, bank, ids, mask):
    """Layer 0's call of a padded batch's forward, as the policy receives it."""
    from posthoc_sparse.attention.call import LayerCall

    calls = []
    with torch.no_grad(), SparseAttention(model, lambda call: calls.append(call) or torch.zeros(
            call.query.shape[0], call.query.shape[2], call.query.shape[1], call.value.shape[-1],
            device=call.query.device)):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert isinstance(calls[0], LayerCall)
    return calls[0]


def test_the_token_select_kernel_compiles_for_hopper(tmp_path):
    """The selection kernels at their default launch, per head and per group, compile to sm_90 machine code without
    local memory, their key tiles' loads pipelined; in the write kernel a ranking chunk of 1 needs fewer registers
    than one of 8."""
    from benchmarks.hopper import TOKEN_SELECT_ALIGNED, TOKEN_SELECT_TYPES, compile_for_hopper, token_select_cases

    pytest.importorskip("triton.backends.nvidia")
    cases = token_select_cases([(ts.TUNING["select_rows"], ts.TUNING["select_keys"], ts.TUNING["select_warps"])],
                               chunks=(), groups=(1, 2))
    cases += token_select_cases([(ts.TUNING["write_rows"], ts.TUNING["write_keys"], ts.TUNING["write_warps"])],
                                chunks=(8, 1), groups=(1, 2))[2:]
    got = compile_for_hopper(tmp_path, "posthoc_sparse.ops.token_select.triton", cases, TOKEN_SELECT_TYPES,
                             TOKEN_SELECT_ALIGNED)
    assert [g["kernel"] for g in got] == ["_token_bracket"] * 2 + ["_token_write"] * 4
    assert all(g["local"] == 0 for g in got), got
    assert all(g["async_copies"] > 0 for g in got), got  # specialized as launched: the key tiles' loads pipelined
    regs = [g["regs"] for g in got[2:]]  # write: RC 8 head, RC 8 group, RC 1 head, RC 1 group
    assert regs[2] < regs[0] and regs[3] <= regs[1], regs


@pytest.mark.parametrize("group", [1, 2])
def test_token_select_guess_keeps_the_sets_and_saves_counting_sweeps(group, monkeypatch):
    """With and without the normal guess at each row's k-th score, the same exact sets; on Gaussian scores the
    guessed first sweep lands near the k-th score, so the programs take fewer counting sweeps."""
    for key, value in (SMALL | {"select_cands": 8, "select_band": 8}).items():
        monkeypatch.setitem(ts.TUNING, key, value)
    a, keys = _inputs("randn", 1, group, 1, 200, 16, seed=5)
    want = _sets(ts.token_select_reference(a, keys, 24, 0.5, group))
    sweeps = {}
    for guess in (False, True):
        monkeypatch.setitem(ts.TUNING, "select_guess", guess)
        idx, sw = ts.token_select(a, keys, 24, 0.5, group, sweeps=True)
        assert torch.equal(_sets(idx), want)
        sweeps[guess] = sw.float().mean().item()
    assert sweeps[True] < sweeps[False], sweeps
    for step in (0.005, 1.0):  # the guess's spacing moves its thresholds, never the sets
        monkeypatch.setitem(ts.TUNING, "select_guess_step", step)
        idx, sw = ts.token_select(a, keys, 24, 0.5, group, sweeps=True)
        assert torch.equal(_sets(idx), want)
    monkeypatch.setitem(ts.TUNING, "select_guess_step", 0.02)
    for every in (2, 4):  # nor does guessing from every n-th tile's scores (and the diagonal tile's)
        monkeypatch.setitem(ts.TUNING, "select_moments_every_group" if group > 1 else "select_moments_every", every)
        assert torch.equal(_sets(ts.token_select(a, keys, 24, 0.5, group)), want)


def test_guessing_from_every_fourth_tile_takes_as_few_counting_sweeps(monkeypatch):
    """At the default launch (64 x 64 tiles), the guess from every fourth tile's moments and the diagonal tile's
    takes as few counting sweeps as the guess from every tile, per head and per group (a guess that took the
    sampled keys for the row's count took 3.2 sweeps against 1.8 here). Its sets: the guess test above."""
    from posthoc_sparse.ops.token_select.triton import token_bracket

    gen = torch.Generator().manual_seed(0)
    a, keys = torch.randn(1, 2, 1024, 32, generator=gen), torch.randn(1, 2, 1024, 32, generator=gen)
    for group, scale in ((1, 1.0), (2, 0.2)):
        sweeps = {}
        for every in (1, 4):
            monkeypatch.setitem(ts.TUNING, "select_moments_every_group" if group > 1 else "select_moments_every", every)
            sweeps[every] = token_bracket(a[:, :group], keys[:, :group], 64, scale, group)[2].float().mean().item()
        assert sweeps[4] <= sweeps[1] + 0.25, (group, sweeps)


@pytest.mark.parametrize("group", [1, 2])
def test_a_missed_guess_moves_out_instead_of_spreading_over_the_bracket(group, monkeypatch):
    """With 4 thresholds the guessed first sweep spans only +-0.08 sd, which the k-th score of a few hundred Gaussian
    scores often leaves; the second sweep then moves all thresholds out on that side. Exact sets, and at most 3
    counting sweeps a program on average here (spreading evenly over the bracket after a miss took 4.96 / 3.92
    per head at k = 4 / 24, 2.54 / 2.85 per group)."""
    for key, value in SMALL.items():
        monkeypatch.setitem(ts.TUNING, key, value)
    assert ts.TUNING["select_cands"] == 4 and ts.TUNING["select_guess"]
    gen = torch.Generator().manual_seed(5)
    a, keys = torch.randn(1, 2, 200, 16, generator=gen), torch.randn(1, 2, 200, 16, generator=gen)
    for k in (4, 24):
        idx, sw = ts.token_select(a, keys, k, 0.5, group, sweeps=True)
        assert torch.equal(_sets(idx), _sets(ts.token_select_reference(a, keys, k, 0.5, group)))
        assert sw.float().mean().item() <= 3.0, (k, sw.float().mean().item())
