"""What distillation records from a dense forward: each layer's q, k, mask and gate inputs (``RecordPolicy``),
optionally into one stack of shared buffers (``RecordStack``) so that all layers' losses run as one batch.

Letters: B batch, H query heads, Hkv key/value heads, T queries, S keys, C hidden width, D head_dim, L layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..ops.attention_lse import flash_attention_lse, flash_lse_ok
from .call import LayerCall
from .policies import DensePolicy
from .reference import allowed_keys

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
    distillation can treat all layers as one batch (``distill.layer_loss.fused_stacked_losses``)."""

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
    """Dense attention that also records each layer's q, k, mask and gate inputs for distillation.

    On CUDA plain-causal prefill (no observer) the attention runs through ``flash_attention_lse`` and the record
    keeps the teacher's log-sum-exp, so the fused KL needs no teacher pass. ``stack_layers`` = L: those layers'
    q, k, x and lse are copied into one ``RecordStack`` per forward (``clear()`` starts the next)."""

    needs_inputs = True

    def __init__(self, stack_layers: int = 0):
        super().__init__()
        self.records: dict[int, LayerRecord] = {}
        self.stack_layers = stack_layers
        self.stack: RecordStack | None = None
        self.cudnn_in_capture = True

    @contextlib.contextmanager
    def flash_in_capture(self):
        """Within: flash attention, not cuDNN, while a stream captures (some torch builds refuse cuDNN there)."""
        self.cudnn_in_capture = False
        try:
            yield
        finally:
            self.cudnn_in_capture = True

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
            out, rec.lse = flash_attention_lse(call.query, call.key, call.value, call.scaling, self.cudnn_in_capture)
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
