"""One layer's distillation loss and its gradient to the gate: the naive reference and the fused paths.

Letters: B batch, H query heads, Hkv key/value heads, T queries, S keys, C a chunk of queries (or the hidden
width), D head_dim, d gate dim, L or n layers.

KL (the default), per query row r with allowed keys A_r, teacher p = softmax(s) and student q = softmax(G):
    KL_r = sum_{j in A_r} p_rj * (log p_rj - log q_rj)
summed here over rows; the caller divides by the number of rows (rows with no allowed key are skipped).

BCE (optional), against the oracle top-k mask M (1 on the k allowed keys with the largest s):
    BCE_r = sum_{j in A_r} -(M_rj log sigmoid(G_rj) + (1 - M_rj) log(1 - sigmoid(G_rj)))
summed over rows and keys; the caller divides by the number of rows (a per-row mean, over keys it is a sum
so that long rows are not down-weighted).
The reference path (``loss_rows`` chunk by chunk, through autograd) takes any mask and either loss; the fused
path (ops.kl and ops.rope kernels, no autograd graph for a "hidden" gate) takes the KL on plain causal windows.
Tests hold the two equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..attention.call import query_chunk_size
from ..attention.recording import LayerRecord, RecordPolicy, RecordStack
from ..attention.reference import scores, topk_keep
from ..gates.modules import GateBank, LayerGate, hidden_weights
from ..ops import kl as okl
from ..ops.rope import gate_rope

RUN_BUDGET = 1 << 28  # bytes of temporaries one run of stacked layers may hold (fused_stacked_losses)


LOSSES = ("kl", "bce")


def kl_rows(s: torch.Tensor, g: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over rows of KL(softmax(s) || softmax(g)) restricted to allowed keys, and the row count.

    s, g: (B, H, C, S); allowed: (B, 1|H, C, S) bool.
    """
    s, g = s.float(), g.float()
    neg = float("-inf")
    logp = torch.log_softmax(s.masked_fill(~allowed, neg), dim=-1)  # (B, H, C, S)
    logq = torch.log_softmax(g.masked_fill(~allowed, neg), dim=-1)
    allowed = allowed.expand_as(s)
    p = logp.exp()
    terms = torch.where(allowed, p * (logp - logq), torch.zeros((), device=s.device))  # (B, H, C, S)
    rows = allowed.any(-1)  # (B, H, C)
    return terms.sum(), int(rows.sum())


def bce_rows(s: torch.Tensor, g: torch.Tensor, allowed: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Sum over rows of the BCE of sigmoid(g) against the oracle top-k mask of s, and the row count."""
    target = topk_keep(s, allowed, k).float()  # (B, H, C, S)
    allowed = allowed.expand_as(s)
    terms = F.binary_cross_entropy_with_logits(g.float(), target, reduction="none")
    rows = allowed.any(-1)
    return torch.where(allowed, terms, torch.zeros((), device=s.device)).sum(), int(rows.sum())


def loss_rows(kind: str, s: torch.Tensor, g: torch.Tensor, allowed: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    if kind == "kl":
        return kl_rows(s, g, allowed)
    if kind == "bce":
        return bce_rows(s, g, allowed, k)
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def layer_loss_backward(rec: LayerRecord, gate: LayerGate, kind: str, k: int, scale: float,
                        chunk: int | None = None, fused: bool | None = None,
                        row_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the layer's query rows; gradients (times ``scale``) accumulate into ``gate``.

    ``row_blocks`` (m,): the sampled ``ROW_BLOCK``-row query blocks (``ops.kl.sample_row_blocks``; None: all).
    Then the loss is the unbiased estimate nb / m * (sum over the sampled rows) / rows, nb the window's blocks.

    The KL on a plain causal window takes the fused kernels where they serve (a "hidden" gate without an
    autograd graph, ``fused_hidden_losses``; a "qk" gate through autograd from the kernels' gradients); else the
    reference runs chunk by chunk. ``fused`` forces one path (None: automatic).
    """
    b, h, t, _ = rec.query.shape
    n_rows = rec.valid_rows()
    eligible = _fused_eligible(rec, kind, gate.spec.d_g)
    if fused is None:
        fused = eligible and okl.kernels_ok(rec.query, gate.spec.d_g)
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
        kl, dg = okl.kl_grad_fused(rec.query, rec.key, gq, gk, rec.scaling, scale / n_rows, rec.lse, row_blocks)
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
    return 1.0 if row_blocks is None else row_blocks.shape[-1] / -(-t // okl.ROW_BLOCK)


def _row_spans(t: int, step: int, row_blocks: torch.Tensor | None) -> list[tuple[int, int]]:
    """Query row spans [a, e) of at most ``step`` rows covering every row, or only the sampled blocks."""
    if row_blocks is None:
        return [(a, min(t, a + step)) for a in range(0, t, step)]
    spans = []
    for blk in sorted(int(i) for i in row_blocks.tolist()):
        lo, hi = blk * okl.ROW_BLOCK, min(t, (blk + 1) * okl.ROW_BLOCK)
        spans += [(a, min(hi, a + step)) for a in range(lo, hi, step)]
    return spans


def _fused_eligible(rec: LayerRecord, kind: str, d_g: int) -> bool:
    """Whether the fused kernels can compute this layer's loss: the KL on a plain causal window, no soft-capping,
    dimensions the kernels take (``ops.kl.supports``)."""
    return (kind == "kl" and rec.mask is None and not rec.softcap and rec.query.shape[2] == rec.key.shape[2]
            and okl.supports(rec.query.shape[-1], d_g))


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
def fused_stacked_losses(stack: RecordStack, recs: list[LayerRecord], gates: list[LayerGate], scale: float,
                         row_blocks: torch.Tensor | None = None, budget_bytes: int | None = None) -> torch.Tensor:
    """``fused_hidden_losses`` for the layers of one ``RecordStack`` (``recs`` its records in slot order, one
    scaling and one rotary table for all): runs of consecutive layers as one batch of n * B sequences
    (``_hidden_run``, ``stack_runs``)."""
    return torch.cat([
        _stack_run(stack, a, e, recs[0], gates[a:e], scale, None if row_blocks is None else row_blocks[a:e])
        for a, e in stack_runs(stack, len(recs), gates[0], budget_bytes)])


def stack_runs(stack: RecordStack, n_all: int, gate: LayerGate, budget_bytes: int | None = None) -> list[tuple[int, int]]:
    """The runs [a, e) of the first ``n_all`` slots of ``stack``: as many consecutive layers as keep a run's
    temporaries (projections, gate queries and keys, their fp32 gradients) within ``budget_bytes`` (None:
    ``RUN_BUDGET``), at least one."""
    b, _, t, _ = stack.query.shape[1:]
    h, _, d = gate.wq.shape
    per_layer = b * t * 2 * h * d * (2 * stack.x.element_size() + 8)
    run = max(1, min(n_all, (budget_bytes or RUN_BUDGET) // per_layer))
    return [(a, min(n_all, a + run)) for a in range(0, n_all, run)]


def _stack_run(stack: RecordStack, a: int, e: int, rec: LayerRecord, gates: list[LayerGate], scale: float,
               row_blocks: torch.Tensor | None) -> torch.Tensor:
    return _hidden_run(*(getattr(stack, name)[a:e] for name in ("query", "key", "x", "lse")), rec, gates, scale,
                       row_blocks)


def _hidden_run(q, k, x, lse, rec: LayerRecord, gates: list[LayerGate], scale: float,
                row_blocks: torch.Tensor | None) -> torch.Tensor:
    """The mean KL (n,) of n layers run as one batch, their weight gradients added to the gates.

    q (n, B, H, T, D), k (n, B, Hkv, T, D), x (n, B, T, C), lse (n, B, H, T) or None, row_blocks (n, m) or
    None; ``rec`` holds the scaling and rotary tables all n layers share. One launch per step for all n layers
    and no autograd graph, because distillation is bound by the host's launches otherwise."""
    n, b, hq, t, dq = q.shape
    c = x.shape[-1]
    h, _, d = gates[0].wq.shape
    rows = b * h * t * _sampled_share(row_blocks, t)  # the mean's denominator
    x = x.reshape(n, b * t, c)
    y = torch.bmm(x, hidden_weights(gates, x.dtype)).view(n * b, t, 2 * h, d)  # (n B, T, 2H, d)
    freq = torch.stack([gate.freq_idx for gate in gates]) if gates[0].freq_idx.numel() else gates[0].freq_idx
    g = gate_rope(y, rec.cos, rec.sin, freq)  # (2, n B, H, T, d): [0] queries, [1] keys
    kl, dg = okl.kl_grad_fused(q.view(n * b, hq, t, dq), k.view(n * b, k.shape[2], t, dq), g[0], g[1], rec.scaling,
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
    add_grads(params, [grads[i, sl] for i in range(n) for sl in (slice(0, h), slice(h, None))])  # (H, C, d) each


def add_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Add ``grads`` to the parameters' ``.grad`` in one call (taking them as the gradients where none exist)."""
    if all(p.grad is None for p in params):
        for p, g in zip(params, grads):
            p.grad = g
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch._foreach_add_([p.grad for p in params], grads)


def recorded_losses(policy: RecordPolicy, bank: GateBank, loss: str, k: int, scale: float,
                    rows_for: Callable[[list[int], torch.device], torch.Tensor | None]) -> tuple[torch.Tensor, bool]:
    """The mean loss (L,) of every layer the policy recorded in one forward, their gradients times ``scale``
    added to the gates (``rows_for(layers, device)``: their sampled row blocks, or None); and whether every
    layer went through the policy's one stack (what a CUDA graph of the step needs)."""
    n_layers = bank.spec.num_layers
    out = torch.zeros(n_layers, device=next(iter(policy.records.values())).query.device)

    def add(layers: list[int], losses: torch.Tensor) -> None:
        out[index_of(layers)] += losses.to(out.device)

    every = sorted(policy.records)
    whole = every == list(range(n_layers)) and stacked(policy, every)
    groups: dict = {}  # device -> layers whose losses go through fused_hidden_losses together
    for layer, rec in sorted(policy.records.items()):
        gate = bank.layers[layer]
        if (gate.spec.gate_input == "hidden" and _fused_eligible(rec, loss, gate.spec.d_g)
                and okl.kernels_ok(rec.query, gate.spec.d_g)):
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


def index_of(layers: list[int]) -> slice | list[int]:
    """An index of ``layers``: a slice where they are consecutive (a view, no index tensor: CUDA-graph safe)."""
    return slice(layers[0], layers[-1] + 1) if layers == list(range(layers[0], layers[-1] + 1)) else layers
