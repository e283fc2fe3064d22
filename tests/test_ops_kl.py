"""The ops kernels of distillation (ops.kl, ops.rope) and the attention-with-lse reference against their naive
fp32 twins: forward and gradients, odd shapes, GQA, sampled rows.

On the CPU the Triton kernels run through TRITON_INTERPRET=1 (set in conftest); GPU-marked tests confirm
bf16 inputs and large shapes on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from posthoc_sparse.gates.io import gate_spec_for_model  # noqa: E402
from posthoc_sparse.gates.modules import GateBank  # noqa: E402
from posthoc_sparse.ops import kl as okl  # noqa: E402
from posthoc_sparse.ops.attention_lse import attention_lse_reference  # noqa: E402
from posthoc_sparse.ops.kl import kl_grad_fused, kl_rows_reference  # noqa: E402
from posthoc_sparse.ops.rope import gate_rope, gate_rope_reference  # noqa: E402

from .tiny import tiny_model  # noqa: E402


def _inputs(b, h, hkv, t, d, dg, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, t, d, generator=gen) * 2).to(device, dtype)
    k = torch.randn(b, hkv, t, d, generator=gen).to(device, dtype)
    gq = torch.randn(b, h, t, dg, generator=gen).to(device).requires_grad_()
    gk = torch.randn(b, h, t, dg, generator=gen).to(device).requires_grad_()
    return q, k, gq, gk


def teacher_lse(q, k, scaling):
    """The teacher's log-sum-exp per row (B, H, T), the obvious way."""
    return attention_lse_reference(q, k, k, scaling)[1]


def _grad_reference(q, k, gq, gk, scaling, weight):
    gq.grad = gk.grad = None
    kl = kl_rows_reference(q, k, gq, gk, scaling)
    (kl.sum() * weight).backward()
    return kl.detach(), gq.grad.clone(), gk.grad.clone()


def _fused(q, k, gq, gk, scaling, weight, lse=None, rows=None):
    kl, dg = kl_grad_fused(q, k, gq.detach(), gk.detach(), scaling, weight, lse, rows)
    return kl, dg[0], dg[1]


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 1, 16, 16, 16), (2, 4, 2, 37, 32, 16), (1, 3, 1, 70, 16, 32)])
def test_one_pass_gradient_equals_reference(shape, with_lse):
    """kl_grad_fused (the distillation path): KL and gradients without autograd, with the teacher's lse given
    (gate-only forward, KL from the gradient pass) or computed by the teacher forward."""
    b, h, hkv, t, d, dg = shape
    q, k, gq, gk = _inputs(b, h, hkv, t, d, dg)
    weight = 0.37
    ref = _grad_reference(q, k, gq, gk, d**-0.5, weight)
    lse = teacher_lse(q, k, d**-0.5) if with_lse else None
    kl, dg = kl_grad_fused(q, k, gq.detach(), gk.detach(), d**-0.5, weight, lse)
    got = (kl, dg[0], dg[1])
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("tuning", [None, (32, 16, 4, 1)])
def test_sampled_row_blocks_equal_the_reference_on_those_rows(with_lse, tuning, monkeypatch):
    """With row_blocks only the sampled 128-row blocks take part: their KL and the gradient of their weighted
    sum equal the reference's with zero weight elsewhere (the last block partial, several sub-blocks each)."""
    if tuning:
        for kind in ("fwd", "lse", "grad"):
            monkeypatch.setitem(okl.triton.TUNING, kind, tuning)
    q, k, gq, gk = _inputs(1, 2, 1, 300, 16, 16, seed=4)
    blocks = torch.tensor([2, 0], dtype=torch.int32)
    mask = torch.zeros(300, dtype=torch.bool)  # the rows of blocks 2 and 0
    mask[:128] = mask[256:] = True
    gq.grad = gk.grad = None
    ref = kl_rows_reference(q, k, gq, gk, 0.25) * mask
    (ref.sum() * 0.7).backward()
    lse = teacher_lse(q, k, 0.25) if with_lse else None
    kl, dg = kl_grad_fused(q, k, gq.detach(), gk.detach(), 0.25, 0.7, lse, blocks)
    for a, r in zip((kl, dg[0], dg[1]), (ref.detach(), gq.grad, gk.grad)):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


def test_row_block_sampling_draws_distinct_blocks_longest_first():
    gen = torch.Generator().manual_seed(0)
    rows = okl.sample_row_blocks(5, 1000, 0.5, gen)  # 8 blocks, 4 drawn per layer
    assert rows.shape == (5, 4) and rows.dtype == torch.int32
    for r in rows.tolist():
        assert len(set(r)) == 4 and r == sorted(r, reverse=True) and all(0 <= i < 8 for i in r)
    assert len({tuple(r) for r in rows.tolist()}) > 1  # layers draw independently
    assert okl.sample_row_blocks(5, 1000, 1.0, gen) is None
    assert okl.sample_row_blocks(5, 100, 0.5, gen) is None  # one block: all of it


def test_kernels_with_query_blocks_larger_than_key_blocks(monkeypatch):
    """BLOCK_M = 2 x BLOCK_N: the diagonal query block spans two key blocks, the second past T for some rows."""
    for kind in ("fwd", "lse", "grad"):
        monkeypatch.setitem(okl.triton.TUNING, kind, (32, 16, 4, 1))
    q, k, gq, gk = _inputs(1, 2, 1, 75, 16, 16, seed=3)
    ref = _grad_reference(q, k, gq, gk, 0.25, 1.0)
    for lse in (None, teacher_lse(q, k, 0.25)):
        for a, r in zip(_fused(q, k, gq, gk, 0.25, 1.0, lse), ref):
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


def test_fused_kl_is_zero_when_the_gate_equals_the_scores():
    q, k, _, _ = _inputs(1, 2, 2, 33, 16, 16)
    kl, _, _ = _fused(q, k, q * 16**-0.25, k * 16**-0.25, 16**-0.5, 1.0)
    assert kl.abs().max() < 1e-5


def test_attention_lse_reference_is_sdpa_and_its_log_sum_exp():
    """The naive twin of flash_attention_lse: SDPA's causal output (GQA) and each row's logsumexp."""
    q, k, _, _ = _inputs(2, 4, 2, 37, 16, 16, seed=7)
    v = torch.randn_like(k)
    out, lse = attention_lse_reference(q, k, v, 0.3)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True, scale=0.3)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), atol=1e-5, rtol=1e-5)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    torch.testing.assert_close(lse[:, :, 5], s[:, :, 5, :6].logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotary", [True, False])
def test_gate_rope_equals_the_gate_rotary_and_its_gradient(rotary):
    """gate_rope (forward) equals the naive rotary (and LayerGate._rope, which uses it) on the raw projection;
    its inverse equals autograd's gradient."""
    model = tiny_model("qwen3")
    gate = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0).layers[0]
    gen = torch.Generator().manual_seed(5)
    b, t, h = 2, 70, gate.wq.shape[0]
    y = torch.randn(b, t, 2 * h, 16, generator=gen).requires_grad_()
    cos, sin = (torch.randn(1, t, 16, generator=gen) for _ in range(2))
    if not rotary:
        cos = sin = None
    ref = gate._rope(y, cos, sin).transpose(1, 2)  # (B, 2H, T, d)
    naive = gate_rope_reference(y, cos, sin, gate.freq_idx)  # (2, B, H, T, d)
    torch.testing.assert_close(torch.cat((naive[0], naive[1]), 1), ref)
    g = gate_rope(y.detach(), cos, sin, gate.freq_idx)
    torch.testing.assert_close(torch.cat((g[0], g[1]), 1), ref, atol=1e-6, rtol=1e-5)
    up = torch.randn(2, b, h, t, 16, generator=gen)
    ref.backward(torch.cat((up[0], up[1]), 1))
    got = gate_rope(torch.empty_like(y), cos, sin, gate.freq_idx, up, inverse=True, scale=0.5)
    torch.testing.assert_close(got, 0.5 * y.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [129, 1000, 4096])
def test_fused_kl_on_gpu(dtype, t):
    """The teacher forward computes lse (no lse given), in fp32 and bf16 inputs."""
    q, k, gq, gk = _inputs(1, 16, 8, t, 128, 32, device="cuda", dtype=dtype, seed=t)
    ref = _grad_reference(q, k, gq, gk, 128**-0.5, 1.0 / t)
    # the fused kernel multiplies on tensor cores (tf32 / bf16 operands): compare by relative norm
    for got, r in zip(_fused(q, k, gq, gk, 128**-0.5, 1.0 / t), ref):
        err = (got.float() - r.float()).norm() / r.float().norm()
        assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), float(err)


@pytest.mark.gpu
@pytest.mark.parametrize("low", [False, True])
@pytest.mark.parametrize("t", [129, 1000, 4096])
def test_one_pass_gradient_on_gpu(t, low, monkeypatch):
    """bf16 teacher and gate (as distillation runs them), the teacher lse given; products in fp32 or bf16."""
    monkeypatch.setitem(okl.triton.TUNING, "low", low)
    q, k, gq, gk = _inputs(1, 16, 8, t, 128, 32, device="cuda", dtype=torch.bfloat16, seed=t)
    gq, gk = gq.detach().bfloat16().requires_grad_(), gk.detach().bfloat16().requires_grad_()
    ref = _grad_reference(q, k, gq, gk, 128**-0.5, 1.0 / t)
    kl, dg = kl_grad_fused(q, k, gq.detach(), gk.detach(), 128**-0.5, 1.0 / t, teacher_lse(q, k, 128**-0.5))
    got = (kl, dg[0], dg[1])
    for a, r in zip(got, ref):
        err = (a.float() - r.float()).norm() / r.float().norm()
        assert err < 2e-2, float(err)
