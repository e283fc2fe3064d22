"""A gate in the training loop (the routing-absorption experiments, docs/absorb.md): the policy each gate mode
trains under, the gate's gradient norm, and the trained gate saved as a gate folder."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .pretrain import PretrainConfig


def training_gate(cfg: PretrainConfig, model):
    """The gate in the loop and the attention policy that applies it, or (None, None) for dense training.

    The gate is the "hidden" gate of docs/method.md at ``gate_d_g`` dims, seeded random init (``cfg.seed``), so a
    soft-learned and a soft-random run of one seed start from the same gate; only the learned one trains.
    """
    from ..attention.policies import TopKPolicy
    from ..attention.selectors import GateSelector, RandomScoreSelector
    from ..attention.soft import SoftGatePolicy
    from ..gates.io import gate_spec_for_model
    from ..gates.modules import GateBank

    if cfg.gate_mode == "dense":
        return None, None
    if cfg.gate_mode == "stochastic":
        return None, TopKPolicy(RandomScoreSelector(), cfg.gate_k)
    bank = GateBank(gate_spec_for_model(model, cfg.gate_d_g, "hidden", flag="--gate-d-g")).reset_random(cfg.seed)
    if cfg.gate_mode == "soft-random":
        bank.requires_grad_(False)
    if cfg.gate_mode == "hard-topk":
        return bank, TopKPolicy(GateSelector(bank), cfg.gate_k)
    return bank, SoftGatePolicy(bank, cfg.gate_k, soft_tau(cfg, 0, cfg.steps), scores=cfg.gate_scores,
                                compile=cfg.gate_compile)


def soft_tau(cfg: PretrainConfig, step: int, total: int) -> float:
    """The soft relaxation's temperature at ``step`` of ``total``: ``gate_tau``, annealed geometrically to
    ``gate_tau_end`` at the last step when that is set (> 0)."""
    if not cfg.gate_tau_end or total <= 1:
        return cfg.gate_tau
    return cfg.gate_tau * (cfg.gate_tau_end / cfg.gate_tau) ** (min(step, total - 1) / (total - 1))


def mass_outside_summary(history: list[dict]) -> dict | None:
    """The soft runs' attention mass outside the gate's top-k, from the logged history: the first and last
    logged values, the mean over the last 10% of logged steps, and the curve [[step, mass, tau], ...]."""
    curve = [[h["step"], h["mass_outside"], h["tau"]] for h in history if h.get("mass_outside") is not None]
    if not curve:
        return None
    tail = curve[-max(1, len(curve) // 10):]
    return {"first": curve[0][1], "last": curve[-1][1], "last_10pct_mean": sum(c[1] for c in tail) / len(tail),
            "curve": curve}


def gate_grad_norm_tensor(bank) -> torch.Tensor | None:
    """The L2 norm of the gate's gradient after a backward pass, as a 0-dim tensor on the device (read back later,
    see ``step_records``): None when no gradient reached any gate parameter (no path from the loss to the gate),
    else the norm (which may be exactly 0.0)."""
    grads = [p.grad for p in bank.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.sqrt(sum(g.detach().float().pow(2).sum() for g in grads))


def save_gate(path: Path, bank, model, cfg: PretrainConfig, step: int) -> None:
    """The gate trained (or carried) in the loop, as a gate folder ``sparsify eval --gates`` accepts."""
    from ..gates.io import save_gates
    from ..loading import model_fingerprint

    save_gates(path, bank.cpu(), {
        "base_model": str(cfg.output), "model_fingerprint": model_fingerprint(model.config),
        "model_type": model.config.model_type, "architecture": type(model).__name__, "gate_init": "random",
        "k": cfg.gate_k, "loss": f"lm:{cfg.gate_mode}", "steps": step, "seed": cfg.seed, "random_seed": cfg.seed + 1,
        "dataset": cfg.dataset, "seq_len": cfg.seq_len})
