"""The attention hook: dense reproduces stock logits, top-k invariants, GQA, padding, sliding windows."""

from __future__ import annotations

import torch

from posthoc_sparse.attention.interface import SparseAttention, attention_modules
from posthoc_sparse.attention.policies import DensePolicy, GateSelector, OracleSelector, TopKPolicy
from posthoc_sparse.attention.reference import allowed_keys, masked_softmax, scores, topk_keep
from posthoc_sparse.gates.io import gate_spec_for_model
from posthoc_sparse.gates.modules import GateBank

from .tiny import random_ids


def _forward(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_dense_policy_reproduces_stock_logits_bitwise(model):
    ids = random_ids(2, 20)
    ref = _forward(model, ids)
    with SparseAttention(model, DensePolicy()):
        got = _forward(model, ids)
    assert torch.equal(got, ref)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert torch.equal(_forward(model, ids), ref)


def test_oracle_with_k_at_least_t_equals_dense(model):
    ids = random_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    ref = _forward(model, ids, mask)
    with SparseAttention(model, TopKPolicy(OracleSelector(), k=24, query_chunk=7)):
        got = _forward(model, ids, mask)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 5:], ref[1, 5:], atol=2e-5, rtol=1e-5)


def test_small_k_changes_output_and_chunking_does_not(model):
    ids = random_ids(1, 24)
    ref = _forward(model, ids)
    outs = []
    for chunk in (5, 24):
        with SparseAttention(model, TopKPolicy(OracleSelector(), k=3, query_chunk=chunk)):
            outs.append(_forward(model, ids))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert (outs[0] - ref).abs().max() > 1e-3


def test_selection_is_causal_with_exactly_min_k_keys():
    gen = torch.Generator().manual_seed(0)
    b, h, t = 2, 3, 17
    allowed = allowed_keys(None, b, t, t, torch.device("cpu"))
    sel = torch.randn(b, h, t, t, generator=gen)
    for k in (1, 4, 16, 40):
        keep = topk_keep(sel, allowed, k)
        assert not (keep & ~allowed).any()
        counts = keep.sum(-1)  # (B, H, T)
        expect = torch.clamp(torch.arange(t) + 1, max=k)
        assert torch.equal(counts, expect.expand(b, h, t))


def test_topk_keeps_the_largest_scores_by_mass():
    gen = torch.Generator().manual_seed(1)
    sel = torch.randn(1, 2, 9, 9, generator=gen)
    allowed = allowed_keys(None, 1, 9, 9, torch.device("cpu"))
    keep = topk_keep(sel, allowed, 3)
    masked = sel.masked_fill(~allowed, float("-inf"))
    best = masked.topk(3, dim=-1).values.clamp(min=-1e9).sum(-1)  # score mass of the true top 3 (finite part)
    got = sel.masked_fill(~keep, 0).sum(-1)
    rows_full = torch.arange(9) >= 2
    torch.testing.assert_close(got[..., rows_full], best[..., rows_full])


def test_allowed_keys_from_bool_float_and_none_agree():
    t = 6
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None, None]
    additive = torch.zeros(1, 1, t, t).masked_fill(~causal, torch.finfo(torch.float32).min)
    cpu = torch.device("cpu")
    a, b_, c = allowed_keys(None, 1, t, t, cpu), allowed_keys(causal, 1, t, t, cpu), allowed_keys(additive, 1, t, t, cpu)
    assert torch.equal(a, b_) and torch.equal(a, c)


def test_gqa_scores_use_the_group_key_head():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 5, 8, generator=gen)
    k = torch.randn(1, 2, 5, 8, generator=gen)
    s = scores(q, k, 0.5)
    for h in range(4):
        torch.testing.assert_close(s[0, h], q[0, h] @ k[0, h // 2].T * 0.5)


def test_masked_softmax_rows_without_keys_are_zero():
    s = torch.randn(1, 1, 2, 3)
    keep = torch.tensor([[[[True, False, True], [False, False, False]]]])
    p = masked_softmax(s, keep)
    assert torch.isfinite(p).all() and p[0, 0, 1].sum() == 0
    torch.testing.assert_close(p[0, 0, 0].sum(), torch.tensor(1.0))


def test_gate_policy_runs_on_every_architecture_and_is_restored(model):
    ids = random_ids(2, 16)
    ref = _forward(model, ids)
    bank = GateBank(gate_spec_for_model(model, d_g=8)).reset_random(0)
    with SparseAttention(model, TopKPolicy(GateSelector(bank), k=4)):
        got = _forward(model, ids)
    assert torch.isfinite(got).all() and (got - ref).abs().max() > 1e-4
    assert torch.equal(_forward(model, ids), ref)
    assert len(attention_modules(model)) == model.config.num_hidden_layers


def test_gate_input_is_the_attention_block_input(model):
    """The pre-hook hands the gate exactly the normed hidden state the attention module receives."""
    seen, recorded = {}, []
    mods = attention_modules(model)

    def grab(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"]

    hook = mods[0].register_forward_pre_hook(grab, with_kwargs=True)

    class Spy(DensePolicy):
        needs_inputs = True

        def __call__(self, call):
            recorded.append(call.x)
            return super().__call__(call)

    try:
        with SparseAttention(model, Spy()):
            _forward(model, random_ids(1, 8))
    finally:
        hook.remove()
    assert recorded[0] is seen["x"]


def test_nested_handles_restore_the_outer_policy(model):
    ids = random_ids(1, 12)
    with SparseAttention(model, TopKPolicy(OracleSelector(), k=2)):
        outer = _forward(model, ids)
        with SparseAttention(model, DensePolicy()):
            _forward(model, ids)
        again = _forward(model, ids)
    assert torch.equal(outer, again)


def test_plain_causal_prefill_masks_are_none_only_for_full_causal_windows():
    """Inside plain_causal_prefill() (CUDA-graph capture of distillation steps) the mask builder returns None for
    full causal attention over whole windows, as SDPA's own builder does eagerly, whatever skip flag transformers
    passes; padding masks, local windows and offsets still get their explicit masks."""
    from posthoc_sparse.attention.interface import _mask, plain_causal_prefill

    base = dict(batch_size=2, q_length=6, kv_length=6, device="cpu")
    forced = _mask(**base, allow_is_causal_skip=False)
    assert forced.shape == (2, 1, 6, 6) and torch.equal(forced[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    with plain_causal_prefill():
        assert _mask(**base, allow_is_causal_skip=False) is None
        padded = torch.ones(2, 6, dtype=torch.bool)
        padded[0, :2] = False
        assert _mask(**base, attention_mask=padded) is not None
        assert _mask(**base, local_size=3, allow_is_causal_skip=False) is not None
        assert _mask(**base, local_size=8, allow_is_causal_skip=False) is None  # a window longer than the keys
        assert _mask(**(base | {"kv_length": 8}), kv_offset=0, allow_is_causal_skip=False) is not None
    assert _mask(**base, allow_is_causal_skip=False) is not None
