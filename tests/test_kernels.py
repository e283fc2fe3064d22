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
from posthoc_sparse.kernels import kl_distill  # noqa: E402
from posthoc_sparse.kernels.kl_distill import kl_grad_fused, kl_rows_fused, kl_rows_reference  # noqa: E402

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


def _teacher_lse(q, k, scaling):
    n_rep = q.shape[1] // k.shape[1]
    s = torch.matmul(q.float(), k.float().repeat_interleave(n_rep, 1).transpose(-1, -2)) * scaling
    t = q.shape[2]
    return s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf")).logsumexp(-1)


def _grad_reference(q, k, gq, gk, scaling, weight):
    gq.grad = gk.grad = None
    kl = kl_rows_reference(q, k, gq, gk, scaling)
    (kl.sum() * weight).backward()
    return kl.detach(), gq.grad.clone(), gk.grad.clone()


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 1, 16, 16, 16), (2, 4, 2, 37, 32, 16), (1, 3, 1, 70, 16, 32)])
def test_one_pass_gradient_equals_reference(shape, with_lse):
    """kl_grad_fused (the distillation path): KL and gradients without autograd, with the teacher's lse given
    (gate-only forward, KL from the gradient pass) or computed by the teacher forward."""
    b, h, hkv, t, d, dg = shape
    q, k, gq, gk, _ = _inputs(b, h, hkv, t, d, dg)
    weight = 0.37
    ref = _grad_reference(q, k, gq, gk, d**-0.5, weight)
    lse = _teacher_lse(q, k, d**-0.5) if with_lse else None
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
            monkeypatch.setitem(kl_distill.TUNING, kind, tuning)
    q, k, gq, gk, _ = _inputs(1, 2, 1, 300, 16, 16, seed=4)
    blocks = torch.tensor([2, 0], dtype=torch.int32)
    mask = torch.zeros(300, dtype=torch.bool)  # the rows of blocks 2 and 0
    mask[:128] = mask[256:] = True
    gq.grad = gk.grad = None
    ref = kl_rows_reference(q, k, gq, gk, 0.25) * mask
    (ref.sum() * 0.7).backward()
    lse = _teacher_lse(q, k, 0.25) if with_lse else None
    kl, dg = kl_grad_fused(q, k, gq.detach(), gk.detach(), 0.25, 0.7, lse, blocks)
    for a, r in zip((kl, dg[0], dg[1]), (ref.detach(), gq.grad, gk.grad)):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


def test_row_block_sampling_draws_distinct_blocks_longest_first():
    gen = torch.Generator().manual_seed(0)
    rows = kl_distill.sample_row_blocks(5, 1000, 0.5, gen)  # 8 blocks, 4 drawn per layer
    assert rows.shape == (5, 4) and rows.dtype == torch.int32
    for r in rows.tolist():
        assert len(set(r)) == 4 and r == sorted(r, reverse=True) and all(0 <= i < 8 for i in r)
    assert len({tuple(r) for r in rows.tolist()}) > 1  # layers draw independently
    assert kl_distill.sample_row_blocks(5, 1000, 1.0, gen) is None
    assert kl_distill.sample_row_blocks(5, 100, 0.5, gen) is None  # one block: all of it


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


def test_kernels_with_query_blocks_larger_than_key_blocks(monkeypatch):
    """BLOCK_M = 2 x BLOCK_N: the diagonal query block spans two key blocks, the second past T for some rows."""
    for kind in ("fwd", "lse", "grad"):
        monkeypatch.setitem(kl_distill.TUNING, kind, (32, 16, 4, 1))
    q, k, gq, gk, w = _inputs(1, 2, 1, 75, 16, 16, seed=3)
    res = _both(q, k, gq, gk, w, scaling=0.25)
    for got, ref in zip(res["fused"], res["ref"]):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    ref = _grad_reference(q, k, gq, gk, 0.25, 1.0)
    kl, dg = kl_grad_fused(q, k, gq.detach(), gk.detach(), 0.25, 1.0, _teacher_lse(q, k, 0.25))
    got = (kl, dg[0], dg[1])
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


def test_fused_kl_is_zero_when_the_gate_equals_the_scores():
    q, k, _, _, _ = _inputs(1, 2, 2, 33, 16, 16)
    gq = (q * 16**-0.25).clone().requires_grad_()
    gk = (k * 16**-0.25).clone().requires_grad_()
    kl = kl_rows_fused(q, k, gq, gk, 16**-0.5)
    assert kl.abs().max() < 1e-5


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
        rec.lse = _teacher_lse(rec.query, rec.key, rec.scaling)
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
    from posthoc_sparse.distill.loop import fused_hidden_losses

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
    from posthoc_sparse.attention.policies import RecordStack
    from posthoc_sparse.distill.loop import fused_stacked_losses, stacked

    model = tiny_model("llama", layers=3)
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(2, 200), use_cache=False)
    recs = [policy.records[i] for i in range(3)]
    stack = RecordStack.like(3, recs[0].query, recs[0].key, recs[0].x)
    for i, rec in enumerate(recs):
        rec.lse = _teacher_lse(rec.query, rec.key, rec.scaling)
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


@pytest.mark.parametrize("rotary", [True, False])
def test_gate_rope_equals_the_gate_rotary_and_its_gradient(rotary):
    """gate_rope (forward) equals LayerGate._rope on the raw projection; inverse equals autograd's gradient."""
    from posthoc_sparse.kernels.kl_distill import gate_rope

    model = tiny_model("qwen3")
    gate = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0).layers[0]
    gen = torch.Generator().manual_seed(5)
    b, t, h = 2, 70, gate.wq.shape[0]
    y = torch.randn(b, t, 2 * h, 16, generator=gen).requires_grad_()
    cos, sin = (torch.randn(1, t, 16, generator=gen) for _ in range(2))
    if not rotary:
        cos = sin = None
    ref = gate._rope(y, cos, sin).transpose(1, 2)  # (B, 2H, T, d)
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
    q, k, gq, gk, w = _inputs(1, 16, 8, t, 128, 32, device="cuda", dtype=dtype, seed=t)
    res = _both(q, k, gq, gk, w, scaling=128**-0.5)
    # the fused kernel multiplies on tensor cores (tf32 / bf16 operands): compare by relative norm
    for got, ref in zip(res["fused"], res["ref"]):
        err = (got.float() - ref.float()).norm() / ref.float().norm()
        assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), float(err)


@pytest.mark.gpu
@pytest.mark.parametrize("low", [False, True])
@pytest.mark.parametrize("t", [129, 1000, 4096])
def test_one_pass_gradient_on_gpu(t, low, monkeypatch):
    """bf16 teacher and gate (as distillation runs them), the teacher lse given; products in fp32 or bf16."""
    monkeypatch.setitem(kl_distill.TUNING, "low", low)
    q, k, gq, gk, _ = _inputs(1, 16, 8, t, 128, 32, device="cuda", dtype=torch.bfloat16, seed=t)
    gq, gk = gq.detach().bfloat16().requires_grad_(), gk.detach().bfloat16().requires_grad_()
    ref = _grad_reference(q, k, gq, gk, 128**-0.5, 1.0 / t)
    kl, dg = kl_grad_fused(q, k, gq.detach(), gk.detach(), 128**-0.5, 1.0 / t, _teacher_lse(q, k, 128**-0.5))
    got = (kl, dg[0], dg[1])
    for a, r in zip(got, ref):
        err = (a.float() - r.float()).norm() / r.float().norm()
        assert err < 2e-2, float(err)


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
    from posthoc_sparse.attention.policies import DensePolicy

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
    torch.testing.assert_close(rec.lse, _teacher_lse(rec.query, rec.key, rec.scaling), atol=2e-3, rtol=1e-4)
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
    from posthoc_sparse.distill.loop import accumulate_gradients, stacked

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


def _steps(model, micro, spec, fraction, graphs, n_steps=4):
    """Per-step losses and the final gate weights of ``n_steps`` AdamW steps of accumulate_gradients."""
    from posthoc_sparse.distill.loop import accumulate_gradients, gate_optimizer

    bank = GateBank(spec).reset_random(0).to("cuda")
    opt = gate_optimizer(bank, 1e-2)
    policy = RecordPolicy(stack_layers=spec.num_layers)
    losses = []
    with SparseAttention(model, policy):
        for step in range(n_steps):
            losses.append(accumulate_gradients(model, policy, bank, micro, "kl", 4, fraction, seed=step,
                                               graphs=graphs))
            opt.step()
            opt.zero_grad(set_to_none=True)
    return torch.stack(losses), [p.detach().clone() for p in bank.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("fail", [False, True])
def test_step_graph_replays_equal_eager_steps_on_gpu(fraction, fail, monkeypatch):
    """StepGraphs: the first micro-batch of a shape runs eagerly, the second is captured, the rest replay; four
    AdamW steps of two micro-batches give the eager run's losses and weights, with and without row sampling. A
    capture that fails leaves the shape eager, with the reason kept."""
    from posthoc_sparse.distill import loop

    if fail:
        def broken(self, body):
            raise RuntimeError("capture refused")
        monkeypatch.setattr(loop._Graph, "capture", broken)
    model = tiny_model("qwen3", layers=3).to("cuda", torch.bfloat16)
    micro = [random_ids(2, 300, seed=s).cuda() for s in (1, 2)]
    spec = gate_spec_for_model(model, d_g=16)
    # the flash-attention op in both runs (whether cuDNN attention can be captured depends on the torch build)
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        eager = _steps(model, micro, spec, fraction, None)
        graphs = loop.StepGraphs()
        replayed = _steps(model, micro, spec, fraction, graphs)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    if fail:
        assert list(graphs.graphs.values()) == [None] and "capture refused" in graphs.failures[-1]
    else:
        assert graphs.failures == [] and len(graphs.graphs) == 1 and None not in graphs.graphs.values()
    torch.testing.assert_close(replayed[0], eager[0], atol=1e-4, rtol=1e-3)
    for a, b in zip(replayed[1], eager[1]):
        err = (a - b).norm() / b.norm()
        assert err < 1e-3, float(err)


def test_kernel_dims_send_other_shapes_to_the_reference_path():
    """The fused kernels take power-of-two head and gate dims of at least 16 (tl.arange, tl.dot on a GPU); a
    gate of d_g = 8 (or a head dim of 80) takes the reference path instead of failing to compile."""
    from posthoc_sparse.distill.loop import _fused_eligible

    from posthoc_sparse.kernels import tile_dims_ok

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
