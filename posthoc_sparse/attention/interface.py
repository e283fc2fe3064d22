"""The one attention function this project registers with transformers' AttentionInterface.

``SparseAttention(model, policy)`` switches a model to it (``model.set_attn_implementation``), binds each
attention module to the policy, captures the attention block's input with a forward pre-hook where the
policy needs it, and restores the previous implementation on ``remove()`` (or on leaving a ``with`` block).
Nothing inside transformers is rebound: the function is looked up by name like SDPA or flash attention.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ..errors import UserError
from .call import LayerCall

IMPL_NAME = "posthoc_sparse"


@dataclass
class _Binding:
    policy: object
    layer: int
    captured: dict


_BINDINGS: weakref.WeakKeyDictionary[nn.Module, _Binding] = weakref.WeakKeyDictionary()


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface entry point: dispatch to the policy bound to this module (SDPA if none)."""
    binding = _BINDINGS.get(module)
    if binding is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    cap = binding.captured
    t, s = query.shape[2], key.shape[2]
    cached = None
    if attention_mask is None and 1 < t < s:
        # a prompt's prefill into an empty preallocated (static) cache: transformers leaves the mask to SDPA's
        # causal alignment from the first key, under which no query sees a key past T (empty slots). The policies
        # read a None mask as plain causal over as many keys as queries: hand them those T keys
        key, value, cached = key[:, :, :t], value[:, :, :t], s
    call = LayerCall(
        module=module, layer=binding.layer, query=query, key=key, value=value, attention_mask=attention_mask,
        scaling=float(scaling), dropout=dropout, kwargs=kwargs, x=cap.get("x"), cos=cap.get("cos"), sin=cap.get("sin"),
        cache=_cache_layer(cap.get("cache"), getattr(module, "layer_idx", None)), cached_keys=cached,
    )
    cap.clear()
    return binding.policy(call), None


_PLAIN_CAUSAL = {"depth": 0}


@contextlib.contextmanager
def plain_causal_prefill():
    """Within: the caller promises that every forward is plain causal prefill of whole windows (input ids only:
    no padding mask, no packed sequences, no cache), so ``_mask`` returns None (SDPA's causal kernels) for full
    attention layers without looking at the inputs. ``graphs.ShapeGraphs`` captures its CUDA graphs inside it:
    while a stream captures, transformers cannot read the position ids to rule out packed sequences and would
    build an explicit (B, 1, T, T) mask instead."""
    _PLAIN_CAUSAL["depth"] += 1
    try:
        yield
    finally:
        _PLAIN_CAUSAL["depth"] -= 1


def _mask(*args, **kwargs):
    """SDPA's mask builder; inside ``plain_causal_prefill()``, None for causal attention over as many queries as
    keys (no padding mask, no offset, no local window shorter than the keys), as SDPA's builder returns eagerly
    for such windows. (Models that add to the mask, ALiBi say, get a mask eagerly too: ``StepGraphs`` captures
    only steps whose eager run took the maskless path, and checks that the capture took it again.)"""
    local = kwargs.get("local_size")
    if not args and _PLAIN_CAUSAL["depth"]:
        if (kwargs.get("attention_mask") is None and (local is None or kwargs.get("kv_length", local) < local)
                and kwargs.get("q_length") is not None and kwargs.get("q_length") == kwargs.get("kv_length")
                and isinstance(kwargs.get("q_offset", 0), int) and kwargs.get("q_offset", 0) == 0
                and isinstance(kwargs.get("kv_offset", 0), int) and kwargs.get("kv_offset", 0) == 0):
            return None
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def register() -> None:
    """Register the attention function and its mask builder (SDPA's boolean masks, ``_mask``). Idempotent."""
    AttentionInterface.register(IMPL_NAME, _attention_forward)
    AttentionMaskInterface.register(IMPL_NAME, _mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, ordered by ``layer_idx``."""
    found = {}
    for mod in model.modules():
        idx = getattr(mod, "layer_idx", None)
        name = type(mod).__name__
        if isinstance(idx, int) and name.endswith("Attention") and "Rotary" not in name:
            found.setdefault(idx, mod)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not found or (n_layers is not None and sorted(found) != list(range(n_layers))):
        raise UserError(
            f"{type(model).__name__}: could not find one attention module with a layer_idx per layer "
            f"(found {sorted(found)}); its attention does not go through transformers' AttentionInterface"
        )
    return [found[i] for i in sorted(found)]


def _cache_layer(cache, layer_idx: int | None):
    """The cache layer of ``layer_idx`` in a transformers ``Cache`` (its ``layers``), or None."""
    layers = getattr(cache, "layers", None)
    if layers is None or not isinstance(layer_idx, int) or layer_idx >= len(layers):
        return None
    return layers[layer_idx]


def _capture_hook(captured: dict):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        captured["x"] = x
        # the KV cache (transformers >= 5.24 names the argument "cache", earlier versions "past_key_values")
        captured["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))
        pe = kwargs.get("position_embeddings")
        if pe is None and len(args) > 1 and isinstance(args[1], tuple):
            pe = args[1]
        if pe is not None:
            captured["cos"], captured["sin"] = pe
        return None

    return hook


class SparseAttention:
    """Route a model's attention through ``policy`` until ``remove()``; usable as a context manager.

    ``policy`` is one object for all layers, or a dict ``{layer: policy}`` (layers not named stay dense).
    """

    def __init__(self, model: nn.Module, policy):
        from .policies import DensePolicy

        register()
        if not model._can_set_attn_implementation():
            raise UserError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface")
        self.model = model
        self.modules = attention_modules(model)
        self.previous = model.config._attn_implementation
        self._hooks = []
        self._outer = {mod: _BINDINGS.get(mod) for mod in self.modules}  # restored on remove: handles nest
        for i, mod in enumerate(self.modules):
            pol = policy.get(i, DensePolicy()) if isinstance(policy, dict) else policy
            binding = _Binding(policy=pol, layer=i, captured={})
            _BINDINGS[mod] = binding
            if getattr(pol, "needs_inputs", False):
                self._hooks.append(mod.register_forward_pre_hook(_capture_hook(binding.captured), with_kwargs=True))
        model.set_attn_implementation(IMPL_NAME)
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        for h in self._hooks:
            h.remove()
        for mod in self.modules:
            if self._outer[mod] is None:
                _BINDINGS.pop(mod, None)
            else:
                _BINDINGS[mod] = self._outer[mod]
        self.model.set_attn_implementation(self.previous)
        self.active = False

    def __enter__(self) -> SparseAttention:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


__all__ = ["IMPL_NAME", "SparseAttention", "attention_modules", "plain_causal_prefill", "register"]
