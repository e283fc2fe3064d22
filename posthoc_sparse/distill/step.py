"""One distillation step's gradients: a no-grad dense forward per micro-batch, then every layer's gate loss.

Letters: B windows per micro-batch, T tokens, L layers, m sampled row blocks per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..attention.graphs import ShapeGraphs
from ..attention.recording import RecordPolicy
from ..gates.modules import GateBank
from ..loading import decoder_of
from ..ops import kl as okl
from ..ops import on_gpu
from .layer_loss import add_grads, index_of, recorded_losses


def gate_optimizer(bank: GateBank, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the gate's parameters; PyTorch's fused (single-kernel) AdamW when they all live on CUDA."""
    params = list(bank.parameters())
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=all(p.is_cuda for p in params) or None)


def step_graphs(policy: RecordPolicy) -> ShapeGraphs:
    """CUDA graphs of distillation micro-batches. A capture is tried with cuDNN attention in the recording
    forward, then once more with flash attention (some torch builds refuse cuDNN under capture)."""
    return ShapeGraphs(attempts=(("", contextlib.nullcontext), (" (flash attention)", policy.flash_in_capture)))


def accumulate_gradients(model, policy: RecordPolicy, bank: GateBank, micro_batches: list[torch.Tensor],
                         loss: str, k: int, row_fraction: float = 1.0, seed: int = 0,
                         graphs: ShapeGraphs | None = None) -> torch.Tensor:
    """One step's gradients over ``micro_batches`` (each (B, T)), under ``policy`` (attached by the caller);
    returns the per-layer mean losses (L,).

    ``row_fraction`` < 1: each layer's loss is the unbiased estimate from a random share of its
    ``ROW_BLOCK``-row query blocks, drawn afresh per micro-batch from ``seed``. ``graphs`` (``step_graphs``):
    on the stacked fused path (CUDA, KL, "hidden" gates, every layer in the stack) each micro-batch shape runs
    eagerly once, is captured once and replayed from then on."""
    n = len(micro_batches)
    n_layers = bank.spec.num_layers
    layer_losses = torch.zeros(n_layers, device=micro_batches[0].device)
    generators: dict = {}

    def sampled(count: int, t: int, device) -> torch.Tensor | None:
        if row_fraction >= 1:
            return None
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return okl.sample_row_blocks(count, t, row_fraction, generators[device])

    fast = (policy.stack_layers > 0 and loss == "kl" and bank.spec.gate_input == "hidden"
            and on_gpu(micro_batches[0]))
    for ids in micro_batches:
        # on the fast path every layer's row blocks are drawn before the forward (a graph takes them as an input)
        rows = sampled(n_layers, ids.shape[1], ids.device) if fast else None

        def run(ids: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
            return _micro_batch(model, policy, bank, ids, loss, k, 1.0 / n, rows, sampled)

        if graphs is not None and fast:
            out = _graphed(graphs, run, ids, rows, 1.0 / n, bank)
        else:
            out, _ = run(ids, rows)
        layer_losses += out / n
    return layer_losses


def _micro_batch(model, policy: RecordPolicy, bank: GateBank, ids: torch.Tensor, loss: str, k: int, scale: float,
                 rows: torch.Tensor | None, sampled: Callable) -> tuple[torch.Tensor, bool]:
    """One micro-batch: the recording forward, then ``recorded_losses`` (the per-layer losses and whether every
    layer took the one stack). ``rows``: every layer's sampled row blocks drawn beforehand, or None."""

    def rows_for(layers: list[int], device) -> torch.Tensor | None:
        if rows is None:
            return sampled(len(layers), ids.shape[1], device)
        return rows[index_of(layers)].to(device)

    try:
        with torch.no_grad():
            decoder_of(model)(input_ids=ids, use_cache=False)
        return recorded_losses(policy, bank, loss, k, scale, rows_for)
    finally:
        policy.clear()  # also when a capture fails part-way: the next forward starts a fresh stack


def _graphed(graphs: ShapeGraphs, run: Callable, ids: torch.Tensor, rows: torch.Tensor | None, scale: float,
             bank: GateBank) -> torch.Tensor:
    """``run(ids, rows)`` through ``graphs``; the graph adds its gradients into one static buffer, which is then
    added to the gates' ``.grad``. A shape whose eager run left the one stack is never captured."""
    params = list(bank.parameters())
    sizes = [p.numel() for p in params]
    # the gates' storage too: a graph reads the weights and adds the gradients where they lived at capture
    key = (tuple(ids.shape), ids.device, scale, None if rows is None else tuple(rows.shape),
           tuple(p.data_ptr() for p in params))

    def eager(ids, rows):
        losses, whole = run(ids, rows)
        if not whole:  # a mask, a layer off the stack: the graph could not hold this step
            graphs.keep_eager(key)
        return losses, None

    def capturable(ids, rows):
        flat = torch.zeros(sum(sizes), device=ids.device, dtype=params[0].dtype)  # zeroed inside the graph
        saved = [p.grad for p in params]
        for p, buf in zip(params, flat.split(sizes)):
            p.grad = buf.view_as(p)  # the losses add their gradients here
        try:
            losses, whole = run(ids, rows)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        if not whole:
            raise RuntimeError("under capture the step left the stacked fused path")
        return losses, flat

    losses, flat = graphs(key, eager, ids, rows, capturable=capturable)
    if flat is not None:
        add_grads(params, [g.view_as(p) for g, p in zip(flat.split(sizes), params)])
    return losses
