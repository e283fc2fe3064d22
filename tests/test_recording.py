"""What distillation records from a dense forward: the teacher's lse from the flash forward (GPU), and every
layer in one stack that the step then treats as one batch."""

from __future__ import annotations

import pytest
import torch

from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.policies import DensePolicy
from posthoc_sparse.attention.recording import RecordPolicy
from posthoc_sparse.distill.layer_loss import layer_loss_backward, stacked
from posthoc_sparse.distill.step import accumulate_gradients
from posthoc_sparse.gates.io import gate_spec_for_model
from posthoc_sparse.gates.modules import GateBank
from posthoc_sparse.ops.attention_lse import attention_lse_reference

from .tiny import random_ids, tiny_model


def test_record_has_no_teacher_lse_off_the_gpu():
    model = tiny_model("qwen3")
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(1, 20), use_cache=False)
    assert all(rec.lse is None for rec in policy.records.values())


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_record_keeps_the_flash_forward_lse_on_gpu(arch):
    """The recording forward runs flash attention's ATen op: same logits as the stock SDPA forward, and the lse
    it keeps is the teacher's log-sum-exp; the distillation loss through it equals the reference path's."""
    model = tiny_model(arch).to("cuda", torch.bfloat16)
    ids = random_ids(2, 300).cuda()
    policy = RecordPolicy()
    with torch.no_grad():
        with SparseAttention(model, DensePolicy()):
            dense = model(input_ids=ids, use_cache=False).logits
        with SparseAttention(model, policy):
            recorded = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(recorded, dense, atol=1e-2, rtol=1e-2)
    rec = policy.records[1]
    assert rec.lse is not None and rec.lse.shape == rec.query.shape[:3]
    torch.testing.assert_close(rec.lse, attention_lse_reference(rec.query, rec.key, rec.key, rec.scaling)[1],
                               atol=2e-3, rtol=1e-4)
    spec = gate_spec_for_model(model, d_g=16)
    losses = []
    for fused in (False, True):
        bank = GateBank(spec).reset_random(0).to("cuda")
        losses.append(float(layer_loss_backward(rec, bank.layers[1], "kl", 4, 1.0, fused=fused)))
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0]), losses


@pytest.mark.gpu
def test_stacked_records_on_gpu_equal_the_per_layer_path():
    """RecordPolicy(stack_layers=L) on CUDA records every layer into one stack; accumulate_gradients then takes
    the stacked path, with the same losses and gradients as the per-layer fused path."""
    model = tiny_model("qwen3", layers=3).to("cuda", torch.bfloat16)
    ids = random_ids(2, 300).cuda()
    spec = gate_spec_for_model(model, d_g=16)
    out = []
    for stack_layers in (0, 3):
        bank = GateBank(spec).reset_random(0).to("cuda")
        policy = RecordPolicy(stack_layers=stack_layers)
        with SparseAttention(model, policy):
            if stack_layers:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
                assert policy.stack is not None and policy.stack.layers == [0, 1, 2]
                assert [policy.records[i].slot for i in range(3)] == [0, 1, 2]
                assert stacked(policy, [0, 1, 2])  # so accumulate_gradients takes the stacked path
                policy.clear()
            losses = accumulate_gradients(model, policy, bank, [ids], "kl", 4)
        out.append((losses, [p.grad.clone() for p in bank.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-4, rtol=1e-3)
    for a, b in zip(out[1][1], out[0][1]):
        err = (a - b).norm() / b.norm()
        assert err < 1e-2, float(err)
