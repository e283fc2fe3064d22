"""Fault injection: kill -9 at every file write and rename of a distill, an eval, a sweep and a pretrain run (tiny
models), rerun with --resume, and compare the final artifacts with an uninterrupted run's; Ctrl-C (SIGINT) at
safe points and at once; two writers on one output folder.

Each run is a child of one fork server that imported torch, transformers, the CLI and what its commands import
once, so a run costs about a second instead of a fresh interpreter's several. ``POSTHOC_SPARSE_FAULT`` tells the
child where to die (``posthoc_sparse.io.fault_point``, called before every write and rename): the uninterrupted run
logs its points, then one run is killed at each distinct point (the first and the last time each write or rename
happens).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from .tiny import tiny_tokenizer, write_corpus

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["tests.test_faults", "sparsify_cli.main", "sparsify_cli.distill", "sparsify_cli.evaluate",
                            "sparsify_cli.sweep", "sparsify_cli.pretrain", "posthoc_sparse.distill.loop",
                            "posthoc_sparse.evaluate.perplexity", "posthoc_sparse.experiments.sweep",
                            "posthoc_sparse.experiments.pretrain", "datasets", "matplotlib"])  # what the runs import
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
IN_FLIGHT = re.compile(r"\.(tmp|new|ready|old)-|\.lock$|^\.write-test-")


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    """The fork server, started with the runs' environment: the libraries it imports read settings such as offline
    mode when imported, as they would in a run that imported them itself."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        multiprocessing.forkserver.ensure_running()


def _child(argv: list[str], fault: str | None, log: str) -> None:
    """Run ``sparsify ARGV`` in this (forked) process with the fault spec ``fault``; stdout and stderr go to ``log``."""
    os.environ.update(ENV)
    os.environ.pop("POSTHOC_SPARSE_FAULT", None)
    if fault:
        os.environ["POSTHOC_SPARSE_FAULT"] = fault
    torch.set_num_threads(1)  # tiny models: threads only add contention
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from sparsify_cli.main import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    os._exit(code)


class Runner:
    """Runs ``sparsify`` commands as fork-server children; counts the runs and the faults injected."""

    def __init__(self, tmp: Path):
        self.tmp, self.runs, self.faults = tmp, 0, 0

    def start(self, argv: list[str], fault: str | None = None):
        self.runs += 1
        self.faults += fault is not None and not fault.startswith("log:")
        log = self.tmp / f"run-{self.runs}.log"
        proc = CTX.Process(target=_child, args=([str(a) for a in argv], fault, str(log)))
        proc.start()
        return proc, log

    def __call__(self, argv: list[str], fault: str | None = None, timeout: float = 300) -> tuple[int, str]:
        proc, log = self.start(argv, fault)
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return proc.exitcode, log.read_text() if log.exists() else ""

    def points(self, argv: list[str]) -> list[str]:
        """The fault points of an uninterrupted run of ``argv`` (which must succeed), in order."""
        log = self.tmp / f"points-{self.runs}.txt"
        code, out = self(argv, f"log:{log}")
        assert code == 0, out[-3000:]
        return [line.split("\t", 1)[1] for line in log.read_text().splitlines()]


def report(name: str, run: Runner, lost: list) -> None:
    """With POSTHOC_SPARSE_FAULT_REPORT=FILE, append this test's counts (faults injected, runs, results lost) to
    FILE as a JSON line: what a reliability probe reports."""
    if path := os.environ.get("POSTHOC_SPARSE_FAULT_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, "faults": run.faults, "runs": run.runs, "lost": len(lost)}) + "\n")


def kill_points(points: list[str]) -> list[int]:
    """1-based indices of the first and the last time each distinct write or rename happens."""
    first, last = {}, {}
    for i, label in enumerate(points, 1):
        if label != "step":
            first.setdefault(label, i)
            last[label] = i
    return sorted(set(first.values()) | set(last.values()))


def leftovers(out: Path) -> list[str]:
    """Temporary files, folders in flight and lock files under ``out`` and beside it."""
    found = [str(p) for p in out.rglob("*") if IN_FLIGHT.search(p.name)] if out.exists() else []
    return found + [str(p) for p in out.parent.glob(f".{out.name}.*")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama whose heads are 64 wide (so the sweep's own distillation, d_g 32, fits), a corpus, a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=64, vocab_size=96, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "tok")
    return root / "model", write_corpus(root / "corpus.txt", n_docs=80), root / "tok"


def _distill(model, corpus, out, *extra):
    return ["distill", "--model", model, "--dataset", corpus, "--k", "4", "--seq-len", "32", "--d-g", "8", "--steps", "6",
            "--lr", "1e-2", "--warmup", "2", "--gate-init", "random", "--val-every", "3", "--val-windows", "2",
            "--checkpoint-every", "2", "--save-every", "3", "--output", out, *extra]


def _pretrain(tok, corpus, out, *extra):
    return ["pretrain", "--dataset", corpus, "--tokenizer", tok, "--n-layer", "1", "--d-model", "32", "--n-head", "2",
            "--d-ff", "64", "--seq-len", "16", "--steps", "6", "--batch-size", "4", "--warmup", "1", "--dropout", "0.1",
            "--eval-every", "3", "--eval-windows", "2", "--checkpoint-every", "2", "--log-every", "1", "--device",
            "cpu", "--output", out, *extra]


def _sweep(model, corpus, out, *extra):  # no --gates: the sweep distills its gate first (and resumes that too)
    return ["unfreeze-sweep", "--model", model, "--dataset", corpus, "--k", "4", "--seq-len", "32", "--distill-steps",
            "4", "--layers", "0,1", "--steps", "2", "--eval-windows", "2", "--output", out, *extra]


def _eval(model, corpus, gates, out, *extra):
    return ["eval", "--gates", gates, "--model", model, "--dataset", corpus, "--k", "4", "--max-windows", "2",
            "--output", out, *extra]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return x.keys() == y.keys() and all(torch.allclose(x[k].float(), y[k].float(), atol=1e-6, rtol=1e-5) for k in x)


def _losses(doc: dict, key: str = "loss") -> list:
    return [(h["step"], round(h[key], 5)) for h in doc["history"]]


def same_distill(ref: Path, out: Path) -> bool:
    cfg = lambda p: {k: v for k, v in json.loads((p / "gate_config.json").read_text()).items()}  # noqa: E731
    log = lambda p: json.loads((p / "distill_log.json").read_text())  # noqa: E731
    snaps = lambda p: sorted(s.name for s in (p / "snapshots").iterdir())  # noqa: E731
    return (_same_tensors(ref / "gates.safetensors", out / "gates.safetensors") and cfg(ref) == cfg(out)
            and _losses(log(ref)) == _losses(log(out)) and snaps(ref) == snaps(out)
            and all(_same_tensors(ref / "snapshots" / s / "gates.safetensors", out / "snapshots" / s / "gates.safetensors")
                    for s in snaps(ref)))


def same_pretrain(ref: Path, out: Path) -> bool:
    log = lambda p: json.loads((p / "pretrain_log.json").read_text())  # noqa: E731
    evals = lambda p: {e["step"]: round(e["heldout_loss"], 5) for e in log(p)["evals"]}  # noqa: E731
    return (_same_tensors(ref / "model.safetensors", out / "model.safetensors") and (out / "config.json").is_file()
            and _losses(log(ref)) == _losses(log(out))  # a resumed run also measures where it resumed:
            and all(evals(out).get(step) == loss for step, loss in evals(ref).items()))  # the others must agree


def same_sweep(ref: Path, out: Path) -> bool:
    points = lambda p: sorted((q["fraction"], q["gate"], round(q["ppl"], 4), round(q["dense_ppl_after"], 4))  # noqa: E731
                              for q in json.loads((p / "sweep.json").read_text())["points"])
    return (points(ref) == points(out) and (out / "sweep.png").is_file()
            and _same_tensors(ref / "gates" / "gates.safetensors", out / "gates" / "gates.safetensors"))


def same_eval(ref: Path, out: Path) -> bool:
    results = lambda p: [(r["mode"], r["k"], round(r["perplexity"], 5), r["routing"].get("recall"))  # noqa: E731
                         for r in json.loads((p / "eval.json").read_text())["results"]]
    return results(ref) == results(out) and (out / "eval.png").is_file()


def kill_and_resume(run: Runner, make, same, tmp: Path, resume: tuple[str, ...] = ("--resume",)) -> dict:
    """Kill a run of ``make(out)`` at each of its kill points, rerun it (with ``resume``), and compare the result
    with the uninterrupted run's. Returns the counts: points, killed runs, and results lost or different."""
    ref = tmp / "reference"
    points = run.points(make(ref))
    assert not leftovers(ref), leftovers(ref)
    lost = []
    for n in kill_points(points):
        out = tmp / f"killed-{n}"
        code, log = run(make(out), f"kill:{n}")
        assert code == -signal.SIGKILL, (n, points[n - 1], code, log[-2000:])
        code, log = run(make(out) + list(resume))
        if code != 0 or not same(ref, out) or leftovers(out):
            lost.append((n, points[n - 1], code, leftovers(out), log[-500:]))
    return {"points": len(points), "killed": len(kill_points(points)), "lost": lost}


@pytest.mark.parametrize("workflow", ["distill", "pretrain", "sweep", "eval"])
def test_kill_at_every_write_and_rename_then_rerun_gives_the_uninterrupted_result(workflow, assets, tmp_path):
    model, corpus, tok = assets
    run = Runner(tmp_path)
    if workflow == "distill":
        counts = kill_and_resume(run, lambda out: _distill(model, corpus, out), same_distill, tmp_path)
    elif workflow == "pretrain":
        counts = kill_and_resume(run, lambda out: _pretrain(tok, corpus, out), same_pretrain, tmp_path)
    elif workflow == "sweep":
        counts = kill_and_resume(run, lambda out: _sweep(model, corpus, out), same_sweep, tmp_path)
    else:
        gates = tmp_path / "gates"
        assert run(_distill(model, corpus, gates))[0] == 0
        counts = kill_and_resume(run, lambda out: _eval(model, corpus, gates, out), same_eval, tmp_path,
                                 resume=("--overwrite",))  # eval has no --resume: it is run again
    report(f"kill {workflow}", run, counts["lost"])
    assert counts["killed"] >= {"distill": 15, "pretrain": 12, "sweep": 20, "eval": 4}[workflow], counts
    assert not counts["lost"], counts["lost"]


def _message(log: str) -> list[str]:
    return [ln for ln in log.strip().splitlines() if ln.strip()]


def test_ctrl_c_in_training_stops_after_a_checkpoint_of_that_step_and_resume_finishes_it(assets, tmp_path):
    model, corpus, tok = assets
    run = Runner(tmp_path)
    for make, same, ref in ((lambda out: _distill(model, corpus, out), same_distill, tmp_path / "d-ref"),
                            (lambda out: _pretrain(tok, corpus, out), same_pretrain, tmp_path / "p-ref")):
        points = run.points(make(ref))
        third_step = [i for i, p in enumerate(points, 1) if p == "step"][2]  # Ctrl-C during step 3 (not a multiple
        out = ref.with_name(ref.name + "-int")  # of --checkpoint-every 2)
        code, log = run(make(out), f"int:{third_step}")
        lines = _message(log)
        assert code == 130 and "Traceback" not in log, log[-2000:]
        assert re.search(r"interrupted: the checkpoint of step 3 .* is kept in .*: rerun the same command with "
                         "--resume", lines[-1]), lines[-1]
        assert json.loads((out / "checkpoint" / "state.json").read_text())["meta"]["step"] == 3
        code, log = run(make(out) + ["--resume"])
        assert code == 0 and same(ref, out) and not leftovers(out), log[-2000:]
    report("ctrl-c training", run, [])


def test_sigterm_in_training_stops_like_ctrl_c_after_a_checkpoint_and_releases_the_lock(assets, tmp_path):
    """A scheduler preempting the job (SIGTERM) used to end the process at once: no checkpoint of the step under
    way, and the folder's lock file left behind. It now stops as Ctrl-C does, and resume finishes the run."""
    model, corpus, _ = assets
    run = Runner(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "term"
    points = run.points(_distill(model, corpus, ref))
    third_step = [i for i, p in enumerate(points, 1) if p == "step"][2]
    code, log = run(_distill(model, corpus, out), f"term:{third_step}")
    assert code == 130 and "Traceback" not in log, log[-2000:]
    assert re.search(r"interrupted: the checkpoint of step 3 .* is kept in", _message(log)[-1]), log[-2000:]
    assert not leftovers(out), leftovers(out)  # the lock released, nothing in flight
    code, log = run(_distill(model, corpus, out, "--resume"))
    assert code == 0 and same_distill(ref, out) and not leftovers(out), log[-2000:]
    report("sigterm training", run, [])


def test_ctrl_c_before_anything_resumable_leaves_nothing_and_exits_130(assets, tmp_path):
    model, corpus, tok = assets
    run = Runner(tmp_path)
    # distill: Ctrl-C at its first write (the step-0 snapshot, before any checkpoint): the new folder goes
    code, log = run(_distill(model, corpus, tmp_path / "d"), "int:1")
    assert code == 130 and "nothing resumable was saved yet, so" in _message(log)[-1], log[-2000:]
    assert not (tmp_path / "d").exists() and not leftovers(tmp_path / "d")
    # eval: the report is built beside the output folder; Ctrl-C at its last write leaves nothing
    gates = tmp_path / "gates"
    assert run(_distill(model, corpus, gates))[0] == 0
    points = run.points(_eval(model, corpus, gates, tmp_path / "e-ref"))
    last_write = points.index("replace eval.png") + 1
    code, log = run(_eval(model, corpus, gates, tmp_path / "e"), f"int:{last_write}")
    assert code == 130 and f"nothing was written to {tmp_path / 'e'}" in log, log[-2000:]
    assert not (tmp_path / "e").exists() and not leftovers(tmp_path / "e")
    # eval --overwrite of an existing report: interrupted, the old report stays whole
    code, log = run(_eval(model, corpus, gates, tmp_path / "e-ref", "--k", "2", "--overwrite"), f"int:{last_write}")
    assert code == 130 and "was left as it was" in log, log[-2000:]
    assert json.loads((tmp_path / "e-ref" / "eval.json").read_text())["setup"]["k"] == [4]
    assert not leftovers(tmp_path / "e-ref")
    report("ctrl-c nothing resumable", run, [])


def test_ctrl_c_in_a_sweep_keeps_finished_points_and_resume_completes_it(assets, tmp_path):
    model, corpus, _ = assets
    run = Runner(tmp_path)
    points = run.points(_sweep(model, corpus, tmp_path / "ref"))
    second_point = [i for i, p in enumerate(points, 1) if p.startswith("write f")][1]
    code, log = run(_sweep(model, corpus, tmp_path / "s"), f"int:{second_point}")
    assert code == 130 and re.search(r"1 finished points and the distilled gate is kept", log), log[-2000:]
    code, log = run(_sweep(model, corpus, tmp_path / "s", "--resume"))
    assert code == 0 and same_sweep(tmp_path / "ref", tmp_path / "s"), log[-2000:]
    report("ctrl-c sweep", run, [])


def test_ctrl_c_at_start_up_is_one_line_and_exit_130(tmp_path):
    """A real process (not a forked one): SIGINT while Python is still importing the CLI and the libraries, or
    loading the model. Until a run takes over its output folder the process ends at once; once it has, the run
    cleans up. Several delays: a SIGINT inside some imports used to end the process by signal (status -2), or was
    swallowed by an import and let the run go on."""
    import subprocess
    import sys

    for delay in (0.3, 1.0, 1.7, 2.5):
        proc = subprocess.Popen([sys.executable, "-m", "sparsify_cli", "distill", "--output", str(tmp_path / "o")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | ENV)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"still running 60 s after a SIGINT at {delay} s: {err[-2000:]}")
        assert proc.returncode == 130 and "Traceback" not in err and len(_message(err)) == 1, (delay, err)
        assert "interrupted" in err and not (tmp_path / "o").exists(), delay


def test_a_second_writer_is_refused_naming_the_running_process_and_a_dead_ones_lock_is_taken_over(assets, tmp_path):
    model, corpus, _ = assets
    run = Runner(tmp_path)
    points = run.points(_distill(model, corpus, tmp_path / "ref"))
    out, marker = tmp_path / "d", tmp_path / "paused"
    fourth_step = [i for i, p in enumerate(points, 1) if p == "step"][3]
    first, _ = run.start(_distill(model, corpus, out), f"pause:{fourth_step}:{marker}")
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    pid = int(marker.read_text())
    for extra in ((), ("--resume",), ("--overwrite",)):
        code, log = run(_distill(model, corpus, out, *extra))
        assert code == 2 and f"output folder {out} is in use by process {pid}" in log, log[-2000:]
    os.kill(pid, signal.SIGKILL)  # the holder dies: its lock is stale
    first.join()
    code, log = run(_distill(model, corpus, out, "--resume"))
    assert code == 0 and same_distill(tmp_path / "ref", out) and not leftovers(out), log[-2000:]
    report("concurrent writers", run, [])
