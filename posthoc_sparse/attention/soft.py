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


def soft_probs(s: torch.Tensor, g: torch.Tensor, allowed: torch.Tensor, tau, k: int, standardize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft policy's probabilities for one query chunk, and the attention mass they put outside the gate's hard
    top-k with the number of rows that drop keys (a (2,) tensor): ``softmax(s + soft_topk_bias(g))``. s, g:
    (B, H, C, S) fp32; allowed: (B, 1|H, C, S) bool; tau a float or a 0-dim CPU tensor (one compiled graph serves
    every tau of an annealed schedule)."""
    bias, keep = soft_topk(g, allowed, k, tau, standardize=standardize)
    p = torch.nan_to_num(torch.softmax(s + bias, dim=-1), nan=0.0)  # (B, H, C, S)
    return p, torch.stack(mass_outside_keep(p, keep, allowed, k))


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
                 scores: str = "standardized", compile: bool = False):
        if k <= 0 or tau <= 0:
            raise ValueError(f"need k > 0 and tau > 0, got k={k}, tau={tau}")
        if scores not in SCORES:
            raise ValueError(f"scores must be one of {SCORES}, got {scores!r}")
        self.selector = GateSelector(bank)  # the gate's scores G, computed exactly as deployed top-k computes them
        self.k, self.tau, self.query_chunk, self.scores = k, tau, query_chunk, scores
        self._outside: list[torch.Tensor] = []  # [mass sum, rows] pairs of this step's calls, on the device
        # compile: the relaxation's elementwise work fused by torch.compile (inductor); equal to the eager path
        # within fp32 rounding (tested); tau goes in as a CPU scalar tensor so that annealing does not recompile
        self.compiled = compile
        self._probs = torch.compile(soft_probs, fullgraph=True, dynamic=False) if compile else soft_probs

    def __call__(self, call: LayerCall) -> torch.Tensor:
        prepared = self.selector.prepare(call)
        tau = torch.tensor(self.tau, dtype=torch.float32) if self.compiled else self.tau

        def probs(a: int, e: int, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            g = self.selector.select(prepared, a, e, s)  # (B, H, C, S)
            p, outside = self._probs(s, g, allowed, tau, self.k, self.scores == "standardized")
            self._outside.append(outside)
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
