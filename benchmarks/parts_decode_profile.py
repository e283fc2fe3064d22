"""Benchmark part ``decode_profile``: where a captured decode step of one layer spends its time on the GPU, kernel
by kernel, gated (per head and per KV group) beside dense attention with SDPA's own GQA (the fastest dense decode
``decode_attention`` measured). Letters as in ``parts_decode.py``.

Each call is replayed as a CUDA graph ``replays`` times under torch.profiler (kernels inside a graph replay are
traced one by one). Per call: the kernels in launch order with their device microseconds (the median over the
replays), their sum, and the span from the first kernel's start to the last one's end: span less the sum is the
GPU idle between the graph's kernels, and the call's wall time (timed apart, without the profiler) less the span is
the graph launch's own cost.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.harness import Bench, cuda_graphed, part, report, timed, tuning
from benchmarks.parts_decode import _layer_decode, sdpa_gqa
from posthoc_sparse.attention.policies import TopKPolicy
from posthoc_sparse.errors import first_line
from posthoc_sparse.ops import decode as dc

# "variants": named overrides of ops.decode's TUNING, each profiled in turn ("": the defaults)
GPU_PLAN = {"S": [32768], "batch": [1, 8], "k": [2048], "replays": 20, "variants": {"": {}}}
CPU_PLAN = {"S": [96], "batch": [1], "k": [16], "replays": 2, "variants": {"": {}}}


def per_replay(kernels: list[tuple[str, float, float]], replays: int) -> dict:
    """``kernels``: (name, start_us, end_us) of every kernel the profiler saw over ``replays`` replays of one graph.
    Returns the kernels of a replay in launch order with the median of their device time over the replays
    (``kernels``: [name, us]), their sum (``kernel_us``) and the median span of a replay (``span_us``).
    Raises ValueError when the count is not a multiple of ``replays`` (then the replays did not launch alike)."""
    kernels = sorted(kernels, key=lambda k: k[1])
    if not kernels or len(kernels) % replays:
        raise ValueError(f"{len(kernels)} kernels over {replays} replays")
    n = len(kernels) // replays
    runs = [kernels[i * n:(i + 1) * n] for i in range(replays)]
    names = [name for name, _, _ in runs[0]]
    if any([name for name, _, _ in run] != names for run in runs):
        raise ValueError("the replays launched different kernels")
    times = [statistics.median(run[j][2] - run[j][1] for run in runs) for j in range(n)]
    return {"launches": n, "kernels": [[name[:80], round(t, 2)] for name, t in zip(names, times)],
            "kernel_us": sum(times), "span_us": statistics.median(run[-1][2] - run[0][1] for run in runs)}


def _profiled(fn, device, replays: int) -> dict:
    """``fn`` captured as a CUDA graph: its kernels per replay (``per_replay``) and its wall time per call."""
    from torch.profiler import ProfilerActivity, profile

    graphed = cuda_graphed(fn, device)
    wall = timed(graphed, device, 20)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graphed()
            torch.cuda.synchronize(device)
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    return {"wall_us": wall * 1e6} | per_replay(kernels, replays)


@part("decode_profile", gpu=GPU_PLAN, cpu=CPU_PLAN, cuda_only=True)
@torch.no_grad()
def decode_profile(bench: Bench, plan: dict) -> list[dict]:
    """Kernel by kernel, one layer's captured decode step: gated per head and per group at each k (under each of
    the plan's TUNING variants), and dense with SDPA's own GQA. Plan: {"S", "batch", "k", "replays", "variants"}."""
    rows = []
    for s_len in plan["S"]:
        for batch in plan["batch"]:
            call, selector, reset = _layer_decode(bench, s_len, batch)
            calls = {"dense_gqa": (lambda: sdpa_gqa(call), {})}
            for variant, settings in plan["variants"].items():
                for kk in plan["k"]:
                    for selection in ("head", "group"):
                        policy = TopKPolicy(selector, kk, selection=selection)
                        calls[f"gate_k{kk}_{selection}{'_' if variant else ''}{variant}"] = (
                            lambda policy=policy: (reset(), policy(call)), settings)
            for name, (fn, settings) in calls.items():
                head = {"S": s_len, "batch": batch, "call": name} | ({"tuning": settings} if settings else {})
                try:
                    with tuning(dc.TUNING, **settings):
                        rows.append(report(head | _profiled(fn, bench.device, plan["replays"])))
                except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run is a row, not the end
                    rows.append(report(head | {"error": first_line(e, 160)}))
            torch.cuda.empty_cache()
    return rows
