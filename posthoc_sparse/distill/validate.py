"""Validation during distillation: open-loop recall@k of gates against the oracle on held-out windows.

Letters: B batch, H query heads, T queries, S keys, C query chunk, d gate dim.
"""

from __future__ import annotations

import torch

from ..attention.call import query_chunk_size
from ..attention.interface import SparseAttention
from ..attention.recording import RecordPolicy
from ..attention.reference import scores, topk_keep
from ..attention.routing import RoutingStats
from ..gates.modules import GateBank
from ..loading import decoder_of


@torch.no_grad()
def open_loop_recall(model, windows: torch.Tensor, banks: dict[str, GateBank], k: int, batch_size: int,
                     device) -> dict[str, RoutingStats]:
    """Recall@k of each bank's selection against the oracle on a dense (open-loop) pass over ``windows``."""
    n_layers = len(next(iter(banks.values())).layers)
    stats = {name: RoutingStats(k, n_layers) for name in banks}
    policy = RecordPolicy()
    with SparseAttention(model, policy):
        for i in range(0, len(windows), batch_size):
            decoder_of(model)(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            for layer, rec in sorted(policy.records.items()):
                projected = {n: bk.layers[layer].project(rec.x, rec.query, rec.key, rec.cos, rec.sin)
                             for n, bk in banks.items()}  # (B, H, T, d), (B, H, S, d)
                t = rec.query.shape[2]
                step = query_chunk_size(*rec.query.shape[:2], rec.key.shape[2])
                for a in range(0, t, step):
                    e = min(t, a + step)
                    s = scores(rec.query[:, :, a:e], rec.key, rec.scaling, rec.softcap)  # (B, H, C, S)
                    allowed = rec.allowed(a, e)
                    for name, (gq, gk) in projected.items():
                        g = torch.matmul(gq[:, :, a:e].float(), gk.float().transpose(-1, -2))
                        stats[name].observe(layer, s, allowed, topk_keep(g, allowed, k))
            policy.clear()
    return stats
