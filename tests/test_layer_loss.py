"""A layer's distillation loss: the fused paths (per layer, all layers, a stack) against the reference path on
tiny models; row sampling's estimate is unbiased; shapes the kernels do not take go to the reference."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from posthoc_sparse.attention.interface import SparseAttention  # noqa: E402
from posthoc_sparse.attention.recording import RecordPolicy, RecordStack  # noqa: E402
from posthoc_sparse.distill.layer_loss import (  # noqa: E402
    _fused_eligible, fused_hidden_losses, fused_stacked_losses, layer_loss_backward, stacked,
)
from posthoc_sparse.gates.io import gate_spec_for_model  # noqa: E402
from posthoc_sparse.gates.modules import GateBank  # noqa: E402
from posthoc_sparse.ops import tile_dims_ok  # noqa: E402

from .test_ops_kl import teacher_lse  # noqa: E402
from .tiny import random_ids, tiny_model  # noqa: E402


def test_sampled_loss_is_an_unbiased_estimate_of_the_full_loss():
    """Averaged over every possible draw (3 blocks, 1 drawn), the sampled layer loss and its gradients equal
    the full ones exactly: the nb / m scaling makes the estimate unbiased."""
    model = tiny_model("qwen3")
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(1, 300), use_cache=False)
    rec = policy.records[0]
    spec = gate_spec_for_model(model, d_g=16)
    full = GateBank(spec).reset_random(0)
    exact = layer_loss_backward(rec, full.layers[0], "kl", 4, 1.0, fused=False)
    for fused in (False, True):
        bank = GateBank(spec).reset_random(0)
        est = [layer_loss_backward(rec, bank.layers[0], "kl", 4, 1 / 3, fused=fused,
                                   row_blocks=torch.tensor([i], dtype=torch.int32)) for i in range(3)]
        torch.testing.assert_close(sum(est) / 3, exact, atol=1e-5, rtol=1e-5)
        for a, b in zip(bank.parameters(), full.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,gate_input,with_lse", [("qwen3", "hidden", False), ("qwen3", "hidden", True),
                                                      ("llama", "hidden", True), ("qwen3", "qk", True)])
def test_layer_loss_fused_and_reference_paths_agree_on_a_model(arch, gate_input, with_lse):
    """The fused layer loss ("hidden" gates: no autograd graph; "qk" gates: the kernels' gradients through
    autograd), with the teacher lse in the record or not, equals the reference path: loss and the gate's weight
    gradients, which accumulate over calls."""
    model = tiny_model(arch)
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(2, 70), use_cache=False)
    rec = policy.records[1]
    if with_lse:
        rec.lse = teacher_lse(rec.query, rec.key, rec.scaling)
    spec = gate_spec_for_model(model, d_g=16, gate_input=gate_input)
    grads, losses = [], []
    for fused in (False, True):
        bank = GateBank(spec).reset_random(0)
        losses.append(float(layer_loss_backward(rec, bank.layers[1], "kl", 4, 0.5, fused=fused)))
        layer_loss_backward(rec, bank.layers[1], "kl", 4, 0.25, fused=fused)
        grads.append([p.grad for p in bank.layers[1].parameters()])
    assert abs(losses[0] - losses[1]) < 1e-5
    assert len(grads[1]) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_all_layers_at_once_equal_the_reference_per_layer():
    """fused_hidden_losses over every layer of a model (weights laid out together, gradients added in one call)
    equals the reference path layer by layer, also when gradients are already there."""
    model = tiny_model("llama", layers=3)
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(2, 66), use_cache=False)
    spec = gate_spec_for_model(model, d_g=16)
    ref_bank, bank = GateBank(spec).reset_random(1), GateBank(spec).reset_random(1)
    records = [policy.records[i] for i in range(3)]
    ref = torch.stack([layer_loss_backward(rec, ref_bank.layers[i], "kl", 4, 0.5, fused=False)
                       for i, rec in enumerate(records)])
    got = fused_hidden_losses([(rec, bank.layers[i]) for i, rec in enumerate(records)], 0.5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for rep in range(2):
        for a, b in zip(bank.parameters(), ref_bank.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
        for i, rec in enumerate(records):
            layer_loss_backward(rec, ref_bank.layers[i], "kl", 4, 0.25, fused=False)
        fused_hidden_losses([(rec, bank.layers[i]) for i, rec in enumerate(records)], 0.25)


@pytest.mark.parametrize("sample,budget", [(False, 1 << 28), (True, 1 << 28), (False, 1)])
def test_stacked_layers_equal_the_reference_per_layer(sample, budget):
    """fused_stacked_losses (every layer as one batch of L * B sequences, from a RecordStack) equals the
    reference path layer by layer, with two sequences per layer and with sampled row blocks."""
    model = tiny_model("llama", layers=3)
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(2, 200), use_cache=False)
    recs = [policy.records[i] for i in range(3)]
    stack = RecordStack.like(3, recs[0].query, recs[0].key, recs[0].x)
    for i, rec in enumerate(recs):
        rec.lse = teacher_lse(rec.query, rec.key, rec.scaling)
        for name in ("query", "key", "x", "lse"):
            getattr(stack, name)[i].copy_(getattr(rec, name))
        stack.layers.append(i)
        rec.slot = i
    policy.stack = stack
    assert stacked(policy, [0, 1, 2]) and not stacked(policy, [0, 1])  # records share one rotary table
    rows = torch.tensor([[1], [0], [1]], dtype=torch.int32) if sample else None
    spec = gate_spec_for_model(model, d_g=16)
    ref_bank, bank = GateBank(spec).reset_random(2), GateBank(spec).reset_random(2)
    ref = torch.stack([layer_loss_backward(rec, ref_bank.layers[i], "kl", 4, 0.5, fused=False,
                                           row_blocks=None if rows is None else rows[i])
                       for i, rec in enumerate(recs)])
    got = fused_stacked_losses(stack, recs, list(bank.layers), 0.5, rows, budget_bytes=budget)  # 1: a run a layer
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(bank.parameters(), ref_bank.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_kernel_dims_send_other_shapes_to_the_reference_path():
    """The fused kernels take power-of-two head and gate dims of at least 16 (tl.arange, tl.dot on a GPU); a
    gate of d_g = 8 (or a head dim of 80) takes the reference path instead of failing to compile."""
    assert tile_dims_ok(128, 32) and tile_dims_ok(64, 16)
    assert not tile_dims_ok(128, 8) and not tile_dims_ok(80, 32)
    model = tiny_model("llama", layers=1)
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(1, 40), use_cache=False)
    rec = policy.records[0]
    assert _fused_eligible(rec, "kl", 16) and not _fused_eligible(rec, "kl", 8)
    bank = GateBank(gate_spec_for_model(model, d_g=8)).reset_random(0)
    with pytest.raises(ValueError, match="power-of-two"):
        layer_loss_backward(rec, bank.layers[0], "kl", 4, 1.0, fused=True)
