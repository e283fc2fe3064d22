"""Speed and memory ratios, measured side by side in one run (docs/performance.md, issue 7 targets).

    python benchmarks/perf.py --size gpu --out perf.json      # Qwen3-1.7B shape, random init, bf16, one GPU
    python benchmarks/perf.py --size cpu --out perf-cpu.json  # a small model, to check the script on a CPU

Parts (``--parts``, comma list):
  distill    distillation step time / frozen forward time of the same batch (T = 2048, 4096)
  distill_sampled  the same with --row-fraction 0.5 and 0.25 (T = 2048, 4096), and T = 16384 exact and 0.25
  kernel     the fused KL kernels alone, one layer at T = 4096, under several launch settings
  memory     peak memory of a distillation step / frozen inference forward (T = 4096, 16384, 32768)
  eval       eval throughput of oracle, gate and random modes / dense (T = 512, 4096)
  attention  one layer's deployed gated top-k attention / SDPA flash attention, forward (T = 4096..32768),
             per-head selection (reference) and block selection (Triton), with the kernels' agreement
  head_tuning  launch settings of the per-head top-k and index-attention kernels (T = 4096, k = 64)
  host       where the host's time goes in one layer's block-gated attention call and in SDPA's (cProfile)
  model      the whole decoder forward, block-gated top-k in every layer / dense SDPA (T = 4096..32768), and
             the attention of all layers alone (a forward's GPU time less that of one that skips attention)
  sweep      peak memory of unfreeze-sweep training with 29% of layers' attention unfrozen (T = 512)
Prints a table and writes JSON with ratios, absolute times, peak memory, device and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posthoc_sparse.attention.graphs import captured  # noqa: E402
from posthoc_sparse.attention.interface import SparseAttention  # noqa: E402
from posthoc_sparse.attention.policies import (  # noqa: E402
    DensePolicy, GateSelector, LayerCall, OracleSelector, RecordPolicy, TopKPolicy,
)
from posthoc_sparse.distill.loop import (  # noqa: E402
    StepGraphs, accumulate_gradients, decoder_of, gate_optimizer,
)
from posthoc_sparse.gates.io import gate_spec_for_model  # noqa: E402
from posthoc_sparse.gates.modules import GateBank  # noqa: E402

SIZES = {
    "gpu": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True,
                max_position_embeddings=40960),
    "cpu": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, vocab_size=4096, rope_theta=1e6, tie_word_embeddings=True,
                max_position_embeddings=4096),
}
PLAN = {
    "gpu": {"distill": [2048, 4096], "distill_sampled": [(2048, 0.5), (2048, 0.25), (4096, 0.5), (4096, 0.25),
                                                         (16384, 1.0), (16384, 0.25)], "memory": [4096, 16384, 32768], "eval": [512, (512, 8), 4096],
            "attention": [4096, 16384, 32768], "attention_k": [64, 256, 2048], "sweep": [512]},
    "cpu": {"distill": [256, 512], "distill_sampled": [(512, 0.5)], "memory": [512, 1024], "eval": [128, (128, 4), 512], "attention": [512, 1024],
            "attention_k": [16, 64], "sweep": [128]},
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    return interleaved({"fn_s": fn}, device, reps, warmup)["fn_s"]


def interleaved(fns: dict, device, reps: int, warmup: int = 1, contexts: dict | None = None,
                host: bool = False) -> dict:
    """Median seconds of each function, timed in ``reps`` rounds that run every function once in turn.
    ``contexts[name]()``: a context manager entered around that function's calls, outside the timed span.
    ``host``: also each function's host time, "<name>_host_s" (from the start until the call returns, before
    the GPU is waited for: when it is close to the wall time, the host's launches bind)."""
    contexts = contexts or {}

    def run(name, fn, times=None):
        ctx = contexts.get(name)
        with ctx() if ctx else contextlib.nullcontext():
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
        for _ in range(warmup):
            run(name, fn)
    times = {key: [] for name in fns for key in (name, name[:-2] + "_host_s")}
    for _ in range(reps):
        for name, fn in fns.items():
            run(name, fn, times)
    return {name: statistics.median(ts) for name, ts in times.items() if host or not name.endswith("_host_s")}


def cuda_graphed(fn, device):
    """``fn`` (static inputs) replayed as a CUDA graph, captured at the first call (``graphs.captured``)."""
    state = {}

    def run():
        if "graph" not in state:
            state["graph"], _ = captured(fn, device)
        state["graph"].replay()

    return run


def gpu_busy(fn) -> float:
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


def back_to_back(fn, device, reps: int, n: int = 8) -> float:
    """Median seconds per call of ``n`` calls of ``fn()`` issued back to back between two waits for the GPU,
    as the layers of a model forward issue theirs: the host's launches overlap the GPU's earlier work."""
    return timed(lambda: [fn() for _ in range(n)], device, reps) / n


class NoAttention:
    """A policy that skips attention (it returns an uninitialised output of the right shape): the GPU time of a
    forward under it is the time of everything but attention."""

    needs_inputs = False

    def __call__(self, call):
        b, h, t, _ = call.query.shape
        return call.query.new_empty(b, t, h, call.value.shape[-1])


def peak(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def build_model(size: str, device, dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**SIZES[size])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def ids_for(model, t: int, device, b: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(t)
    return torch.randint(0, model.config.vocab_size, (b, t), generator=gen).to(device)


def bench_distill(model, bank, ts, device, reps, memory_only=False, row_fraction=1.0, graph_step=False):
    """Targets 1 (time) and 2 (memory): the distillation step as ``distill.loop.distill`` runs it (the model stays
    switched to the recording policy across steps) against the stock forward of the same batch. On a GPU with
    ``graph_step`` the step replays as a CUDA graph (``StepGraphs``, the loop's default there) and is timed
    beside the eager step. Also the recording forward alone, each one's host time (until the call returns) and
    GPU busy time, and the stock forward replayed as a CUDA graph (how much of its time is the host's launching;
    under capture transformers builds an explicit causal mask, so that forward's attention is slower)."""
    rows = []
    opt = gate_optimizer(bank, 1e-4)
    policy = RecordPolicy(stack_layers=bank.spec.num_layers)  # as the distillation loop records

    def attached():
        return SparseAttention(model, policy)

    for t in ts:
        ids = ids_for(model, t, device)

        def forward():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        def decoder_forward():  # the same forward without the LM head (what distillation runs)
            with torch.no_grad():
                decoder_of(model)(input_ids=ids, use_cache=False)

        def record_forward():  # the recording forward alone (SparseAttention attached by the context)
            with torch.no_grad():
                decoder_of(model)(input_ids=ids, use_cache=False)
            policy.clear()

        def step(graphs=None):
            accumulate_gradients(model, policy, bank, [ids], "kl", 64, row_fraction, graphs=graphs)
            opt.step()
            opt.zero_grad(set_to_none=True)

        graphed = graph_step and device.type == "cuda"
        graphs = StepGraphs() if graphed else None
        fns = {"forward_s": forward, "decoder_forward_s": decoder_forward, "record_forward_s": record_forward,
               "distill_step_eager_s": step}
        if graphed:
            fns |= {"distill_step_s": lambda: step(graphs), "forward_graph_s": cuda_graphed(forward, device)}
        contexts = {name: attached for name in ("record_forward_s", "distill_step_eager_s", "distill_step_s")}
        row = {"T": t, "row_fraction": row_fraction, "cuda_graph": graphed}
        try:
            if not memory_only:
                # interleaved rounds, so that the host's noise (at T <= 4096 the eager forward is bound by the
                # host's launches) falls on all alike; medians of each
                row.update(interleaved(fns, device, reps, contexts=contexts, host=True))
                if not graphed:
                    row["distill_step_s"] = row["distill_step_eager_s"]
                row["time_ratio"] = row["distill_step_s"] / row["forward_s"]
                row["time_ratio_eager"] = row["distill_step_eager_s"] / row["forward_s"]
                row["time_ratio_vs_decoder"] = row["distill_step_s"] / row["decoder_forward_s"]
                if graphed:
                    row["graph_failures"] = graphs.failures
                if device.type == "cuda":  # how much of each the GPU is busy: below the wall time, the host binds
                    for name, fn in fns.items():
                        with contexts.get(name, contextlib.nullcontext)():
                            row[name[:-2] + "_gpu_busy_s"] = gpu_busy(fn)
                    # the step's GPU work against the forward's: the time ratio on a host that never binds
                    row["gpu_busy_ratio"] = row["distill_step_eager_gpu_busy_s"] / row["forward_gpu_busy_s"]
            with attached():
                row["distill_peak_bytes"] = peak(step, device)
                if graphed:  # a fresh graph: the eager first step, then the capture and a replay
                    fresh = StepGraphs()
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
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_kernel(ts, device, reps):
    """The fused KL kernels alone (one layer, Qwen3-1.7B heads, bf16 teacher and gate as distillation runs them):
    each kernel under several launch settings, then the whole per-layer KL (forward + gradient) as distillation
    calls it, with the teacher's lse from the model's attention forward (cuDNN or flash attention, as SDPA
    picks) and without, beside that attention forward itself."""
    from posthoc_sparse.kernels import kl_distill as kd

    configs = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3),
               (64, 32, 4, 2), (128, 32, 4, 2), (128, 128, 8, 2)]
    rows = []
    default = dict(kd.TUNING)
    for t in ts:
        gen = torch.Generator().manual_seed(t)
        q = torch.randn(1, 16, t, 128, generator=gen).to(device, torch.bfloat16)
        k = torch.randn(1, 8, t, 128, generator=gen).to(device, torch.bfloat16)
        v = torch.randn(1, 8, t, 128, generator=gen).to(device, torch.bfloat16)
        gq = torch.randn(1, 16, t, 32, generator=gen).to(device, torch.bfloat16)
        gk = torch.randn(1, 16, t, 32, generator=gen).to(device, torch.bfloat16)
        _, lse = kd.flash_attention_lse(q, k, v, 128**-0.5)
        w = torch.full(lse.shape, 1.0 / t, device=device)
        _, lse_s, lse_g = kd._forward(q, k, gq, gk, 128**-0.5, teacher=True)

        def record(name, fn, **extra):
            try:
                sec = timed(fn, device, reps, warmup=2)
            except Exception as e:  # a launch setting the compiler rejects (shared memory)
                sec = None
                print("failed", name, extra, type(e).__name__, str(e)[:120])
            rows.append({"T": t, "kernel": name, **extra, "seconds": sec})
            print(json.dumps(rows[-1]), flush=True)

        record("teacher_attention_forward", lambda: kd.flash_attention_lse(q, k, v, 128**-0.5))
        for kind, fn in (("fwd", lambda: kd._forward(q, k, gq, gk, 128**-0.5, teacher=True)),
                         ("lse", lambda: kd._forward(q, k, gq, gk, 128**-0.5, teacher=False))):
            for cfg in configs:
                kd.TUNING.update(default, **{kind: cfg})
                record(kind, fn, config=cfg)
        for low in (False, True):
            for cfg in configs:
                kd.TUNING.update(default, grad=cfg, low=low)
                record("grad", lambda: kd._gradient(q, k, gq, gk, w, lse_s, lse_g, 128**-0.5, with_kl=True),
                       config=cfg, low=low)
        for sem in ("acq_rel", "relaxed"):  # the memory order of the dgk atomics
            for cfg in ((128, 128, 8, 2), (128, 64, 8, 3)):
                kd.TUNING.update(default, grad=cfg, sem=sem)
                record("grad", lambda: kd._gradient(q, k, gq, gk, w, lse_s, lse_g, 128**-0.5, with_kl=True),
                       config=cfg, low=kd.TUNING["low"], sem=sem)
        kd.TUNING.update(default)
        record("kl_with_flash_lse", lambda: kd.kl_grad_fused(q, k, gq, gk, 128**-0.5, 1.0 / t, lse))
        record("kl_teacher_pass", lambda: kd.kl_grad_fused(q, k, gq, gk, 128**-0.5, 1.0 / t))
    kd.TUNING.update(default)
    return rows


def bench_eval(model, bank, ts, device, reps, block_sizes=(16, 64)):
    """Whole-model eval (windows_nll, ``--no-routing``) throughput of each sparse mode against dense, k = 64:
    per-head selection (the method's, the chunked reference) and block selection (Triton kernels on a GPU)
    per block size. Eager, and with each forward replayed as a CUDA graph (``sparsify eval``'s default on one
    GPU): every function is timed in interleaved rounds, so that the host's noise falls on all alike.
    ``ts``: window lengths, or (length, windows per batch) pairs."""
    from posthoc_sparse.attention.graphs import ForwardGraphs
    from posthoc_sparse.evaluate.perplexity import windows_nll

    rows = []
    random_bank = GateBank(bank.spec).reset_random(1).to(device)
    selectors = {"oracle": OracleSelector, "gate": lambda: GateSelector(bank),
                 "random": lambda: GateSelector(random_bank)}
    for t in ts:
        t, batch = t if isinstance(t, tuple) else (t, 1)
        windows = ids_for(model, t, device, b=batch).cpu()
        row = {"T": t, "batch": batch, "k": 64}
        policies = {"dense": DensePolicy()}
        for name, make in selectors.items():
            policies[name] = TopKPolicy(make(), 64)
            for blk in block_sizes:
                policies[f"{name}_block{blk}"] = TopKPolicy(make(), 64, selection="block", block=blk)
        policies["gate_block64exact"] = TopKPolicy(GateSelector(bank, block_score="exact"), 64, selection="block",
                                                   block=64)
        fns, contexts = {}, {}
        for name, pol in policies.items():
            for suffix, graphs in (("", None), ("_graph", ForwardGraphs() if device.type == "cuda" else None)):
                if suffix and graphs is None:
                    continue
                fns[f"{name}{suffix}_s"] = lambda graphs=graphs: windows_nll(model, windows, batch, device,
                                                                             graphs=graphs)
                contexts[f"{name}{suffix}_s"] = lambda pol=pol: SparseAttention(model, pol)
        # two warm-up calls: a graph's shape runs eagerly once, then is captured
        row |= interleaved(fns, device, reps, warmup=2, contexts=contexts)
        for name in policies:
            for suffix in ("", "_graph"):
                if name != "dense" and f"{name}{suffix}_s" in row:
                    row[f"{name}{suffix}_throughput_ratio"] = row[f"dense{suffix}_s"] / row[f"{name}{suffix}_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _layer_inputs(model, spec, t, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(t)
    q = torch.randn(1, spec.num_heads, t, spec.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(1, spec.num_kv_heads, t, spec.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(1, spec.num_kv_heads, t, spec.head_dim, generator=gen).to(device, dtype)
    x = torch.randn(1, t, spec.hidden_size, generator=gen).to(device, dtype)
    pos = torch.arange(t, device=device)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    return q, k, v, x, cos, sin


def _agreement(pol, call, rows: int = 256) -> dict:
    """The kernel path against the naive fp32 reference at full size: the selection (fused block scores vs
    the reference's; differing choices compared by the reference score mass they carry) and the output of
    the last ``rows`` queries (reference attention over those rows only)."""
    from posthoc_sparse.kernels import block_sparse as bsp

    gq, gk = pol.selector.prepare(call)  # the reference: torch projection and rotary, pool_bound, naive scores
    b = pol.block
    groups = call.key.shape[1]
    gq, gkb = bsp.pool_bound(gq, gk, b)
    n = bsp.n_blocks(pol.k, b)
    fused = bsp.group_sum(pol.selector.block_mass(call, b), groups)  # the deployed path (Triton summaries + scores)
    ref = torch.cat([bsp.block_mass_reference(gq[:, :, a:a + 4096], gkb, b, a)
                     for a in range(0, gq.shape[2], 4096)], dim=2)  # 4096 is a multiple of every block size
    ref = bsp.group_sum(ref, groups)
    idx_f, idx_r = bsp.select(fused, n, 0, b), bsp.select_blocks(ref, n, 0, b)

    def carried(idx):  # the reference mass of the chosen earlier blocks (the diagonal is always chosen)
        return ref.gather(-1, idx[..., :-1].long().clamp(min=0)).masked_fill(idx[..., :-1] < 0, 0).sum(-1)

    same = (idx_f.sort(-1).values == idx_r.sort(-1).values).all(-1).float().mean()
    t = call.query.shape[2]
    out = bsp.block_attention_fused(call.query, call.key, call.value, idx_f, b, call.scaling)[:, -rows:]
    want = bsp.block_attention_reference(call.query[:, :, -rows:], call.key, call.value, idx_f[:, :, (t - rows) // b:],
                                         b, call.scaling)
    err = (out.transpose(1, 2).float() - want).norm() / want.norm()
    got_rows, want_rows = carried(idx_f), carried(idx_r)
    want_mass = float(want_rows.sum())
    has = want_rows > 0
    worst = float((got_rows[has] / want_rows[has]).min()) if bool(has.any()) else 1.0
    return {"same_selection_fraction": float(same),
            "selected_mass_ratio": float(got_rows.sum()) / want_mass if want_mass > 0 else 1.0,
            "worst_row_mass_ratio": worst,
            "output_rel_err_last_rows": float(err)}


def bench_attention(model, bank, ts, ks, device, dtype, reps, block_sizes=(16, 64, 128), head_max_t=4096):
    """One layer: SDPA flash attention vs the deployed gated top-k (gate projection + scoring + top-k +
    attention over the selected keys). Per-head selection (the chunked reference) up to ``head_max_t``;
    block selection (Triton) for every T, k and block size, with its parts timed and its agreement with the
    reference."""
    import torch.nn.functional as F

    from posthoc_sparse.kernels import block_sparse as bsp

    spec = bank.spec
    attn = [m for m in model.modules() if type(m).__name__.endswith("Attention")][0]
    rows = []
    for t in ts:
        q, k, v, x, cos, sin = _layer_inputs(model, spec, t, device, dtype)
        call = LayerCall(module=attn, layer=0, query=q, key=k, value=v, attention_mask=None,
                         scaling=spec.head_dim**-0.5, dropout=0.0, kwargs={}, x=x, cos=cos, sin=sin)
        def flash():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        sdpa = timed(flash, device, reps)
        timings = {}
        if device.type == "cuda":  # GPU work alone, and calls issued back to back as a model's layers issue them
            timings = {"sdpa_gpu_busy_s": gpu_busy(flash), "sdpa_back_to_back_s": back_to_back(flash, device, reps)}
        for kk in ks:
            row = {"T": t, "k": kk, "sdpa_s": sdpa, **timings}
            pol = TopKPolicy(GateSelector(bank), kk)
            head_kernels = pol._head_kernels(call)  # per-head selection through kernels.head_topk (k <= MAX_K)
            if t <= head_max_t or head_kernels:
                with torch.no_grad():
                    row["head_s"] = timed(lambda: pol(call), device, max(1, reps // 2))
                row["head_speedup_vs_sdpa"] = sdpa / row["head_s"]
                row["head_path"] = "kernels" if head_kernels else "reference"
                if head_kernels and device.type == "cuda":
                    from posthoc_sparse.kernels import head_topk as ht

                    gq, gk = pol.selector.prepare(call)
                    row["head_prepare_s"] = timed(lambda: pol.selector.prepare(call), device, reps)
                    row["head_topk_s"] = timed(lambda: ht.head_topk(gq, gk, kk), device, reps)
                    idx = ht.head_topk(gq, gk, kk)
                    row["head_attention_s"] = timed(lambda: ht.index_attention(q, k, v, idx, call.scaling), device,
                                                    reps)
                    oracle = TopKPolicy(OracleSelector(), kk)
                    row["head_oracle_s"] = timed(lambda: oracle(call), device, reps)
            for blk in block_sizes:
                pol = TopKPolicy(GateSelector(bank), kk, selection="block", block=blk)
                key = f"block{blk}"
                try:
                    with torch.no_grad():
                        row[f"{key}_s"] = timed(lambda: pol(call), device, reps)
                        # gate projection + block summaries + block scores
                        mass = bsp.group_sum(pol.selector.block_mass(call, blk), k.shape[1])
                        row[f"{key}_scoring_s"] = timed(lambda: pol.selector.block_mass(call, blk), device, reps)
                        n = bsp.n_blocks(kk, blk)
                        row[f"{key}_topk_s"] = timed(lambda: bsp.select(mass, n, 0, blk), device, reps)
                        row[f"{key}_torch_topk_s"] = timed(lambda: bsp.select_blocks(mass, n, 0, blk), device, reps)
                        if device.type == "cuda":  # the kernels alone (on a CPU the policy takes the reference)
                            idx = bsp.select(mass, n, 0, blk)
                            row[f"{key}_attention_s"] = timed(
                                lambda: bsp.block_attention_fused(q, k, v, idx, blk, call.scaling), device, reps)
                            row[f"{key}_agreement"] = _agreement(pol, call)
                            if blk == 64:
                                row[f"{key}_gpu_busy_s"] = gpu_busy(lambda: pol(call))
                                row[f"{key}_back_to_back_s"] = back_to_back(lambda: pol(call), device, reps)
                                row[f"{key}_speedup_gpu_busy"] = timings["sdpa_gpu_busy_s"] / row[f"{key}_gpu_busy_s"]
                                row[f"{key}_speedup_back_to_back"] = (timings["sdpa_back_to_back_s"]
                                                                      / row[f"{key}_back_to_back_s"])
                    row[f"{key}_speedup_vs_sdpa"] = sdpa / row[f"{key}_s"]
                    row[f"{key}_keys_per_query"] = n * blk
                except torch.OutOfMemoryError:
                    row[f"{key}_s"] = None
                    torch.cuda.empty_cache()
            exact = TopKPolicy(GateSelector(bank, block_score="exact"), kk, selection="block", block=64)
            with torch.no_grad():
                row["block64exact_s"] = timed(lambda: exact(call), device, reps)
            row["block64exact_speedup_vs_sdpa"] = sdpa / row["block64exact_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_host(model, bank, ts, device, calls: int = 200, top: int = 15):
    """Where the host's time goes in one layer's block-gated attention call (k = 64, block 64) and in SDPA's:
    ``calls`` calls issued back to back under cProfile; microseconds per call, and the functions with the most
    own time."""
    import cProfile
    import pstats

    import torch.nn.functional as F

    spec = bank.spec
    attn = [m for m in model.modules() if type(m).__name__.endswith("Attention")][0]
    rows = []
    for t in ts:
        q, k, v, x, cos, sin = _layer_inputs(model, spec, t, device, next(model.parameters()).dtype)
        call = LayerCall(module=attn, layer=0, query=q, key=k, value=v, attention_mask=None,
                         scaling=spec.head_dim**-0.5, dropout=0.0, kwargs={}, x=x, cos=cos, sin=sin)
        pol = TopKPolicy(GateSelector(bank), 64, selection="block", block=64)
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
            entries = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
            row[f"{name}_top"] = [{"function": f"{Path(f).name}:{line}:{fn_name}", "calls_per_call": nc / calls,
                                   "own_us": tt / calls * 1e6, "cumulative_us": ct / calls * 1e6}
                                  for (f, line, fn_name), (_, nc, tt, ct, _) in entries]
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    return rows


def bench_head_tuning(device, reps, t: int = 4096, k: int = 64):
    """Launch settings of the per-head kernels (rows per program, warps) at one T and k: the top-k on gate-sized
    inputs (16 heads, d = 32, bf16) and the attention over the kept keys (head_dim 128, 8 KV heads)."""
    from posthoc_sparse.kernels import head_topk as ht

    if device.type != "cuda":  # the kernels run on a GPU (the CPU interpreter is for the tests)
        return []
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, 16, t, 32, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    q = torch.randn(1, 16, t, 128, generator=gen).to(device, torch.bfloat16)
    key, v = (torch.randn(1, 8, t, 128, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    default = dict(ht.TUNING)
    want = ht.head_topk(a, b, k)
    rows = []
    for part, settings in (("topk", [(16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]),
                           ("attn", [(32, 4), (16, 4), (64, 4), (64, 8)])):
        for n_rows, warps in settings:
            ht.TUNING.update({f"{part}_rows": n_rows, f"{part}_warps": warps})
            try:
                if part == "topk":
                    same = bool(torch.equal(ht.head_topk(a, b, k), want))
                    sec = timed(lambda: ht.head_topk(a, b, k), device, reps)
                else:
                    same = True
                    sec = timed(lambda: ht.index_attention(q, key, v, want, 128**-0.5), device, reps)
            except Exception as e:  # a setting the compiler rejects (shared memory, registers)
                sec, same = None, None
                print("config failed", part, n_rows, warps, type(e).__name__)
            rows.append({"T": t, "k": k, "kernel": part, "rows": n_rows, "num_warps": warps, "seconds": sec,
                         "same_as_default": same})
            print(json.dumps(rows[-1]), flush=True)
            ht.TUNING.update(default)
    return rows


def bench_attention_tuning(model, bank, t, k, device, dtype, reps):
    """Launch settings of the block attention kernel (rows per program, warps, stages) at one T and k."""
    from posthoc_sparse.kernels import block_sparse as bsp

    spec = bank.spec
    q, key, v, _, _, _ = _layer_inputs(model, spec, t, device, dtype)
    default = dict(bsp.TUNING)
    rows = []
    for blk in (64, 128):
        n = bsp.n_blocks(k, blk)
        nq = -(-t // blk)
        gen = torch.Generator(device="cpu").manual_seed(0)
        mass = torch.rand(1, spec.num_kv_heads, nq, nq, generator=gen).to(device)
        idx = bsp.select(mass, n, 0, blk)
        for max_rows, warps, stages in [(128, 4, 2), (64, 4, 2), (128, 8, 2), (128, 4, 3), (128, 8, 3), (256, 8, 2)]:
            bsp.TUNING.update(max_rows=max_rows, num_warps=warps, num_stages=stages)
            try:
                sec = timed(lambda: bsp.block_attention_fused(q, key, v, idx, blk, spec.head_dim**-0.5), device, reps)
            except Exception as e:  # a setting the compiler rejects (shared memory, registers)
                sec = None
                print("config failed", blk, max_rows, warps, stages, type(e).__name__)
            rows.append({"T": t, "k": k, "block": blk, "max_rows": max_rows, "num_warps": warps, "num_stages": stages,
                         "seconds": sec})
            print(json.dumps(rows[-1]), flush=True)
    bsp.TUNING.update(default)
    return rows


def bench_model(model, bank, ts, ks, device, reps, block_sizes=(16, 64)):
    """The whole model: decoder forward with dense (SDPA) attention vs block-gated top-k in every layer."""
    rows = []
    for t in ts:
        ids = ids_for(model, t, device)

        def forward(policy=None):
            with torch.no_grad():
                if policy is None:
                    decoder_of(model)(input_ids=ids, use_cache=False)
                else:
                    with SparseAttention(model, policy):
                        decoder_of(model)(input_ids=ids, use_cache=False)

        dense = timed(forward, device, reps)
        gpu = device.type == "cuda"
        if gpu:  # the attention of every layer alone: a whole forward's GPU time less that of one without attention
            rest = gpu_busy(lambda: forward(NoAttention()))
            dense_attention = gpu_busy(lambda: forward(DensePolicy())) - rest
        for kk in ks:
            row = {"T": t, "k": kk, "dense_decoder_s": dense}
            if gpu:
                row |= {"no_attention_gpu_s": rest, "dense_attention_gpu_s": dense_attention}
            for blk in block_sizes:
                pol = TopKPolicy(GateSelector(bank), kk, selection="block", block=blk)
                row[f"block{blk}_s"] = timed(lambda: forward(pol), device, reps)
                row[f"block{blk}_speedup_vs_dense"] = dense / row[f"block{blk}_s"]
                if gpu:
                    row[f"block{blk}_attention_gpu_s"] = gpu_busy(lambda: forward(pol)) - rest
                    row[f"block{blk}_attention_speedup_whole_model"] = (dense_attention
                                                                        / row[f"block{blk}_attention_gpu_s"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_sweep_memory(size, device, ts):
    """Peak memory of LM training with 29% of layers' attention unfrozen under the gate's hard top-k."""
    import torch.nn.functional as F

    from posthoc_sparse.experiments.sweep import choose_layers, trainable_parameters

    model = build_model(size, device, torch.float32)
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
            with SparseAttention(model, TopKPolicy(GateSelector(bank), 64)):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        row = {"T": t, "layers_unfrozen": layers, "n_layers": spec.num_layers,
               "trainable_params": sum(p.numel() for p in params), "peak_bytes": peak(step, device),
               "step_s": timed(step, device, 2, warmup=0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default="distill,memory,eval,attention,model,sweep")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="perf.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = PLAN[args.size]
    parts = args.parts.split(",")
    import transformers

    result = {"size": args.size, "config": SIZES[args.size], "device": torch.cuda.get_device_name(0)
              if device.type == "cuda" else "cpu", "dtype": str(dtype), "versions": {
                  "torch": torch.__version__, "transformers": transformers.__version__}, "parts": {}}
    model = build_model(args.size, device, dtype)
    bank = GateBank(gate_spec_for_model(model, d_g=32)).reset_random(0).to(device)
    t0 = time.perf_counter()

    def save():
        result["seconds"] = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps(result, indent=2))

    if "distill" in parts:
        result["parts"]["distill"] = bench_distill(model, bank, plan["distill"], device, args.reps, graph_step=True)
        save()
    if "distill_sampled" in parts:
        result["parts"]["distill_sampled"] = [
            row for t, fraction in plan["distill_sampled"]
            for row in bench_distill(model, bank, [t], device, args.reps, row_fraction=fraction, graph_step=True)]
        save()
    if "kernel" in parts:
        result["parts"]["kernel"] = bench_kernel([4096], device, args.reps)
        save()
    if "memory" in parts:
        result["parts"]["memory"] = bench_distill(model, bank, plan["memory"], device, 1, memory_only=True,
                                                 graph_step=True)
        save()
    if "eval" in parts:
        result["parts"]["eval"] = bench_eval(model, bank, plan["eval"], device, args.reps)
        save()
    if "attention" in parts:
        result["parts"]["attention"] = bench_attention(model, bank, plan["attention"], plan["attention_k"], device,
                                                       dtype, args.reps)
        save()
    if "host" in parts:
        result["parts"]["host"] = bench_host(model, bank, plan["eval"][:1] + plan["attention"][:1], device)
        save()
    if "head_tuning" in parts:
        result["parts"]["head_tuning"] = bench_head_tuning(device, args.reps)
        save()
    if "attention_tuning" in parts:
        result["parts"]["attention_tuning"] = bench_attention_tuning(model, bank, plan["attention"][-1], 2048, device,
                                                                     dtype, args.reps)
        save()
    if "model" in parts:
        result["parts"]["model"] = bench_model(model, bank, plan["attention"], plan["attention_k"], device, args.reps)
        save()
    if "sweep" in parts:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["parts"]["sweep"] = bench_sweep_memory(args.size, device, plan["sweep"])
    save()
    print(f"\n{result['device']}  {result['dtype']}  ({args.size} size)")
    for part, rows in result["parts"].items():
        for row in rows:
            keys = [k for k in row if k.endswith(("ratio", "ratio_eager", "ratio_graph", "ratio_vs_decoder", "speedup_vs_sdpa", "speedup_vs_dense",
                                          "speedup_gpu_busy", "speedup_back_to_back", "speedup_whole_model"))
                    or k in ("T", "k", "batch", "row_fraction", "peak_bytes", "error")]
            print(part, {k: (round(row[k], 3) if isinstance(row[k], float) else row[k]) for k in keys})


if __name__ == "__main__":
    main()
