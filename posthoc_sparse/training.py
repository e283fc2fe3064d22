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


TENSORBOARD_DIR = "tensorboard"  # OUTPUT/tensorboard: `tensorboard --logdir OUTPUT`


def check_report_to(report_to: str) -> None:
    """One clear UserError for an unknown tracker, or one whose package is not installed."""
    from .config import REPORT_TO

    if report_to not in REPORT_TO:
        raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to == "tensorboard" and not is_tensorboard_available():
        raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    if report_to == "wandb" and not is_wandb_available():
        raise UserError("--report-to wandb needs the wandb package: pip install wandb (or use --report-to "
                        "tensorboard)")


class Tracker:
    """Accelerate's tracker for ``report_to`` (``accelerate.tracking``), on the main process only: the run's
    settings once, then numbers per step (``log``). ``report_to="none"`` or ``enabled=False``: does nothing."""

    def __init__(self, report_to: str, output: Path, run_name: str, config: dict, enabled: bool = True):
        self.tracker = None
        if report_to == "none" or not enabled:
            return
        check_report_to(report_to)
        from accelerate import tracking

        if report_to == "tensorboard":
            tracker = tracking.TensorBoardTracker(TENSORBOARD_DIR, str(output))
        else:
            tracker = tracking.WandBTracker(run_name, dir=str(output))
        tracker.start()
        tracker.store_init_configuration({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                          for k, v in config.items()})
        self.tracker = tracker

    def log(self, values: dict, step: int) -> None:
        """Log the finite numbers of ``values`` at ``step`` (None and NaN are left out)."""
        if self.tracker is None:
            return
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            self.tracker.log(numbers, step=step)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
