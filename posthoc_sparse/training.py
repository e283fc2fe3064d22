"""What every training loop here shares (distill, pretrain, the unfreeze sweep): the learning-rate schedule, the
check that a resumed run has the checkpoint's settings (the learning rate and its schedule may change: a recorded
override), the divergence guard, and the versions record."""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from ._version import __version__
from .errors import UserError
from .io import fault_point


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up over ``warmup`` steps to ``lr``, then cosine
    decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def resume_settings(cfg, keys: tuple[str, ...], **resolved) -> dict:
    """The settings of ``cfg`` a checkpoint records, so that a resumed run can be checked against them; ``resolved``
    adds values fixed at run time (e.g. the dtype that ``auto`` became)."""
    return {key: getattr(cfg, key) for key in keys} | resolved


def check_resume(saved: dict, cfg, keys: tuple[str, ...], checkpoint: Path, *, resolved: dict | None = None,
                 overridable: tuple[str, ...] = ()) -> dict:
    """Refuse to resume ``checkpoint`` when a setting in ``keys`` (or ``resolved``) differs between it (``saved``)
    and this run, listing them. Those in ``overridable`` (the learning rate and its schedule) may change: returns
    the ones that did, ``{key: [checkpoint's, now]}``, for the run to report and record."""
    now = {key: getattr(cfg, key) for key in keys} | (resolved or {})
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}" for key, value in now.items()
             if key not in overridable and saved.get(key) != value]
    if diffs:
        raise UserError(f"cannot resume {checkpoint}: settings differ ({'; '.join(diffs)}); rerun with the "
                        "checkpoint's settings, or with --overwrite instead of --resume to start over")
    return {key: [saved.get(key), value] for key, value in now.items() if key in overridable and saved.get(key) != value}


def nested_error(error: UserError, command: str, passed: tuple[str, ...], fix: str) -> UserError:
    """``error`` of a run that a command started for itself (the sweep's own distillation), its advice made true
    for that command: the flags it names that the command does not pass on (those not in ``passed``) are said to
    be ``command``'s, followed by ``fix``; an error naming no such flag is returned as it is."""
    foreign = [f for f in dict.fromkeys(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", str(error))) if f not in passed]
    if not foreign:
        return error
    return type(error)(f"{error} ({', '.join(foreign)} {'is a flag' if len(foreign) == 1 else 'are flags'} of "
                       f"`{command}`: {fix})")


STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"  # a training checkpoint (distill/checkpoint.py)
START_OVER = "rerun with --overwrite instead of --resume to start over"  # when a checkpoint cannot be resumed


def checkpoint_status(folder: Path) -> tuple[int, bool] | None:
    """(step, whether every parameter is finite) of the training checkpoint in ``folder``; None without one."""
    from safetensors.torch import load_file

    try:
        step = json.loads((Path(folder) / STATE_JSON).read_text())["meta"]["step"]
        tensors = load_file(str(Path(folder) / STATE_TENSORS))
    except Exception:  # missing, or not a readable checkpoint
        return None
    finite = all(bool(torch.isfinite(t).all()) for k, t in tensors.items() if k.startswith("params."))
    return step, finite


def stop_advice(checkpoint: Path | None) -> str:
    """What to do after a run blew up: resume the last checkpoint when it exists and is finite, else start over."""
    if checkpoint is None:
        return "lower --lr"
    status = checkpoint_status(checkpoint)
    if status is None:
        return "no checkpoint was saved before that; rerun with a lower --lr"
    if not status[1]:
        return f"the checkpoint in {checkpoint} holds non-finite weights; rerun with a lower --lr and --overwrite"
    return f"the last good checkpoint (step {status[0]}) is in {checkpoint}: rerun with --resume and a lower --lr"


def check_finite(losses: torch.Tensor | float, step: int, what: str = "the loss",
                 checkpoint: Path | None = None) -> None:
    """Stop with a UserError when ``losses`` (one number, or one per layer) is not finite at 0-based ``step``."""
    values = torch.as_tensor(losses)
    bad = ~torch.isfinite(values)
    if not bad.any():
        return
    where = f" in layer {int(bad.flatten().nonzero()[0])}" if values.dim() else ""
    raise UserError(f"{what} became non-finite at step {step + 1}{where}; {stop_advice(checkpoint)}")


class DivergenceGuard:
    """Stops a run whose loss has clearly blown up, before it writes anything final: a non-finite loss, or a mean
    loss over the last ``WINDOW`` steps above ``ratio`` times the loss of the run's first step (taken before any
    update, so a learning rate that blows up at once is still measured against a sane start; ``ratio`` 0: the
    non-finite check only). The error names the last good checkpoint (one that exists and is finite, see
    ``stop_advice``); the loops write a checkpoint only while ``healthy()``, so that one predates the blow-up and
    resuming it with a lower --lr works. ``start`` survives a resume in the checkpoint."""

    WINDOW = 10

    def __init__(self, ratio: float, checkpoint: Path | None = None, start: float | None = None):
        self.ratio, self.checkpoint, self.start = ratio, checkpoint, start
        self.recent: deque[float] = deque(maxlen=self.WINDOW)

    def check(self, losses: torch.Tensor | float, step: int, what: str = "the loss") -> None:
        """Check the loss (one number, or one per layer) of 0-based ``step``."""
        check_finite(losses, step, what, self.checkpoint)
        loss = float(torch.as_tensor(losses).double().mean())
        if self.start is None:
            self.start = loss
        self.recent.append(loss)
        mean = sum(self.recent) / len(self.recent)
        if self.ratio and self.start > 0 and len(self.recent) == self.WINDOW and mean > self.ratio * self.start:
            raise UserError(f"{what} diverged by step {step + 1}: {mean:.4g} over the last {self.WINDOW} steps, "
                            f"{mean / self.start:.3g} times its start ({self.start:.4g}); "
                            f"{stop_advice(self.checkpoint)}")

    def healthy(self) -> bool:
        """Whether the last loss is within ``ratio`` times the start: a checkpoint now is worth resuming."""
        return not self.ratio or not self.recent or self.recent[-1] <= self.ratio * (self.start or 0)


def after_step(step: int, total: int, every: int, guard: DivergenceGuard, run, checkpoint,
               sync: Callable[[], None] | None = None) -> None:
    """The end of a training step (1-based ``step`` of ``total``): the periodic ``checkpoint(step)`` every
    ``every`` steps, and after a Ctrl-C (``run.stop_requested``, see ``runs.OutputRun``) a checkpoint of this step
    and the stop. Only while ``guard`` finds the loss healthy: the last checkpoint stays the last good one.
    ``sync`` (a loop that reads its losses back late) brings ``guard`` up to this step before that decision."""
    fault_point("step")
    if step % every == 0 and step < total or run.stop_requested:
        if sync is not None:
            sync()
        if guard.healthy():
            checkpoint(step)
    if run.stop_requested:
        raise KeyboardInterrupt


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


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of training step ``step`` in process ``rank``: the same after a resume; different in every process
    of a data-parallel run, so that each process's windows get their own dropout masks (and stochastic top-k masks);
    process 0's is a one-process run's. With dropout or stochastic masks, N processes are therefore another draw
    of the same recipe, not the same numbers as one process."""
    return seed * 1_000_003 + step + rank * 1_000_000_007
