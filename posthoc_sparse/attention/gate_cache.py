"""The gate's key cache beside the model's KV cache, laid out exactly as the KV cache lays out its keys.

Letters: B batch, H query heads, T new tokens, S keys the attention call sees, d gate dim.

A "hidden" gate's keys are projections of hidden states that no KV cache keeps, so the gate keeps its own. Each
KV cache layer (a transformers ``CacheLayerMixin``: dynamic, static, sliding-window, ...) gets a *mirror*: a fresh
layer of the same class and sizes, updated with the gate keys (as its keys, and an empty (B, H, T, 0) tensor as
its values) whenever the model updates the original with K and V. The mirror then returns gate keys at the very
positions where the KV cache returns K: a StaticCache's full preallocated length (written in place at its
positions, zeros past them, which the attention mask excludes), a DynamicCache's concatenation, a sliding
window's trimming or rolling. No position is worked out here, so nothing reads the device: a static-cache step
stays free of host synchronisation (CUDA graphs, torch.compile). A mirror is an attribute of its KV cache layer
(``MIRROR``), so it lives as long as that layer and a new ``generate`` call starts a new gate cache. Under
torch.compile the mirror is then reached from the step's own input (the cache) and guarded as one: a new cache
of the same sizes reuses the compiled step. (Kept in a dictionary of this object's, weakly keyed by the layer,
each new cache invalidated the guards on its keys, and every ``generate`` call compiled its step again.)
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import StaticLayer

MIRROR = "_posthoc_sparse_gate_keys"  # the attribute of a KV cache layer that holds its gate keys' mirror layer


def _mirror(layer) -> object | None:
    """A fresh, empty cache layer of ``layer``'s class and sizes; None if the class cannot be built that way."""
    sizes = {}
    for name in ("max_cache_len", "sliding_window"):
        if isinstance(getattr(layer, name, None), int):
            sizes[name] = getattr(layer, name)
    if "sliding_window" not in sizes and getattr(layer, "is_sliding", False) and "max_cache_len" in sizes:
        sizes["sliding_window"] = sizes["max_cache_len"]  # a static sliding layer keeps only its effective length
    try:
        return type(layer)(**sizes)
    except TypeError:
        return None


class GateKeyCache:
    """Per KV cache layer, the gate keys of every position that layer holds."""

    def __init__(self):
        self._mirrors: list[weakref.ref] = []  # the mirrors made, in order, while their KV cache layers live
        self._plain: dict[int, torch.Tensor] = {}  # layers without a mirror: appended, trimmed to the key length

    def keys(self, layer: int, kv_layer, new: torch.Tensor, s: int) -> torch.Tensor:
        """Record ``new`` gate keys (B, H, T, d) of this call's T tokens; return all (B, H, S, d), aligned with the
        keys the attention call received. ``kv_layer``: the model's cache layer (None without a cache)."""
        if kv_layer is None:
            if new.shape[2] != s:
                raise RuntimeError(f"layer {layer}: {new.shape[2]} gate keys for {s} keys, and no KV cache to follow")
            return new
        mirror = getattr(kv_layer, MIRROR, False)
        if mirror is False:  # the layer's first call (a prefill, eager even under a compiled generate)
            mirror = _mirror(kv_layer)
            setattr(kv_layer, MIRROR, mirror)
            if mirror is not None:
                self._mirrors = [r for r in self._mirrors if r() is not None] + [weakref.ref(mirror)]
        if mirror is not None:
            empty = new.new_empty(*new.shape[:3], 0)  # (B, H, T, 0): values the mirror stores for nothing
            keys, _ = mirror.update(new.detach(), empty, {})
        else:
            keys = self._appended(layer, new.detach(), s)
        if keys.shape[2] != s:
            raise RuntimeError(f"gate key cache of layer {layer} holds {keys.shape[2]} keys, the KV cache {s}")
        return keys

    def static_mirror(self, kv_layer, new_shape: tuple, dtype: torch.dtype, s: int):
        """The mirror of ``kv_layer`` if it is a plain ``StaticLayer`` already holding (B, H, S, d) gate keys of
        ``dtype`` beside a device counter of its length (``cumulative_length``, what its ``update`` writes at and
        advances), for a caller that writes new keys itself at that position and then advances the counter as
        ``update`` would (``GateSelector.decode_inputs``: the rotary kernel writes them, no index_copy launches);
        None otherwise (``keys`` serves)."""
        mirror = getattr(kv_layer, MIRROR, None) if kv_layer is not None else None
        if type(mirror) is not StaticLayer or not getattr(mirror, "is_initialized", False):
            return None
        keys, pos = getattr(mirror, "keys", None), getattr(mirror, "cumulative_length", None)
        ok = (isinstance(keys, torch.Tensor) and isinstance(pos, torch.Tensor) and pos.numel() == 1
              and pos.device == keys.device and keys.dtype == dtype and keys.shape[2] == s
              and tuple(keys.shape[:2]) + (keys.shape[3],) == (new_shape[0], new_shape[1], new_shape[3]))
        return mirror if ok else None

    def mirrors(self) -> list:
        """The mirror layers alive (one per KV cache layer seen): their ``keys`` are the gate key cache."""
        return [m for m in (r() for r in self._mirrors) if m is not None]

    def _appended(self, layer: int, new: torch.Tensor, s: int) -> torch.Tensor:
        """Cache layers of a class the mirror cannot build: new keys appended, the last S kept (dynamic and
        dynamic sliding-window caches lay their keys out so)."""
        cached = self._plain.get(layer)
        keys = new if new.shape[2] >= s or cached is None else torch.cat((cached, new), dim=2)[:, :, -s:]
        self._plain[layer] = keys
        return keys
