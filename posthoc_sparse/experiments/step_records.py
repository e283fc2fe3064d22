"""The per-step numbers of ``sparsify pretrain``'s loop, kept on the device and read back in one transfer every
few steps.

A read of a GPU number (``float(loss)``) makes the host wait for the step's last kernel, so the host cannot queue
the next step's kernels while the GPU runs this one; at the 31M model's size the host's launches are as long as
the GPU's work (docs/absorb.md, "Training speed"), and a read per step costs about a third of the time. The loop
adds each step's tensors here and calls ``flush`` every ``every`` steps and before anything that needs the
numbers (a held-out evaluation, a checkpoint, a stop, the end): only then are the losses checked for divergence,
the gate's gradient counted, the history written and the step events emitted, in step order, exactly as a read
per step would have done them. A diverged loss is found up to ``every`` steps late; no checkpoint is written in
between, since every checkpoint comes after a flush.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..training import DivergenceGuard


@dataclass
class _Step:
    step: int  # 1-based
    lr: float
    loss: torch.Tensor  # 0-dim
    grad_norm: torch.Tensor | None
    gate_grad: torch.Tensor | None  # None: no gradient reached the gate
    mass: torch.Tensor | None  # (2,): attention mass outside the gate's top-k summed over rows, and the rows
    tau: float | None


class StepRecords:
    """Pending steps and what a flush does with them (see the module's docstring). ``gate_stats`` (or None, no
    gate in the loop) and ``history``, ``losses`` are the loop's own and are updated in place."""

    def __init__(self, every: int, guard: DivergenceGuard, gate_stats: dict | None, history: list, losses: list,
                 total: int, tokens_per_step: int, log: Callable[[dict, int], None], emit: Callable[[str, dict], None]):
        """``every``: the loop's ``log_every``, both how often it reads back and how often history gets an entry."""
        self.every, self.guard, self.gate_stats, self.history, self.losses = every, guard, gate_stats, history, losses
        self.total, self.tokens_per_step = total, tokens_per_step
        self.log, self.emit = log, emit
        self.pending: list[_Step] = []
        self.since = time.perf_counter()

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor | None,
            gate_grad: torch.Tensor | None, mass: torch.Tensor | None, tau: float | None) -> None:
        self.pending.append(_Step(step, lr, loss.detach(), grad_norm, gate_grad, mass, tau))

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def restart_clock(self) -> None:
        """Leave what ran since the last flush (an evaluation, a checkpoint) out of the next steps' time."""
        self.since = time.perf_counter()

    def flush(self) -> None:
        """Read every pending number in one transfer, then check, count, record and emit each step in order."""
        if not self.pending:
            return
        values, slots, n = [], [], 0
        for p in self.pending:
            row = {}
            for name in ("loss", "grad_norm", "gate_grad", "mass"):
                t = getattr(p, name)
                if t is not None:
                    row[name] = n  # where its first number lands in the flat read-back
                    values.append(t.float().reshape(-1))
                    n += values[-1].numel()
            slots.append(row)
        flat = torch.cat([v.to(values[0].device) for v in values]).tolist()  # waits for the GPU's last step
        dt = (time.perf_counter() - self.since) / len(self.pending)  # the steps ran back to back: an even share
        pending, self.pending = self.pending, []
        for p, row in zip(pending, slots):
            loss = flat[row["loss"]]
            self.guard.check(loss, p.step - 1)
            self.losses.append(loss)
            entry = {"step": p.step, "loss": loss, "lr": p.lr, "seconds": dt,
                     "tokens_per_second": self.tokens_per_step / dt,
                     "grad_norm": flat[row["grad_norm"]] if "grad_norm" in row else None}
            if self.gate_stats is not None:
                gate = flat[row["gate_grad"]] if "gate_grad" in row else None
                self.gate_stats["steps"] += 1
                if gate is not None:
                    self.gate_stats["steps_with_gradient"] += 1
                    self.gate_stats["max_norm"] = max(self.gate_stats["max_norm"], gate)
                    self.gate_stats["sum_norm"] += gate
                entry["gate_grad_norm"] = gate  # None: no gradient reached the gate at all
            if p.tau is not None:  # this process's rows: the mean over layers, heads and rows with > k keys
                total, rows = (flat[row["mass"]], flat[row["mass"] + 1]) if "mass" in row else (0.0, 0.0)
                entry |= {"mass_outside": total / rows if rows else None, "tau": p.tau}
            if self.due(p.step):
                recent = self.losses[-self.every:]
                self.history.append(entry | {"loss_mean": sum(recent) / len(recent)})
            self.log({k: v for k, v in entry.items() if k != "step"}, p.step)
            self.emit("step", entry | {"total": self.total})
        self.restart_clock()
