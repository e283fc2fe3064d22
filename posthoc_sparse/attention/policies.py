"""Selection policies run inside the attention function: dense, oracle top-k, gate top-k, random top-k.

Letters: B batch, H query heads, Hkv key/value heads, T queries, S keys, C query chunk, D head_dim, d gate dim.
A policy receives one ``LayerCall`` (what transformers handed the attention function plus the captured gate
inputs) and returns the attention output (B, T, H, D), as transformers' own attention functions do.
Policies never compute losses; an optional observer sees per-chunk scores and selections (for metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import UserError
from ..gates.modules import GateBank
from ..kernels import block_sparse as bsp
from ..kernels import head_topk as ht
from ..kernels.kl_distill import flash_attention_lse, flash_lse_ok
from .reference import allowed_keys, attend, group_scores, masked_softmax, scores, soft_topk_bias, topk_keep

# top-k per query head (METHOD.md); one top-k shared by each KV group; key blocks shared by each KV group and
# query block (kernels/block_sparse.py: the fast deployed path)
SELECTIONS = ("head", "group", "block")
BLOCK_SCORES = ("bound", "exact")  # how the gate scores a key block (GateSelector.block_mass)
DEFAULT_BLOCK = 64


def check_selection(selection: str, block_size: int, block_score: str,
                    names: tuple[str, str, str] = ("selection", "block_size", "block_score")) -> None:
    """One clear UserError for a bad selection, block size or block score; ``names`` are what the caller calls
    them (Python arguments by default, or CLI flags)."""
    for name, value, allowed in zip(names, (selection, block_size, block_score),
                                    (SELECTIONS, bsp.BLOCK_SIZES, BLOCK_SCORES)):
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _half_autocast(t: torch.Tensor):
    """Autocast to ``t``'s dtype on CUDA half-precision models: gate projections run in the model's dtype with
    fp32 accumulation, as in distillation; a no-op elsewhere."""
    return torch.autocast("cuda", dtype=t.dtype, enabled=t.is_cuda and t.dtype in (torch.bfloat16, torch.float16))

# observer(layer, s, allowed, keep): s (B, H, C, S) fp32 dense scores of a query chunk, allowed (B, 1|H, C, S),
# keep (B, H, C, S) or None for the dense policy.
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


@dataclass
class LayerCall:
    """One call of the attention function for one layer."""

    module: torch.nn.Module
    layer: int
    query: torch.Tensor  # (B, H, T, D), post-rotary (and post QK-norm)
    key: torch.Tensor  # (B, Hkv, S, D)
    value: torch.Tensor  # (B, Hkv, S, D)
    attention_mask: torch.Tensor | None
    scaling: float
    dropout: float
    kwargs: dict
    x: torch.Tensor | None = None  # (B, T, hidden): the attention block's input, if captured
    cos: torch.Tensor | None = None  # (B, T, rotary_dim)
    sin: torch.Tensor | None = None

    @property
    def softcap(self) -> float | None:
        return self.kwargs.get("softcap")

    def allowed(self, a: int = 0, e: int | None = None) -> torch.Tensor:
        b, _, t, _ = self.query.shape
        return allowed_keys(self.attention_mask, b, t, self.key.shape[2], self.query.device, a, e)  # (B, 1, C, S)


def query_chunk_size(b: int, h: int, s: int, budget_bytes: int = 1 << 28) -> int:
    """Queries per chunk so one fp32 (B, H, C, S) tensor stays near ``budget_bytes`` (256 MiB)."""
    return max(1, budget_bytes // max(1, b * h * s * 4))


def chunked_attention(call: LayerCall, probs, query_chunk: int | None = None) -> torch.Tensor:
    """Attention over query chunks: ``probs(a, e, s, allowed)`` turns the fp32 scores (B, H, C, S) of query rows
    a:e and their allowed keys (B, 1, C, S) into probabilities; returns the output (B, T, H, D) in v's dtype.
    Differentiable in q, k, v (and in whatever ``probs`` uses); one (B, H, C, S) chunk is built at a time."""
    q, key, v = call.query, call.key, call.value
    b, h, t, _ = q.shape
    step = query_chunk or query_chunk_size(b, h, key.shape[2])
    out = torch.empty(b, h, t, v.shape[-1], dtype=torch.float32, device=q.device)  # (B, H, T, D)
    for a in range(0, t, step):
        e = min(t, a + step)
        s = scores(q[:, :, a:e], key, call.scaling, call.softcap)  # (B, H, C, S)
        out[:, :, a:e] = attend(probs(a, e, s, call.allowed(a, e)), v)
    return out.to(v.dtype).transpose(1, 2).contiguous()  # (B, T, H, D)


class DensePolicy:
    """Exactly the model's stock attention (transformers' SDPA function), optionally observed."""

    needs_inputs = False

    def __init__(self, observer: Observer | None = None):
        self.observer = observer

    def __call__(self, call: LayerCall) -> torch.Tensor:
        if self.observer is not None:
            t, s = call.query.shape[2], call.key.shape[2]
            step = query_chunk_size(call.query.shape[0], call.query.shape[1], s)
            for a in range(0, t, step):
                e = min(t, a + step)
                sc = scores(call.query[:, :, a:e], call.key, call.scaling, call.softcap)
                self.observer(call.layer, sc, call.allowed(a, e), None)
        out, _ = sdpa_attention_forward(
            call.module, call.query, call.key, call.value, call.attention_mask,
            dropout=call.dropout, scaling=call.scaling, **call.kwargs,
        )
        return out


@dataclass
class LayerRecord:
    """What distillation needs from one layer of a dense forward (all detached)."""

    query: torch.Tensor  # (B, H, T, D)
    key: torch.Tensor  # (B, Hkv, S, D)
    mask: torch.Tensor | None  # the mask transformers passed: None means plain causal (kept as given, O(1))
    scaling: float
    softcap: float | None
    x: torch.Tensor | None  # (B, T, hidden)
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    lse: torch.Tensor | None = None  # (B, H, T) fp32: the teacher's log-sum-exp, when the forward yielded it
    slot: int | None = None  # where query, key, x and lse live in the policy's RecordStack, if they do

    def allowed(self, a: int = 0, e: int | None = None) -> torch.Tensor:
        """Allowed keys of query rows a:e, bool (B, 1, C, S); built per chunk, never (T, S) for all layers."""
        b, _, t, _ = self.query.shape
        e = t if e is None else e
        return allowed_keys(self.mask, b, t, self.key.shape[2], self.query.device, a, e)

    def valid_rows(self) -> int:
        """Query rows (times heads) that have at least one allowed key."""
        b, h, t, _ = self.query.shape
        if self.mask is None:
            return b * h * t
        return int(self.allowed().any(-1).sum()) * h


@dataclass
class RecordStack:
    """Recorded inputs of several layers in shared buffers (slot i holds layer ``layers[i]``), so that
    distillation can treat all layers as one batch (``distill.loop.fused_stacked_losses``)."""

    query: torch.Tensor  # (L, B, H, T, D)
    key: torch.Tensor  # (L, B, Hkv, T, D)
    x: torch.Tensor  # (L, B, T, C)
    lse: torch.Tensor  # (L, B, H, T) fp32
    layers: list[int] = field(default_factory=list)

    @classmethod
    def like(cls, n: int, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> RecordStack:
        def new(t: torch.Tensor, dtype=None) -> torch.Tensor:
            return torch.empty((n, *t.shape), dtype=dtype or t.dtype, device=t.device)

        return cls(new(q), new(k), new(x), new(q[..., 0], torch.float32))

    def fits(self, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> bool:
        return (len(self.layers) < self.query.shape[0] and self.query.shape[1:] == q.shape
                and self.key.shape[1:] == k.shape and self.x.shape[1:] == x.shape
                and self.query.dtype == q.dtype and self.x.dtype == x.dtype and self.query.device == q.device)


class RecordPolicy(DensePolicy):
    """Dense attention that also records each layer's q, k, mask and gate inputs for distillation. On CUDA
    plain-causal prefill (no observer) the attention runs through the ATen op of the kernel the model's SDPA
    call would use (``flash_attention_lse``: cuDNN or flash attention), and the record keeps its log-sum-exp:
    the fused KL then needs no teacher pass of its own. With ``stack_layers`` = L, such layers' q, k, x and
    lse are copied into one ``RecordStack`` of L slots per forward (``clear()`` starts the next)."""

    needs_inputs = True

    def __init__(self, stack_layers: int = 0):
        super().__init__()
        self.records: dict[int, LayerRecord] = {}
        self.stack_layers = stack_layers
        self.stack: RecordStack | None = None

    def clear(self) -> None:
        """Forget this forward's records (and its stack)."""
        self.records.clear()
        self.stack = None

    def __call__(self, call: LayerCall) -> torch.Tensor:
        rec = LayerRecord(
            query=call.query.detach(), key=call.key.detach(), mask=call.attention_mask, scaling=call.scaling,
            softcap=call.softcap, x=None if call.x is None else call.x.detach(),
            cos=None if call.cos is None else call.cos.detach(), sin=None if call.sin is None else call.sin.detach(),
        )
        self.records[call.layer] = rec
        if self.observer is None and flash_lse_ok(call.query, call.key, call.value, call.attention_mask, call.softcap,
                                                  call.dropout, call.kwargs):
            out, rec.lse = flash_attention_lse(call.query, call.key, call.value, call.scaling)
            if self.stack_layers and rec.x is not None:
                if self.stack is None:
                    self.stack = RecordStack.like(self.stack_layers, rec.query, rec.key, rec.x)
                if self.stack.fits(rec.query, rec.key, rec.x):
                    rec.slot = len(self.stack.layers)
                    self.stack.layers.append(call.layer)
                    for name in ("query", "key", "x", "lse"):
                        buf = getattr(self.stack, name)[rec.slot]
                        buf.copy_(getattr(rec, name))
                        setattr(rec, name, buf)
            return out
        return super().__call__(call)


class OracleSelector:
    """Select by the true scores."""

    def prepare(self, call: LayerCall):
        return None

    def select(self, prepared, a: int, b: int, s: torch.Tensor) -> torch.Tensor:
        return s

    def block_mass(self, call: LayerCall, block: int) -> torch.Tensor:
        """Exact dense attention mass of each earlier key block, per head: (B, H, NQ, NB) fp32."""
        return softmax_block_mass(call, call.query, call.key, call.scaling, call.softcap, block)


def softmax_block_mass(call: LayerCall, q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None,
                       block: int) -> torch.Tensor:
    """The mass softmax(q . k * scaling) puts on each earlier key block over the call's allowed keys, summed
    over each query block: (B, H, NQ, NB) fp32. q (B, H, T, D); k (B, H or Hkv, S, D). The Triton kernel on
    CUDA plain-causal prefill, else chunked (one (B, H, C, S) tensor at a time)."""
    b, h, t, _ = q.shape
    s_len = k.shape[2]
    if q.is_cuda and call.attention_mask is None and bsp.block_kernels_ok(q, k, block):
        return bsp.oracle_block_mass_fused(q, k, block, scaling, softcap)
    q0 = s_len - t
    step = query_chunk_size(b, h, s_len)
    parts = []
    for a in range(0, t, step):
        e = min(t, a + step)
        p = masked_softmax(scores(q[:, :, a:e], k, scaling, softcap), call.allowed(a, e))
        parts.append((q0 + a, bsp.block_mass_from_probs(p, q0 + a, block)))
    return _stack_query_blocks(parts, block)


def _stack_query_blocks(parts: list[tuple[int, torch.Tensor]], block: int) -> torch.Tensor:
    """Join per-chunk (B, H, NQ_c, NB) masses; a query block split over two chunks has its parts added."""
    first = parts[0][0] // block
    nq = (parts[-1][0] // block) + parts[-1][1].shape[2] - first
    out = torch.zeros(*parts[0][1].shape[:2], nq, parts[0][1].shape[3], device=parts[0][1].device)
    for pos, m in parts:
        j = pos // block - first
        out[:, :, j : j + m.shape[2]] += m
    return out


@dataclass
class GateSelector:
    """Select by a gate bank's scores. Caches gate keys per layer for decoding with a KV cache."""

    bank: GateBank
    key_cache: dict[int, torch.Tensor] = field(default_factory=dict)
    block_score: str = "bound"  # with block selection: "bound" (fast) or "exact" (the gate's softmax mass)

    def prepare(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.bank.layers[call.layer]
        with _half_autocast(call.query):
            gq, gk = gate.project(call.x, call.query, call.key, call.cos, call.sin)  # (B, H, T, d), (B, H, T|S, d)
        s = call.key.shape[2]
        if gk.shape[2] < s:  # decoding: new gate keys extend the cache
            cached = self.key_cache.get(call.layer)
            if cached is None or cached.shape[2] + gk.shape[2] < s:
                raise RuntimeError(f"gate key cache of layer {call.layer} does not match the KV cache length {s}")
            gk = torch.cat((cached, gk), dim=2)[:, :, -s:]  # (B, H, S, d); sliding-window caches keep the last S
        self.key_cache[call.layer] = gk.detach()
        return gq, gk

    def select(self, prepared, a: int, b: int, s: torch.Tensor) -> torch.Tensor:
        gq, gk = prepared
        return torch.matmul(gq[:, :, a:b].float(), gk.float().transpose(-1, -2))  # (B, H, C, S)

    def block_mass(self, call: LayerCall, block: int) -> torch.Tensor:
        """The gate's mass of each earlier key block, per head: (B, H, NQ, NB) fp32. A block's score is an upper
        bound of its largest gate score (``pool_bound``); it ranked blocks far better than the gate score of
        the mean key (docs/performance.md). On CUDA prefill with the "hidden" input one Triton pass turns the
        raw projection into the summaries (and the decode cache's keys).

        ``block_score="exact"`` scores a block by the mass the gate's own softmax over keys puts on it (as the
        oracle does with the dense scores): closer to per-head quality, but O(T^2 d) like dense attention."""
        if self.block_score == "exact":
            gq, gk = self.prepare(call)
            return softmax_block_mass(call, gq, gk, 1.0, None, block)
        gate = self.bank.layers[call.layer]
        q, d = call.query, gate.spec.d_g
        if (q.is_cuda and gate.spec.gate_input == "hidden" and call.x is not None
                and bsp.block_kernels_ok(q, call.key, block, 2 * d)):
            # (B, T, 2H, d), in the model's dtype for half models (as _half_autocast does), else in the gate's
            y = gate.hidden_projection(call.x, q.dtype if q.dtype in (torch.float16, torch.bfloat16) else gate.wq.dtype)
            rope = (call.cos, call.sin, gate.freq_idx) if call.cos is not None and gate.freq_idx.numel() else None
            gq2, gkb, gk = bsp.gate_summaries_fused(y, rope, block)
            self.key_cache[call.layer] = gk
            return bsp.block_mass_fused(gq2, gkb, block)
        gq, gk = self.prepare(call)
        gq, gkb = bsp.pool_bound(gq, gk, block)
        if q.is_cuda and bsp.block_kernels_ok(q, call.key, block, gq.shape[-1]):
            return bsp.block_mass_fused(gq, gkb, block)
        return bsp.block_mass_reference(gq, gkb, block, call.key.shape[2] - q.shape[2])


class RandomScoreSelector:
    """A fresh uniformly random top-k selection at every call (the stochastic-mask experiment). Draws from
    torch's global generator, so a seeded training step draws the same masks again (resume is exact)."""

    def prepare(self, call: LayerCall):
        return None

    def select(self, prepared, a: int, b: int, s: torch.Tensor) -> torch.Tensor:
        return torch.rand(s.shape, device=s.device)

    def block_mass(self, call: LayerCall, block: int) -> torch.Tensor:
        b, h, t, _ = call.query.shape
        s_len = call.key.shape[2]
        nq = (s_len - 1) // block - (s_len - t) // block + 1
        return torch.rand(b, h, nq, -(-s_len // block), device=call.query.device)


class TopKPolicy:
    """Deployed hard top-k: keep the selector's top-k allowed keys per query, softmax the true scores over them.

    The naive chunked reference path: never more than one (B, H, C, S) chunk of scores at a time.
    """

    def __init__(self, selector, k: int, observer: Observer | None = None, query_chunk: int | None = None,
                 selection: str = "head", block: int = DEFAULT_BLOCK):
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if selection == "block" and block not in bsp.BLOCK_SIZES:
            raise ValueError(f"block size must be one of {bsp.BLOCK_SIZES}, got {block}")
        self.selector, self.k, self.observer, self.query_chunk = selector, k, observer, query_chunk
        self.selection, self.block = selection, block

    @property
    def needs_inputs(self) -> bool:
        return isinstance(self.selector, GateSelector)

    def __call__(self, call: LayerCall) -> torch.Tensor:
        if self.selection == "block":
            return self._blocks(call)
        if self.selection == "head" and self._head_kernels(call):
            return self._heads(call)
        prepared = self.selector.prepare(call)
        n_rep = call.query.shape[1] // call.key.shape[1] if self.selection == "group" else 1

        def probs(a: int, e: int, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            keep = topk_keep(group_scores(self.selector.select(prepared, a, e, s), allowed, n_rep), allowed, self.k)
            if self.observer is not None:
                self.observer(call.layer, s, allowed, keep)
            return masked_softmax(s, keep)

        return chunked_attention(call, probs, self.query_chunk)

    def _plain_prefill(self, call: LayerCall) -> bool:
        """CUDA prefill with plain causal masking where nothing needs gradients or per-chunk scores (an
        observer): what the Triton kernels serve. Everything else takes the chunked reference."""
        q = call.query
        return (q.is_cuda and self.observer is None and call.attention_mask is None and not call.dropout
                and not (torch.is_grad_enabled() and (q.requires_grad or call.key.requires_grad
                                                      or call.value.requires_grad))
                and call.value.shape[-1] == q.shape[-1])

    def fast_path(self, call: LayerCall) -> bool:
        """Whether block selection's attention runs as the Triton kernel (``_plain_prefill``, kernel shapes)."""
        return self._plain_prefill(call) and bsp.block_kernels_ok(call.query, call.key, self.block)

    def _head_kernels(self, call: LayerCall) -> bool:
        """Per-head selection by the gate (hidden input) or the oracle through the Triton kernels
        (``kernels.head_topk``): plain prefill, k <= ht.MAX_K, kernel shapes."""
        sel = self.selector
        if type(sel) is OracleSelector:
            dim = call.query.shape[-1]
        elif type(sel) is GateSelector:
            dim = sel.bank.spec.d_g
        else:
            return False
        return self._plain_prefill(call) and ht.kernels_ok(call.query, call.key, self.k, dim)

    def _heads(self, call: LayerCall) -> torch.Tensor:
        """Per-head top-k through the kernels: the k causal keys of largest selection score per row and head
        (exactly min(k, causal keys), as ``topk_keep``), then attention over those keys."""
        if type(self.selector) is OracleSelector:  # the true scores (softcap keeps their order)
            a, b, scale = call.query, call.key, call.scaling
        else:
            (a, b), scale = self.selector.prepare(call), 1.0
        a, b = (x if x.stride(-1) == 1 else x.contiguous() for x in (a, b))
        idx = ht.head_topk(a, b, self.k, scale)
        return ht.index_attention(call.query, call.key, call.value, idx, call.scaling, call.softcap)

    def _blocks(self, call: LayerCall) -> torch.Tensor:
        q, key = call.query, call.key
        s_len, t = key.shape[2], q.shape[2]
        groups = key.shape[1]
        mass = bsp.group_sum(self.selector.block_mass(call, self.block), groups)
        idx = bsp.select(mass, bsp.n_blocks(self.k, self.block), s_len - t, self.block)  # (B, G, NQ, n)
        if self.fast_path(call):
            return bsp.block_attention_fused(q, key, call.value, idx, self.block, call.scaling, call.softcap)

        def probs(a: int, e: int, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            keep = bsp.block_keep(idx, self.block, s_len, s_len - t, q.shape[1] // groups, a, e) & allowed
            if self.observer is not None:
                self.observer(call.layer, s, allowed, keep)
            return masked_softmax(s, keep)

        return chunked_attention(call, probs, self.query_chunk)


class SoftGatePolicy:
    """End-to-end soft gating: the scores plus ``soft_topk_bias`` of the gate's scores, softmax over the
    allowed keys. Differentiable in the model's q, k, v and in the gate (when its parameters require grad).
    Used only for training with a gate in the loop (``sparsify pretrain --gate-mode soft-*``), never deployed.
    """

    needs_inputs = True

    def __init__(self, bank: GateBank, k: int, tau: float = 1.0, query_chunk: int | None = None):
        if k <= 0 or tau <= 0:
            raise ValueError(f"need k > 0 and tau > 0, got k={k}, tau={tau}")
        self.selector = GateSelector(bank)  # the gate's scores G, computed exactly as deployed top-k computes them
        self.k, self.tau, self.query_chunk = k, tau, query_chunk

    def __call__(self, call: LayerCall) -> torch.Tensor:
        prepared = self.selector.prepare(call)

        def probs(a: int, e: int, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            g = self.selector.select(prepared, a, e, s)  # (B, H, C, S)
            return torch.nan_to_num(torch.softmax(s + soft_topk_bias(g, allowed, self.k, self.tau), dim=-1), nan=0.0)

        return chunked_attention(call, probs, self.query_chunk)
