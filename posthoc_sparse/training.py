"""What every training loop here shares (distill, pretrain, the unfreeze sweep): the learning-rate schedule, the
check that a resumed run has the checkpoint's settings, the finite-loss check, and the versions record."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ._version import __version__
from .errors import UserError


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up over ``warmup`` steps to ``lr``, then cosine
    decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def resume_settings(cfg, keys: tuple[str, ...]) -> dict:
    """The settings of ``cfg`` a checkpoint records, so that a resumed run can be checked against them."""
    return {key: getattr(cfg, key) for key in keys}


def check_resume(saved: dict, cfg, keys: tuple[str, ...], checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` when a setting in ``keys`` differs between it (``saved``) and ``cfg``."""
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {getattr(cfg, key)!r}" for key in keys
             if saved.get(key) != getattr(cfg, key)]
    if diffs:
        raise UserError(f"cannot resume {checkpoint}: settings differ ({'; '.join(diffs)})")


def check_finite(losses: torch.Tensor | float, step: int, what: str = "the loss",
                 checkpoint: Path | None = None) -> None:
    """Stop with a UserError when ``losses`` (one number, or one per layer) is not finite at 0-based ``step``."""
    values = torch.as_tensor(losses)
    bad = ~torch.isfinite(values)
    if not bad.any():
        return
    where = f" in layer {int(bad.flatten().nonzero()[0])}" if values.dim() else ""
    advice = (f"the last good checkpoint is in {checkpoint} (lower --lr and rerun with --resume)"
              if checkpoint is not None else "lower --lr")
    raise UserError(f"{what} became non-finite at step {step + 1}{where}; {advice}")


def versions() -> dict:
    """The versions a report records."""
    import transformers

    return {"posthoc_sparse": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
