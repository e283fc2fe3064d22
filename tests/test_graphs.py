"""The one CUDA-graph helper (attention.graphs.ShapeGraphs) and its two users: the eval forward and the
distillation step. On the CPU a stand-in graph replays by rerunning the captured function into its static
outputs, which checks the bookkeeping; GPU-marked tests replay real graphs."""

from __future__ import annotations

import contextlib

import pytest
import torch

from posthoc_sparse.attention.graphs import ShapeGraphs
from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.recording import RecordPolicy
from posthoc_sparse.distill.step import _graphed, accumulate_gradients, gate_optimizer, step_graphs
from posthoc_sparse.gates.io import gate_spec_for_model
from posthoc_sparse.gates.modules import GateBank

from .tiny import random_ids, tiny_model


def _copy_into(static, new):
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, (tuple, list)):
        for s, n in zip(static, new):
            _copy_into(s, n)


class _StandInGraph:
    """A stand-in for a CUDA graph on the CPU: replay reruns the captured function into its static outputs."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        _copy_into(self.out, self.fn())


def stand_in_capture(fn, device):
    out = fn()
    return _StandInGraph(fn, out), out


def _key(ids):
    return (tuple(ids.shape), ids.dtype, ids.device)


def test_a_key_runs_eagerly_then_is_captured_once_then_replays_new_inputs():
    calls = []

    def fn(ids):
        calls.append(ids.data_ptr())
        return ids.float().sum(-1) * 2

    graphs = ShapeGraphs(capture=stand_in_capture)
    a, b, c = (torch.full((2, 3), v) for v in (1, 2, 3))
    assert torch.equal(graphs(_key(a), fn, a), fn(a))  # first of its shape: eager
    assert graphs.graphs == {} and graphs.replays == 0
    assert torch.equal(graphs(_key(b), fn, b), torch.tensor([12.0, 12.0]))  # second: captured, replayed with b
    assert torch.equal(graphs(_key(c), fn, c), torch.tensor([18.0, 18.0]))  # later: replayed with c copied in
    assert graphs.replays == 2 and graphs.replayed_shapes == [[2, 3]]
    out = graphs(_key(a), fn, a)
    graphs(_key(b), fn, b)
    assert torch.equal(out, torch.tensor([6.0, 6.0]))  # a clone: the next replay does not overwrite it
    assert graphs(_key(torch.ones(1, 3)), fn, torch.ones(1, 3)).shape == (1,)  # another shape starts eagerly


def test_a_failed_capture_leaves_the_key_eager_with_the_reason():
    def fn(ids):
        return ids.float().sum(-1) * 2

    def refuse(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    failing = ShapeGraphs(capture=refuse)
    for v in (1, 2, 3):
        x = torch.full((2, 3), v)
        assert torch.equal(failing(_key(x), fn, x), torch.full((2,), 6.0 * v))  # eager throughout
    assert failing.graphs == {((2, 3), torch.int64, torch.device("cpu")): None} and failing.replays == 0
    assert failing.failures == ["(2, 3): RuntimeError: operation not permitted when stream is capturing"]


def test_attempts_are_tried_in_turn_and_a_kept_eager_key_is_never_captured():
    """A capture refused once is retried under the next attempt's context (its reason kept in ``retried``); one
    refused by every attempt stays eager with every reason in ``failures``; ``keep_eager`` skips the capture."""
    entered = []

    def attempt(name):
        @contextlib.contextmanager
        def context():
            entered.append(name)
            yield
        return context

    def fn(x):
        return x * 2

    x = torch.ones(3)
    for refusals, replayed in ((0, True), (1, True), (2, False)):
        left = [refusals]

        def capture(f, device):
            if left[0]:
                left[0] -= 1
                raise RuntimeError("refused")
            return stand_in_capture(f, device)

        entered.clear()
        graphs = ShapeGraphs(capture=capture, attempts=(("", attempt("cudnn")), (" (flash)", attempt("flash"))))
        for _ in range(3):
            assert torch.equal(graphs(("k",), fn, x), x * 2)
        assert entered == ["cudnn", "flash"][:refusals + 1]  # captured once, not again
        assert graphs.replays == (2 if replayed else 0)
        assert len(graphs.retried) == (refusals == 1) and len(graphs.failures) == 2 * (refusals == 2)
        assert refusals != 2 or graphs.failures[1].startswith("('k',) (flash): RuntimeError: refused")
    graphs = ShapeGraphs(capture=stand_in_capture)
    graphs.keep_eager(("k",))
    for _ in range(3):
        graphs(("k",), fn, x)
    assert graphs.replays == 0 and graphs.replayed_shapes == []


def test_step_graphs_retry_with_flash_attention_in_the_recording_forward():
    """The distillation step's second attempt turns cuDNN off in the recording forward under capture, and the
    policy's setting is restored after."""
    policy = RecordPolicy()
    graphs = step_graphs(policy)
    seen = []
    for _, context in graphs.attempts:
        with context():
            seen.append(policy.cudnn_in_capture)
    assert seen == [True, False] and policy.cudnn_in_capture is True


def test_graphed_step_adds_the_captured_gradients_as_the_eager_step_does():
    """``_graphed`` (CPU, stand-in graph): the eager run adds its gradients to .grad itself; the captured run adds
    them into one static buffer that is then added to .grad, also where .grad already holds some; a step whose
    eager run left the one stack is never captured."""
    bank = GateBank(gate_spec_for_model(tiny_model("qwen3"), d_g=8)).reset_random(0)
    params = list(bank.parameters())
    whole = [True]

    def run(ids, rows):  # losses from ids; the gradient of every parameter is ids.sum() (as the losses add it)
        for p in params:
            g = torch.full_like(p, float(ids.sum()))
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return ids.float().sum(-1), whole[0]

    graphs = ShapeGraphs(capture=stand_in_capture)
    for step, value in enumerate((1, 2, 3)):
        for p in params:
            p.grad = None if step != 2 else torch.ones_like(p)  # the third step finds gradients already there
        ids = torch.full((2, 4), value)
        losses = _graphed(graphs, run, ids, None, 0.5, bank)
        assert torch.equal(losses, torch.full((2,), 4.0 * value))
        expected = 8.0 * value + (1.0 if step == 2 else 0.0)
        assert all(torch.equal(p.grad, torch.full_like(p, expected)) for p in params), step
    assert graphs.replays == 2 and graphs.replayed_shapes == [[2, 4]]

    whole[0] = False  # an eager run that left the one stack: that shape stays eager
    graphs = ShapeGraphs(capture=stand_in_capture)
    for _ in range(3):
        _graphed(graphs, run, torch.ones(1, 4, dtype=torch.long), None, 1.0, bank)
    assert graphs.replays == 0 and list(graphs.graphs.values()) == [None]


def _steps(model, micro, spec, fraction, graphs, n_steps=4):
    """Per-step losses and the final gate weights of ``n_steps`` AdamW steps of accumulate_gradients."""
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
def test_step_graph_replays_equal_eager_steps_on_gpu(fraction, fail):
    """The first micro-batch of a shape runs eagerly, the second is captured, the rest replay; four AdamW steps
    of two micro-batches give the eager run's losses and weights, with and without row sampling. A capture that
    fails leaves the shape eager, with the reason kept."""
    from posthoc_sparse.attention.graphs import captured

    def broken(fn, device):
        raise RuntimeError("capture refused")

    model = tiny_model("qwen3", layers=3).to("cuda", torch.bfloat16)
    micro = [random_ids(2, 300, seed=s).cuda() for s in (1, 2)]
    spec = gate_spec_for_model(model, d_g=16)
    # the flash-attention op in both runs (whether cuDNN attention can be captured depends on the torch build)
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        eager = _steps(model, micro, spec, fraction, None)
        graphs = ShapeGraphs(capture=broken if fail else captured)
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


def _decoded(model, ids, mask, n: int, graph: bool):
    """``n`` greedy tokens through ``DecodeStep`` after an eager prefill into a StaticCache: (tokens (B, n),
    logits (B, n, V)). ``mask`` (B, T) is the prompt's padding mask (left padding)."""
    from transformers import StaticCache

    from posthoc_sparse.attention.graphs import DecodeStep, cache_kwarg

    b, t = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=t + n)
    full = torch.cat((mask, mask.new_ones(b, n)), 1)  # (B, T + n)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=full, position_ids=pos, use_cache=True, **{cache_kwarg(model): cache})
    first = out.logits[:, -1]
    step = DecodeStep(model, cache, first.argmax(-1, keepdim=True), pos[:, -1:] + 1, full, graph)
    tokens, logits = [step.ids.clone()], [first]
    for _ in range(n - 1):
        logits.append(step().clone())
        tokens.append(step.ids.clone())
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def test_decode_step_generates_what_generate_does_under_the_gate():
    """DecodeStep (static cache, the full-length mask and positions held on the device) reproduces
    model.generate's greedy tokens for a left-padded batch under a hidden gate."""
    from posthoc_sparse.deploy import apply_gates

    model = tiny_model("qwen3")
    bank = GateBank(gate_spec_for_model(model, d_g=8)).reset_random(0)
    ids = random_ids(2, 9, seed=4)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    with torch.no_grad(), apply_gates(model, bank, k=5):
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 9:]
        got, _ = _decoded(model, ids, mask, 6, graph=False)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, selection",
                         [("gate", "head"), ("gate", "group"), ("oracle", "head"), ("dense", "head")])
def test_decode_step_replays_as_a_cuda_graph(mode, selection):
    """A static-cache decode step under the fused decode path (hidden gate of d 16, tiny Qwen3 of head dim 16)
    captures as a CUDA graph; replaying it generates the eager tokens and logits."""
    from posthoc_sparse.deploy import apply_gates

    model = tiny_model("qwen3").cuda()
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0)
    ids = random_ids(2, 20, seed=4).cuda()
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    with torch.no_grad(), apply_gates(model, None if mode == "oracle" else bank, k=7, mode=mode, selection=selection):
        eager = _decoded(model, ids, mask, 8, graph=False)
        graphed = _decoded(model, ids, mask, 8, graph=True)
    assert torch.equal(graphed[0], eager[0])
    torch.testing.assert_close(graphed[1], eager[1], atol=1e-4, rtol=1e-4)
