"""Benchmark parts of the whole model: eval throughput per mode (target 3), the decoder forward with block-gated
top-k in every layer, and where the host's time goes in one layer's call."""

from __future__ import annotations

import contextlib
import cProfile
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import Bench, gpu_busy, ids_for, interleaved, layer_call, part, report, sync, timed
from posthoc_sparse.attention.graphs import ShapeGraphs
from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.policies import policy_for
from posthoc_sparse.evaluate.perplexity import windows_nll
from posthoc_sparse.gates.modules import random_control
from posthoc_sparse.loading import decoder_of

EVAL_K = 64


@part("eval", gpu=[512, (512, 8), 4096], cpu=[64, (64, 2)])
def eval_throughput(bench: Bench, plan: list, block_sizes: tuple[int, ...] = (16, 64)) -> list[dict]:
    """Eval throughput of oracle, gate and random modes / dense, k = 64 (target 3).

    Whole-model eval (``windows_nll``, as ``--no-routing``) of each sparse mode against dense: per-head selection
    (the method's) and block selection per block size, and the gate with exact block scores. Eager, and on a
    GPU with each forward replayed as a CUDA graph (``ShapeGraphs``, ``sparsify eval``'s default on one GPU);
    every function is timed in interleaved rounds. Plan: window lengths T, or (T, windows per batch) pairs."""
    model, bank, device = bench.model, bench.bank, bench.device
    banks = {"oracle": None, "gate": bank, "random": random_control(bank.spec, 1).to(device)}
    rows = []
    for t in plan:
        t, batch = t if isinstance(t, tuple) else (t, 1)
        windows = ids_for(model, t, device, b=batch).cpu()
        row = {"T": t, "batch": batch, "k": EVAL_K}
        policies = {"dense": policy_for("dense")}
        for mode, mode_bank in banks.items():
            policies[mode] = policy_for(mode, EVAL_K, mode_bank)
            for blk in block_sizes:
                policies[f"{mode}_block{blk}"] = policy_for(mode, EVAL_K, mode_bank, selection="block", block_size=blk)
        policies["gate_block64exact"] = policy_for("gate", EVAL_K, bank, selection="block", block_size=64,
                                                   block_score="exact")
        fns, contexts = {}, {}
        for name, pol in policies.items():
            for suffix, graphs in (("", None), ("_graph", ShapeGraphs() if device.type == "cuda" else None)):
                if suffix and graphs is None:
                    continue
                fns[f"{name}{suffix}_s"] = lambda graphs=graphs: windows_nll(model, windows, batch, device,
                                                                             graphs=graphs)
                contexts[f"{name}{suffix}_s"] = lambda pol=pol: SparseAttention(model, pol)
        # two warm-up calls: a graph's shape runs eagerly once, then is captured
        row |= interleaved(fns, device, bench.reps, warmup=2, contexts=contexts)
        for name in policies:
            for suffix in ("", "_graph"):
                if name != "dense" and f"{name}{suffix}_s" in row:
                    row[f"{name}{suffix}_throughput_ratio"] = row[f"dense{suffix}_s"] / row[f"{name}{suffix}_s"]
        rows.append(report(row))
    return rows


class NoAttention:
    """A policy that skips attention (it returns an uninitialised output of the right shape): the GPU time of a
    forward under it is the time of everything but attention."""

    needs_inputs = False

    def __call__(self, call):
        b, h, t, _ = call.query.shape
        return call.query.new_empty(b, t, h, call.value.shape[-1])  # (B, T, H, D)


@part("model", gpu={"T": [4096, 16384, 32768], "k": [64, 256, 2048], "token": ["head", "group"]},
      cpu={"T": [128], "k": [16], "token": ["head", "group"]})
def whole_model(bench: Bench, plan: dict, block_sizes: tuple[int, ...] = (16, 64)) -> list[dict]:
    """The decoder forward, block-gated / token-level top-k in every layer / dense SDPA, and all layers' attention.

    The attention alone (on a GPU): a whole forward's GPU time less that of a forward that skips attention
    (``NoAttention``). Token-level selection per head and per KV group (plan "token") is what a long prompt's
    prefill under ``apply_gates`` runs with ``--selection head`` / ``group`` (``head_topk`` at k <= 128,
    ``token_select`` above). Plan: {"T": window lengths, "k": keys kept, "token": selections}."""
    model, bank, device, reps = bench.model, bench.bank, bench.device, bench.reps
    gpu = device.type == "cuda"
    rows = []
    for t in plan["T"]:
        ids = ids_for(model, t, device)

        def forward(policy=None):
            attached = contextlib.nullcontext() if policy is None else SparseAttention(model, policy)
            with torch.no_grad(), attached:
                decoder_of(model)(input_ids=ids, use_cache=False)

        dense = timed(forward, device, reps)
        if gpu:
            rest = gpu_busy(lambda: forward(NoAttention()))
            dense_attention = gpu_busy(lambda: forward(policy_for("dense"))) - rest
        for kk in plan["k"]:
            row = {"T": t, "k": kk, "dense_decoder_s": dense}
            if gpu:
                row |= {"no_attention_gpu_s": rest, "dense_attention_gpu_s": dense_attention}
            for blk in block_sizes:
                pol = policy_for("gate", kk, bank, selection="block", block_size=blk)
                row[f"block{blk}_s"] = timed(lambda: forward(pol), device, reps)
                row[f"block{blk}_speedup_vs_dense"] = dense / row[f"block{blk}_s"]
                if gpu:
                    row[f"block{blk}_attention_gpu_s"] = gpu_busy(lambda: forward(pol)) - rest
                    row[f"block{blk}_attention_speedup_whole_model"] = (dense_attention
                                                                        / row[f"block{blk}_attention_gpu_s"])
            for sel in plan.get("token", []):
                pol = policy_for("gate", kk, bank, selection=sel)
                row[f"{sel}_s"] = timed(lambda: forward(pol), device, reps)
                row[f"{sel}_speedup_vs_dense"] = dense / row[f"{sel}_s"]
            rows.append(report(row))
    return rows


@part("host", gpu=[512, 4096], cpu=[64, 128])
def host(bench: Bench, ts: list[int], calls: int = 200, top: int = 15) -> list[dict]:
    """Where the host's time goes in one layer's block-gated attention call and in SDPA's (cProfile).

    Block selection, k = 64, block 64: ``calls`` calls issued back to back under cProfile; microseconds per call,
    and the functions with the most own time. Plan: window lengths T."""
    model, bank, device = bench.model, bench.bank, bench.device
    rows = []
    for t in ts:
        call = layer_call(model, bank.spec, t, device, bench.dtype)
        q, k, v = call.query, call.key, call.value
        pol = policy_for("gate", 64, bank, selection="block", block_size=64)
        fns = {"block64": lambda: pol(call),
               "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
        row = {"T": t}
        for name, fn in fns.items():
            with torch.no_grad():
                for _ in range(5):
                    fn()
                sync(device)
                prof = cProfile.Profile()
                t0 = time.perf_counter()
                prof.enable()
                for _ in range(calls):
                    fn()
                prof.disable()
                row[f"{name}_host_us"] = (time.perf_counter() - t0) / calls * 1e6
                sync(device)
            stats = pstats.Stats(prof)
            entries = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
            row[f"{name}_top"] = [{"function": f"{Path(f).name}:{line}:{fn_name}", "calls_per_call": nc / calls,
                                   "own_us": tt / calls * 1e6, "cumulative_us": ct / calls * 1e6}
                                  for (f, line, fn_name), (_, nc, tt, ct, _) in entries]
        rows.append(report(row, indent=1))
    return rows
