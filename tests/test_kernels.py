"""Fused kernels against their naive fp32 twins: forward and gradients, odd shapes, GQA.

On the CPU the Triton kernels run through TRITON_INTERPRET=1 (set in conftest); GPU-marked tests confirm
bf16 inputs and large shapes on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from posthoc_sparse.attention.interface import SparseAttention  # noqa: E402
from posthoc_sparse.attention.policies import RecordPolicy  # noqa: E402
from posthoc_sparse.distill.loop import layer_loss_backward  # noqa: E402
from posthoc_sparse.gates.io import gate_spec_for_model  # noqa: E402
from posthoc_sparse.gates.modules import GateBank  # noqa: E402
from posthoc_sparse.kernels.kl_distill import kl_rows_fused, kl_rows_reference  # noqa: E402

from .tiny import random_ids, tiny_model  # noqa: E402


def _inputs(b, h, hkv, t, d, dg, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, t, d, generator=gen) * 2).to(device, dtype)
    k = torch.randn(b, hkv, t, d, generator=gen).to(device, dtype)
    gq = torch.randn(b, h, t, dg, generator=gen).to(device).requires_grad_()
    gk = torch.randn(b, h, t, dg, generator=gen).to(device).requires_grad_()
    w = torch.rand(b, h, t, generator=gen).to(device)
    return q, k, gq, gk, w


def _both(q, k, gq, gk, w, scaling):
    out = {}
    for name, fn in (("ref", kl_rows_reference), ("fused", kl_rows_fused)):
        gq.grad = gk.grad = None
        kl = fn(q, k, gq, gk, scaling)
        (kl * w).sum().backward()
        out[name] = (kl.detach(), gq.grad.clone(), gk.grad.clone())
    return out


@pytest.mark.parametrize("shape", [(1, 2, 1, 16, 16, 16), (2, 4, 2, 37, 32, 16), (1, 2, 2, 70, 16, 32)])
def test_fused_kl_equals_reference_forward_and_backward(shape):
    b, h, hkv, t, d, dg = shape
    res = _both(*_inputs(b, h, hkv, t, d, dg), scaling=d**-0.5)
    for got, ref in zip(res["fused"], res["ref"]):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_fused_kl_is_zero_when_the_gate_equals_the_scores():
    q, k, _, _, _ = _inputs(1, 2, 2, 33, 16, 16)
    gq = (q * 16**-0.25).clone().requires_grad_()
    gk = (k * 16**-0.25).clone().requires_grad_()
    kl = kl_rows_fused(q, k, gq, gk, 16**-0.5)
    assert kl.abs().max() < 1e-5


def test_layer_loss_fused_and_reference_paths_agree_on_a_model():
    model = tiny_model("qwen3")
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(2, 40), use_cache=False)
    rec = policy.records[1]
    spec = gate_spec_for_model(model, d_g=16)
    grads, losses = [], []
    for fused in (False, True):
        bank = GateBank(spec).reset_random(0)
        losses.append(float(layer_loss_backward(rec, bank.layers[1], "kl", 4, 1.0, fused=fused)))
        grads.append([p.grad for p in bank.layers[1].parameters()])
    assert abs(losses[0] - losses[1]) < 1e-5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [129, 1000, 4096])
def test_fused_kl_on_gpu(dtype, t):
    q, k, gq, gk, w = _inputs(1, 16, 8, t, 128, 32, device="cuda", dtype=dtype, seed=t)
    res = _both(q, k, gq, gk, w, scaling=128**-0.5)
    # the fused kernel multiplies on tensor cores (tf32 / bf16 operands): compare by relative norm
    for got, ref in zip(res["fused"], res["ref"]):
        err = (got.float() - ref.float()).norm() / ref.float().norm()
        assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), float(err)
