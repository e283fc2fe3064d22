"""apply_gates: exact restoration, KV-cache decoding equals the full forward, k >= T generates like dense."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.policies import policy_for
from posthoc_sparse.deploy import apply_gates
from posthoc_sparse.errors import GateMismatchError, UserError
from posthoc_sparse.gates.io import gate_spec_for_model, save_gates
from posthoc_sparse.gates.modules import GateBank

from .tiny import random_ids, tiny_model


def _bank(model, gate_input="hidden", seed=0):
    return GateBank(gate_spec_for_model(model, d_g=8, gate_input=gate_input)).reset_random(seed)


def test_apply_and_remove_restores_logits_bitwise(model):
    ids = random_ids(2, 12)
    with torch.no_grad():
        before = model(ids).logits
        handle = apply_gates(model, _bank(model), k=3)
        during = model(ids).logits
        handle.remove()
        after = model(ids).logits
    assert torch.equal(before, after) and not torch.equal(before, during)


@pytest.mark.parametrize("gate_input", ["hidden", "qk"])
def test_decoding_with_cache_equals_full_forward(model, gate_input):
    ids = random_ids(1, 22)
    with torch.no_grad(), apply_gates(model, _bank(model, gate_input), k=4):
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :9], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for i in range(9, 22):
            out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_generation_matches_single_rows():
    model = tiny_model("llama")
    bank = _bank(model)
    a, b = random_ids(1, 7, seed=3), random_ids(1, 4, seed=4)
    batch = torch.full((2, 7), 2)
    batch[0], batch[1, 3:] = a[0], b[0]
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    with torch.no_grad(), apply_gates(model, bank, k=3):
        together = model.generate(batch, attention_mask=mask, **kw)
        alone = model.generate(b, attention_mask=torch.ones_like(b), **kw)
    assert torch.equal(together[1, 3:], alone[0])


def test_k_at_least_length_generates_exactly_like_dense():
    model = tiny_model("qwen3")
    ids = random_ids(1, 6)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        with apply_gates(model, _bank(model), k=64):
            sparse = model.generate(ids, **kw)
    assert torch.equal(dense, sparse)


def test_sampling_works_under_the_gate():
    model = tiny_model("llama")
    torch.manual_seed(0)
    with torch.no_grad(), apply_gates(model, _bank(model), k=2):
        out = model.generate(random_ids(1, 5), max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0)
    assert out.shape == (1, 10)


def test_mismatched_gate_and_bad_arguments_are_refused(tmp_path):
    model = tiny_model("llama")
    save_gates(tmp_path / "g", _bank(tiny_model("llama", layers=3)), {"k": 4})
    with pytest.raises(GateMismatchError, match="num_layers"):
        apply_gates(model, tmp_path / "g", k=4)
    with pytest.raises(UserError, match="k must be"):
        apply_gates(model, _bank(model), k=0)
    with pytest.raises(UserError, match="mode"):
        apply_gates(model, _bank(model), k=4, mode="fancy")


def _generated(model, ids, mask, cache, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         cache_implementation=cache, return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)  # (B, T + N), (B, N, V)


@pytest.mark.parametrize("gate_input", ["hidden", "qk"])
def test_static_cache_decodes_like_the_dynamic_cache(gate_input):
    """A StaticCache hands attention keys of its full length (zeros past the tokens seen, masked): the gate's key
    cache must follow its positions. Left-padded batch, k = 8 of up to 20 keys, greedy."""
    model = tiny_model("qwen3")
    ids = random_ids(2, 12, seed=5)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # row 1: 8 tokens, left-padded
    with torch.no_grad():
        dense = {c: _generated(model, ids, mask, c)[0] for c in ("dynamic", "static")}
        with apply_gates(model, _bank(model, gate_input), k=8):
            (dyn, dyn_logits), (sta, sta_logits) = (_generated(model, ids, mask, c) for c in ("dynamic", "static"))
    assert torch.equal(dense["dynamic"], dense["static"])
    assert torch.equal(dyn, sta)
    torch.testing.assert_close(sta_logits, dyn_logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(dyn, dense["dynamic"])  # the gate does select (k = 8 of up to 20 keys)


class _DeviceReads(TorchDispatchMode):
    """Records ops that make the host wait for the device: a scalar read (.item(), bool(t), int(t)) or an output
    whose shape depends on values (nonzero, masked_select, unique, indexing by a bool mask)."""

    NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = args[1] if func.__name__.startswith("index.") and isinstance(args[1], (list, tuple)) else ()
        by_mask = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if by_mask or any(n in func.__name__ for n in self.NAMES):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("gate_input", ["hidden", "qk"])
def test_static_cache_decode_step_reads_nothing_back_and_grows_nothing(gate_input):
    """What CUDA-graph capture and torch.compile need of a static-cache step: no value read back by the host inside
    the attention calls, and the gate's key cache written in place (the same storage every step)."""
    from transformers import StaticCache

    model = tiny_model("qwen3")
    bank = _bank(model, gate_input)
    policy = policy_for("gate", 4, bank)
    spy = _DeviceReads()

    class Spied:
        needs_inputs = True

        def __call__(self, call):
            with spy:
                return policy(call)

    ids = random_ids(2, 10)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad(), SparseAttention(model, Spied()):
        out = model(ids, past_key_values=cache, use_cache=True)
        spy.seen.clear()
        storages = []
        for step in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, past_key_values=cache, use_cache=True, position_ids=torch.full((2, 1), 10 + step))
            storages.append([m.keys.data_ptr() for m in policy.selector.key_cache.mirrors()])
    assert spy.seen == []
    if gate_input == "hidden":
        assert len(storages[0]) == model.config.num_hidden_layers and storages[0] == storages[1] == storages[2]


def test_static_cache_decode_step_traces_as_one_graph():
    """torch.compile's tracer takes a whole static-cache decode step under a hidden gate without a graph break
    (a break would mark a value read back, data-dependent Python, or untraceable bookkeeping)."""
    from transformers import StaticCache

    model = tiny_model("qwen3")
    cache = StaticCache(config=model.config, max_cache_len=16)
    ids = random_ids(2, 10)
    with torch.no_grad(), apply_gates(model, _bank(model), k=4, selection="group"):
        nxt = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        explained = torch._dynamo.explain(model)(nxt, past_key_values=cache, use_cache=True,
                                                  position_ids=torch.full((2, 1), 10))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("selection", ["head", "group", "block"])
def test_a_static_caches_prefill_gives_the_logits_of_a_prefill_without_a_cache(selection):
    """transformers (5.24 here) passes no mask for a prompt's prefill into an empty StaticCache, leaving it to SDPA's
    causal alignment from the first key, while the cache hands attention all its preallocated keys. The gated
    paths read a missing mask as causal over the last T of S keys, so every query saw keys past its own, and the
    logits parted from a prefill without a cache (by 0.43 on this model); now the call holds the prompt's keys."""
    from transformers import StaticCache

    model = tiny_model("qwen3")
    ids = random_ids(2, 40)
    with torch.no_grad(), apply_gates(model, _bank(model, "hidden"), k=8, selection=selection, block_size=16):
        plain = model(ids, use_cache=False).logits
        static = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=48), use_cache=True).logits
    torch.testing.assert_close(static, plain, atol=1e-5, rtol=1e-5)


def test_an_explicit_mask_over_a_static_caches_prompt_is_recognised_as_plain_causal():
    """Older transformers (5.17) pass a static cache's prefill an explicit mask over the whole preallocated length:
    where it is causal over the prompt and masks the rest, ``causal_prefix`` gives the call over the prompt's keys
    (what the prefill kernels serve); any other mask (padding, a window, a key past the prompt) stays as it is."""
    from posthoc_sparse.attention.call import LayerCall, causal_prefix

    b, h, t, s, d = 2, 4, 6, 9, 8
    q, k = torch.randn(b, h, t, d), torch.randn(b, 2, s, d)

    def call(mask):
        return LayerCall(module=None, layer=0, query=q, key=k, value=k, attention_mask=mask, scaling=1.0,
                         dropout=0.0, kwargs={})

    causal = torch.zeros(b, 1, t, s, dtype=torch.bool)
    causal[..., :t] = torch.ones(t, t, dtype=torch.bool).tril()
    got = causal_prefix(call(causal))
    assert got.key.shape[2] == got.value.shape[2] == t and got.attention_mask is None and got.cached_keys == s
    additive = torch.zeros(b, 1, t, s).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert causal_prefix(call(additive)) is not None
    for change in ((0, 0, 0, 7), (1, 0, 2, 4), (1, 0, 0, 0)):  # a key past the prompt, a future key, padding
        other = causal.clone()
        other[change] = not other[change]
        assert causal_prefix(call(other)) is None, change
    assert causal_prefix(call(None)) is None


def test_the_prefill_mask_is_checked_in_row_chunks_once_per_mask(monkeypatch):
    """The check reads the mask a few rows at a time (a (B, T, S) int64 sum of a 32k prompt at batch 8 took 64 GiB
    on an H200) and gives the same answer at any chunk size: each sequence's left padding where every row is
    causal after it (rows of padding see nothing), else None; every layer of a forward gets one mask object, and
    it is checked once (a model of sliding-window and full layers hands a forward two, in turn)."""
    from posthoc_sparse.attention import call as call_mod

    b, t, s = 3, 7, 11
    causal = torch.zeros(b, 1, t, s, dtype=torch.bool)
    causal[..., :t] = torch.ones(t, t, dtype=torch.bool).tril()
    padded = causal.clone()
    padded[1, ..., :2] = False  # two tokens of padding
    padded[2] = False  # a row of padding only
    late = causal.clone()
    late[2, 0, 6, 3] = False  # the last row of the last sequence, seen only by the last chunk
    sees_pad = padded.clone()
    sees_pad[1, 0, 1, 1] = True  # a row of padding that sees a key
    for rows in (1, 2, 3, 7, 100):
        assert call_mod._left_pads(causal, t, s, rows) == [0, 0, 0], rows
        assert call_mod._left_pads(padded, t, s, rows) == [0, 2, t], rows
        assert call_mod._left_pads(late, t, s, rows) is None and call_mod._left_pads(sees_pad, t, s, rows) is None
    checks = []
    monkeypatch.setattr(call_mod, "_left_pads", lambda *a: checks.append(a) or [0, 0, 0])
    q, k = torch.randn(b, 4, t, 8), torch.randn(b, 2, s, 8)
    layer = [call_mod.LayerCall(module=None, layer=i, query=q, key=k, value=k, attention_mask=causal, scaling=1.0,
                                dropout=0.0, kwargs={}) for i in range(3)]
    assert all(call_mod.causal_prefix(c) is not None for c in layer)
    assert len(checks) == 1
    other = causal.clone()  # a new mask object is checked anew; two masks in turn (sliding and full layers), once
    for mask in (other, causal, other, causal):
        call_mod.causal_prefix(call_mod.LayerCall(module=None, layer=0, query=q, key=k, value=k, attention_mask=mask,
                                                  scaling=1.0, dropout=0.0, kwargs={}))
    assert len(checks) == 2


def test_a_compiled_decode_step_is_reused_by_a_new_static_cache():
    """Every ``generate`` call makes a new StaticCache: the compiled decode step must take it without compiling
    again. Under a hidden gate the step reads the gate key cache, whose mirrors the guards must see as parts of
    the cache (its input), not as entries of a dictionary the new cache invalidates (each call then compiled the
    step anew: 48 s a call for Qwen3-1.7B's shape on an H200, benchmarks/compiled_generate.py)."""
    from transformers import StaticCache

    model = tiny_model("qwen3")
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(model, backend=backend)
    ids = random_ids(2, 10)
    with torch.no_grad(), apply_gates(model, _bank(model), k=4):
        for _ in range(3):  # three generate calls' caches, two decode steps each
            cache = StaticCache(config=model.config, max_cache_len=16)
            nxt = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)  # eager prefill
            for pos in (10, 11):
                nxt = step(nxt, past_key_values=cache, use_cache=True,
                           position_ids=torch.full((2, 1), pos)).logits[:, -1:].argmax(-1)
    torch._dynamo.reset()
    assert len(compiles) == 1


@pytest.mark.parametrize("max_memory", ["cpu=200KB", "cpu=1KB"])
def test_apply_gates_on_a_model_offloaded_by_a_device_map(tmp_path, max_memory):
    """With Accelerate's device map putting layers (or everything) on disk, each gate layer goes where its
    attention computes and the gated logits equal those of the plain model (the whole model offloaded once
    failed with "Cannot copy out of meta tensor")."""
    from posthoc_sparse.loading import load_model

    from .tiny import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "m", sharpen=3.0)
    plain = load_model(str(tmp_path / "m")).model
    save_gates(tmp_path / "g", GateBank(gate_spec_for_model(plain, d_g=8)).reset_random(0), {"k": 4})
    ids = random_ids(1, 20)
    offloaded = load_model(str(tmp_path / "m"), device_map="auto", max_memory=max_memory).model
    assert "disk" in offloaded.hf_device_map.values()
    for mode in ("gate", "random"):
        with apply_gates(plain, str(tmp_path / "g"), k=4, mode=mode):
            ref = plain(ids).logits
        with apply_gates(offloaded, str(tmp_path / "g"), k=4, mode=mode):
            torch.testing.assert_close(offloaded(ids).logits, ref)
