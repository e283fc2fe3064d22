"""Data parallelism over the processes that `torchrun` or `accelerate launch` started (Accelerate's PartialState).

Every process holds the whole frozen model on its own device and works on its own share of the windows; the
few numbers that must agree (gate gradients, loss sums, token counts, routing sums) are all-reduced. With one
process (a plain `python` or `sparsify` call) every helper here is a no-op, so the same code serves both.
Only the main process writes files and reports progress.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from .errors import UserError
from .devices import resolve_device

__all__ = ["Processes", "is_main_process"]


class Processes:
    """This process's place among the launched processes, and the collectives the workflows need.

    ``device`` is what the user asked for (``auto``, ``cpu``, ``cuda``, ``cuda:N``): ``cpu`` joins a gloo
    group (CPU test runs: ``torchrun --nproc_per_node 2``), anything else the launcher's NCCL group.
    """

    def __init__(self, device: str = "auto"):
        from accelerate import PartialState

        self.cpu = resolve_device(device) == "cpu"
        self.state = PartialState(cpu=self.cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.requested = device

    def model_device(self) -> str:
        """The device this process loads the model on: with several processes, its own GPU (LOCAL_RANK)."""
        if self.world == 1 or self.cpu:
            return self.requested
        if self.requested in ("auto", "cuda"):
            return str(self.state.device)
        raise UserError(f"--device {self.requested} would put all {self.world} processes on one GPU; use "
                        "--device auto, so that each process takes its own GPU")

    def check_device_map(self, device_map: str | None) -> None:
        if device_map is not None and self.world > 1:
            raise UserError(f"--device-map {device_map} spreads one model over this process's GPUs; it cannot be "
                            f"combined with {self.world} data-parallel processes: launch one process")

    def shard(self, items):
        """This process's share of ``items`` (every world-th item from its rank): disjoint, together all."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``values`` in place across processes and return it."""
        if self.world > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return values

    def sum_floats(self, values: list[float]) -> list[float]:
        """The element-wise sum over processes of a list of Python floats (fp64 on the wire)."""
        if self.world == 1:
            return list(values)
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=self.state.device)).tolist()

    def sum_tables(self, sums: dict[str, list[float]]) -> dict[str, list[float]]:
        """Sum a ``{name: [float, ...]}`` table (e.g. ``RoutingStats.sums``) over processes, in one call."""
        if self.world == 1:
            return sums
        keys = sorted(sums)
        flat = self.sum_floats([x for key in keys for x in sums[key]])
        out, i = {}, 0
        for key in keys:
            out[key] = flat[i : i + len(sums[key])]
            i += len(sums[key])
        return out

    def average_gradients(self, params: Iterable[torch.nn.Parameter], *extra: torch.Tensor,
                          bucket_elements: int = 1 << 26) -> list[torch.Tensor]:
        """Replace each parameter's gradient by its mean over processes (a missing gradient counts as zeros);
        ``extra`` tensors (e.g. per-layer losses) are averaged alongside and returned. Few collectives: the
        tensors travel flattened, in buckets of up to ``bucket_elements`` elements per dtype and device."""
        if self.world == 1:
            return [t.clone() for t in extra]
        params = list(params)
        for p in params:
            if p.grad is None:  # every process must send the same tensors
                p.grad = torch.zeros_like(p)
        tensors = [p.grad for p in params] + [t.clone() for t in extra]
        groups: dict[tuple, list[list[torch.Tensor]]] = {}
        for t in tensors:
            buckets = groups.setdefault((t.dtype, t.device), [[]])
            if buckets[-1] and sum(x.numel() for x in buckets[-1]) + t.numel() > bucket_elements:
                buckets.append([])
            buckets[-1].append(t)
        for buckets in groups.values():
            for bucket in buckets:
                flat = torch.cat([t.reshape(-1) for t in bucket])  # (sum of numels,)
                self.sum_(flat).div_(self.world)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
        return tensors[len(params):]


def is_main_process() -> bool:
    """True unless this is a non-main process of a launched group (for front ends deciding what to print)."""
    from accelerate import PartialState

    if PartialState._shared_state:  # already joined by a workflow
        return PartialState().is_main_process
    return os.environ.get("RANK", "0") == "0"
