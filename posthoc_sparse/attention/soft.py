"""End-to-end soft gating, for training with a gate in the loop (``sparsify pretrain --gate-mode soft-*``).

Letters: B batch, H query heads, C query chunk, S keys.
"""

from __future__ import annotations

import torch

from ..gates.modules import GateBank
from .call import LayerCall, chunked_attention
from .reference import mass_outside_keep, soft_topk
from .selectors import GateSelector

SCORES = ("standardized", "raw")


class SoftGatePolicy:
    """End-to-end soft gating: the scores plus ``soft_topk_bias`` of the gate's scores, softmax over the
    allowed keys. Differentiable in the model's q, k, v and in the gate (when its parameters require grad).
    Used only for training with a gate in the loop (``sparsify pretrain --gate-mode soft-*``), never deployed.

    ``tau`` may be changed between steps (an annealed temperature). Every call adds to the attention mass
    that falls outside the gate's hard top-k (over all layers, heads and rows with more than k allowed
    keys); ``take_mass_outside()`` returns the sum and the rows since the last take, on the device.
    """

    needs_inputs = True

    def __init__(self, bank: GateBank, k: int, tau: float = 1.0, query_chunk: int | None = None,
                 scores: str = "standardized"):
        if k <= 0 or tau <= 0:
            raise ValueError(f"need k > 0 and tau > 0, got k={k}, tau={tau}")
        if scores not in SCORES:
            raise ValueError(f"scores must be one of {SCORES}, got {scores!r}")
        self.selector = GateSelector(bank)  # the gate's scores G, computed exactly as deployed top-k computes them
        self.k, self.tau, self.query_chunk, self.scores = k, tau, query_chunk, scores
        self._outside: list[torch.Tensor] = []  # [mass sum, rows] pairs of this step's calls, on the device

    def __call__(self, call: LayerCall) -> torch.Tensor:
        prepared = self.selector.prepare(call)

        def probs(a: int, e: int, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            g = self.selector.select(prepared, a, e, s)  # (B, H, C, S)
            bias, keep = soft_topk(g, allowed, self.k, self.tau, standardize=self.scores == "standardized")
            p = torch.nan_to_num(torch.softmax(s + bias, dim=-1), nan=0.0)  # (B, H, C, S)
            self._outside.append(torch.stack(mass_outside_keep(p, keep, allowed, self.k)))
            return p

        return chunked_attention(call, probs, self.query_chunk)

    def take_mass_outside(self) -> torch.Tensor | None:
        """The attention mass outside the gate's top-k summed over the rows seen since the last take, and the number
        of those rows: a (2,) tensor on the device, read by the caller when it likes (None: no rows seen)."""
        if not self._outside:
            return None
        sums = torch.stack(self._outside).sum(0)
        self._outside.clear()
        return sums
