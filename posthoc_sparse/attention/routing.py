"""Routing metrics accumulated chunk by chunk from inside the attention function (an observer).

Letters: B batch, H query heads, C a chunk of queries, S keys.
Per layer: recall and F1 of the selection against the oracle top-k of the same layer's scores, attention
mass kept (dense softmax probability on the kept keys, averaged over query rows), kept and allowed pairs
(for the causal-pairs sparsity) and, for dense passes, the share of attention on the first key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import masked_softmax, topk_keep

_FIELDS = ("inter", "oracle", "selected", "mass", "rows", "kept", "allowed", "first")


@dataclass
class RoutingStats:
    """Running sums per layer; ``observe`` is the observer handed to a policy."""

    k: int
    num_layers: int
    sums: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self):
        self.sums = {f: [0.0] * self.num_layers for f in _FIELDS}

    def observe(self, layer: int, s: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor | None) -> None:
        allowed = allowed.expand_as(s)  # (B, H, C, S)
        p = masked_softmax(s, allowed)  # dense probabilities (B, H, C, S)
        rows = allowed.any(-1)
        add = self.sums
        add["rows"][layer] += float(rows.sum())
        add["allowed"][layer] += float(allowed.sum())
        if keep is None:  # dense pass: the attention-sink statistic
            add["first"][layer] += float(p[..., 0].sum())
            return
        oracle = topk_keep(s, allowed, self.k)
        add["inter"][layer] += float((keep & oracle).sum())
        add["oracle"][layer] += float(oracle.sum())
        add["selected"][layer] += float(keep.sum())
        add["kept"][layer] += float(keep.sum())
        add["mass"][layer] += float((p * keep).sum())

    def per_layer(self) -> list[dict]:
        out = []
        for i in range(self.num_layers):
            g = {f: self.sums[f][i] for f in _FIELDS}
            rec = g["inter"] / g["oracle"] if g["oracle"] else float("nan")
            prec = g["inter"] / g["selected"] if g["selected"] else float("nan")
            row = {"layer": i}
            if g["oracle"]:
                row |= {
                    "recall": rec, "precision": prec,
                    "f1": 2 * rec * prec / (rec + prec) if rec + prec else 0.0,
                    "mass": g["mass"] / g["rows"], "sparsity_causal": 1 - g["kept"] / g["allowed"],
                }
            else:
                row |= {"first_token_share": g["first"] / g["rows"] if g["rows"] else float("nan")}
            out.append(row)
        return out

    def overall(self) -> dict:
        tot = {f: sum(self.sums[f]) for f in _FIELDS}
        if not tot["oracle"]:
            return {"first_token_share": tot["first"] / tot["rows"] if tot["rows"] else float("nan")}
        rec, prec = tot["inter"] / tot["oracle"], tot["inter"] / tot["selected"]
        return {
            "recall": rec, "precision": prec, "f1": 2 * rec * prec / (rec + prec) if rec + prec else 0.0,
            "mass": tot["mass"] / tot["rows"], "sparsity_causal": 1 - tot["kept"] / tot["allowed"],
        }
