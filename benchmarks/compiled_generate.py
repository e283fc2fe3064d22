"""``model.generate(..., cache_implementation="static")`` compiled (transformers' default on CUDA), gated against
dense, as a user calls it: the first call (which compiles), then repeated calls, and how many graphs torch.compile
made (a step that recompiles at every new token would show here as many graphs and slow repeated calls). Each
call's tokens are timed as they come (a streamer that waits for the GPU at each token, which generate's stopping
check does anyway): the prefill (to the first new token) and the decode steps after it, tokens/s per sequence.

    python benchmarks/compiled_generate.py --out x.json                      # on a GPU: Qwen3-1.7B shape
    python benchmarks/compiled_generate.py --size cpu --s 2048 --out x.json  # the small model, on a GPU

Random-init model (``harness.SIZES``), random gate (d = 32), random prompt ids of ``--s`` tokens, ``--new`` new
tokens, greedy, ``--batch`` sequences of one length. Run with ``TORCH_LOGS=recompiles`` to see why a graph was remade.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import SIZES, build_model, ids_for  # noqa: E402
from posthoc_sparse.io import atomic_write_json  # noqa: E402


def _graphs() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"])}


class _Clock:
    """A ``generate`` streamer that records when each new token is ready (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def split(self) -> dict:
        """Prefill seconds (prompt in to first token out) and decode seconds per step after it."""
        t = self.times
        return {"prefill_s": t[1] - t[0], "decode_s_per_step": (t[-1] - t[1]) / max(len(t) - 2, 1)}


def _timed(model, ids, kw: dict) -> tuple[float, dict]:
    """One ``generate`` call: its seconds, and its prefill and decode split (``_Clock``) with decode tokens/s."""
    t0, clock = time.perf_counter(), _Clock()
    model.generate(ids, streamer=clock, **kw)
    torch.cuda.synchronize()
    split = clock.split()
    return time.perf_counter() - t0, {**split, "decode_tokens_per_s": 1 / split["decode_s_per_step"]}


def _save(out: str, result: dict) -> None:
    """Writes ``result`` with each gated mode's speedups over each dense mode (``vs_dense``, ``vs_dense_gqa``), for
    the calls both have made so far."""
    for base, dense in [(m, r) for m, r in result["modes"].items() if m.startswith("dense")]:
        for mode, row in result["modes"].items():
            kinds = [kind for kind in ("eager", "compiled_last_call") if kind in row and kind in dense]
            if not mode.startswith("dense") and kinds:
                row[f"vs_{base}"] = {f"{kind}_{part}_speedup": dense[kind][key] / row[kind][key]
                                     for kind in kinds for part, key in (("decode", "decode_s_per_step"),
                                                                         ("prefill", "prefill_s"))}
    atomic_write_json(Path(out), result)


def _profile(model, ids, kw: dict, steps: int):
    """torch.profiler's events of one compiled ``generate`` call stopped after ``steps`` new tokens. The call keeps
    the timed calls' ``max_new_tokens`` (so their static cache's length: the same graph, not another compiled
    for another length) and a stopping criterion ends it early."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = input_ids.shape[1] >= ids.shape[1] + steps
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if ids.is_cuda else [])]) as prof:
        model.generate(ids, stopping_criteria=StoppingCriteriaList([StopAfter()]), **kw)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return prof.key_averages()


def _kernels(events) -> list:
    return sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.self_device_time_total, reverse=True)


def _host_ops(short, long, steps: int, top: int = 25) -> list:
    """The host's work per decode step: each CPU event's calls and self time in the long call less the short
    one's, over ``steps``, the most costly first (what the host does beyond replaying the step's graph)."""
    before = {e.key: e for e in short if e.device_type == torch.autograd.DeviceType.CPU}
    rows = []
    for e in long:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        b = before.get(e.key)
        ms = (e.self_cpu_time_total - (b.self_cpu_time_total if b else 0)) / 1e3 / steps
        calls = (e.count - (b.count if b else 0)) / steps
        rows.append({"name": e.key[:120], "calls_per_step": calls, "self_host_ms_per_step": ms})
    return sorted(rows, key=lambda r: r["self_host_ms_per_step"], reverse=True)[:top]


def _profiled(model, ids, kw: dict, steps: int, wall_s_per_step: float) -> dict:
    """Two more compiled calls under torch.profiler, stopped after 2 and after 2 + ``steps`` new tokens (the
    prefill and the first decode step in both, so the difference holds only steady steps): how the decode steps
    reach the GPU (graph replays against kernel launches from the host) and the GPU's kernel time per decode step
    (the difference of the two calls' kernel times, over ``steps``), against the step's wall time measured
    without the profiler (``wall_s_per_step``): far below it, the step waits for the host. A step replayed as a
    CUDA graph shows as one ``cudaGraphLaunch``; a step inductor did not capture, as hundreds of kernel launches.
    ``host_ops``: where the host's time per step goes (``_host_ops``); ``graph_records``: the CUDA graphs each call
    recorded (``CUDAGraphNode.record``; 1 in the short call means every ``generate`` call records its step anew)."""
    short, long = _profile(model, ids, kw, 2), _profile(model, ids, kw, 2 + steps)
    kernels = [_kernels(ev) for ev in (short, long)]
    per_call = [sum(e.self_device_time_total for e in ks) / 1e3 for ks in kernels]
    device_ms = (per_call[1] - per_call[0]) / steps
    return {"steps": steps, "host_launches": {e.key: e.count for e in long
                                              if "GraphLaunch" in e.key or "LaunchKernel" in e.key},
            "graph_records": [sum(e.count for e in ev if "CUDAGraphNode.record" in e.key) for ev in (short, long)],
            "kernel_ms_per_call": per_call, "decode_kernel_ms_per_step": device_ms,
            "decode_kernel_share_of_wall": device_ms / 1e3 / wall_s_per_step,
            "host_ops": _host_ops(short, long, steps),
            "top_kernels": [{"name": e.key[:120], "calls": e.count, "device_ms": e.self_device_time_total / 1e3}
                            for e in kernels[1][:20]]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="gpu")
    ap.add_argument("--s", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--modes", default="dense,gate",
                    help="comma list of apply_gates' modes, and dense_gqa: the dense model with SDPA's own GQA "
                         "(benchmarks/parts_decode.py's dense_gqa), no copy of K and V")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed eager calls of 2 new tokens per mode first (Triton's compilation, CUDA's warm-up)")
    ap.add_argument("--profile", type=int, default=0,
                    help="then compiled calls of 2 and 2 + this many new tokens under torch.profiler: the "
                         "decode steps' kernel time against their wall time (0: none)")
    ap.add_argument("--out", default="compiled-generate.json")
    args = ap.parse_args(argv)
    if args.profile < 0 or (args.profile and args.profile + 2 > args.new):
        ap.error(f"--profile {args.profile} needs --new of at least {args.profile + 2} (its calls stop after 2 and "
                 f"2 + --profile new tokens), and is not negative")
    from benchmarks.parts_decode import dense_gqa
    from posthoc_sparse.deploy import apply_gates
    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank

    if not torch.cuda.is_available():
        ap.exit(2, "benchmarks/compiled_generate.py: needs a CUDA GPU (transformers compiles generate on CUDA only)\n")
    device = torch.device("cuda")
    model = build_model(args.size, device, torch.bfloat16)
    bank = GateBank(gate_spec_for_model(model, d_g=32)).reset_random(0).to(device)
    ids = ids_for(model, args.s, device, args.batch)
    # an explicit mask: without one, generate takes every prompt token equal to pad_token_id for padding (two of
    # the eight random 32k prompts hold id 0), and a padded prefill takes the gated path's chunked reference
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids), cache_implementation="static")
    result = {"device": torch.cuda.get_device_name(device), "size": args.size, "s": args.s, "k": args.k,
              "new_tokens": args.new, "batch": args.batch, "warmup_calls": args.warmup, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "modes": {}}
    for mode in [m for m in args.modes.split(",") if m]:
        torch._dynamo.reset()
        before = _graphs()
        row = result["modes"][mode] = {"compiled_calls_s": []}
        bound = dense_gqa(model) if mode == "dense_gqa" else apply_gates(model, bank, k=args.k, mode=mode)
        with torch.no_grad(), bound:
            # the row is written after each call, so a run cut off by a time limit keeps what it measured
            for _ in range(args.warmup):  # else the eager call's first steps compile the mode's kernels
                model.generate(ids, disable_compile=True, **dict(kw, max_new_tokens=2, min_new_tokens=2))
            row["eager_call_s"], row["eager"] = _timed(model, ids, dict(kw, disable_compile=True))
            _save(args.out, result)
            for _ in range(args.calls):
                seconds, row["compiled_last_call"] = _timed(model, ids, kw)
                row["compiled_calls_s"].append(seconds)
                row["graphs_made"] = _graphs()["unique_graphs"] - before["unique_graphs"]
                row["compiled_over_eager_last_call"] = seconds / row["eager_call_s"]
                _save(args.out, result)
            if args.profile:
                row["profile"] = _profiled(model, ids, kw, args.profile,
                                           row["compiled_last_call"]["decode_s_per_step"])
                _save(args.out, result)
        print(mode, row, flush=True)
    return result


if __name__ == "__main__":
    main()
