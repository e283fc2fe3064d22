"""Benchmark parts of training: the distillation step's time and memory (targets 1 and 2) and the unfreeze sweep's
memory."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from benchmarks.harness import (Bench, build_model, cuda_graphed, gpu_busy, ids_for, interleaved, part, peak,
                                report, timed)
from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.policies import policy_for
from posthoc_sparse.attention.recording import RecordPolicy
from posthoc_sparse.distill.step import accumulate_gradients, gate_optimizer, step_graphs
from posthoc_sparse.experiments.sweep import choose_layers, trainable_parameters
from posthoc_sparse.gates.io import gate_spec_for_model
from posthoc_sparse.gates.modules import GateBank
from posthoc_sparse.loading import decoder_of


def distill_rows(bench: Bench, t: int, reps: int, row_fraction: float = 1.0, memory_only: bool = False) -> dict:
    """One row: the distillation step as ``distill.loop.distill`` runs it (the model stays switched to the
    recording policy across steps; KL, k = 64) against the stock forward of the same batch (B = 1, T tokens).
    On a GPU the step replays as a CUDA graph (``step_graphs``, the loop's default there) and is timed beside
    the eager step. Also the recording forward alone, each one's host time (until the call returns) and GPU busy
    time, and the stock forward replayed as a CUDA graph (how much of its time is the host's launching; under
    capture transformers builds an explicit causal mask, so that forward's attention is slower)."""
    model, bank, device = bench.model, bench.bank, bench.device
    opt = gate_optimizer(bank, 1e-4)
    policy = RecordPolicy(stack_layers=bank.spec.num_layers)  # as the distillation loop records
    ids = ids_for(model, t, device)

    def attached():
        return SparseAttention(model, policy)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def decoder_forward():  # the same forward without the LM head (what distillation runs)
        with torch.no_grad():
            decoder_of(model)(input_ids=ids, use_cache=False)

    def record_forward():  # the recording forward alone (SparseAttention attached by the context)
        decoder_forward()
        policy.clear()

    def step(graphs=None):
        accumulate_gradients(model, policy, bank, [ids], "kl", 64, row_fraction, graphs=graphs)
        opt.step()
        opt.zero_grad(set_to_none=True)

    graphed = device.type == "cuda"
    graphs = step_graphs(policy) if graphed else None
    fns = {"forward_s": forward, "decoder_forward_s": decoder_forward, "record_forward_s": record_forward,
           "distill_step_eager_s": step}
    if graphed:
        fns |= {"distill_step_s": lambda: step(graphs), "forward_graph_s": cuda_graphed(forward, device)}
    contexts = {name: attached for name in ("record_forward_s", "distill_step_eager_s", "distill_step_s")}
    row = {"T": t, "row_fraction": row_fraction, "cuda_graph": graphed}
    try:
        if not memory_only:
            # interleaved rounds, so that the host's noise (at T <= 4096 the eager forward is bound by the host's
            # launches) falls on all alike; medians of each
            row.update(interleaved(fns, device, reps, contexts=contexts, host=True))
            if not graphed:
                row["distill_step_s"] = row["distill_step_eager_s"]
            row["time_ratio"] = row["distill_step_s"] / row["forward_s"]
            row["time_ratio_eager"] = row["distill_step_eager_s"] / row["forward_s"]
            row["time_ratio_vs_decoder"] = row["distill_step_s"] / row["decoder_forward_s"]
            if graphed:
                row["graph_failures"] = graphs.failures
                for name, fn in fns.items():  # how much of each the GPU is busy: below the wall time, the host binds
                    with contexts.get(name, contextlib.nullcontext)():
                        row[name[:-2] + "_gpu_busy_s"] = gpu_busy(fn)
                # the step's GPU work against the forward's: the time ratio on a host that never binds
                row["gpu_busy_ratio"] = row["distill_step_eager_gpu_busy_s"] / row["forward_gpu_busy_s"]
        with attached():
            row["distill_peak_bytes"] = peak(step, device)
            if graphed:  # a fresh graph: the eager first step, then the capture and a replay
                fresh = step_graphs(policy)
                row["distill_graph_peak_bytes"] = peak(lambda: [step(fresh) for _ in range(2)], device)
        row["forward_peak_bytes"] = peak(forward, device)
        row["decoder_forward_peak_bytes"] = peak(decoder_forward, device)
        if row["forward_peak_bytes"]:
            row["memory_ratio"] = row["distill_peak_bytes"] / row["forward_peak_bytes"]
            row["memory_ratio_vs_decoder"] = row["distill_peak_bytes"] / row["decoder_forward_peak_bytes"]
            if graphed:
                row["memory_ratio_graph"] = row["distill_graph_peak_bytes"] / row["forward_peak_bytes"]
    except torch.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0][:160]}"
        torch.cuda.empty_cache()
    return report(row)


@part("distill", gpu=[2048, 4096], cpu=[64, 128])
def distill(bench: Bench, ts: list[int]) -> list[dict]:
    """Distillation step time / frozen forward time of the same batch, and peak memory (target 1).

    Plan: window lengths T (``distill_rows``)."""
    return [distill_rows(bench, t, bench.reps) for t in ts]


@part("distill_sampled", gpu=[(2048, 0.5), (2048, 0.25), (4096, 0.5), (4096, 0.25), (16384, 1.0), (16384, 0.25)],
      cpu=[(256, 0.5)])
def distill_sampled(bench: Bench, plan: list[tuple[int, float]]) -> list[dict]:
    """The distill part with each layer's loss from a share of its query rows (``--row-fraction``).

    Plan: (T, row fraction) pairs."""
    return [distill_rows(bench, t, bench.reps, row_fraction=fraction) for t, fraction in plan]


@part("memory", gpu=[4096, 16384, 32768], cpu=[128, 256])
def memory(bench: Bench, ts: list[int]) -> list[dict]:
    """Peak memory of a distillation step / of the frozen inference forward (target 2).

    Plan: window lengths T."""
    return [distill_rows(bench, t, 1, memory_only=True) for t in ts]


@part("sweep", gpu=[512], cpu=[64])
def sweep(bench: Bench, ts: list[int]) -> list[dict]:
    """Peak memory of unfreeze-sweep training with 29% of layers' attention unfrozen under the gate's hard top-k.

    Its own model in fp32 (bf16 autocast on a GPU), after the run's model is released. Plan: window lengths T."""
    bench.release()
    device = bench.device
    model = build_model(bench.size, device, torch.float32)
    spec = gate_spec_for_model(model, d_g=32)
    bank = GateBank(spec).reset_random(0).to(device)
    layers = choose_layers(spec.num_layers, 0.29, "spread")
    params = trainable_parameters(model, layers, "attention")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    rows = []
    for t in ts:
        ids = ids_for(model, t, device, b=1)

        def step():
            with SparseAttention(model, policy_for("gate", 64, bank)):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        rows.append(report({"T": t, "layers_unfrozen": layers, "n_layers": spec.num_layers,
                            "trainable_params": sum(p.numel() for p in params), "peak_bytes": peak(step, device),
                            "step_s": timed(step, device, 2, warmup=0)}))
    return rows
