"""Every bad value from any source (flags, --set, recipes, gate_config.json, checkpoints) is one line naming the
field and its source, exit code 2; refused runs leave nothing behind; resume refuses settings that change the
result; a loss that blows up stops the run before anything final is written; write errors are exit code 2."""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import pytest
import torch

from posthoc_sparse.config import DistillConfig
from posthoc_sparse.distill.loop import distill
from posthoc_sparse.errors import UserError
from posthoc_sparse.gates.io import GATE_CONFIG_NAME, load_gates
from sparsify_cli.main import main

from .tiny import tiny_model


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run ``sparsify ARGV`` in this process: (exit code, the non-empty lines of stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _recipe(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "r.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BAD_VALUES = [  # (arguments, recipe text or None, the message)
    (["distill", "--lr", "nan"], None, "--lr must be a finite number, got nan"),
    (["distill", "--seed", "100000000000000000000"], None, "--seed must be in [0, 4294967295]"),
    (["distill", "--warmup", "-1"], None, "--warmup must be 0 or more, got -1"),
    (["distill", "--row-fraction", "2"], None, "--row-fraction must be in (0, 1], got 2.0"),
    (["distill", "--max-loss-ratio", "-1"], None, "--max-loss-ratio must be 0 or more"),
    (["eval", "--batch-size", "0"], None, "--batch-size must be a positive number, got 0"),
    (["eval", "--max-tokens", "0"], None, "--max-tokens must be a positive number, got 0"),
    (["eval", "--random-seed", "-3"], None, "--random-seed must be in [0, 4294967295]"),
    (["generate", "--temperature", "0"], None, "--temperature must be a positive number, got 0.0"),
    (["generate", "--temperature", "nan"], None, "--temperature must be a finite number, got nan"),
    (["generate", "--top-p", "2"], None, "--top-p must be in (0, 1], got 2.0"),
    (["generate", "--max-new-tokens", "0"], None, "--max-new-tokens must be a positive number"),
    (["pretrain", "--grad-clip", "nan"], None, "--grad-clip must be a finite number, got nan"),
    (["pretrain", "--dropout", "1"], None, "--dropout must be in [0, 1), got 1.0"),
    (["unfreeze-sweep", "--lr", "inf"], None, "--lr must be a finite number, got inf"),
    (["unfreeze-sweep", "--steps", "-2"], None, "--steps must be 0 or more"),
    (["distill", "--set", "k=8.5"], None, "--set k must be an integer, got '8.5'"),
    (["distill", "--set", "seed=1e20"], None, "--set seed must be an integer, got '1e20'"),
    (["distill", "--set", "lr=nan"], None, "--set lr must be a finite number, got nan"),
    (["pretrain", "--set", "steps=many"], None, "--set steps must be an integer, got 'many'"),
    (["distill"], "k = 8.5\n", "k in recipe {recipe} must be an integer, got 8.5"),
    (["distill"], "k = true\n", "k in recipe {recipe} must be an integer, got True"),
    (["distill"], "steps = [1, 2]\n", "steps in recipe {recipe} must be an integer or none, got [1, 2]"),
    (["distill"], "lr = nan\n", "lr in recipe {recipe} must be a finite number, got nan"),
    (["distill"], "[model]\nname = 'x'\n", "model in recipe {recipe} must be text, got {{'name': 'x'}}"),
    (["pretrain"], "seed = 1e20\n", "seed in recipe {recipe} must be an integer, got 1e+20"),
    (["distill"], b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "recipe {recipe} is not UTF-8 text"),
]


@pytest.mark.parametrize("argv, recipe, message", BAD_VALUES, ids=[" ".join(a) + (f" [{r[:12]!r}]" if r else "")
                                                                   for a, r, _ in BAD_VALUES])
def test_a_bad_value_from_any_source_is_one_line_naming_it_and_exit_2(argv, recipe, message, tmp_path, capsys):
    argv = argv + ["--output", str(tmp_path / "out")] if argv[0] != "generate" else argv
    if recipe is not None:
        path = _recipe(tmp_path, recipe)
        argv, message = argv + ["--recipe", str(path)], message.format(recipe=path)
    code, lines = _cli(argv, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], (code, lines)
    assert not (tmp_path / "out").exists()


EMPTY_ITEMS = [  # (arguments, the flag, its value): a comma list with an empty item
    (["eval", "--k"], "--k", "16,,32"),
    (["eval", "--k"], "--k", "16,32,"),
    (["eval", "--modes"], "--modes", ",dense"),
    (["passkey", "--modes", "dense", "--lengths"], "--lengths", "64,,128"),
    (["unfreeze-sweep", "--layers"], "--layers", "0,,0.2"),
    (["unfreeze-sweep", "--which"], "--which", "0,5,"),
    (["absorb", "--experiments"], "--experiments", "hard,"),
    (["corpus", "--sources"], "--sources", "wiki,,tiny"),
    (["lm-eval", "--tasks"], "--tasks", "hellaswag,,arc_easy"),
    (["distill", "--device-map", "auto", "--max-memory"], "--max-memory", "0=1GiB,,cpu=2GiB"),
]


@pytest.mark.parametrize("argv, flag, value", EMPTY_ITEMS, ids=[f"{a[0]} {f} {v}" for a, f, v in EMPTY_ITEMS])
def test_a_comma_list_with_an_empty_item_is_refused_in_one_line(argv, flag, value, tmp_path, capsys):
    """Never dropped silently (`--k 16,,32` was `--k 16,32`); the one line has no blank line above it."""
    try:
        main([*argv, value, "--output", str(tmp_path / "out")])
        code = 0
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: {flag} has an empty item in {value!r}; separate the values with single "
                              "commas\n")
    assert not (tmp_path / "out").exists()


def test_a_bad_dtype_or_mode_names_its_flag(tiny_gates, capsys):
    gates = tiny_gates[2]
    code, lines = _cli(["generate", "--gates", gates, "--dtype", "float8", "--max-new-tokens", "2"], capsys)
    assert (code, lines) == (2, ["error: --dtype must be auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16), "
                                 "got 'float8'"])
    code, lines = _cli(["generate", "--gates", gates, "--mode", "sideways", "--max-new-tokens", "2"], capsys)
    assert (code, lines) == (2, ["error: --mode must be one of dense, oracle, gate, random, got 'sideways'"])


def _gate_config(gates: Path, **changes) -> Path:
    folder = gates.parent / f"bad-{len(list(gates.parent.iterdir()))}"
    shutil.copytree(gates, folder)
    doc = json.loads((folder / GATE_CONFIG_NAME).read_text())
    (folder / GATE_CONFIG_NAME).write_text(json.dumps(doc | changes))
    return folder


def test_gate_config_fields_are_checked_and_nothing_is_allocated_before_the_shapes_are(tiny_gates, tmp_path, capsys):
    model_dir, corpus, gates = tiny_gates
    for changes, message in (({"num_layers": 1e9}, "num_layers in {cfg} must be an integer, got 1000000000.0"),
                             ({"k": "abc"}, "k in {cfg} must be an integer, got 'abc'"),
                             ({"rotary": 1}, "rotary in {cfg} must be true or false, got 1"),
                             ({"seq_len": -4}, "seq_len in {cfg} must be at least 2"),
                             ({"gate_input": "sideways"}, "gate_input in {cfg} must be one of hidden, qk")):
        folder = _gate_config(gates, **changes)
        with pytest.raises(UserError, match=message.format(cfg=folder / GATE_CONFIG_NAME).replace(".", r"\.")
                           .replace("(", r"\(").replace("[", r"\[")):
            load_gates(folder)
    huge = _gate_config(gates, num_layers=10**9, num_heads=10**6)  # a bank of petabytes, were it built
    with pytest.raises(UserError, match="holds 6 tensors, but gate_config.json describes 1000000000 layers"):
        load_gates(huge)
    with pytest.raises(UserError, match="does not match this model: num_layers 1000000000 != model's 2"):
        load_gates(huge, model=tiny_model("llama"))
    out = tmp_path / "eval"
    code, lines = _cli(["eval", "--gates", huge, "--model", model_dir, "--dataset", corpus, "--output", out], capsys)
    assert code == 2 and len(lines) == 1 and "num_layers 1000000000 != model's 2" in lines[0], lines
    assert not out.exists()


def _distill_cfg(trained_tiny, out: Path, **kw) -> DistillConfig:
    model, corpus = trained_tiny
    base = dict(model=str(model), dataset=str(corpus), output=str(out), k=4, steps=8, seq_len=32, d_g=8, lr=1e-2,
                warmup=1, val_every=1000, val_windows=2, checkpoint_every=4, gate_init="random")
    return DistillConfig(**(base | kw))


def test_refused_runs_leave_nothing_behind(trained_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, corpus = trained_tiny
    pickled = tmp_path / "pickled"  # a model folder whose weights are a pickle only
    shutil.copytree(model, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(model).state_dict(), pickled / "pytorch_model.bin")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [(dict(model=str(tmp_path / "missing")), "does not exist"),
             (dict(dataset=str(empty)), "empty"),
             (dict(dataset=str(tmp_path / "no-text")), "does not exist"),
             (dict(model=str(pickled)), r"has only pickle weights \(pytorch_model.bin\), which can run code"),
             (dict(seq_len=512, k=4), "--seq-len 512 exceeds the model's 256 positions")]
    for i, (kw, message) in enumerate(cases):
        out = tmp_path / "new" / f"out-{i}"  # its parent is new too
        with pytest.raises(UserError, match=message):
            distill(_distill_cfg(trained_tiny, out, **kw))
        assert not (tmp_path / "new").exists(), kw
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError, match="does not exist"):
        distill(_distill_cfg(trained_tiny, existing, model=str(tmp_path / "missing")))
    assert existing.is_dir() and not any(existing.iterdir())  # left as it was, empty


def _state(out: Path) -> Path:
    return out / "checkpoint" / "state.json"


def test_resume_refuses_changed_results_and_malformed_checkpoints_but_takes_a_lower_lr(trained_tiny, tmp_path):
    out = tmp_path / "d"
    distill(_distill_cfg(trained_tiny, out, steps=4))
    for kw, message in ((dict(dtype="bfloat16"), "dtype: checkpoint 'float32', now 'bfloat16'"),
                        (dict(row_fraction=0.5), "row_fraction: checkpoint 1.0, now 0.5"),
                        (dict(steps=2), r"checkpoint .* is at step 4, beyond --steps 2")):
        with pytest.raises(UserError, match=message):
            distill(_distill_cfg(trained_tiny, out, resume=True, **kw))
    doc = json.loads(_state(out).read_text())
    for broken, message in ((doc | {"meta": doc["meta"] | {"step": "x"}}, "step in .*state.json must be an integer"),
                            (doc | {"meta": doc["meta"] | {"sampler": []}}, "sampler in .* must be a JSON object"),
                            ({"meta": doc["meta"]}, "lacks its meta or optimizer part")):
        _state(out).write_text(json.dumps(broken))
        with pytest.raises(UserError, match=message):
            distill(_distill_cfg(trained_tiny, out, resume=True, steps=8))
    _state(out).write_text(json.dumps(doc))
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "checkpoint" / "state.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("optim.")}, out / "checkpoint" / "state.safetensors")
    with pytest.raises(UserError, match="holds no optimizer state at step 4"):
        distill(_distill_cfg(trained_tiny, out, resume=True, steps=8))
    save_file(tensors, out / "checkpoint" / "state.safetensors")
    res = distill(_distill_cfg(trained_tiny, out, resume=True, steps=8, lr=1e-3))  # a lower --lr: an override
    log = json.loads((out / "distill_log.json").read_text())
    assert res.resumed_from == 4 and log["overrides"] == [{"step": 4, "lr": [1e-2, 1e-3], "steps": [4, 8]}]


def test_a_corrupt_checkpoint_advises_the_flag_that_starts_over_and_that_advice_works(trained_tiny, tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["distill", "--model", trained_tiny[0], "--dataset", trained_tiny[1], "--k", "4", "--seq-len", "32",
            "--d-g", "8", "--steps", "4", "--val-every", "1000", "--val-windows", "2", "--checkpoint-every", "2",
            "--gate-init", "random", "--output", out]
    assert _cli(argv, capsys)[0] == 0
    (out / "checkpoint" / "state.safetensors").write_bytes(b"truncated")
    code, lines = _cli(argv + ["--resume"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: checkpoint {out / 'checkpoint'} is corrupt (") and lines[0].endswith(
        "); rerun with --overwrite instead of --resume to start over"), lines
    assert _cli(argv, capsys)[0] == 2  # without --resume alone: the folder exists
    code, lines = _cli(argv + ["--overwrite"], capsys)  # what the error advised
    assert code == 0 and json.loads((out / GATE_CONFIG_NAME).read_text())["steps"] == 4, lines


@pytest.mark.parametrize("command", ["distill", "pretrain", "unfreeze-sweep", "absorb"])
def test_resume_of_an_output_folder_that_does_not_exist_is_refused_in_one_line(command, tmp_path, capsys):
    """Not a fresh run under a mistyped --output (nor under the default one, in the current folder); a folder that
    exists but holds nothing resumable yet (a run killed before its first checkpoint) is still started in
    (test_faults.py), as are the runs a command starts for itself (absorb's, the sweep's own distillation)."""
    out = tmp_path / "no-such-run"
    code = 0
    try:
        main([command, "--output", str(out), "--resume"])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: --resume: output folder {out} does not exist, so there is nothing to resume; "
                              "run without --resume to start\n")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_resume_of_a_folder_with_nothing_resumable_yet_starts_the_run(trained_tiny, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()  # as a run killed before its first write leaves it
    code, lines = _cli(["distill", "--model", trained_tiny[0], "--dataset", trained_tiny[1], "--k", "4", "--seq-len",
                        "32", "--d-g", "8", "--steps", "2", "--val-every", "1000", "--val-windows", "2",
                        "--gate-init", "random", "--output", out, "--resume"], capsys)
    assert code == 0 and json.loads((out / GATE_CONFIG_NAME).read_text())["steps"] == 2, lines


@pytest.mark.parametrize("name, text, where", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": "cut\n{"text": "x"}\n',
     "line 2 is not valid JSON (Unterminated string starting at column 10)"),
    ("doc.json", '[\n  {"text": "a"},\n  {"text": "b" "c"}\n]\n',
     "line 3 is not valid JSON (Expecting ',' delimiter at column 16)"),
], ids=["json lines", "one json document"])
def test_a_corrupt_json_dataset_is_one_line_naming_the_line(name, text, where, trained_tiny, tmp_path):
    """Not also the datasets library's own log line (its handler holds the stderr of the process: a command run
    apart); the library's verbosity is restored after the load."""
    import subprocess
    import sys

    bad = tmp_path / name
    bad.write_text(text)
    code = ("import sys, datasets; from sparsify_cli.main import main; before = datasets.logging.get_verbosity()\n"
            "try:\n    main(sys.argv[1:])\nfinally:\n    assert datasets.logging.get_verbosity() == before")
    argv = ["distill", "--model", str(trained_tiny[0]), "--dataset", str(bad), "--k", "4", "--seq-len", "32", "--d-g",
            "8", "--steps", "2", "--output", str(tmp_path / "out")]
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stderr) == (2, f"error: could not read {bad} as JSON: {where}; check the file\n")
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_before_the_gate_is_written_and_its_advice_works(trained_tiny, tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["distill", "--model", trained_tiny[0], "--dataset", trained_tiny[1], "--k", "4", "--seq-len", "32",
            "--d-g", "8", "--warmup", "1", "--val-every", "1000", "--val-windows", "2", "--checkpoint-every", "2",
            "--gate-init", "random", "--output", out]
    code, lines = _cli(argv + ["--steps", "60", "--lr", "10"], capsys)  # the probe's: loss 0.37 -> 1452, exit 0
    assert code == 2 and lines[-1].startswith("error: the loss diverged by step"), lines
    assert "no checkpoint was saved before that; rerun with a lower --lr" in lines[-1], lines  # it blew up at once
    assert not out.exists()
    assert _cli(argv + ["--steps", "4", "--lr", "1e-2"], capsys)[0] == 0  # a good start, then a learning rate
    code, lines = _cli(argv + ["--steps", "60", "--lr", "10", "--resume"], capsys)  # that blows up: a good
    step = json.loads(_state(out).read_text())["meta"]["step"]  # checkpoint stays, none is written while it blows
    assert code == 2 and "diverged" in lines[-1] and 4 <= step < 60, lines  # up
    assert f"the last good checkpoint (step {step}) is in {out / 'checkpoint'}: rerun with --resume and a lower " \
           "--lr" in lines[-1], lines
    assert json.loads((out / GATE_CONFIG_NAME).read_text())["steps"] == 4  # the earlier run's gate, untouched
    code, lines = _cli(argv + ["--steps", "60", "--lr", "1e-2", "--resume"], capsys)  # what the error advised
    assert code == 0 and json.loads((out / GATE_CONFIG_NAME).read_text())["steps"] == 60, lines
    log = json.loads((out / "distill_log.json").read_text())
    assert log["overrides"] == [{"step": step, "steps": [4, 60]}] and len(log["history"]) == 60  # the blown-up
    # run's override went with it: resumed from the good checkpoint, only the longer schedule is an override


@pytest.mark.parametrize("error", ["ENOSPC", "EFBIG", "EROFS", "EACCES"])
def test_write_errors_are_exit_2_and_leave_nothing_half_written(error, trained_tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"
    monkeypatch.setenv("POSTHOC_SPARSE_FAULT", "errno:1:" + error)  # the first write fails
    monkeypatch.setattr("posthoc_sparse.io._faults", {"count": 0})
    argv = ["distill", "--model", trained_tiny[0], "--dataset", trained_tiny[1], "--k", "4", "--seq-len", "32",
            "--d-g", "8", "--steps", "2", "--val-windows", "2", "--output", out]
    code, lines = _cli(argv, capsys)
    assert code == 2 and lines[-1].startswith("error: cannot write"), lines  # after the progress lines
    assert not out.exists()


def test_a_real_file_size_limit_is_exit_2(trained_tiny, tmp_path, capsys):
    """EFBIG from the system itself (Python ignores SIGXFSZ): a 4 kB limit on file sizes, then a gate to write."""
    out = tmp_path / "d"
    argv = ["distill", "--model", trained_tiny[0], "--dataset", trained_tiny[1], "--k", "4", "--seq-len", "32",
            "--d-g", "8", "--steps", "2", "--val-windows", "2", "--checkpoint-every", "1", "--output", out]
    from posthoc_sparse.sources import local_documents

    local_documents(str(trained_tiny[1]), "text")  # datasets' cache of the text is written before the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        code, lines = _cli(argv, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2 and lines[-1].startswith("error: cannot write") and "File too large" in lines[-1], lines
    assert not out.exists()


def test_a_sweep_resumed_with_other_settings_is_refused_listing_them(tiny_gates, tmp_path):
    from posthoc_sparse.experiments.sweep import SweepConfig, run_sweep

    _, corpus, gates = tiny_gates
    cfg = SweepConfig(gates=str(gates), dataset=str(corpus), layers="0", steps=1, eval_windows=2,
                      output=str(tmp_path / "s"))
    run_sweep(cfg)
    with pytest.raises(UserError, match=r"settings differ \(steps: checkpoint 1, now 3; lr: checkpoint 0.0001, now "
                                        r"0.01\)"):
        run_sweep(SweepConfig(**cfg.__dict__ | {"resume": True, "steps": 3, "lr": 1e-2}))
    assert torch.isfinite(torch.tensor(run_sweep(SweepConfig(**cfg.__dict__ | {"resume": True}))["table"][0]["gap"]))
