"""The shell entry points of the GPU units (benchmarks/gpu_units.sh, benchmarks/gpu_lanes.sh), run on the CPU with a
stand-in Python and nvidia-smi that record what they are asked to do: which unit runs on which GPU under which
recipe and overrides, what comes back, and that bad input stops before anything runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "CUDA=${CUDA_VISIBLE_DEVICES:-} ARGS=$*" >> "$FAKE_LOG"
[[ "$1" == -c || "$1" == -m ]] && exit 0
if [[ "$1" == benchmarks/perf.py || "$1" == benchmarks/compiled_generate.py ]]; then  # --out FILE among them
    while [[ $# -gt 0 ]]; do [[ "$1" == --out ]] && echo '{}' > "$2"; shift; done
    exit 0
fi
shift 2  # benchmarks/gpu_units.py STAGE
out=; units=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --work|--recipe|--set|--speed|--train-processes) shift 2 ;;
        *) units+=("$1"); shift ;;
    esac
done
for u in "${units[@]}"; do
    [[ "$u" == *fail* ]] && exit 1
    [[ "$u" == *slow* ]] && sleep 60
    mkdir -p "$out"; echo '{}' > "$out/$u.json"
done
exit 0
"""

FAKE_SMI = """#!/usr/bin/env bash
case "$*" in
    *--query-gpu=index\\ *|*--query-gpu=index) printf '0\\n1\\n' ;;
    *) echo "0, Fake GPU, 1 MiB" ;;
esac
"""


@pytest.fixture
def repo(tmp_path):
    """A copy of the two scripts in a repository-shaped folder, a corpus manifest, and the stand-ins on PATH."""
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    for name in ("gpu_units.sh", "gpu_lanes.sh", "gpu_env.sh", "gpu_decode.sh", "gpu_generate.sh"):
        shutil.copy(ROOT / "benchmarks" / name, root / "benchmarks" / name)
    (root / "data" / "offline-en-plus").mkdir(parents=True)
    (root / "data" / "offline-en-plus" / "manifest.json").write_text("{}")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", FAKE_SMI)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "RECIPE", "SET", "PARALLEL")}
    env |= {"PATH": f"{bin_}:{env['PATH']}", "PYTHON": str(bin_ / "python"), "FAKE_LOG": str(log),
            "OUT": str(tmp_path / "out"), "JOBS": str(tmp_path / "jobs"), "WORK": str(tmp_path / "work")}
    return root, env, log


def _run(repo, script: str, *args: str, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    root, base, log = repo
    proc = subprocess.run(["bash", str(root / "benchmarks" / script), *args], env=base | env, capture_output=True,
                          text=True, timeout=60)
    calls = [line for line in log.read_text().splitlines() if "ARGS=-c" not in line] if log.exists() else []
    return proc, calls


def test_the_generate_call_runs_the_static_tests_then_each_batch(repo, tmp_path):
    """benchmarks/gpu_generate.sh: the GPU-marked static-cache tests (unless TESTS=0), then compiled_generate.py
    once per batch of BATCHES, each writing its own JSON under $OUT."""
    proc, calls = _run(repo, "gpu_generate.sh", BATCHES="1 8", S="4096", K="256")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any("-m pytest" in c and "-m gpu" in c and "static_caches" in c for c in calls)
    runs = [c for c in calls if "benchmarks/compiled_generate.py" in c]
    assert len(runs) == 2 and all("--s 4096 --k 256" in c for c in runs)
    assert "--batch 1 " in runs[0] and "--batch 8 " in runs[1]
    assert sorted(p.name for p in (tmp_path / "out").glob("compiled-*.json")) == ["compiled-b1.json", "compiled-b8.json"]
    proc, calls = _run(repo, "gpu_generate.sh", BATCHES="8", TESTS="0")
    assert proc.returncode == 0 and sum("-m pytest" in c for c in calls) == 1  # the log holds both calls: no new tests
    assert [c for c in calls if "compiled_generate.py" in c][-1].count("--batch 8 ") == 1


def test_lanes_run_each_job_on_its_gpu_and_bring_back_one_archive(repo, tmp_path):
    proc, calls = _run(repo, "gpu_lanes.sh", "0 a dense-s0 steps=4 lr=2e-3; b soft-learned-s0 recipe=paper-31m-plateau",
                       "1 c fail-s0", "1 d dense-s1; sp --speed soft-learned:64 --compile")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one job failed: the call says so
    runs = {c.split(" run ")[1].split()[0]: c for c in calls if " run " in c}
    assert set(runs) == {"dense-s0", "soft-learned-s0", "fail-s0", "dense-s1"}
    assert runs["dense-s0"].startswith("CUDA=0 ") and runs["dense-s1"].startswith("CUDA=1 ")
    assert "--recipe paper-31m-units --set steps=4 --set lr=2e-3" in runs["dense-s0"]
    assert "--recipe paper-31m-plateau" in runs["soft-learned-s0"] and "--set" not in runs["soft-learned-s0"]
    work = {u: c.split("--work ")[1].split()[0] for u, c in runs.items()}
    assert work["fail-s0"] == work["dense-s1"] != work["dense-s0"] != work["soft-learned-s0"]  # shared per settings
    speed = [c for c in calls if " speed " in c]
    assert len(speed) == 1 and speed[0].startswith("CUDA=1 ") and speed[0].endswith("--speed soft-learned:64 --compile")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json", "d.json", "lanes.tgz"]  # not the failed c
    listing = subprocess.run(["tar", "tzf", str(out / "lanes.tgz")], capture_output=True, text=True).stdout
    assert "./a/dense-s0.json" in listing and "./c.log" in listing


def test_a_lane_over_two_gpus_trains_its_units_on_both(repo, tmp_path):
    proc, calls = _run(repo, "gpu_lanes.sh", "0,1 p soft-learned-s0 recipe=paper-31m-plateau")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = [c for c in calls if " run " in c]
    assert run.startswith("CUDA=0,1 ") and run.endswith("--train-processes 2")
    proc, calls = _run(repo, "gpu_lanes.sh", "1 q dense-s0")  # one GPU: no data parallel training
    assert "--train-processes" not in [c for c in calls if " run dense-s0" in c][0]


@pytest.mark.parametrize("lane, message", [
    ("0 a dense-s0; a dense-s1", "two jobs are named a"),
    (["0 a dense-s0 lr=2e-3", "1 b dense-s0 lr=2e-3"], "two jobs run dense-s0 lr=2e-3"),
    ("0 ; ", "has no job"),
    ("0 a", "needs NAME UNIT"),
    ("x a dense-s0", "starts with a GPU index"),
    ("0, a dense-s0", "starts with a GPU index"),
    ("0 s --speed", "--speed takes one MODE:BATCH list"),
    ("0 s --speed soft-learned:64 --fast", "--speed takes one MODE:BATCH list"),
    ("0 d --decode decode_attention decode_model", "--decode takes one PARTS list or nothing"),
    ("0 t --tests", "--tests needs at least one test file"),
    ("0 " + "; ".join(f"j{i} dense-s{i}" for i in range(8)), "8 jobs"),
])
def test_lanes_refuse_bad_input_before_running_anything(repo, lane, message):
    proc, calls = _run(repo, "gpu_lanes.sh", *([lane] if isinstance(lane, str) else lane))
    assert proc.returncode == 2 and message in proc.stderr and calls == []


def test_decode_and_test_jobs_run_on_their_gpu(repo, tmp_path):
    proc, calls = _run(repo, "gpu_lanes.sh", "0 a dense-s0; t --tests tests/test_absorb.py::test_x tests/test_y.py",
                       "1 dec --decode decode_attention")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    perf = [c for c in calls if "benchmarks/perf.py" in c]
    assert len(perf) == 1 and perf[0].startswith("CUDA=1 ") and "--parts decode_attention --reps 3" in perf[0]
    assert any(c.startswith("CUDA=1 ARGS=-m pytest") and "test_decode.py" in c for c in calls)  # its GPU tests first
    tests = [c for c in calls if c.startswith("CUDA=0 ARGS=-m pytest")]
    assert len(tests) == 1 and tests[0].endswith("tests/test_absorb.py::test_x tests/test_y.py") and "-m gpu" in tests[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json", "dec.json", "lanes.tgz"]


def test_lanes_stop_at_the_limit_and_still_bring_back_the_logs(repo, tmp_path):
    import time

    t0 = time.monotonic()
    proc, calls = _run(repo, "gpu_lanes.sh", "0 a slow-s0; b dense-s1", "1 c dense-s0", LIMIT="8")
    assert time.monotonic() - t0 < 30  # not the 60 s the slow unit wants
    assert proc.returncode == 1 and "a stopped or skipped: LIMIT of 8 s" in proc.stdout, proc.stdout + proc.stderr
    assert "b stopped or skipped" in proc.stdout  # no time left to start it
    assert not any(" dense-s1" in c for c in calls)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["c.json", "lanes.tgz"]
    listing = subprocess.run(["tar", "tzf", str(out / "lanes.tgz")], capture_output=True, text=True).stdout
    assert "./a.log" in listing


def test_parallel_units_spread_over_the_gpus(repo):
    proc, calls = _run(repo, "gpu_units.sh", "dense-s0", "dense-s1", "dense-s2", PARALLEL="1")
    assert proc.returncode == 0, proc.stderr
    gpu = {c.split(" run ")[1].split()[0]: c.split()[0] for c in calls if " run " in c}
    assert gpu == {"dense-s0": "CUDA=0", "dense-s1": "CUDA=1", "dense-s2": "CUDA=0"}  # two GPUs from nvidia-smi
    proc, calls = _run(repo, "gpu_units.sh", "soft-learned-s1", "soft-random-s1", PARALLEL="1",
                       CUDA_VISIBLE_DEVICES="3,5")
    gpu = {c.split(" run ")[1].split()[0]: c.split()[0] for c in calls if " run soft-" in c}
    assert gpu == {"soft-learned-s1": "CUDA=3", "soft-random-s1": "CUDA=5"}  # the caller's GPUs, in turn


def test_units_take_the_recipe_before_the_units_only(repo):
    proc, calls = _run(repo, "gpu_units.sh", "--recipe", "paper-31m-plateau", "dense-s0")
    assert proc.returncode == 0 and "run dense-s0" in calls[-1] and "--recipe paper-31m-plateau" in calls[-1]
    proc, _ = _run(repo, "gpu_units.sh", "dense-s0", "--recipe", "paper-31m-plateau")
    assert proc.returncode == 2 and "options go before the units" in proc.stderr
    proc, _ = _run(repo, "gpu_units.sh", "--recipe")
    assert proc.returncode == 2 and "--recipe needs a name" in proc.stderr


def test_the_plan_names_each_recipe_and_its_pending_units(tmp_path):
    import sys

    def plan(*args):
        run = subprocess.run([sys.executable, "benchmarks/gpu_units.py", "plan", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        return [line.split("#")[0].split() for line in lines if " benchmarks/gpu_units.sh " in line], lines

    empty = tmp_path / "none"
    empty.mkdir()
    full, lines = plan("--done", str(empty))
    assert len(full) == 15 and full[0] == ["bash", "benchmarks/gpu_units.sh", "dense-s0"]
    assert not any(line.startswith("# done") for line in lines) and lines[-1].startswith("# 15 pending")
    plateau, plateau_lines = plan("--recipe", "paper-31m-plateau", "--done", str(empty))
    assert len(plateau) == 15 and plateau[0] == ["bash", "benchmarks/gpu_units.sh", "--recipe", "paper-31m-plateau",
                                                 "dense-s0"]
    # over two GPUs: each command says so, and the estimates use the measured two-GPU speed-up, said in the summary
    two, two_lines = plan("--recipe", "paper-31m-plateau", "--done", str(empty), "--train-processes", "2")
    assert [c[0] for c in two] == ["TRAIN_PROCESSES=2"] * 15 and [c[1:] for c in two] == plateau
    speedup = json.loads((ROOT / "docs/data/train-speed-h200x2.json").read_text())["speedup_two_over_one"]
    assert f"over 2 GPUs each (training {speedup:.2f}x faster than on one: measured" in two_lines[-1]
    one_min = {c[-1]: float(line.split("~")[1].split()[0]) for c, line in zip(plateau, plateau_lines) if "~" in line}
    two_min = {c[-1]: float(line.split("~")[1].split()[0]) for c, line in zip(two, two_lines) if "~" in line}
    assert all(two_min[u] < one_min[u] for u in one_min) and two_min["soft-learned-s0"] < 0.8 * one_min["soft-learned-s0"]

    # a finished unit of the recipe leaves the list, with its measured seconds; one of other settings does not
    minutes = {cmd[-1]: float(line.split("~")[1].split()[0]) for cmd, line in zip(full, lines) if "~" in line}
    some = tmp_path / "some"
    some.mkdir()
    record = json.loads((ROOT / "docs/data/units/dense-s0.json").read_text())
    (some / "dense-s0.json").write_text(json.dumps(record))
    other = record | {"unit": "dense-s1", "settings": record["settings"] | {"lr": 1.0}}
    (some / "dense-s1.json").write_text(json.dumps(other))
    listed, lines = plan("--done", str(some))
    assert [c[-1] for c in listed] == [c[-1] for c in full if c[-1] != "dense-s0"]
    assert lines[0].startswith("# done (1,") and f"dense-s0 {record['seconds']:.0f} s" in lines[0]
    factor = record["seconds"] / 60 / minutes["dense-s0"]  # the estimates scale by measured / estimated
    again = {cmd[-1]: float(line.split("~")[1].split()[0]) for cmd, line in zip(listed, lines[1:]) if "~" in line}
    assert again["soft-learned-s0"] == pytest.approx(minutes["soft-learned-s0"] * factor, abs=0.2)


def test_the_plan_times_sweep_steps_from_the_finished_sweep_units(tmp_path):
    """The sweep's small-batch step as measured in the committed sweep units (median over their trained points),
    not counted from the kernels of a batch-64 step; None where no sweep unit has run."""
    from benchmarks import gpu_units

    points = [p for s in (0, 1) for p in json.loads((ROOT / f"docs/data/units/sweep-s{s}.json").read_text())
              ["sweep"]["points"] if p["steps"]]
    per = sorted(p["seconds"] / p["steps"] for p in points)
    assert len(per) == 12 and gpu_units._sweep_step(("docs/data/units",)) == per[len(per) // 2]
    assert 0.02 < per[len(per) // 2] < 0.1  # tens of ms: launch-bound at batch 8
    assert gpu_units._sweep_step((str(tmp_path),)) is None


def test_a_batch_that_does_not_split_over_the_processes_stops_before_anything_runs(tmp_path):
    import sys

    run = subprocess.run([sys.executable, "benchmarks/gpu_units.py", "run", "dense-s0", "--train-processes", "3",
                          "--done", str(tmp_path), "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "batch size 64 does not split over --train-processes 3" in run.stderr
    assert not (tmp_path / "work").exists()
