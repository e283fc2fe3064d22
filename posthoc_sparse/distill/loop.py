"""The distillation loop: frozen model, dense forward, per-layer gate loss in query chunks, AdamW.

Letters: B batch, H query heads, T queries, S keys, C a chunk of queries, d gate dim.
Each step: one no-grad dense forward records every layer's q, k, mask and gate inputs (detached); then, layer
by layer, the gate's loss is computed in query chunks and backpropagated into that layer's gate alone, so no
(B, H, T, S) tensor of more than one chunk exists at a time. The model never changes (asserted at the end).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..attention.graphs import captured
from ..attention.interface import SparseAttention, attention_modules, plain_causal_prefill
from ..attention.policies import LayerRecord, RecordPolicy, query_chunk_size
from ..attention.reference import scores, topk_keep
from ..config import DistillConfig
from ..errors import UserError
from ..attention.routing import RoutingStats
from ..gates.io import gate_spec_for_model, save_gates
from ..gates.modules import GateBank, LayerGate, hidden_weights
from ..io import atomic_write_json, check_output_dir
from .checkpoint import load_checkpoint, save_checkpoint
from .losses import loss_rows

CHECKPOINT_DIR = "checkpoint"
HISTORY_NAME = "distill_log.json"
RUN_BUDGET = 1 << 28  # bytes of temporaries one run of stacked layers may hold (fused_stacked_losses)
SNAPSHOT_DIR = "snapshots"  # --save-every: <output>/snapshots/step-<N>/, each a complete gate folder
# Config keys that must agree between a checkpoint and the run resuming it.
_RESUME_KEYS = ("model", "dataset", "k", "seq_len", "batch_size", "grad_accum", "lr", "warmup", "d_g",
                "gate_input", "gate_init", "loss", "seed", "max_train_windows")


@dataclass
class DistillResult:
    output: Path
    steps: int
    loss_first: float
    loss_last: float
    recall: float  # learned gate, open loop, held-out windows
    recall_random: float
    recall_init: float  # the learned gate before training
    seconds_per_step: float
    tokens_per_second: float
    resumed_from: int
    history: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def layer_loss_backward(rec: LayerRecord, gate: LayerGate, kind: str, k: int, scale: float,
                        chunk: int | None = None, fused: bool | None = None,
                        row_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the layer's query rows; gradients (times ``scale``) accumulate into ``gate``.

    ``row_blocks`` (m,): the sampled ``ROW_BLOCK``-row query blocks (``sample_row_blocks``; None: every row).
    Then the loss is the unbiased estimate nb / m * (sum over the sampled rows) / rows, nb the window's blocks.

    The KL on a plain causal window goes through the fused kernels (posthoc_sparse.kernels.kl_distill) where
    Triton can run them: for a "hidden" gate the whole layer (projection, rotary, KL and its gradient, the
    weight gradient) runs without an autograd graph (``fused_hidden_losses``); a "qk" gate takes the kernels'
    gradients through autograd. Otherwise the naive reference runs chunk by chunk against detached leaves whose
    gradients are then pushed through the projections in one call. ``fused`` forces one path (None: automatic).
    """
    from ..kernels.kl_distill import fused_available, kl_grad_fused

    b, h, t, _ = rec.query.shape
    n_rows = rec.valid_rows()
    eligible = _fused_eligible(rec, kind, gate.spec.d_g)
    if fused is None:
        fused = eligible and fused_available(rec.query)
    if fused and not eligible:
        raise ValueError("the fused kernel needs the KL loss on a plain causal window without soft-capping, "
                         "with power-of-two head and gate dimensions of at least 16")
    if fused and gate.spec.gate_input == "hidden":
        return fused_hidden_losses([(rec, gate)], scale, None if row_blocks is None else row_blocks[None])[0]
    n_rows = n_rows * _sampled_share(row_blocks, t)
    # On a GPU with a bf16 model the gate projections run in bf16 (fp32 accumulation); the loss stays fp32.
    low = rec.query.is_cuda and rec.query.dtype == torch.bfloat16
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
        gq, gk = gate.project(rec.x, rec.query, rec.key, rec.cos, rec.sin)  # (B, H, T, d), (B, H, S, d)
    if n_rows == 0:
        return torch.zeros((), device=gq.device)
    if fused:
        # one gradient pass (and a gate-only lse pass) when the forward left the teacher's lse in the record
        kl, dg = kl_grad_fused(rec.query, rec.key, gq, gk, rec.scaling, scale / n_rows, rec.lse, row_blocks)
        torch.autograd.backward([gq, gk], [dg[0].to(gq.dtype), dg[1].to(gk.dtype)])
        return kl.sum() / n_rows
    gq_leaf, gk_leaf = gq.detach().requires_grad_(), gk.detach().requires_grad_()
    step = chunk or query_chunk_size(b, h, rec.key.shape[2], budget_bytes=1 << 26)
    total = torch.zeros((), device=gq.device)
    for a, e in _row_spans(t, step, row_blocks):
        s = scores(rec.query[:, :, a:e], rec.key, rec.scaling, rec.softcap)  # (B, H, C, S)
        g = torch.matmul(gq_leaf[:, :, a:e], gk_leaf.transpose(-1, -2))  # (B, H, C, S)
        loss, _ = loss_rows(kind, s, g, rec.allowed(a, e), k)
        (loss * (scale / n_rows)).backward()
        total += loss.detach()
    torch.autograd.backward([gq, gk], [gq_leaf.grad, gk_leaf.grad])
    return total / n_rows


def _sampled_share(row_blocks: torch.Tensor | None, t: int) -> float:
    """m / nb: the share of a T-row window's ROW_BLOCK-row blocks that were sampled (1 without sampling)."""
    from ..kernels.kl_distill import ROW_BLOCK

    return 1.0 if row_blocks is None else row_blocks.shape[-1] / -(-t // ROW_BLOCK)


def _row_spans(t: int, step: int, row_blocks: torch.Tensor | None) -> list[tuple[int, int]]:
    """Query row spans [a, e) of at most ``step`` rows covering every row, or only the sampled blocks."""
    from ..kernels.kl_distill import ROW_BLOCK

    if row_blocks is None:
        return [(a, min(t, a + step)) for a in range(0, t, step)]
    spans = []
    for blk in sorted(int(i) for i in row_blocks.tolist()):
        lo, hi = blk * ROW_BLOCK, min(t, (blk + 1) * ROW_BLOCK)
        spans += [(a, min(hi, a + step)) for a in range(lo, hi, step)]
    return spans


def _fused_eligible(rec: LayerRecord, kind: str, d_g: int) -> bool:
    """Whether the fused kernels compute this layer's loss: the KL on a plain causal window, no soft-capping,
    head and gate dimensions the kernels take (``kernels.tile_dims_ok``)."""
    from ..kernels import tile_dims_ok

    return (kind == "kl" and rec.mask is None and not rec.softcap and rec.query.shape[2] == rec.key.shape[2]
            and tile_dims_ok(rec.query.shape[-1], d_g))


@torch.no_grad()
def fused_hidden_losses(pairs: list[tuple[LayerRecord, LayerGate]], scale: float,
                        row_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL (L,) of each (record, "hidden" gate) pair, adding ``scale`` times the gradient of each mean to
    its gate's wq and wk; with ``row_blocks`` (L, m), its unbiased estimate from each layer's sampled query
    blocks (as ``layer_loss_backward``). Layer by layer (``_hidden_run``), for records not in one
    ``RecordStack`` (``fused_stacked_losses`` batches those). The autograd path of ``layer_loss_backward`` is
    the reference (tests hold them equal)."""
    return torch.cat([
        _hidden_run(rec.query[None], rec.key[None], rec.x[None], None if rec.lse is None else rec.lse[None], rec,
                    [gate], scale, None if row_blocks is None else row_blocks[i:i + 1])
        for i, (rec, gate) in enumerate(pairs)])


@torch.no_grad()
def fused_stacked_losses(stack, recs: list[LayerRecord], gates: list[LayerGate], scale: float,
                         row_blocks: torch.Tensor | None = None, budget_bytes: int | None = None) -> torch.Tensor:
    """``fused_hidden_losses`` for the layers of one ``RecordStack`` (``recs`` its records in slot order, one
    scaling and one rotary table for all): runs of consecutive layers as one batch of n * B sequences
    (``_hidden_run``, ``stack_runs``)."""
    return torch.cat([
        _stack_run(stack, a, e, recs[0], gates[a:e], scale, None if row_blocks is None else row_blocks[a:e])
        for a, e in stack_runs(stack, len(recs), gates[0], budget_bytes)])


def stack_runs(stack, n_all: int, gate: LayerGate, budget_bytes: int | None = None) -> list[tuple[int, int]]:
    """The runs [a, e) of the first ``n_all`` slots of ``stack``: as many consecutive layers as keep a run's
    temporaries (projections, gate queries and keys, their fp32 gradients) within ``budget_bytes`` (None:
    ``RUN_BUDGET``), at least one."""
    b, _, t, _ = stack.query.shape[1:]
    h, _, d = gate.wq.shape
    per_layer = b * t * 2 * h * d * (2 * stack.x.element_size() + 8)
    run = max(1, min(n_all, (budget_bytes or RUN_BUDGET) // per_layer))
    return [(a, min(n_all, a + run)) for a in range(0, n_all, run)]


def _stack_run(stack, a: int, e: int, rec: LayerRecord, gates: list[LayerGate], scale: float,
               row_blocks: torch.Tensor | None) -> torch.Tensor:
    return _hidden_run(*(getattr(stack, name)[a:e] for name in ("query", "key", "x", "lse")), rec, gates, scale,
                       row_blocks)


def _hidden_run(q, k, x, lse, rec: LayerRecord, gates: list[LayerGate], scale: float,
                row_blocks: torch.Tensor | None) -> torch.Tensor:
    """The mean KL (n,) of n layers given as one batch, adding their weight gradients: q (n, B, H, T, D), k
    (n, B, Hkv, T, D), x (n, B, T, C), lse (n, B, H, T) or None (then the KL kernels make their own teacher
    pass), ``rec`` a record whose scaling and rotary tables all n layers share, row_blocks (n, m) or None.
    No autograd graph and one launch of each step for the n layers (distillation is otherwise bound by the
    host's launch rate): the projection (one batched product, as ``LayerGate.hidden_projection``), the rotary
    embedding (``gate_rope``), the fused KL and its gradient, the gradient back through the rotation, and the
    weight gradient (one batched product), added to the gates in one call."""
    from ..kernels.kl_distill import gate_rope, kl_grad_fused

    n, b, hq, t, dq = q.shape
    c = x.shape[-1]
    h, _, d = gates[0].wq.shape
    rows = b * h * t * _sampled_share(row_blocks, t)  # the mean's denominator
    x = x.reshape(n, b * t, c)
    y = torch.bmm(x, hidden_weights(gates, x.dtype)).view(n * b, t, 2 * h, d)  # (n B, T, 2H, d)
    freq = torch.stack([gate.freq_idx for gate in gates]) if gates[0].freq_idx.numel() else gates[0].freq_idx
    g = gate_rope(y, rec.cos, rec.sin, freq)  # (2, n B, H, T, d): [0] queries, [1] keys
    kl, dg = kl_grad_fused(q.view(n * b, hq, t, dq), k.view(n * b, k.shape[2], t, dq), g[0], g[1], rec.scaling,
                           scale / rows, None if lse is None else lse.view(n * b, hq, t),
                           None if row_blocks is None else row_blocks.repeat_interleave(b, 0))
    # back through the rotation and the weight's d**-0.25, into y's storage; then the weight gradient
    dy = gate_rope(y, rec.cos, rec.sin, freq, dg, inverse=True, scale=gates[0].spec.d_g**-0.25)
    _add_weight_grads(gates, torch.bmm(x.transpose(1, 2), dy.view(n, b * t, 2 * h * d)))
    return kl.view(n, -1).sum(1) / rows


def stacked(policy: RecordPolicy, layers: list[int]) -> bool:
    """Whether ``layers`` are exactly the policy's stack, in order, with one scaling and one rotary table."""
    st = policy.stack
    if st is None or st.layers != layers:
        return False
    recs = [policy.records[i] for i in layers]
    return all(r.slot == j for j, r in enumerate(recs)) and _one_table(recs)


def _one_table(recs: list[LayerRecord]) -> bool:
    """Whether the records share one scaling and one rotary table (what ``_hidden_run`` takes from one)."""
    return (len({r.scaling for r in recs}) == 1
            and all(_same(r.cos, recs[0].cos) and _same(r.sin, recs[0].sin) for r in recs))


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same tensor (storage, offset, shape and strides), as records of one forward share the rotary tables."""
    if a is None or b is None:
        return a is b
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _add_weight_grads(gates: list[LayerGate], dw: torch.Tensor) -> None:
    """Add (L, C, 2 H d) weight gradients (of ``hidden_weights``'s layout) to the gates' wq and wk, in one call."""
    n, c, _ = dw.shape
    h, _, d = gates[0].wq.shape
    grads = dw.view(n, c, 2 * h, d).permute(0, 2, 1, 3).to(gates[0].wq.dtype, memory_format=torch.contiguous_format)
    params = [p for gate in gates for p in (gate.wq, gate.wk)]
    parts = [grads[i, sl] for i in range(n) for sl in (slice(0, h), slice(h, None))]  # (H, C, d) each
    if all(p.grad is None for p in params):
        for p, part in zip(params, parts):
            p.grad = part
    else:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_add_([p.grad for p in params], parts)


def gate_optimizer(bank: GateBank, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the gate's parameters; PyTorch's fused (single-kernel) AdamW when they all live on CUDA."""
    params = list(bank.parameters())
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=all(p.is_cuda for p in params) or None)


def decoder_of(model):
    """The model without its LM head (distillation needs attention inputs, not logits)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def accumulate_gradients(model, policy: RecordPolicy, bank: GateBank, micro_batches: list[torch.Tensor],
                         loss: str, k: int, row_fraction: float = 1.0, seed: int = 0,
                         graphs: StepGraphs | None = None) -> torch.Tensor:
    """One step's gradients: for each micro-batch (B, T) a no-grad dense forward under ``policy`` (attached
    by the caller), then every layer's gate loss backpropagated; returns per-layer mean losses (L,).

    ``row_fraction`` < 1: each layer's loss is estimated from a random ceil(fraction * nb) of the window's nb
    ``ROW_BLOCK``-row query blocks, drawn afresh per micro-batch from ``seed`` (unbiased; see
    ``layer_loss_backward``).

    ``graphs`` (CUDA, a stacking policy, the KL of "hidden" gates, every layer in the stack): each micro-batch
    shape runs eagerly once, is then captured as a CUDA graph (forward and losses) and replayed from then on
    (``StepGraphs``), so the host launches nothing but the replay."""
    from ..kernels.kl_distill import fused_available, sample_row_blocks

    n = len(micro_batches)
    n_layers = bank.spec.num_layers
    layer_losses = torch.zeros(n_layers, device=micro_batches[0].device)
    generators: dict = {}

    def sampled(count: int, t: int, device) -> torch.Tensor | None:
        if row_fraction >= 1:
            return None
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return sample_row_blocks(count, t, row_fraction, generators[device])

    fast = (policy.stack_layers > 0 and loss == "kl" and bank.spec.gate_input == "hidden"
            and micro_batches[0].is_cuda and fused_available(micro_batches[0]))
    for ids in micro_batches:
        # on the fast path every layer's sampled row blocks are drawn before the forward (a graph takes them as an
        # input), as the stacked path draws them after it
        rows = sampled(n_layers, ids.shape[1], ids.device) if fast else None

        def body(ids=ids, rows=rows):
            return _micro_batch(model, policy, bank, ids, loss, k, 1.0 / n, rows, sampled)

        out = graphs.replay(ids, rows, 1.0 / n, bank, body) if graphs is not None and fast else None
        if out is None:
            out, whole = body()
            if graphs is not None and fast:
                graphs.ran_eagerly(ids, rows, 1.0 / n, bank, whole)
        layer_losses += out / n
    return layer_losses


def _micro_batch(model, policy: RecordPolicy, bank: GateBank, ids: torch.Tensor, loss: str, k: int, scale: float,
                 rows: torch.Tensor | None, sampled: Callable) -> tuple[torch.Tensor, bool]:
    """One micro-batch of ``accumulate_gradients``: the per-layer mean losses (L,) on ``ids``'s device, their
    gradients times ``scale`` added to the gates; and whether every layer went through the one stack of the
    policy (so that the micro-batch can be captured as a CUDA graph)."""

    def rows_for(layers: list[int], device) -> torch.Tensor | None:
        if rows is None:
            return sampled(len(layers), ids.shape[1], device)
        return rows[_index(layers)].to(device)

    try:
        return _micro_batch_losses(model, policy, bank, ids, loss, k, scale, rows_for)
    finally:
        policy.clear()  # also when a capture fails part-way: the next forward starts a fresh stack


def _micro_batch_losses(model, policy: RecordPolicy, bank: GateBank, ids: torch.Tensor, loss: str, k: int,
                        scale: float, rows_for: Callable) -> tuple[torch.Tensor, bool]:
    """``_micro_batch``'s forward and losses (``rows_for(layers, device)``: their sampled row blocks)."""
    from ..kernels.kl_distill import fused_available

    n_layers = bank.spec.num_layers
    out = torch.zeros(n_layers, device=ids.device)

    def add(layers: list[int], losses: torch.Tensor) -> None:
        out[_index(layers)] += losses.to(out.device)

    with torch.no_grad():
        decoder_of(model)(input_ids=ids, use_cache=False)
    every = sorted(policy.records)
    whole = every == list(range(n_layers)) and stacked(policy, every)
    groups: dict = {}  # device -> layers whose losses go through fused_hidden_losses together
    for layer, rec in sorted(policy.records.items()):
        gate = bank.layers[layer]
        if (gate.spec.gate_input == "hidden" and _fused_eligible(rec, loss, gate.spec.d_g)
                and fused_available(rec.query)):
            groups.setdefault(rec.query.device, []).append(layer)
        else:  # with a model split over devices (--device-map) each layer's loss lives on its layer's device
            mine = rows_for([layer], rec.query.device)
            mine = None if mine is None else mine[0]
            add([layer], layer_loss_backward(rec, gate, loss, k, scale, row_blocks=mine)[None])
            whole = False
    for device, layers in groups.items():
        mine = rows_for(layers, device)
        recs, gates = [policy.records[i] for i in layers], [bank.layers[i] for i in layers]
        if stacked(policy, layers):
            add(layers, fused_stacked_losses(policy.stack, recs, gates, scale, mine))
        else:
            add(layers, fused_hidden_losses(list(zip(recs, gates)), scale, mine))
    return out, whole


def _index(layers: list[int]) -> slice | list[int]:
    """An index of ``layers``: a slice where they are consecutive (a view, no index tensor: CUDA-graph safe)."""
    return slice(layers[0], layers[-1] + 1) if layers == list(range(layers[0], layers[-1] + 1)) else layers


class StepGraphs:
    """CUDA graphs of ``accumulate_gradients``'s micro-batches, one per input shape (and row sampling and
    gradient scale). A shape's first micro-batch runs eagerly (the warm-up: Triton compiles, cuDNN plans); if
    every layer then went through the policy's one stack, the second is captured (the recording forward, the
    fused losses, the gradients into static buffers) and every later one replays the graph: the host launches
    one graph instead of some thousand kernels, which is what bounds the step at T <= 4096 on a GPU as fast as
    an H100. A capture that fails leaves that shape eager (``failures`` says why).

    The graphs read the gates' weights where they live (an optimizer that updates them in place, as AdamW does,
    is seen by the next replay) and add their gradients to ``.grad`` after each replay. Their memory (the step's
    activations and temporaries, as in an eager step) stays reserved while this object lives."""

    def __init__(self):
        self.graphs: dict = {}  # key -> _Graph, or None where the shape stays eager
        self.seen: set = set()
        self.failures: list[str] = []  # why shapes stayed eager
        self.retried: list[str] = []  # captures that failed once, then took (without cuDNN attention)

    @property
    def replayed_shapes(self) -> list[list[int]]:
        return [list(key[0]) for key, graph in self.graphs.items() if graph is not None]

    @staticmethod
    def _key(ids: torch.Tensor, rows: torch.Tensor | None, scale: float, bank: GateBank) -> tuple:
        # the gates' storage too: a graph reads the weights and adds the gradients where they lived at capture
        return (tuple(ids.shape), ids.device, scale, None if rows is None else tuple(rows.shape),
                tuple(p.data_ptr() for p in bank.parameters()))

    def ran_eagerly(self, ids: torch.Tensor, rows: torch.Tensor | None, scale: float, bank: GateBank,
                    whole: bool) -> None:
        key = self._key(ids, rows, scale, bank)
        if not whole:
            self.graphs[key] = None
        self.seen.add(key)

    def replay(self, ids: torch.Tensor, rows: torch.Tensor | None, scale: float, bank: GateBank,
               body: Callable) -> torch.Tensor | None:
        """The micro-batch's per-layer losses through this shape's graph (captured now if due), its gradients
        added to the gates; None where the caller must run it eagerly."""
        key = self._key(ids, rows, scale, bank)
        if key not in self.seen:
            return None
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids, rows, bank, body)
        graph = self.graphs[key]
        return None if graph is None else graph.replay(ids, rows)

    def _capture(self, ids: torch.Tensor, rows: torch.Tensor | None, bank: GateBank, body: Callable
                 ) -> _Graph | None:
        """A captured graph of ``body``, or None (the reasons in ``failures``). cuDNN attention (the recording
        forward's, as SDPA's) may refuse capture in some torch builds: then the capture is tried once more with
        the flash-attention op."""
        from ..kernels import kl_distill as kd

        errors = []
        for cudnn in (True, False):
            kd.CUDNN_IN_CAPTURE = cudnn
            try:
                graph = _Graph(ids, rows, list(bank.parameters()))
                graph.capture(body)
                self.retried += errors
                return graph
            except Exception as e:  # noqa: BLE001 - any capture failure: this shape stays eager
                torch.cuda.synchronize(ids.device)
                errors.append(f"{tuple(ids.shape)}{'' if cudnn else ' (flash attention)'}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            finally:
                kd.CUDNN_IN_CAPTURE = True
        self.failures += errors
        return None


class _Graph:
    """One captured micro-batch: static inputs (ids, sampled rows), static gradient buffers (one flat buffer,
    zeroed inside the graph), the static per-layer losses."""

    def __init__(self, ids: torch.Tensor, rows: torch.Tensor | None, params: list[torch.Tensor]):
        self.ids = ids.clone()
        self.rows = None if rows is None else rows.clone()
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), device=ids.device, dtype=params[0].dtype)
        self.bufs = [b.view_as(p) for b, p in zip(self.flat.split([p.numel() for p in params]), params)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.losses: torch.Tensor | None = None

    def _run(self, body: Callable) -> torch.Tensor:
        self.flat.zero_()
        losses, whole = body(ids=self.ids, rows=self.rows)
        if not whole:  # the captured forward left the path the eager one took (a mask, a layer off the stack)
            raise RuntimeError("under capture the step left the stacked fused path")
        return losses

    def capture(self, body: Callable) -> None:
        saved = [p.grad for p in self.params]
        try:
            for p, b in zip(self.params, self.bufs):  # the losses add their gradients here
                p.grad = b
            with plain_causal_prefill():  # distillation windows: whole, unpadded, unpacked
                self.graph, self.losses = captured(lambda: self._run(body), self.ids.device)
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g

    def replay(self, ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        self.ids.copy_(ids)
        if rows is not None:
            self.rows.copy_(rows)
        self.graph.replay()
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            flat = self.flat.clone()
            for p, g in zip(self.params, flat.split([p.numel() for p in self.params])):
                p.grad = g.view_as(p)
        else:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            torch._foreach_add_([p.grad for p in self.params], self.bufs)
        return self.losses.clone()


@torch.no_grad()
def open_loop_recall(model, windows: torch.Tensor, banks: dict[str, GateBank], k: int, batch_size: int,
                     device) -> dict[str, RoutingStats]:
    """Recall@k of each bank's selection against the oracle on a dense (open-loop) pass over ``windows``."""
    n_layers = len(next(iter(banks.values())).layers)
    stats = {name: RoutingStats(k, n_layers) for name in banks}
    policy = RecordPolicy()
    with SparseAttention(model, policy):
        for i in range(0, len(windows), batch_size):
            decoder_of(model)(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            for layer, rec in sorted(policy.records.items()):
                projected = {n: bk.layers[layer].project(rec.x, rec.query, rec.key, rec.cos, rec.sin)
                             for n, bk in banks.items()}
                t = rec.query.shape[2]
                step = query_chunk_size(*rec.query.shape[:2], rec.key.shape[2])
                for a in range(0, t, step):
                    e = min(t, a + step)
                    s = scores(rec.query[:, :, a:e], rec.key, rec.scaling, rec.softcap)
                    allowed = rec.allowed(a, e)
                    for name, (gq, gk) in projected.items():
                        g = torch.matmul(gq[:, :, a:e].float(), gk.float().transpose(-1, -2))
                        stats[name].observe(layer, s, allowed, topk_keep(g, allowed, k))
            policy.records.clear()
    return stats


def lr_at(step: int, cfg: DistillConfig, total: int) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to zero at ``total``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_gate_bank(model, cfg: DistillConfig) -> GateBank:
    """The learned gate at step 0: the model's own q/k rows ("model") or the seeded random init."""
    bank = GateBank(gate_spec_for_model(model, cfg.d_g, cfg.gate_input)).reset_random(cfg.seed)
    if cfg.gate_init == "model":
        try:
            bank.init_from_model(attention_modules(model))
        except ValueError as e:
            raise UserError(f"{e}; use --gate-init random") from None
    return bank


def random_gate_bank(model, cfg: DistillConfig) -> GateBank:
    """The frozen random control: same architecture, seeded init (seed + 1), never trained."""
    return GateBank(gate_spec_for_model(model, cfg.d_g, cfg.gate_input)).reset_random(cfg.seed + 1).requires_grad_(False)


def distill(cfg: DistillConfig, on_event: Callable[[str, dict], None] | None = None) -> DistillResult:
    """Distill gates for ``cfg.model`` and write them to ``cfg.output``. ``on_event(kind, info)`` reports
    progress ("loaded", "step", "validate", "checkpoint", "done") for a front end to render.

    Launched as several processes (``torchrun`` / ``accelerate launch``), each holds the frozen model on its
    own device and takes its slice of every global batch; gate gradients and losses are averaged across
    processes, validation windows are shared out and their sums added. Only the main process writes files
    and calls ``on_event``; every process returns the same result. With ``cfg.device_map`` one process
    spreads the model over its GPUs (then CPU, disk) and each gate layer lives beside its attention layer.
    """
    from ..data import WindowSampler, build_windows
    from ..loading import (assert_frozen, device_summary, execution_devices, input_device, load_model,
                           model_fingerprint, onloaded)
    from ..parallel import Processes

    cfg.validate()
    procs = Processes(cfg.device)
    procs.check_device_map(cfg.device_map)
    emit = on_event if on_event is not None and procs.is_main else (lambda kind, info: None)
    out = Path(cfg.output)
    if procs.is_main:  # one process checks and creates the folder (the others would see its probe file)
        check_output_dir(out, cfg.overwrite, cfg.resume)
    procs.barrier()
    total_steps = cfg.resolved_steps()

    loaded = load_model(cfg.model, dtype=cfg.dtype, device=procs.model_device(),
                        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, device_map=cfg.device_map,
                        max_memory=cfg.max_memory)
    model, tok = loaded.model, loaded.tokenizer
    device = input_device(model)
    attns = attention_modules(model)
    layer_devices = execution_devices(model, attns)  # one device per layer: several with a device map
    train, train_info = build_windows(tok, cfg.dataset, "train", cfg.seq_len, max_windows=cfg.max_train_windows)
    heldout, held_info = build_windows(tok, cfg.dataset, "heldout", cfg.seq_len, max_windows=cfg.val_windows)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.device.type != "meta"} \
        if total_steps <= 10_000 and sum(p.numel() for p in model.parameters()) < 5e8 else None

    with onloaded(attns):  # the model's q/k rows, also where a device map offloaded them
        bank = build_gate_bank(model, cfg)
    random_bank = random_gate_bank(model, cfg)
    for b in (bank, random_bank):
        for gate, dev in zip(b.layers, layer_devices, strict=True):
            gate.to(dev)
    opt = gate_optimizer(bank, cfg.lr, cfg.weight_decay)
    # --batch-size is per process and micro-batch (as in transformers' Trainer); the sampler deals out the
    # global batch, so 1 process x 4 windows and 2 processes x 2 windows see the same windows per step.
    sampler = WindowSampler(len(train), cfg.batch_size * cfg.grad_accum * procs.world,
                            seed=cfg.seed, rank=procs.rank, world_size=procs.world)
    step, history = 0, []
    ckpt_dir = out / CHECKPOINT_DIR
    if cfg.resume and (ckpt_dir / "state.json").exists():
        params, meta = load_checkpoint(ckpt_dir, opt)
        diffs = [f"{key}: checkpoint {meta['config'][key]!r}, now {getattr(cfg, key)!r}" for key in _RESUME_KEYS
                 if meta["config"].get(key) != getattr(cfg, key)]
        if diffs:
            raise UserError(f"cannot resume {ckpt_dir}: settings differ ({'; '.join(diffs)})")
        bank.load_state_dict(params, strict=True)
        sampler.load_state_dict(meta["sampler"])
        step, history = meta["step"], meta["history"]
    resumed_from = step
    emit("loaded", {"model": loaded.source, "resolved": str(loaded.resolved), "device": device_summary(model),
                    "processes": procs.world, "dtype": loaded.dtype, "train": train_info, "heldout": held_info,
                    "spec": bank.spec.to_dict(), "steps": total_steps, "resumed_from": step})

    def validate(banks: dict[str, GateBank]) -> dict[str, RoutingStats]:
        """Open-loop recall on the held-out windows: each process scores its share, the sums are added."""
        stats = open_loop_recall(model, procs.shard(heldout), banks, cfg.k, cfg.batch_size, device)
        for s in stats.values():
            s.sums = procs.sum_tables(s.sums)
        return stats

    val = validate({"init": bank, "random": random_bank})
    recall_init, recall_random = val["init"].overall()["recall"], val["random"].overall()["recall"]
    emit("validate", {"step": step, "recall": recall_init, "recall_random": recall_random})

    meta = {"base_model": loaded.source, "base_model_revision": loaded.revision,
            "model_fingerprint": model_fingerprint(model.config), "model_type": model.config.model_type,
            "architecture": type(model).__name__, "gate_init": cfg.gate_init, "k": cfg.k, "loss": cfg.loss,
            "seed": cfg.seed, "random_seed": cfg.seed + 1, "dataset": cfg.dataset, "seq_len": cfg.seq_len}

    def snapshot(done: int) -> None:
        if procs.is_main and cfg.save_every and done % cfg.save_every == 0:
            save_gates(out / SNAPSHOT_DIR / f"step-{done}", copy.deepcopy(bank).cpu(), meta | {"steps": done})

    if step == 0:
        snapshot(0)

    def checkpoint(done: int) -> None:
        if procs.is_main:
            save_checkpoint(ckpt_dir, bank.state_dict(), opt, {
                "step": done, "sampler": sampler.state_dict(), "history": history,
                "config": {key: getattr(cfg, key) for key in _RESUME_KEYS},
            })
        emit("checkpoint", {"step": done, "path": str(ckpt_dir)})

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * procs.world  # all processes together
    # the fused losses of "hidden" gates take all layers' inputs from one stack (fused_stacked_losses)
    policy = RecordPolicy(stack_layers=bank.spec.num_layers if (cfg.loss, cfg.gate_input) == ("kl", "hidden") else 0)
    batches = iter(sampler)
    t_start, steps_timed = time.perf_counter(), 0
    recall = recall_init
    graphs = StepGraphs() if cfg.cuda_graph and torch.device(device).type == "cuda" else None
    with SparseAttention(model, policy):
        while step < total_steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg, total_steps)
            idx = next(batches)  # (batch_size * grad_accum,) window indices of this process
            micro = [train[i].to(device) for i in idx.split(cfg.batch_size)]
            failed = len(graphs.failures) if graphs is not None else 0
            layer_losses = accumulate_gradients(model, policy, bank, micro, cfg.loss, cfg.k, cfg.row_fraction,
                                                seed=cfg.seed * 1_000_003 + step, graphs=graphs)
            if graphs is not None and len(graphs.failures) > failed:
                emit("note", {"message": f"CUDA graph capture failed, steps of this shape run eagerly: "
                                         f"{graphs.failures[-1]}"})
            if procs.world > 1:  # the mean over processes = the gradient of the whole global batch
                (layer_losses,) = procs.average_gradients(bank.parameters(), layer_losses)
            if not torch.isfinite(layer_losses).all():
                bad = int((~torch.isfinite(layer_losses)).nonzero()[0])
                raise UserError(f"loss became non-finite at step {step + 1} in layer {bad}; the last good "
                                f"checkpoint is in {ckpt_dir} (lower --lr and rerun with --resume)")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            steps_timed += 1
            dt = time.perf_counter() - t0
            loss = float(layer_losses.mean())
            entry = {"step": step, "loss": loss, "lr": lr_at(step - 1, cfg, total_steps), "seconds": dt,
                     "tokens_per_second": tokens_per_step / dt}
            if step % cfg.val_every == 0 or step == total_steps:
                recall = validate({"gate": bank})["gate"].overall()["recall"]
                entry["recall"] = recall
                emit("validate", {"step": step, "recall": recall, "recall_random": recall_random})
            history.append(entry)
            snapshot(step)
            emit("step", entry | {"total": total_steps})
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint(step)

    if before is not None:
        changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
        assert not changed, f"distillation changed base model parameters: {changed[:3]}"
    assert_frozen(model)
    elapsed = time.perf_counter() - t_start
    graph_info = None if graphs is None else {  # which step shapes replayed as CUDA graphs, and why others did not
        "replayed_shapes": graphs.replayed_shapes,
        "failures": graphs.failures, "retried": graphs.retried}
    if procs.is_main:
        save_gates(out, bank.cpu(), meta | {"steps": step})
        checkpoint(step)
        atomic_write_json(out / HISTORY_NAME, {"config": asdict(cfg), "history": history, "train": train_info,
                                               "heldout": held_info, "library_version": __version__,
                                               "processes": procs.world, "cuda_graph": graph_info})
    procs.barrier()  # the gate folder is complete before any process returns (and, say, loads it)
    losses = [h["loss"] for h in history]
    result = DistillResult(
        output=out, steps=step, loss_first=losses[0] if losses else float("nan"),
        loss_last=losses[-1] if losses else float("nan"), recall=recall, recall_random=recall_random,
        recall_init=recall_init, seconds_per_step=elapsed / max(1, steps_timed),
        tokens_per_second=tokens_per_step * steps_timed / max(elapsed, 1e-9), resumed_from=resumed_from,
        history=history, data={"train": train_info, "heldout": held_info, "cuda_graph": graph_info},
    )
    emit("done", asdict(result))
    return result
