"""End-to-end soft gating, for training with a gate in the loop (``sparsify pretrain --gate-mode soft-*``).

Letters: B batch, H query heads, C query chunk, S keys.
"""

from __future__ import annotations

import torch

from ..gates.modules import GateBank
from .call import LayerCall, chunked_attention
from .reference import soft_topk_bias
from .selectors import GateSelector

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
