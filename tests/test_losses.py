"""The distillation losses' definitions (KL over allowed keys, BCE against the oracle mask) against naive
row-by-row versions, and the chunked reference layer loss."""

from __future__ import annotations

import torch

from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.recording import RecordPolicy
from posthoc_sparse.attention.reference import allowed_keys
from posthoc_sparse.distill.layer_loss import bce_rows, kl_rows, layer_loss_backward
from posthoc_sparse.gates.io import gate_spec_for_model
from posthoc_sparse.gates.modules import GateBank

from .tiny import random_ids, tiny_model


def _record(model, t=16, b=2):
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(b, t), use_cache=False)
    return policy.records


def naive_kl(s, g, allowed):
    """Row-by-row KL over the allowed keys, the obvious way (float64)."""
    total, rows = 0.0, 0
    s, g, allowed = s.double(), g.double(), allowed.expand_as(s)
    for idx in torch.nonzero(allowed.any(-1)):
        a = allowed[tuple(idx)]
        p = torch.softmax(s[tuple(idx)][a], -1)
        q = torch.softmax(g[tuple(idx)][a], -1)
        total += float((p * (p.log() - q.log())).sum())
        rows += 1
    return total, rows


def test_kl_matches_naive_reference_and_is_a_true_kl():
    gen = torch.Generator().manual_seed(0)
    s, g = torch.randn(2, 3, 7, 7, generator=gen) * 3, torch.randn(2, 3, 7, 7, generator=gen)
    allowed = allowed_keys(None, 2, 7, 7, torch.device("cpu")).clone()
    allowed[1, :, :, :2] = False  # padding: first two keys of the second row unavailable
    allowed[1, :, :2] = False  # and its first two queries have no key at all
    got, rows = kl_rows(s, g, allowed)
    ref, ref_rows = naive_kl(s, g, allowed)
    assert rows == ref_rows == 2 * 3 * 7 - 3 * 2
    assert abs(float(got) - ref) < 1e-4
    zero, _ = kl_rows(s, s, allowed)
    assert abs(float(zero)) < 1e-5 and float(got) > 0


def test_bce_targets_the_oracle_mask():
    s = torch.tensor([[[[3.0, 1.0, 2.0]]]])
    allowed = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    good = torch.tensor([[[[10.0, -10.0, 10.0]]]])  # agrees with the top-2 mask {0, 2}
    bad = -good
    assert float(bce_rows(s, good, allowed, 2)[0]) < 1e-3 < float(bce_rows(s, bad, allowed, 2)[0])


def test_layer_loss_chunked_equals_unchunked_and_grads_reach_only_the_gate():
    model = tiny_model("qwen3")
    rec = _record(model, t=20)[1]
    spec = gate_spec_for_model(model, d_g=8)
    grads, losses = [], []
    for chunk in (3, 20):
        bank = GateBank(spec).reset_random(0)
        losses.append(float(layer_loss_backward(rec, bank.layers[1], "kl", 4, 1.0, chunk=chunk)))
        grads.append([p.grad.clone() for p in bank.layers[1].parameters()])
        assert all(p.grad is None for p in bank.layers[0].parameters())
    assert abs(losses[0] - losses[1]) < 1e-5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())
