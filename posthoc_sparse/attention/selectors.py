"""What a top-k policy selects by: the true scores (oracle), a gate's scores, or fresh random scores.

Letters: B batch, H query heads, Hkv key/value heads, T queries, S keys, C query chunk, d gate dim, NQ query
blocks, NB key blocks. A selector ``prepare``s per call (e.g. the gate's projections), ``select``s scores for a
query chunk (B, H, C, S), and gives block scores (``block_mass``) for block selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..gates.modules import GateBank
from ..ops import block_sparse as bsp
from ..ops import decode as dc
from ..ops.rope import gate_rope
from .call import LayerCall, query_chunk_size
from .gate_cache import GateKeyCache
from .reference import masked_softmax, scores


def _half_autocast(t: torch.Tensor):
    """Autocast to ``t``'s dtype on CUDA half-precision models: gate projections run in the model's dtype with
    fp32 accumulation, as in distillation; a no-op elsewhere."""
    return torch.autocast("cuda", dtype=t.dtype, enabled=t.is_cuda and t.dtype in (torch.bfloat16, torch.float16))


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
    if call.attention_mask is None and bsp.kernels_ok(q, k, block):
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
    """Select by a gate bank's scores. A "hidden" gate keeps its keys beside the model's KV cache
    (``GateKeyCache``: at the KV cache's own positions, static caches included)."""

    bank: GateBank
    key_cache: GateKeyCache = field(default_factory=GateKeyCache)
    block_score: str = "bound"  # with block selection: "bound" (fast) or "exact" (the gate's softmax mass)

    def prepare(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate queries (B, H, T, d) and keys (B, H, S, d), aligned with the call's keys."""
        gate = self.bank.layers[call.layer]
        with _half_autocast(call.query):
            gq, gk = gate.project(call.x, call.query, call.key, call.cos, call.sin)  # (B, H, T, d), (B, H, T|S, d)
        if gate.spec.gate_input == "hidden":  # gate keys of the call's T tokens: the cache holds the others
            gk = self._cached(call, gk)
        return gq, gk

    def _cached(self, call: LayerCall, new: torch.Tensor) -> torch.Tensor:
        """The gate key cache's keys after ``new`` (B, H, T, d), aligned with the call's keys: a static cache's
        prefill served on its first T keys (``call.cached_keys``) records all S and gives back the first T."""
        s = call.key.shape[2]
        return self.key_cache.keys(call.layer, call.cache, new, call.cached_keys or s)[:, :, :s]

    def decode_inputs(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
        """``prepare`` of one decode step for a "hidden" gate, through ``ops.rope``'s kernel (one launch for the
        rotary embedding, not a dozen): the gate query (B, H, d) and every gate key (B, H, S, d), in the model's
        dtype for half models. The same numbers as ``prepare`` up to the rounding of the rotation."""
        gate = self.bank.layers[call.layer]
        q = call.query
        y = gate.hidden_projection(call.x, q.dtype if q.dtype in (torch.float16, torch.bfloat16) else gate.wq.dtype)
        b, t, h2, d = y.shape
        s = call.key.shape[2]
        mirror = None
        if dc.TUNING["keys_in_rope"]:
            mirror = self.key_cache.static_mirror(call.cache, (b, h2 // 2, t, d), y.dtype, call.cached_keys or s)
        if mirror is None:
            g = gate_rope(y, call.cos, call.sin, gate.freq_idx)  # (2, B, H, 1, d)
            return g[0, :, :, 0], self._cached(call, g[1])
        # a static gate key cache: the kernel writes the keys at its position, advanced as its update would
        g = gate_rope(y, call.cos, call.sin, gate.freq_idx, keys_into=(mirror.keys, mirror.cumulative_length))
        mirror.cumulative_length.add_(t)
        return g[0, :, :, 0], mirror.keys[:, :, :s]

    def select(self, prepared, a: int, b: int, s: torch.Tensor) -> torch.Tensor:
        gq, gk = prepared
        return torch.matmul(gq[:, :, a:b].float(), gk.float().transpose(-1, -2))  # (B, H, C, S)

    def block_mass(self, call: LayerCall, block: int) -> torch.Tensor:
        """The gate's mass of each earlier key block, per head: (B, H, NQ, NB) fp32.

        "bound" (default): softmax over blocks of an upper bound of each block's largest gate score
        (``pool_bound``; it ranks blocks better than the mean key, docs/performance.md). "exact": the mass the
        gate's own softmax puts on the block, O(T^2 d) like dense attention."""
        if self.block_score == "exact":
            gq, gk = self.prepare(call)
            return softmax_block_mass(call, gq, gk, 1.0, None, block)
        gate = self.bank.layers[call.layer]
        q, d = call.query, gate.spec.d_g
        if gate.spec.gate_input == "hidden" and call.x is not None and bsp.kernels_ok(q, call.key, block, 2 * d):
            # (B, T, 2H, d), in the model's dtype for half models (as _half_autocast does), else in the gate's
            y = gate.hidden_projection(call.x, q.dtype if q.dtype in (torch.float16, torch.bfloat16) else gate.wq.dtype)
            rope = (call.cos, call.sin, gate.freq_idx) if call.cos is not None and gate.freq_idx.numel() else None
            gq2, gkb, gk = bsp.gate_summaries_fused(y, rope, block)
            self._cached(call, gk)
            return bsp.block_mass_fused(gq2, gkb, block)
        gq, gk = self.prepare(call)
        gq, gkb = bsp.pool_bound(gq, gk, block)
        if bsp.kernels_ok(q, call.key, block, gq.shape[-1]):
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
