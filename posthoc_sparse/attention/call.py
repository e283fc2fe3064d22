"""What the attention function hands a policy (``LayerCall``), and the naive chunked attention the reference paths
of every policy share.

Letters: B batch, H query heads, Hkv key/value heads, T queries, S keys, C query chunk, D head_dim.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
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
    every row: ``causal_pads`` all 0); None otherwise."""
    t, s = call.query.shape[2], call.key.shape[2]
    pads = causal_pads(call) if s > t else None
    if pads is None or any(pads):
        return None
    return replace(call, key=call.key[:, :, :t], value=call.value[:, :, :t], attention_mask=None, cached_keys=s)


def causal_pads(call: LayerCall) -> list[int] | None:
    """Where ``call`` is a prompt's prefill (T >= 2 queries over the first T of S >= T keys, the cache empty
    before it) of left-padded sequences: query i of sequence b sees keys p_b..i and nothing else (the rows of
    padding, i < p_b, see nothing), the p_b (B values, 0 without padding; T for a row of padding only). None for
    any other mask, no mask, a decode step. The mask is checked on the device in row chunks (never a (B, T, S)
    tensor beyond the mask itself), with one read back, once per mask: every layer of a forward gets the same
    mask object (a model of sliding-window and full layers: one of two), and the answers for the last four
    masks checked are kept."""
    b, _, t, _ = call.query.shape
    s = call.key.shape[2]
    mask = call.attention_mask
    if mask is None or t < 2 or s < t or call.cached_keys is not None or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    seen = [c for c in _CHECKED_MASKS if c[0]() is mask and c[1:3] == (t, s)]
    if seen:
        pads = seen[0][3]
    else:
        pads = _left_pads(mask, t, s)
        _CHECKED_MASKS[:] = [c for c in _CHECKED_MASKS if c[0]() is not None][-3:] + [(weakref.ref(mask), t, s, pads)]
    if pads is None or len(pads) not in (1, b):
        return None
    return pads * b if len(pads) == 1 else pads


# (weak reference to a mask, T, S, its causal_pads) of the last four masks checked: a model of sliding-window and
# full layers (Gemma 3) hands each forward two masks, in turn
_CHECKED_MASKS: list[tuple] = []


def _left_pads(mask: torch.Tensor, t: int, s: int, rows: int | None = None) -> list[int] | None:
    """Each sequence's left padding p (the first key its last query sees) where ``mask`` (B, 1, T, S) lets query
    i see keys p..i of S and nothing else, in every row; else None. ``rows`` query rows at a time."""
    n, device = mask.shape[0], mask.device
    last = allowed_keys(mask, n, t, s, device, t - 1, t)[:, 0, 0]  # (B, S)
    pads = torch.where(last.any(-1), last.int().argmax(-1), t)  # (B,): argmax gives the first True
    kpos = torch.arange(s, device=device)
    after_pad = kpos[None, None, :] >= pads[:, None, None]  # (B, 1, S)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    step = rows or query_chunk_size(n, 1, s)  # rows whose bool (B, C, S) stays near 64 MiB
    for a in range(0, t, step):
        e = min(t, a + step)
        want = (kpos[None, :] <= torch.arange(a, e, device=device)[:, None])[None] & after_pad  # (B, C, S)
        bad |= (allowed_keys(mask, n, t, s, device, a, e)[:, 0] != want).any()
    found = torch.cat([bad.view(1).long(), pads.long()]).tolist()
    return None if found[0] else found[1:]


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
