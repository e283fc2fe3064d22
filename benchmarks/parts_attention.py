"""Benchmark parts of one layer: deployed gated top-k attention against SDPA (target 4), and the launch settings of
the kernels (the KL kernels of distillation, the per-head and block attention kernels of deployment).

Speed only: the kernels' agreement with their references at these shapes is tested (GPU-marked tests in
tests/test_block_sparse.py and tests/test_head_topk.py)."""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

from benchmarks.harness import (Bench, back_to_back, gpu_busy, layer_call, part, report, timed, timed_result,
                                tuning, written_words)
from posthoc_sparse.attention.call import LayerCall
from posthoc_sparse.attention.policies import policy_for
from posthoc_sparse.errors import first_line
from posthoc_sparse.gates.modules import GateBank
from posthoc_sparse.ops import block_sparse as bsp
from posthoc_sparse.ops import head_topk as ht
from posthoc_sparse.ops import mask_attention as ma
from posthoc_sparse.ops import token_select as ts
from posthoc_sparse.ops.attention_lse import flash_attention_lse
from posthoc_sparse.ops.kl import kl_grad_fused
from posthoc_sparse.ops.kl import triton as kl_triton  # its single passes and TUNING: no public API times them
from posthoc_sparse.ops.token_select import triton as ts_triton  # token_bracket: the counting alone
from posthoc_sparse.ops.token_select.bits import bits_write

# launch settings tried: (BLOCK_M, BLOCK_N, warps, stages) of the KL kernels; (rows, warps) of the per-head
# kernels; (rows per program, warps, stages) of the block attention kernel
KL_LAUNCHES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3),
               (64, 32, 4, 2), (128, 32, 4, 2), (128, 128, 8, 2)]
HEAD_LAUNCHES = {"topk": [(16, 4), (16, 8), (32, 4), (32, 8), (64, 8)], "attn": [(32, 4), (16, 4), (64, 4), (64, 8)]}
BLOCK_LAUNCHES = [(128, 4, 2), (64, 4, 2), (128, 8, 2), (128, 4, 3), (128, 8, 3), (256, 8, 2)]
# (rows, keys per tile, candidate thresholds, warps) of token_select; (rows, keys per step, warps) of gather_attention
# (rows, keys per tile, candidate thresholds, warps) of token_select's counting kernel; (rows, keys per tile, warps)
# of its write kernel, of gather_attention and of mask_attention
SELECT_LAUNCHES = [(64, 64, 8, 4), (64, 32, 8, 4), (32, 64, 8, 4), (16, 64, 8, 4), (64, 64, 8, 8), (128, 64, 8, 8),
                   (64, 64, 4, 4), (16, 32, 8, 4), (64, 64, 2, 4), (64, 32, 4, 4)]
WRITE_LAUNCHES = [(16, 64, 4), (16, 32, 4), (32, 64, 4), (64, 64, 4)]
GATHER_LAUNCHES = [(16, 8, 4), (16, 8, 8), (32, 8, 8), (16, 16, 8), (32, 4, 4), (8, 16, 4), (64, 4, 8)]
MASK_LAUNCHES = [(64, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 8), (64, 128, 4)]  # 128 x 128: 233 KB of smem


def launch_time(fn, device, reps: int, warmup: int | None = None) -> dict:
    """{"seconds": median seconds of ``fn()``}, or seconds None and the error where a launch setting fails (the
    compiler rejects some for shared memory or registers)."""
    try:
        return {"seconds": timed(fn, device, reps, warmup)}
    except Exception as e:  # noqa: BLE001 - any failure of this setting: recorded in its row, the others run
        return {"seconds": None, "error": f"{type(e).__name__}: {first_line(e, 160)}"}


def _per_head(call: LayerCall, bank: GateBank, kk: int, sdpa: float, head_max_t: int, device, reps: int) -> dict:
    """Per-head selection by the gate (the method's), and on its kernel path each kernel alone and the oracle."""
    q, key, v = call.query, call.key, call.value
    pol = policy_for("gate", kk, bank)
    kernels = ht.kernels_ok(q, key, kk, bank.spec.d_g)  # where the policy takes ops.head_topk (k <= MAX_K)
    if q.shape[2] > head_max_t and not kernels:  # the chunked reference: too slow to time at long context
        return {}
    row = {"head_s": timed(lambda: pol(call), device, max(1, reps // 2))}
    row["head_speedup_vs_sdpa"] = sdpa / row["head_s"]
    row["head_path"] = "kernels" if kernels else "reference"
    if kernels:
        gq, gk = pol.selector.prepare(call)
        row["head_prepare_s"] = timed(lambda: pol.selector.prepare(call), device, reps)
        row["head_topk_s"] = timed(lambda: ht.head_topk(gq, gk, kk), device, reps)
        idx = ht.head_topk(gq, gk, kk)
        row["head_attention_s"] = timed(lambda: ht.index_attention(q, key, v, idx, call.scaling), device, reps)
        oracle = policy_for("oracle", kk)
        row["head_oracle_s"] = timed(lambda: oracle(call), device, reps)
    return row


def _block(call: LayerCall, bank: GateBank, kk: int, blk: int, sdpa_times: dict, device, reps: int) -> dict:
    """Block selection by the gate: the whole call, and its parts (scoring, top-n by the kernel and by
    torch.topk, the attention kernel); at block 64 on a GPU also GPU work alone and calls back to back."""
    q, key, v = call.query, call.key, call.value
    pol = policy_for("gate", kk, bank, selection="block", block_size=blk)
    name = f"block{blk}"
    row = {}
    try:
        row[f"{name}_s"] = timed(lambda: pol(call), device, reps)
        # gate projection + block summaries + block scores
        mass = bsp.group_sum(pol.selector.block_mass(call, blk), key.shape[1])
        row[f"{name}_scoring_s"] = timed(lambda: pol.selector.block_mass(call, blk), device, reps)
        n = bsp.n_blocks(kk, blk)
        row[f"{name}_topk_s"] = timed(lambda: bsp.select(mass, n, 0, blk), device, reps)
        row[f"{name}_torch_topk_s"] = timed(lambda: bsp.select_blocks(mass, n, 0, blk), device, reps)
        if device.type == "cuda":  # the kernels alone (on a CPU the policy takes the reference)
            idx = bsp.select(mass, n, 0, blk)
            row[f"{name}_attention_s"] = timed(
                lambda: bsp.block_attention_fused(q, key, v, idx, blk, call.scaling), device, reps)
            if blk == 64:
                row[f"{name}_gpu_busy_s"] = gpu_busy(lambda: pol(call))
                row[f"{name}_back_to_back_s"] = back_to_back(lambda: pol(call), device, reps)
                row[f"{name}_speedup_gpu_busy"] = sdpa_times["sdpa_gpu_busy_s"] / row[f"{name}_gpu_busy_s"]
                row[f"{name}_speedup_back_to_back"] = (sdpa_times["sdpa_back_to_back_s"]
                                                       / row[f"{name}_back_to_back_s"])
        row[f"{name}_speedup_vs_sdpa"] = sdpa_times["sdpa_s"] / row[f"{name}_s"]
        row[f"{name}_keys_per_query"] = n * blk
    except torch.OutOfMemoryError:
        row[f"{name}_s"] = None
        torch.cuda.empty_cache()
    return row


@part("attention", gpu={"T": [4096, 16384, 32768], "k": [64, 256, 2048]}, cpu={"T": [128, 256], "k": [16, 64]})
@torch.no_grad()
def attention(bench: Bench, plan: dict, block_sizes: tuple[int, ...] = (16, 64, 128), head_max_t: int = 4096
              ) -> list[dict]:
    """One layer's deployed gated top-k attention / SDPA flash attention, forward (target 4).

    The gate's projection, scoring, top-k and attention over the kept keys, against SDPA: per-head selection (its
    kernels where they serve, else the chunked reference up to ``head_max_t``), block selection per block size
    with its parts timed, and exact block scores at block 64. On a GPU also SDPA's and block 64's GPU work alone
    and calls issued back to back. Plan: {"T": window lengths, "k": keys kept}."""
    model, bank, device, reps = bench.model, bench.bank, bench.device, bench.reps
    rows = []
    for t in plan["T"]:
        call = layer_call(model, bank.spec, t, device, bench.dtype)
        q, key, v = call.query, call.key, call.value

        def flash():
            return F.scaled_dot_product_attention(q, key, v, is_causal=True, enable_gqa=True)

        sdpa = {"sdpa_s": timed(flash, device, reps)}
        if device.type == "cuda":  # GPU work alone, and calls issued back to back as a model's layers issue them
            sdpa |= {"sdpa_gpu_busy_s": gpu_busy(flash), "sdpa_back_to_back_s": back_to_back(flash, device, reps)}
        for kk in plan["k"]:
            row = {"T": t, "k": kk, **sdpa, **_per_head(call, bank, kk, sdpa["sdpa_s"], head_max_t, device, reps)}
            for blk in block_sizes:
                row |= _block(call, bank, kk, blk, sdpa, device, reps)
            exact = policy_for("gate", kk, bank, selection="block", block_size=64, block_score="exact")
            row["block64exact_s"] = timed(lambda: exact(call), device, reps)
            row["block64exact_speedup_vs_sdpa"] = sdpa["sdpa_s"] / row["block64exact_s"]
            rows.append(report(row))
    return rows


@part("kernel", gpu=[4096], cpu=[1024], cuda_only=True)
def kernel(bench: Bench, ts: list[int]) -> list[dict]:
    """The fused KL kernels alone, one layer, under several launch settings (``ops.kl`` TUNING).

    One layer of Qwen3-1.7B's heads (16 query, 8 KV, head_dim 128; gate d = 32), bf16 teacher and gate as
    distillation runs them: the teacher's attention forward, the two forward passes and the gradient pass under
    each launch setting, then the whole per-layer KL (forward + gradient) as distillation calls it, with the
    teacher's lse from the attention forward and without. Plan: window lengths T."""
    device, reps = bench.device, bench.reps
    scaling = 128**-0.5
    rows = []
    for t in ts:
        gen = torch.Generator().manual_seed(t)
        q = torch.randn(1, 16, t, 128, generator=gen).to(device, torch.bfloat16)
        k, v = (torch.randn(1, 8, t, 128, generator=gen).to(device, torch.bfloat16) for _ in range(2))
        gq, gk = (torch.randn(1, 16, t, 32, generator=gen).to(device, torch.bfloat16) for _ in range(2))
        _, lse = flash_attention_lse(q, k, v, scaling)
        _, lse_s, lse_g = kl_triton._forward(q, k, gq, gk, scaling, teacher=True)

        def record(name, fn, settings=None, **extra):
            with tuning(kl_triton.TUNING, **(settings or {})):
                rows.append(report({"T": t, "kernel": name, **extra, **launch_time(fn, device, reps, warmup=2)}))

        def gradient():
            return kl_triton._gradient(q, k, gq, gk, 1.0 / t, lse_s, lse_g, scaling, with_kl=True)

        record("teacher_attention_forward", lambda: flash_attention_lse(q, k, v, scaling))
        for kind, teacher in (("fwd", True), ("lse", False)):
            for cfg in KL_LAUNCHES:
                record(kind, lambda: kl_triton._forward(q, k, gq, gk, scaling, teacher=teacher), {kind: cfg},
                       config=cfg)
        for low in (False, True):
            for cfg in KL_LAUNCHES:
                record("grad", gradient, {"grad": cfg, "low": low}, config=cfg, low=low)
        for sem in ("acq_rel", "relaxed"):  # the memory order of the dgk atomics
            for cfg in ((128, 128, 8, 2), (128, 64, 8, 3)):
                record("grad", gradient, {"grad": cfg, "sem": sem}, config=cfg, low=kl_triton.TUNING["low"], sem=sem)
        record("kl_with_flash_lse", lambda: kl_grad_fused(q, k, gq, gk, scaling, 1.0 / t, lse))
        record("kl_teacher_pass", lambda: kl_grad_fused(q, k, gq, gk, scaling, 1.0 / t))
    return rows


@part("head_tuning", gpu={"T": 4096, "k": 64}, cpu={"T": 512, "k": 16}, cuda_only=True)
def head_tuning(bench: Bench, plan: dict) -> list[dict]:
    """Launch settings of the per-head top-k and index-attention kernels (``ops.head_topk`` TUNING).

    Rows per program and warps at one T and k: the top-k on gate-sized inputs (16 heads, d = 32, bf16) and the
    attention over the kept keys (head_dim 128, 8 KV heads). Plan: {"T": window length, "k": keys kept}."""
    device, t, k = bench.device, plan["T"], plan["k"]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, 16, t, 32, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    q = torch.randn(1, 16, t, 128, generator=gen).to(device, torch.bfloat16)
    key, v = (torch.randn(1, 8, t, 128, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    idx = ht.head_topk(a, b, k)  # under the default settings
    fns = {"topk": lambda: ht.head_topk(a, b, k), "attn": lambda: ht.index_attention(q, key, v, idx, 128**-0.5)}
    rows = []
    for kind, settings in HEAD_LAUNCHES.items():
        for n_rows, warps in settings:
            with tuning(ht.TUNING, **{f"{kind}_rows": n_rows, f"{kind}_warps": warps}):
                sec = launch_time(fns[kind], device, bench.reps)
            rows.append(report({"T": t, "k": k, "kernel": kind, "rows": n_rows, "num_warps": warps, **sec}))
    return rows


@part("attention_tuning", gpu={"T": 32768, "k": 2048}, cpu={"T": 1024, "k": 64}, cuda_only=True)
def attention_tuning(bench: Bench, plan: dict) -> list[dict]:
    """Launch settings of the block attention kernel (``ops.block_sparse`` TUNING).

    Rows per program, warps and stages at one T and k, blocks of 64 and 128 selected from random masses. Plan:
    {"T": window length, "k": keys kept}."""
    spec, device, t, k = bench.bank.spec, bench.device, plan["T"], plan["k"]
    call = layer_call(bench.model, spec, t, device, bench.dtype)
    rows = []
    for blk in (64, 128):
        nq = -(-t // blk)
        gen = torch.Generator(device="cpu").manual_seed(0)
        mass = torch.rand(1, spec.num_kv_heads, nq, nq, generator=gen).to(device)  # (B, Hkv, NQ, NB)
        idx = bsp.select(mass, bsp.n_blocks(k, blk), 0, blk)
        for max_rows, warps, stages in BLOCK_LAUNCHES:
            with tuning(bsp.TUNING, max_rows=max_rows, num_warps=warps, num_stages=stages):
                sec = launch_time(lambda: bsp.block_attention_fused(call.query, call.key, call.value, idx, blk,
                                                                    call.scaling), device, bench.reps)
            rows.append(report({"T": t, "k": k, "block": blk, "max_rows": max_rows, "num_warps": warps,
                                "num_stages": stages, **sec}))
    return rows


def _prefill_work(t: int, h: int, g: int, d_sel: int, d: int, k: int, group: int, sweeps: float, elem: int) -> dict:
    """Work of one layer's token-level prefill, counted from the shapes (batch 1): what each kernel must move and
    compute, so that a time can be read against the GPU's rates. ``sweeps``: the selection's mean counting
    sweeps per program (measured). Key tiles are reloaded per block of rows, mostly from L2."""
    pairs = t * (t + 1) / 2  # causal (query, key) pairs per head
    rows, cands = ts.TUNING["select_rows"], ts.TUNING["select_cands"]
    n_sel = h // group  # index sets: per head, or per KV group
    passes = 2 + sweeps + (1 if group > 1 else 0)  # min/max, counting, write (+ the log-sum-exp sweep)
    kept = sum(min(k, i + 1) for i in range(t)) / t  # mean kept keys per row
    sdpa_flops = 4 * d * pairs * h
    return {
        "select_sweeps_total": passes,
        "select_flops": passes * pairs * h * 2 * d_sel,  # every sweep rescores every query head's pairs
        "select_exp": (passes - 1) * pairs * h if group > 1 else 0,  # softmax probabilities, every sweep but the first
        "select_compares": sweeps * pairs * n_sel * cands,  # one compare and add per candidate threshold
        "select_key_tile_bytes": passes * h * (t * t / (2 * rows)) * d_sel * elem,
        "index_bytes": n_sel * t * k * 4,  # (B, H or G, T, k) int32, written once and read once
        "attention_flops": 4 * d * kept * t * h,  # without tensor cores: each row dots its own gathered keys
        "attention_gather_bytes": 2 * d * elem * kept * t * h,  # K and V rows as requested, per query head
        "attention_gather_unique_bytes": 2 * d * elem * kept * t * n_sel,  # one gather per index set
        "sdpa_flops": sdpa_flops,  # tensor cores
        "sdpa_min_bytes": (2 * h + 2 * g) * t * d * elem,  # Q, O, K, V once
    }


def _topk_gap(gq, gk, bits, rows, group: int, limit: int = 2048) -> float:
    """How far the bitmask ``bits`` is from a top-k set of the fp32 reference scores on ``rows`` (B x H // group,
    T) index pairs (the first ``limit``): the largest score a row leaves out less the least it keeps (0 or below for
    a top-k set; ties within rounding give a few ulps), relative to the row's largest score, the most over them."""
    t, n_sel, n_rep = gq.shape[2], bits.shape[1], gq.shape[1] // gk.shape[1]
    gap = float("-inf")
    rows = rows[:limit]
    for sel in rows[:, 0].unique().tolist():  # the rows of one index set share its keys
        r = rows[rows[:, 0] == sel, 1]
        bz, g = sel // n_sel, sel % n_sel
        causal = torch.arange(t, device=gq.device)[None, :] <= r[:, None]
        s = torch.zeros(r.shape[0], t, device=gq.device)
        for h in range(g * group, (g + 1) * group):  # selection_scores_reference's, without its (T, T) tensor
            si = gq[bz, h, r].float() @ gk[bz, h // n_rep].float().T
            s += si if group == 1 else torch.softmax(si.masked_fill(~causal, float("-inf")), -1) / group
        keep = ma.keep_from_bits(bits[bz, g, r], t) & causal
        out_max = s.masked_fill(keep | ~causal, float("-inf")).amax(-1)
        in_min = s.masked_fill(~keep, float("inf")).amin(-1)
        top = s.masked_fill(~causal, float("-inf")).amax(-1).abs().clamp(min=1e-30)
        gap = max(gap, ((out_max - in_min) / top).max().item())
    return gap if rows.shape[0] else 0.0


def _mask_path(q, key, v, gq, gk, k: int, group: int, scaling: float, device, reps: int) -> dict:
    """The selection writing a bitmask and the attention over key tiles (``ops.mask_attention``), with and without
    the test that skips a tile no row of the block keeps, and the share of (row block, key tile) pairs that keep
    a key (what skipping can save). Also both bitmask writes side by side (``select_bits_offsets_s``,
    ``select_bits_reduce_s`` with band keys best first, two other launches of it, and the default, with atomic band
    slots, ``select_bits_reduce_atomic_s``, by row reductions, ``select_bits_reduce_rows_s``, and as words,
    ``select_bits_reduce_words_s``) and whether every one kept the offsets write's sets (``select_bits_same_sets``).
    The words' keys are ranked by their scores summed again, in another order than the tile's product: where they
    differ, the rows and how far each write's sets are from a top-k set of fp32 reference scores there
    (``select_bits_words_rows_differing``, ``select_bits_{offsets,words}_topk_gap``, ``_topk_gap``)."""
    t = q.shape[2]
    row = {"mask_path_taken": ma.dense_enough(t, k, per_head=group == 1)}
    causal = written_words(t, device)
    default = bits_write(ts.TUNING, group, t)  # the write the policy takes: timed and kept below
    if default == "reduce" and ts.TUNING["bits_band"] != "extract":  # the variant named after the default band
        default = f"reduce_{ts.TUNING['bits_band']}"
    extract = dict(bits_kernel="reduce", bits_band="extract")  # the second write, band keys best first
    variants = {"offsets": dict(bits_kernel="offsets"), "reduce": extract,  # the two writes,
                "reduce_32x4": extract | dict(bits_rows=32, bits_warps=4),  # other launches of the
                "reduce_64x8": extract | dict(bits_rows=64, bits_warps=8),  # second (default 64 x 4)
                "reduce_atomic": dict(bits_kernel="reduce", bits_band="atomic"),  # and its atomic band slots,
                "reduce_rows": dict(bits_kernel="reduce", bits_band="rows"),  # and its band keys by row reductions,
                "reduce_words": dict(bits_kernel="reduce", bits_band="words")}  # and as words, scored again
    ref, bits, same = None, None, True
    for name, settings in variants.items():  # each compared with the offsets write's sets as it comes, so at most
        with tuning(ts.TUNING, **settings):  # three T x T / 32-word bitmasks are held at once, not five
            row[f"select_bits_{name}_s"], got = timed_result(lambda: ts.token_select(gq, gk, k, 1.0, group, bits=True),
                                                             device, reps)
        if ref is None:
            ref = got
        elif name == "reduce_words":  # ties within rounding may fall otherwise: measured, not required equal
            rows = ((ref != got) & causal).any(-1).flatten(0, 1).nonzero()
            row["select_bits_words_rows_differing"] = rows.shape[0]
            row["select_bits_offsets_topk_gap"] = _topk_gap(gq, gk, ref, rows, group)
            row["select_bits_words_topk_gap"] = _topk_gap(gq, gk, got, rows, group)
        else:
            same = same and not bool(((ref != got) & causal).any())
        if name == default:
            bits = got
        del got
    row["select_bits_same_sets"] = same
    row["select_bits_s"] = row[f"select_bits_{default}_s"]
    del ref
    for skip in (True, False):
        with tuning(ma.TUNING, skip=skip):
            row[f"mask_attention{'' if skip else '_noskip'}_s"] = timed(
                lambda: ma.mask_attention(q, key, v, bits, scaling), device, reps)
    row["mask_tiles_kept_share"] = ma.kept_tile_share(bits, ma.TUNING["rows"], max(32, ma.TUNING["keys"]))
    return row


@part("prefill_topk", gpu={"T": [8192, 32768], "k": [256, 2048]}, cpu={"T": [96], "k": [40]})
@torch.no_grad()
def prefill_topk(bench: Bench, plan: dict) -> list[dict]:
    """Token-level prefill top-k per head and per KV group (``ops.token_select``) / SDPA flash, one layer.

    The gate's (d = 32) selection kernel alone, the attention over the kept keys alone, the whole policy call
    (with the gate's projection) and its ratio to causal SDPA, with the work each piece does counted from the
    shapes (bytes, FLOPs, the measured counting sweeps). Targets at T = 32768, k = 2048: group >= 1.0x SDPA,
    head >= 0.5x. On a CPU the kernels run only under TRITON_INTERPRET=1 (else only SDPA and the policy's
    reference path are timed). Plan: {"T": window lengths, "k": keys kept}."""
    model, bank, device, reps = bench.model, bench.bank, bench.device, bench.reps
    kernels = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    elem = torch.finfo(bench.dtype).bits // 8
    rows = []
    for t in plan["T"]:
        call = layer_call(model, bank.spec, t, device, bench.dtype)
        q, key, v = call.query, call.key, call.value
        h, g, d = q.shape[1], key.shape[1], q.shape[-1]
        sdpa = timed(lambda: F.scaled_dot_product_attention(q, key, v, is_causal=True, enable_gqa=True), device, reps)
        for kk in plan["k"]:
            for sel in ("head", "group"):
                group = h // g if sel == "group" else 1
                pol = policy_for("gate", kk, bank, selection=sel)
                row = {"T": t, "k": kk, "selection": sel, "sdpa_s": sdpa,
                       "path": "kernels" if pol._token_kernels(call) else "reference"}
                try:
                    if kernels:
                        gq, gk = pol.selector.prepare(call)
                        row["prepare_s"] = timed(lambda: pol.selector.prepare(call), device, reps)
                        row["select_s"], (idx, sweeps) = timed_result(
                            lambda: ts.token_select(gq, gk, kk, 1.0, group, sweeps=True), device, reps)
                        row["select_count_s"] = timed(lambda: ts_triton.token_bracket(gq, gk, kk, 1.0, group),
                                                      device, reps)  # the write is the rest
                        row["select_sweeps_mean"] = sweeps.float().mean().item()
                        row["select_sweeps_max"] = int(sweeps.max())
                        row["attention_s"] = timed(lambda: ts.gather_attention(q, key, v, idx, call.scaling),
                                                   device, reps)
                        del idx
                        row |= _mask_path(q, key, v, gq, gk, kk, group, call.scaling, device, reps)
                        row["select_speedup_vs_sdpa"] = sdpa / row["select_s"]
                        row["attention_speedup_vs_sdpa"] = sdpa / row["attention_s"]
                        row["mask_attention_speedup_vs_sdpa"] = sdpa / row["mask_attention_s"]
                        row["mask_attention_speedup_vs_gather"] = row["attention_s"] / row["mask_attention_s"]
                        row["select_and_mask_attention_speedup_vs_sdpa"] = sdpa / (row["select_bits_s"]
                                                                                    + row["mask_attention_s"])
                        work = _prefill_work(t, h, g, gq.shape[-1], d, kk, group, row["select_sweeps_mean"], elem)
                        row |= work
                        row["select_tflops_per_s"] = work["select_flops"] / row["select_s"] / 1e12
                        row["attention_gather_tb_per_s"] = work["attention_gather_bytes"] / row["attention_s"] / 1e12
                        row["sdpa_tflops_per_s"] = work["sdpa_flops"] / sdpa / 1e12
                    if row["path"] == "kernels" or t <= 4096:  # the chunked reference: too slow at long context
                        row["total_s"] = timed(lambda: pol(call), device, max(1, reps // 2))
                        row["speedup_vs_sdpa"] = sdpa / row["total_s"]
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                    torch.cuda.empty_cache()
                rows.append(report(row))
    return rows


@part("prefill_tuning", gpu={"T": 8192, "k": 2048}, cpu={"T": 256, "k": 64}, cuda_only=True)
def prefill_tuning(bench: Bench, plan: dict) -> list[dict]:
    """Launch settings of the token-level prefill kernels (``ops.token_select`` TUNING).

    At one T and k, per head and per KV group: the selection on gate-sized inputs (16 heads, d = 32, bf16) under
    each (rows, keys per tile, candidate thresholds, warps) of its counting kernel, with the counting sweeps it
    took, then without the guessed first sweep, then under each (rows, keys per tile, warps) of its write kernel;
    the attention over the kept keys (head_dim 128, 8 KV heads) by gathering, under each (rows, keys per step,
    warps), and over key tiles (``ops.mask_attention``) under each (rows, keys per tile, warps), with and without
    skipping empty tiles.
    Plan: {"T": window length, "k": keys kept}."""
    device, t, k = bench.device, plan["T"], plan["k"]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, 16, t, 32, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    q = torch.randn(1, 16, t, 128, generator=gen).to(device, torch.bfloat16)
    key, v = (torch.randn(1, 8, t, 128, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    rows = []
    for sel, group in (("head", 1), ("group", 2)):
        for n_rows, keys, cands, warps in SELECT_LAUNCHES:
            settings = dict(select_rows=n_rows, select_keys=keys, select_cands=cands, select_warps=warps)
            with tuning(ts.TUNING, **settings):
                sec = launch_time(lambda: ts.token_select(a, b, k, 1.0, group), device, bench.reps)
                if sec["seconds"] is not None:
                    sec["sweeps_mean"] = ts.token_select(a, b, k, 1.0, group, sweeps=True)[1].float().mean().item()
            rows.append(report({"T": t, "k": k, "selection": sel, "kernel": "select", **settings, **sec}))
        with tuning(ts.TUNING, select_guess=False):  # the default launch without the guessed first sweep
            sec = launch_time(lambda: ts.token_select(a, b, k, 1.0, group), device, bench.reps)
            if sec["seconds"] is not None:
                sec["sweeps_mean"] = ts.token_select(a, b, k, 1.0, group, sweeps=True)[1].float().mean().item()
        rows.append(report({"T": t, "k": k, "selection": sel, "kernel": "select", "select_guess": False, **sec}))
        for n_rows, keys, warps in WRITE_LAUNCHES:
            settings = dict(write_rows=n_rows, write_keys=keys, write_warps=warps)
            with tuning(ts.TUNING, **settings):
                sec = launch_time(lambda: ts.token_select(a, b, k, 1.0, group), device, bench.reps)
            rows.append(report({"T": t, "k": k, "selection": sel, "kernel": "select", **settings, **sec}))
        idx = ts.token_select(a, b, k, 1.0, group)  # under the default settings
        for n_rows, keys, warps in GATHER_LAUNCHES:
            settings = dict(attn_rows=n_rows, attn_keys=keys, attn_warps=warps)
            with tuning(ts.TUNING, **settings):
                sec = launch_time(lambda: ts.gather_attention(q, key, v, idx, 128**-0.5), device, bench.reps)
            rows.append(report({"T": t, "k": k, "selection": sel, "kernel": "attention", **settings, **sec}))
        idx = None  # free it before the bitmask
        bits = ts.token_select(a, b, k, 1.0, group, bits=True)
        for (n_rows, keys, warps), skip in itertools.product(MASK_LAUNCHES, (True, False)):
            settings = dict(rows=n_rows, keys=keys, warps=warps, skip=skip)
            with tuning(ma.TUNING, **settings):
                sec = launch_time(lambda: ma.mask_attention(q, key, v, bits, 128**-0.5), device, bench.reps)
            rows.append(report({"T": t, "k": k, "selection": sel, "kernel": "mask_attention",
                                **{f"mask_{n}": x for n, x in settings.items()}, **sec}))
    return rows
