"""Benchmark parts of gated decoding (issue 21): one layer's decode attention, and the whole model's decode
tokens/s, dense against gated, side by side; the gate key cache's memory against the KV cache's.

Letters: B batch, H query heads, Hkv key/value heads, S tokens in the cache (the context), L the cache's length,
D head_dim, d gate dim, N decode steps timed.

The caches are filled with random keys and values rather than by a prefill (a gated prefill at these lengths
takes the chunked reference, minutes at 32k): a decode step's work depends on the lengths, not on the values.
Speed only: the fused path's agreement with the reference is tested (tests/test_decode.py, GPU-marked there).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from benchmarks.harness import Bench, cuda_graphed, interleaved, part, report, timed
from posthoc_sparse.attention.call import LayerCall
from posthoc_sparse.attention.graphs import DecodeStep
from posthoc_sparse.attention.interface import SparseAttention, attention_modules
from posthoc_sparse.attention.policies import TopKPolicy
from posthoc_sparse.attention.selectors import GateSelector
from posthoc_sparse.errors import first_line
from posthoc_sparse.gates.modules import GateBank, random_control
from posthoc_sparse.ops import decode as dc

# "selection": decode_model's gated selections ("head": gate_k<k>, "group": gate_k<k>_group); decode_attention
# times both always
GPU_PLAN = {"S": [8192, 16384, 32768, 65536], "batch": [1, 8], "k": [256, 2048], "steps": 8,
            "selection": ["head", "group"]}
CPU_PLAN = {"S": [96], "batch": [1, 2], "k": [16], "steps": 2, "selection": ["head", "group"]}
# SDPA's kernels for a decode step on CUDA, each forced as a baseline beside SDPA's own choice (for a masked single
# query on an H200 with torch 2.11 its choice ran at cuDNN's speed, the memory-efficient kernel at a quarter of it;
# inductor calls cuDNN's in transformers' compiled generate)
SDPA_BACKENDS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def _frozen_gate(bench: Bench) -> GateBank:
    """The run's gate shapes, random and frozen, as deployed gates are (``load_gates`` and the random control
    freeze theirs, so the laid-out projection weight is kept between calls)."""
    return random_control(bench.bank.spec, 0).to(bench.device)


def _randomise(cache_layers, length: int) -> None:
    """Random keys (and values) in the first ``length`` positions of static cache layers, which then hold
    ``length`` tokens: the next update writes at position ``length``."""
    for layer in cache_layers:
        layer.keys[:, :, :length].normal_()
        if layer.values.numel():
            layer.values[:, :, :length].normal_()
        layer.cumulative_length.fill_(length)


def _bytes(layers) -> int:
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))


def _layer_decode(bench: Bench, s_len: int, batch: int):
    """Layer 0's attention call at a static-cache decode step: the new token is the S-th of a cache of
    L = S + 1 positions (random K, V), with the hidden state, rotary tables and padding mask the model hands
    it, and a gate selector whose key cache holds S random gate keys. Returns (call, selector, reset), where
    ``reset()`` rewinds the gate key cache by the token a gated call writes."""
    model, spec, device, dtype = bench.model, bench.bank.spec, bench.device, bench.dtype
    cache = StaticCache(config=model.config, max_cache_len=s_len + 1)
    kv = cache.layers[0]
    kv.lazy_initialization(torch.empty(batch, spec.num_kv_heads, 1, spec.head_dim, device=device, dtype=dtype),
                           torch.empty(batch, spec.num_kv_heads, 1, spec.head_dim, device=device, dtype=dtype))
    _randomise([kv], s_len)
    gen = torch.Generator(device="cpu").manual_seed(s_len)
    q = torch.randn(batch, spec.num_heads, 1, spec.head_dim, generator=gen).to(device, dtype)
    x = torch.randn(batch, 1, spec.hidden_size, generator=gen).to(device, dtype)
    cos, sin = model.model.rotary_emb(x, torch.full((batch, 1), s_len - 1, device=device))
    mask = (torch.arange(s_len + 1, device=device) < s_len).expand(batch, 1, 1, s_len + 1)  # (B, 1, 1, L)
    call = LayerCall(module=attention_modules(model)[0], layer=0, query=q, key=kv.keys, value=kv.values,
                     attention_mask=mask, scaling=spec.head_dim**-0.5, dropout=0.0, kwargs={}, x=x, cos=cos, sin=sin,
                     cache=kv)
    selector = GateSelector(_frozen_gate(bench))
    gk = torch.randn(batch, spec.num_heads, s_len + 1, spec.d_g, generator=gen).to(device, dtype)
    selector.key_cache.keys(0, kv, gk, s_len + 1)  # the mirror, then rewound to S tokens

    def reset():
        for mirror in selector.key_cache.mirrors():
            mirror.cumulative_length.fill_(s_len - 1)

    reset()
    return call, selector, reset


def _pieces(call: LayerCall, selector: GateSelector, reset, kk: int, group: bool, device, reps: int) -> dict:
    """The fused path's parts alone: the gate's query and key-cache write, scoring, selection (the default, and each
    of the one-program radix kernel, the split one and torch.topk), attention over the kept keys."""

    def inputs():
        reset()
        return selector.decode_inputs(call)

    sq, sk = inputs()
    q, key, v = call.query[:, :, 0], call.key, call.value
    valid = call.allowed()[:, 0, 0]
    groups = key.shape[1] if group else None
    sc, pm, pl = dc.decode_scores(sq, sk, valid, stats=group)
    idx = dc.decode_topk(sc, kk, groups, pm, pl)
    row = {"gate_inputs_s": timed(inputs, device, reps),
           "scores_s": timed(lambda: dc.decode_scores(sq, sk, valid, stats=group), device, reps),
           "select_s": timed(lambda: dc.decode_topk(sc, kk, groups, pm, pl), device, reps),
           "attend_s": timed(lambda: dc.decode_attention(q, key, v, idx, call.scaling), device, reps)}
    for mode in ("single", "split", "torch"):  # select_s is the default's choice: split below split_rows rows
        if mode != "torch" or not group:
            with _select_mode(mode):
                row[f"select_{'torch_topk' if mode == 'torch' else mode}_s"] = timed(
                    lambda: dc.decode_topk(sc, kk, groups, pm, pl), device, reps)
    return row


@contextlib.contextmanager
def _select_mode(mode: str):
    saved = dc.TUNING["select"]
    dc.TUNING["select"] = mode
    try:
        yield
    finally:
        dc.TUNING["select"] = saved


def _attention_rows(bench: Bench, s_len: int, batch: int, ks: list[int]) -> list[dict]:
    """The rows of one context and batch: SDPA, then the policy per k and selection."""
    device, reps = bench.device, bench.reps
    call, selector, reset = _layer_decode(bench, s_len, batch)

    def sdpa():
        return sdpa_attention_forward(call.module, call.query, call.key, call.value, call.attention_mask,
                                      scaling=call.scaling)[0]

    base = {"S": s_len, "batch": batch, "sdpa_s": timed(sdpa, device, reps)}
    if device.type == "cuda":
        base["sdpa_graph_s"] = timed(cuda_graphed(sdpa, device), device, reps)
        base |= _sdpa_backends(_dense_calls(call, sdpa), base["sdpa_graph_s"], device, reps)
    rows = []
    for kk in ks:
        for selection in ("head", "group"):
            policy = TopKPolicy(selector, kk, selection=selection)

            def gated(policy=policy):
                reset()
                return policy(call)

            row = {**base, "k": kk, "selection": selection,
                   "path": "fused" if policy._decode_kernels(call) else "reference",
                   "gated_s": timed(gated, device, reps)}
            row["speedup_vs_sdpa"] = base["sdpa_s"] / row["gated_s"]
            if device.type == "cuda":
                row["gated_graph_s"] = timed(cuda_graphed(gated, device), device, reps)
                row["graph_speedup_vs_sdpa"] = base["sdpa_graph_s"] / row["gated_graph_s"]
                row["graph_speedup_vs_fastest_sdpa"] = base["sdpa_fastest_graph_s"] / row["gated_graph_s"]
                for mode in ("single", "split"):  # the whole call with each radix select, captured the same way
                    with _select_mode(mode):
                        row[f"gated_graph_{mode}_s"] = timed(cuda_graphed(gated, device), device, reps)
                row |= _pieces(call, selector, reset, kk, selection == "group", device, reps)
            rows.append(report(row))
    return rows


def sdpa_gqa(call: LayerCall) -> torch.Tensor:
    """Dense attention of ``call`` through SDPA's own GQA (``enable_gqa``, no copy of K and V): the fastest dense
    decode measured (``_dense_calls``' "gqa_")."""
    return F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=call.attention_mask,
                                          scale=call.scaling, enable_gqa=True)


def _dense_calls(call, sdpa) -> dict:
    """Dense decode attention of one layer, the ways a dense model can call SDPA for one query per sequence:
    "" transformers' call as the stock model makes it (``sdpa``: with a mask, transformers 5.17 repeats K and V for
    GQA, a copy of the cache), "gqa_" SDPA's own GQA (``enable_gqa``, no copy), "packed_" the query heads of a KV
    group as SDPA's query rows against the group's K and V (no copy; transformers 5.24's eager decode), and
    "compiled_" transformers' call through ``torch.compile`` (what ``generate`` runs with a static cache)."""
    q, key, v, mask = call.query, call.key, call.value, call.attention_mask
    b, h, _, d = q.shape
    g = key.shape[1]

    def packed():
        out = F.scaled_dot_product_attention(q.reshape(b, g, h // g, d), key, v, attn_mask=mask, scale=call.scaling)
        return out.reshape(b, h, 1, d)

    return {"": sdpa, "gqa_": lambda: sdpa_gqa(call), "packed_": packed,
            "compiled_": torch.compile(sdpa, fullgraph=True)}


def _sdpa_backends(calls: dict, default_s: float, device, reps: int) -> dict:
    """Each of ``calls`` (``_dense_calls``) replayed as a CUDA graph with SDPA's default choice and with each of
    ``SDPA_BACKENDS`` forced (``sdpa_<call><backend>_graph_s``; one that refuses gets ``sdpa_<call><backend>_error``;
    the compiled call with the default only), and the fastest of all with the stock call's default (``default_s``):
    ``sdpa_fastest_graph_s`` and its name ``sdpa_fastest``, the baseline a gated step must beat."""
    row, times = {}, {"default": default_s}
    for prefix, fn in calls.items():
        for name, backend in [("default", None), *SDPA_BACKENDS.items()]:
            if (prefix == "" and backend is None) or (prefix == "compiled_" and backend is not None):
                continue  # the stock call's default is default_s
            label = f"{prefix}{name}".removesuffix("_default")
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    times[label] = row[f"sdpa_{label}_graph_s"] = timed(cuda_graphed(fn, device), device, reps)
            except (RuntimeError, torch._dynamo.exc.TorchDynamoException) as e:
                row[f"sdpa_{label}_error"] = first_line(e, 160)
    fastest = min(times, key=times.get)
    return row | {"sdpa_fastest": fastest, "sdpa_fastest_graph_s": times[fastest]}


@part("decode_attention", gpu=GPU_PLAN, cpu=CPU_PLAN)
@torch.no_grad()
def decode_attention(bench: Bench, plan: dict) -> list[dict]:
    """One layer's decode attention at a static-cache step, gated (per head and per KV group) / SDPA.

    Per context S, batch B and k: SDPA as the stock model calls it (the padding mask over the cache's length)
    and the deployed policy's call (gate projection and rotary, the gate key cache's write, scoring, top-k,
    attention), each call waited for, and on a GPU also replayed as a CUDA graph (no host launches), with the
    fused path's parts alone. On a CPU the policy takes the reference path. Plan: {"S", "batch", "k", "steps",
    "selection"} (the last two decode_model's)."""
    rows = []
    for s_len in plan["S"]:
        for batch in plan["batch"]:
            try:
                rows += _attention_rows(bench, s_len, batch, plan["k"])
            except torch.OutOfMemoryError as e:
                rows.append(report({"S": s_len, "batch": batch, "error": first_line(e, 160)}))
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# a dense model whose SDPA call uses SDPA's own GQA (``enable_gqa``) with the static cache's mask, where
# transformers 5.17 repeats K and V for GQA whenever there is a mask: the fastest dense decode per layer measured
# (``decode_attention``'s sdpa_gqa rows); registered through transformers' AttentionInterface like the gated path
GQA_IMPL = "posthoc_bench_sdpa_gqa"


def _sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def dense_gqa(model):
    """The dense ``model`` with SDPA's own GQA (``GQA_IMPL``) inside the context, its own attention after."""
    AttentionInterface.register(GQA_IMPL, _sdpa_gqa_forward)
    AttentionMaskInterface.register(GQA_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(GQA_IMPL)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _dense_variants(model, device) -> dict:
    """Dense decode's contexts: the model as it runs (transformers' SDPA call), with cuDNN's kernel forced (on
    CUDA: what inductor calls in compiled generate), and with SDPA's own GQA (``GQA_IMPL``)."""
    variants = {"dense": contextlib.nullcontext, "dense_gqa": lambda: dense_gqa(model)}
    if device.type == "cuda":
        variants["dense_cudnn"] = lambda: sdpa_kernel([SDPA_BACKENDS["cudnn"]])
    return variants


@contextlib.contextmanager
def _bound(model, policy, rewind, dense=contextlib.nullcontext):
    """Around one timed call: the cache rewound, and the policy attached (none: dense, in context ``dense()``)."""
    rewind()
    with SparseAttention(model, policy) if policy is not None else dense():
        yield


def _model_row(bench: Bench, s_len: int, batch: int, ks: list[int], n: int, selections: list[str]) -> dict:
    """Tokens/s of N greedy decode steps after S tokens, dense and gated at each k and selection, eager and (on a
    GPU) each step replayed as a CUDA graph, all in interleaved rounds on one StaticCache (rewound before every
    call)."""
    model, device = bench.model, bench.device
    cache = StaticCache(config=model.config, max_cache_len=s_len + n + 1)
    selector = GateSelector(_frozen_gate(bench))  # one gate key cache for every k
    policies = {f"gate_k{kk}{'' if sel == 'head' else '_' + sel}": TopKPolicy(selector, kk, selection=sel)
                for sel in selections for kk in ks}
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.zeros_like(ids)
    mask = torch.ones(batch, s_len + n + 1, dtype=torch.long, device=device)  # (B, L): no padding
    with SparseAttention(model, next(iter(policies.values()))):  # allocates the KV and gate key caches
        DecodeStep(model, cache, ids, pos, mask, graph=False)()
    mirrors = selector.key_cache.mirrors()
    _randomise([*cache.layers, *mirrors], s_len)

    def rewind():
        for layer in (*cache.layers, *mirrors):
            layer.cumulative_length.fill_(s_len)
        pos.fill_(s_len)

    dense = _dense_variants(model, device)
    variants = {**{name: (None, ctx) for name, ctx in dense.items()},
                **{name: (pol, None) for name, pol in policies.items()}}
    modes = ("", "_graph") if device.type == "cuda" else ("",)
    steps = {f"{name}{mode}_s": (DecodeStep(model, cache, ids, pos, mask, graph=bool(mode)), pol, ctx)
             for mode in modes for name, (pol, ctx) in variants.items()}
    times = interleaved({key: (lambda st=st: [st() for _ in range(n)]) for key, (st, _, _) in steps.items()},
                        device, bench.reps, contexts={key: (lambda pol=pol, ctx=ctx: _bound(model, pol, rewind, ctx))
                                                      for key, (_, pol, ctx) in steps.items()})
    row = {"S": s_len, "batch": batch, "steps": n, "kv_cache_bytes": _bytes(cache.layers),
           "gate_cache_bytes": _bytes(mirrors)}
    row["gate_cache_over_kv_cache_ratio"] = row["gate_cache_bytes"] / row["kv_cache_bytes"]
    for key, t in times.items():
        name = key[:-2]
        row[f"{name}_s_per_token"] = t / n
        row[f"{name}_tokens_per_s"] = batch * n / t
    for mode in modes:
        fastest = min(times[f"{d}{mode}_s"] for d in dense)
        for name in policies:
            row[f"{name}{mode}_speedup_vs_dense"] = times[f"dense{mode}_s"] / times[f"{name}{mode}_s"]
            row[f"{name}{mode}_speedup_vs_fastest_dense"] = fastest / times[f"{name}{mode}_s"]
    return row


@part("decode_model", gpu=GPU_PLAN, cpu=CPU_PLAN)
@torch.no_grad()
def decode_model(bench: Bench, plan: dict) -> list[dict]:
    """The whole model's decode tokens/s with a StaticCache of S tokens, gated (per head and per group) / dense.

    Every step is one token per sequence through all layers and the LM head (``attention.graphs.DecodeStep``, the
    loop of greedy ``generate`` without its host bookkeeping), N steps per timed call; eager (both as transformers
    runs them) and each step replayed as a CUDA graph (both captured the same way). Also the bytes of the gate key
    cache against the KV cache's. Plan: {"S", "batch", "k", "steps", "selection"}."""
    rows = []
    for s_len in plan["S"]:
        for batch in plan["batch"]:
            try:
                rows.append(report(_model_row(bench, s_len, batch, plan["k"], plan["steps"], plan["selection"])))
            except torch.OutOfMemoryError as e:
                rows.append(report({"S": s_len, "batch": batch, "error": first_line(e, 160)}))
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
