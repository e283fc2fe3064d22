"""What the attention function hands a policy (``LayerCall``), and the naive chunked attention the reference paths
of every policy share.

Letters: B batch, H query heads, Hkv key/value heads, T queries, S keys, C query chunk, D head_dim.
"""

from __future__ import annotations

from collections.abc import Callable
import weakref
from dataclasses import dataclass, replace

import torch

from .reference import allowed_keys, attend, scores

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
    cache: object | None = None  # the layer's transformers cache layer (KV cache), if captured with a cache
    cached_keys: int | None = None  # served on the first T of a static cache's S keys (``causal_prefix``): S

    @property
    def softcap(self) -> float | None:
        return self.kwargs.get("softcap")

    def allowed(self, a: int = 0, e: int | None = None) -> torch.Tensor:
        b, _, t, _ = self.query.shape
        return allowed_keys(self.attention_mask, b, t, self.key.shape[2], self.query.device, a, e)  # (B, 1, C, S)


def causal_prefix(call: LayerCall) -> LayerCall | None:
    """``call`` as a plain causal call over its first T keys, where it is a prompt's prefill into a longer,
    preallocated KV cache (a StaticCache: S > T keys, the mask letting query i see keys 0..i and nothing else, in
    every row); None otherwise. Prefill only, never a decode step (T = 1). The mask is checked on the device in
    row chunks (never a (B, T, S) tensor beyond the mask itself), with one read back, once per mask: every layer
    of a forward gets the same mask object, and the answer for the last one checked is kept."""
    b, _, t, _ = call.query.shape
    s = call.key.shape[2]
    mask = call.attention_mask
    if mask is None or t < 2 or s <= t or call.cached_keys is not None:
        return None
    seen = _CHECKED_MASK.get("last")
    if seen is not None and seen[0]() is mask and seen[1:3] == (t, s):
        ok = seen[3]
    else:
        ok = _plain_causal(mask, t, s)
        _CHECKED_MASK["last"] = (weakref.ref(mask), t, s, ok)
    if not ok:
        return None
    return replace(call, key=call.key[:, :, :t], value=call.value[:, :, :t], attention_mask=None, cached_keys=s)


_CHECKED_MASK: dict = {}  # "last": (weak reference to a mask, T, S, whether it is plain causal over T of S keys)


def _plain_causal(mask: torch.Tensor, t: int, s: int, rows: int | None = None) -> bool:
    """Whether ``mask`` lets query i (of T) see keys 0..i of S and nothing else, in every row of every sequence;
    ``rows`` query rows at a time."""
    kpos = torch.arange(s, device=mask.device)
    bad = torch.zeros((), dtype=torch.bool, device=mask.device)
    step = rows or query_chunk_size(mask.shape[0], 1, s)  # rows whose bool (B, 1, C, S) stays near 64 MiB
    for a in range(0, t, step):
        e = min(t, a + step)
        causal = kpos[None, :] <= torch.arange(a, e, device=mask.device)[:, None]  # (C, S)
        bad |= (allowed_keys(mask, mask.shape[0], t, s, mask.device, a, e) != causal).any()
    return not bool(bad)


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
