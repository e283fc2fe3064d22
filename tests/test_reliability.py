"""Reliability: kill -9 then --resume loses nothing; every bad input is one line and exit code 2; the artifact
loader never fails with anything but the clear error (fuzzed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posthoc_sparse.config import DistillConfig
from posthoc_sparse.distill.loop import distill
from posthoc_sparse.errors import UserError
from posthoc_sparse.gates.io import GATE_CONFIG_NAME, GATE_WEIGHTS_NAME, load_gates, save_gates
from posthoc_sparse.gates.modules import GateBank, GateSpec

from .tiny import tiny_tokenizer, write_corpus

ENV = {**os.environ, "COLUMNS": "200"}
CLI = [sys.executable, "-m", "sparsify_cli"]


def _distill_cmd(model, corpus, out, steps, extra=()):
    return CLI + ["distill", "--model", str(model), "--dataset", str(corpus), "--k", "4", "--seq-len", "32",
                  "--d-g", "8", "--steps", str(steps), "--lr", "1e-2", "--gate-init", "random", "--val-every", "1000",
                  "--val-windows", "2", "--checkpoint-every", "5", "--output", str(out), *extra]


def _wait_for(path: Path, proc: subprocess.Popen, cond, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists():
            try:
                if cond(json.loads(path.read_text())):
                    return True
            except (json.JSONDecodeError, OSError):
                pass
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _full_killed_resumed(cmd, out: Path, reached_when, env=ENV) -> int:
    """Run ``cmd(out / "full")`` to the end; run ``cmd(out / "killed")``, SIGKILL it once its checkpoint's
    state.json satisfies ``reached_when(meta)``, then rerun it with --resume. Returns the step it was killed at."""
    full = subprocess.run(cmd(out / "full"), capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(cmd(out / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = out / "killed" / "checkpoint" / "state.json"
    reached = _wait_for(state, proc, lambda d: reached_when(d["meta"]))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached, "the run ended before a checkpoint could be interrupted"
    killed_at = json.loads(state.read_text())["meta"]["step"]
    resumed = subprocess.run(cmd(out / "killed") + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    return killed_at


def test_kill_9_during_distill_then_resume_gives_the_uninterrupted_result(trained_tiny, tmp_path):
    model, corpus = trained_tiny
    steps = 60
    seen = {}

    def cmd(out):
        if out.name == "killed" and (out / "checkpoint").exists():
            seen["final_before_resume"] = (out / GATE_CONFIG_NAME).exists()  # nothing final was half-written
        return _distill_cmd(model, corpus, out, steps)

    _full_killed_resumed(cmd, tmp_path, lambda meta: meta["step"] >= 10)
    assert seen == {"final_before_resume": False}
    a, _ = load_gates(tmp_path / "full")
    b, cfg = load_gates(tmp_path / "killed")
    assert cfg["steps"] == steps
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def _pretrain_cmd(tok, corpus, out, steps, extra=()):
    return CLI + ["pretrain", "--dataset", str(corpus), "--tokenizer", str(tok), "--n-layer", "2", "--d-model", "32",
                  "--n-head", "2", "--d-ff", "64", "--seq-len", "32", "--batch-size", "8", "--steps", str(steps),
                  "--lr", "3e-3", "--min-lr", "3e-4", "--warmup", "5", "--dropout", "0.1", "--eval-every", "1000",
                  "--eval-windows", "2", "--checkpoint-every", "10", "--device", "cpu", "--output", str(out), *extra]


def test_kill_9_during_pretrain_then_resume_gives_the_uninterrupted_result(tmp_path):
    from safetensors.torch import load_file

    tok, corpus = tmp_path / "tok", write_corpus(tmp_path / "corpus.txt")
    tiny_tokenizer().save_pretrained(tok)
    steps = 120  # dropout on: the per-step seeding must survive the kill too
    env = ENV | {"OMP_NUM_THREADS": "1"}  # tiny matrices: threads only add contention
    seen = {}

    def cmd(out):
        if out.name == "killed" and (out / "checkpoint").exists():
            seen["final_before_resume"] = (out / "config.json").exists()  # nothing final was written
        return _pretrain_cmd(tok, corpus, out, steps)

    killed_at = _full_killed_resumed(cmd, tmp_path, lambda meta: 20 <= meta["step"] < steps, env)  # final: last
    assert seen == {"final_before_resume": False}
    log = json.loads((tmp_path / "killed" / "pretrain_log.json").read_text())
    assert 0 < log["resumed_from"] == killed_at < steps and log["history"][-1]["step"] == steps
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_kill_9_during_sweep_then_resume_skips_finished_points(trained_tiny, tmp_path):
    model, corpus = trained_tiny
    gates = tmp_path / "gates"
    distill(DistillConfig(model=str(model), dataset=str(corpus), output=str(gates), k=4, steps=10, seq_len=32,
                          d_g=8, gate_init="random", val_every=10, val_windows=2))
    cmd = CLI + ["unfreeze-sweep", "--gates", str(gates), "--dataset", str(corpus), "--layers", "0,0.5,1",
                 "--steps", "20", "--eval-windows", "2", "--output", str(tmp_path / "s")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    first = tmp_path / "s" / "points" / "f0.0000-random.json"
    reached = _wait_for(first, proc, lambda d: True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached
    done = sorted(p.name for p in (tmp_path / "s" / "points").glob("*.json"))
    run = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert len(report["points"]) == 6 and len(done) >= 2
    assert not list((tmp_path / "s" / "points").glob(".*tmp*"))  # no temporary files left behind


BAD_INPUTS = [
    (["distill", "--model", "/nonexistent/model"], "does not exist"),
    (["distill", "--model", "Qwen/No-Such-Model-xyz"], "could not load model"),
    (["distill", "--k", "0"], "--k must be a positive"),
    (["distill", "--k", "600"], "choose k < --seq-len"),
    (["distill", "--d-g", "7"], "--d-g must be even"),
    (["distill", "--gate-input", "sideways"], "--gate-input must be one of"),
    (["distill", "--recipe", "no-such-recipe"], "not found"),
    (["distill", "--set", "colour=blue"], "unknown DistillConfig key 'colour'"),
    (["eval", "--gates", "/nonexistent/gates"], "does not exist"),
    (["eval", "--k", "a,b"], "--k takes integers"),
    (["eval", "--modes", "gate"], "needs --gates"),
    (["unfreeze-sweep", "--layers", "2"], "--layers fractions must lie in [0, 1]"),
    (["unfreeze-sweep", "--which", "x,y"], "--which"),
    (["generate", "--prompt", " "], "empty"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1"}
    if args[0] in ("distill", "unfreeze-sweep") and "--output" not in args:
        args = args + ["--output", str(tmp_path / "out")]
    run = subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in run.stderr, run.stderr


def test_bad_files_are_user_errors(trained_tiny, tmp_path):
    model, corpus = trained_tiny
    base = dict(model=str(model), dataset=str(corpus), k=4, steps=2, seq_len=32, d_g=8, val_windows=2)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                  "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 64}))
    short = tmp_path / "short.txt"
    short.write_text("the city\n\nthe river\n")
    odd = tmp_path / "data.tsv"
    odd.write_text("a\tb\n")
    header_only = tmp_path / "data.csv"
    header_only.write_text("a,b\n")
    cases = [
        (dict(model=str(bert)), "not a causal LM"),
        (dict(dataset=str(short)), "fewer than one window"),
        (dict(dataset=str(odd)), "unsupported"),
        (dict(dataset=str(header_only)), "has no text after loading"),
        (dict(output=str(corpus / "x")), "cannot write"),
    ]
    for override, message in cases:
        cfg = DistillConfig(**{**base, "output": str(tmp_path / "o"), **override})
        with pytest.raises(UserError, match=message):
            distill(cfg)


def test_nan_loss_stops_with_the_layer_named_and_keeps_the_last_checkpoint(trained_tiny, tmp_path):
    model, corpus = trained_tiny
    cfg = DistillConfig(model=str(model), dataset=str(corpus), k=4, steps=40, seq_len=32, d_g=8, lr=1e25,
                        warmup=1, checkpoint_every=1, val_every=1000, val_windows=2, output=str(tmp_path / "nan"),
                        gate_init="random")
    with pytest.raises(UserError, match=r"non-finite at step \d+ in layer \d+"):
        distill(cfg)
    state = json.loads((tmp_path / "nan" / "checkpoint" / "state.json").read_text())
    assert state["meta"]["step"] >= 1
    assert not (tmp_path / "nan" / GATE_CONFIG_NAME).exists()


def _gate_folder(tmp_path: Path) -> Path:
    spec = GateSpec(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, hidden_size=16, d_g=4, rotary_dim=8)
    return save_gates(tmp_path / "g", GateBank(spec).reset_random(0), {"k": 2})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), cut=st.integers(min_value=0, max_value=5000), flip=st.integers(0, 255))
def test_fuzzed_weights_file_gives_only_the_clear_error(tmp_path, data, cut, flip):
    folder = _gate_folder(tmp_path)
    weights = folder / GATE_WEIGHTS_NAME
    good = weights.read_bytes()
    mutated = bytearray(good[:cut] + data)
    if mutated:
        mutated[cut % len(mutated)] ^= flip
    weights.write_bytes(bytes(mutated))
    try:
        load_gates(folder)
    except UserError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(["num_layers", "num_heads", "d_g", "head_dim", "gate_input", "rotary",
                                            "format_version", "hidden_size", "num_kv_heads", "rotary_dim", "extra"]),
                           st.one_of(st.integers(-3, 40), st.text(max_size=5), st.booleans(), st.none(),
                                     st.lists(st.integers(), max_size=2))))
def test_fuzzed_config_gives_only_the_clear_error(tmp_path, doc):
    folder = _gate_folder(tmp_path)
    config = json.loads((folder / GATE_CONFIG_NAME).read_text())
    (folder / GATE_CONFIG_NAME).write_text(json.dumps({**config, **doc}))
    try:
        load_gates(folder)
    except UserError:
        pass
