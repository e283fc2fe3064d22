"""The benchmark harness: the registry of parts, the timing helpers, the model, and the run that writes the JSON.

A part is a function registered under a name with its plan per size (``@part("eval", gpu=..., cpu=...)``). It
takes the run (``Bench``: device, dtype, repetitions, and the model and gate, built on first use) and the plan
of the run's size, and returns rows (dicts of times in seconds, ratios, peak bytes). Parts measure speed and
memory only; whether the kernels agree with their references is for the tests (GPU-marked ones at full size).

Letters: B batch, H query heads, Hkv key/value heads, T tokens, D head_dim.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from posthoc_sparse.attention.call import LayerCall
from posthoc_sparse.attention.graphs import captured
from posthoc_sparse.attention.interface import attention_modules
from posthoc_sparse.gates.io import gate_spec_for_model
from posthoc_sparse.gates.modules import GateBank
from posthoc_sparse.io import atomic_write_bytes
from posthoc_sparse.training import versions

# "gpu": Qwen3-1.7B's shape (random init, bf16 on a GPU); "cpu": a small model, to check the parts on a CPU
SIZES = {
    "gpu": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True,
                max_position_embeddings=40960),
    "cpu": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, vocab_size=4096, rope_theta=1e6, tie_word_embeddings=True,
                max_position_embeddings=4096),
}
DEFAULT_PARTS = "distill,memory,eval,attention,model,sweep"
# the keys of a row that the closing table shows
TABLE_SUFFIXES = ("ratio", "ratio_eager", "ratio_graph", "ratio_vs_decoder", "speedup_vs_sdpa", "speedup_vs_dense",
                  "speedup_gpu_busy", "speedup_back_to_back", "speedup_whole_model")
TABLE_KEYS = ("T", "S", "k", "batch", "selection", "row_fraction", "peak_bytes", "error")


# --- the registry ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Bench, object], list[dict]]  # (the run, the plan of its size) -> rows
    plans: dict[str, object]  # size -> plan
    cuda_only: bool  # its kernels run on a GPU only (the CPU interpreter is for the tests): no rows elsewhere

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


PARTS: dict[str, Part] = {}


def part(name: str, *, gpu, cpu, cuda_only: bool = False) -> Callable:
    """Register the decorated function as the part ``name``, with its plan for ``--size gpu`` and ``--size cpu``."""

    def register(fn: Callable) -> Callable:
        if name in PARTS:
            raise ValueError(f"benchmark part {name!r} is registered twice")
        PARTS[name] = Part(name, fn, {"gpu": gpu, "cpu": cpu}, cuda_only)
        return fn

    return register


@contextlib.contextmanager
def tuning(settings: dict, **overrides) -> Iterator[dict]:
    """Within: ``settings`` (an op's ``TUNING`` dict of launch settings) updated with ``overrides``; on leaving,
    also when the body raises, exactly what it held before. An override of a key it lacks is a KeyError (a
    misspelt setting would otherwise time the default)."""
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise KeyError(f"no launch setting {', '.join(unknown)}; the settings are {', '.join(settings)}")
    saved = dict(settings)
    settings.update(overrides)
    try:
        yield settings
    finally:
        settings.clear()
        settings.update(saved)


# --- timing ------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_warmup() -> int:
    """Warm-up calls before timing: one (compiles, caches, allocator), none under TRITON_INTERPRET=1, where the
    kernels run through the interpreter on the CPU, nothing compiles and the times only show that a part runs."""
    return 0 if os.environ.get("TRITON_INTERPRET") == "1" else 1


def interleaved(fns: dict[str, Callable], device, reps: int, warmup: int | None = None, contexts: dict | None = None,
                host: bool = False) -> dict[str, float]:
    """Median seconds of each function (its name ends in "_s"), timed in ``reps`` rounds that run every function
    once in turn (after ``warmup`` calls each, ``default_warmup()`` when None), so that the host's noise falls on
    all alike. ``contexts[name]()``: a context manager entered
    around that function's calls, outside the timed span. ``host``: also each function's host time,
    "<name>_host_s" (from the start until the call returns, before the GPU is waited for: when it is close to
    the wall time, the host's launches bind)."""
    contexts = contexts or {}

    def run(name, fn, times=None):
        with contexts.get(name, contextlib.nullcontext)():
            sync(device)
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            sync(device)
            t2 = time.perf_counter()
        if times is not None:
            times[name].append(t2 - t0)
            times[name[:-2] + "_host_s"].append(t1 - t0)

    for name, fn in fns.items():
        for _ in range(default_warmup() if warmup is None else warmup):
            run(name, fn)
    times = {key: [] for name in fns for key in (name, name[:-2] + "_host_s")}
    for _ in range(reps):
        for name, fn in fns.items():
            run(name, fn, times)
    return {name: statistics.median(ts) for name, ts in times.items() if host or not name.endswith("_host_s")}


def timed(fn: Callable, device, reps: int, warmup: int | None = None) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (``default_warmup()`` when None)."""
    return interleaved({"fn_s": fn}, device, reps, warmup)["fn_s"]


def timed_result(fn: Callable, device, reps: int) -> tuple[float, object]:
    """``timed(fn, ...)`` and what the last timed call of ``fn()`` returned (no call again for the result)."""
    last = {}
    seconds = timed(lambda: last.update(out=fn()), device, reps)
    return seconds, last["out"]


def written_words(t: int, device) -> torch.Tensor:
    """(T, ceil(T / 32)) bool: the bitmask words a row's causal keys reach, the only ones ``token_select(...,
    bits=True)`` writes (compare bitmasks there)."""
    words = torch.arange((t + 31) // 32, device=device)
    return words[None, :] * 32 <= torch.arange(t, device=device)[:, None]


def back_to_back(fn: Callable, device, reps: int, n: int = 8) -> float:
    """Median seconds per call of ``n`` calls of ``fn()`` issued back to back between two waits for the GPU,
    as the layers of a model forward issue theirs: the host's launches overlap the GPU's earlier work."""
    return timed(lambda: [fn() for _ in range(n)], device, reps) / n


def gpu_busy(fn: Callable) -> float:
    """Seconds during which at least one GPU kernel or copy of ``fn()`` runs (the union over streams of their
    intervals, from the profiler's trace; after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, -math.inf
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy * 1e-6


def cuda_graphed(fn: Callable, device) -> Callable[[], None]:
    """``fn`` (static inputs) replayed as a CUDA graph, captured at the first call (``graphs.captured``)."""
    state = {}

    def run():
        if "graph" not in state:
            state["graph"], _ = captured(fn, device)
        state["graph"].replay()

    return run


def peak(fn: Callable, device) -> int | None:
    """Peak bytes allocated on the GPU while ``fn()`` runs; None on a CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


# --- the model and its inputs ----------------------------------------------------------------------------------

def build_model(size: str, device, dtype: torch.dtype):
    """A random-init Qwen3 of ``SIZES[size]``, frozen, in eval mode, SDPA attention."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**SIZES[size])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def ids_for(model, t: int, device, b: int = 1) -> torch.Tensor:
    """(B, T) random token ids, seeded by T."""
    gen = torch.Generator().manual_seed(t)
    return torch.randint(0, model.config.vocab_size, (b, t), generator=gen).to(device)


def layer_call(model, spec, t: int, device, dtype: torch.dtype) -> LayerCall:
    """What layer 0's attention function receives for one window of T tokens: random q (1, H, T, D), k and v
    (1, Hkv, T, D) and hidden state (1, T, C), and the model's rotary tables (seeded by T)."""
    gen = torch.Generator(device="cpu").manual_seed(t)
    q = torch.randn(1, spec.num_heads, t, spec.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(1, spec.num_kv_heads, t, spec.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(1, spec.num_kv_heads, t, spec.head_dim, generator=gen).to(device, dtype)
    x = torch.randn(1, t, spec.hidden_size, generator=gen).to(device, dtype)
    cos, sin = model.model.rotary_emb(x, torch.arange(t, device=device)[None])
    return LayerCall(module=attention_modules(model)[0], layer=0, query=q, key=k, value=v, attention_mask=None,
                     scaling=spec.head_dim**-0.5, dropout=0.0, kwargs={}, x=x, cos=cos, sin=sin)


class Bench:
    """One run: its size, device, dtype and repetitions; the model (``build_model``) and a random-init gate of
    d_g = 32 with the hidden-state input (the trained gate's stand-in), each built on first use."""

    def __init__(self, size: str, device: torch.device, reps: int):
        self.size, self.device, self.reps = size, device, reps
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self._model = self._bank = None

    @property
    def model(self):
        if self._model is None:
            self._model = build_model(self.size, self.device, self.dtype)
        return self._model

    @property
    def bank(self) -> GateBank:
        if self._bank is None:
            self._bank = GateBank(gate_spec_for_model(self.model, d_g=32)).reset_random(0).to(self.device)
        return self._bank

    def release(self) -> None:
        """Drop the model and gate (a part that builds a model of its own frees their memory first)."""
        self._model = self._bank = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_baseline(path: str, package: str):
    """The module of an earlier version of a kernel file at ``path`` (e.g. from ``git show REV:FILE``), loaded as a
    private module of ``package`` (its package in this tree), so that its relative imports resolve here: a
    benchmark then times it beside the current kernels in one run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{package}._baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_device(script: str) -> torch.device:
    """The device a kernel script runs on: CUDA, or the CPU where TRITON_INTERPRET=1 (a small run, for tests);
    else one line on stderr and exit 2."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        print(f"{script}: needs a CUDA GPU, or TRITON_INTERPRET=1 for a small run on the CPU", file=sys.stderr)
        sys.exit(2)
    return torch.device("cpu")


def report(row: dict, indent: int | None = None) -> dict:
    """Print one row as JSON as soon as it is measured (a long run shows its progress), and return it."""
    print(json.dumps(row, indent=indent), flush=True)
    return row


# --- the run -----------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {p.name:<17}{p.summary}" for p in PARTS.values())
    ap = argparse.ArgumentParser(
        prog="benchmarks/perf.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Speed and memory ratios, measured side by side in one run (docs/performance.md).",
        epilog=f"parts (--parts, a comma list, run in the order given):\n{listing}\n"
               "Prints a table and writes JSON with ratios, absolute times, peak memory, device and versions.")
    ap.add_argument("--size", choices=list(SIZES), default="gpu" if torch.cuda.is_available() else "cpu",
                    help="gpu: Qwen3-1.7B's shape in bf16; cpu: a small model in fp32, to check the parts")
    ap.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma list (default {DEFAULT_PARTS})")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (medians), after warm-up calls")
    ap.add_argument("--plan", type=json.loads, default={}, metavar="JSON",
                    help='overrides of each part\'s plan for the run\'s size, e.g. \'{"S": [32768]}\' (keys it lacks '
                         'are refused)')
    ap.add_argument("--out", default="perf.json", help="the JSON, rewritten after every part")
    return ap


def _plan(entry: Part, size: str, overrides: dict, ap: argparse.ArgumentParser):
    """The part's plan for ``size`` with ``--plan``'s overrides (a dict plan only, and only keys it has)."""
    plan = entry.plans[size]
    if not overrides:
        return plan
    if not isinstance(plan, dict) or not isinstance(overrides, dict) or set(overrides) - set(plan):
        ap.error(f"--plan: part {entry.name}'s plan is {plan!r}; {overrides!r} does not override its keys")
    return {**plan, **overrides}


def _table(result: dict) -> None:
    print(f"\n{result['device']}  {result['dtype']}  ({result['size']} size)")
    for name, rows in result["parts"].items():
        for row in rows:
            keys = [k for k in row if k.endswith(TABLE_SUFFIXES) or k in TABLE_KEYS]
            print(name, {k: (round(row[k], 3) if isinstance(row[k], float) else row[k]) for k in keys})


def main(argv: list[str] | None = None) -> dict:
    """Run the registered parts named by ``--parts`` in that order; after each, write the JSON to ``--out``.
    Returns what it wrote."""
    ap = _parser()
    args = ap.parse_args(argv)
    names = list(dict.fromkeys(p.strip() for p in args.parts.split(",") if p.strip()))
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        ap.error(f"--parts takes a comma list of {', '.join(PARTS)}; got {args.parts!r}")
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    plans = {name: _plan(PARTS[name], args.size, args.plan, ap) for name in names}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(args.size, device, args.reps)
    result = {"size": args.size, "config": SIZES[args.size],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(bench.dtype), "versions": versions(), "parts": {}}
    if args.plan:
        result["plan_overrides"] = args.plan
    out = Path(args.out)
    t0 = time.perf_counter()
    for name in names:
        entry = PARTS[name]
        if entry.cuda_only and device.type != "cuda":
            print(f"{name}: skipped, its kernels run on a GPU only", flush=True)
            rows = []
        else:
            rows = entry.run(bench, plans[name])
        result["parts"][name] = rows
        result["seconds"] = time.perf_counter() - t0
        atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    _table(result)
    return result
