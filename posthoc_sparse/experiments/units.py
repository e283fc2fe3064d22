"""The absorption evidence as self-contained units, each sized for one GPU call (docs/absorb.md, "In units").

A unit trains one model from scratch and runs everything that needs that model (its evaluations, the gates
distilled onto it, the unfreeze sweep on it), then writes one small JSON (no weights). Units share nothing
on disk, so any subset can run in any call, in any order; a unit whose JSON already exists in ``done`` with the
same fingerprint (settings, unit, data) is reused, not recomputed. ``unit_report.py`` builds the report from
whatever units exist.

Names: ``dense-sN``, ``soft-learned-sN``, ``soft-random-sN``, ``hard-topk-sN``, ``stochastic-sN`` and ``sweep-sN``
(the unfreeze sweep on the dense model of seed N, with data-order seed N). Seed N sets the model's init and data
order, so the runs of one seed are paired: same init, same batches, only the attention differs.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config import option
from ..errors import UserError
from ..training import versions
from .absorb import AbsorbConfig, _gate_moved, _Runner, finished_gate, finished_run
from .pretrain import GATE_DIR, PretrainConfig

KINDS = ("dense", "soft-learned", "soft-random", "hard-topk", "stochastic", "sweep")
FORMAT = "posthoc-sparse absorb unit"
FORMAT_VERSION = 1
_NAME = re.compile(r"^(?P<kind>[a-z-]+)-s(?P<seed>\d+)$")


@dataclass(frozen=True)
class SweepSettings:
    """The unfreeze sweep of the ``sweep-sN`` units (``sparsify unfreeze-sweep`` settings)."""

    fractions: str = option("0,0.1667,0.3333,0.5", "Fractions of the layers unfrozen (0, 1/6, 2/6, 3/6 of 6).")
    steps: int = option(500, "LM training steps per point.")
    batch_size: int = option(8, "Windows per step.")
    lr: float = option(3e-4, "AdamW learning rate of the unfrozen attention projections.")
    warmup: int = option(50, "Warm-up steps.")
    eval_windows: int = option(32, "Held-out windows per point.")


def parse_unit(name: str) -> tuple[str, int]:
    """``"soft-learned-s2"`` -> ("soft-learned", 2); a one-line UserError for anything else."""
    m = _NAME.match(name)
    if not m or m["kind"] not in KINDS:
        raise UserError(f"unknown unit {name!r}: use KIND-sN with KIND one of {', '.join(KINDS)} (e.g. dense-s0)")
    return m["kind"], int(m["seed"])


def plan(seeds: int = 3, sweep_seeds: int = 2) -> list[str]:
    """Every unit of the evidence, in the order to run them: the dense reference first (it shows the plateau),
    then the paired seeds of finding 1, hard top-k and stochastic masks, and the sweeps."""
    names = []
    for s in range(seeds):
        names += [f"dense-s{s}", f"soft-learned-s{s}", f"soft-random-s{s}"]
    names += ["hard-topk-s0", "stochastic-s0"] + [f"sweep-s{s}" for s in range(sweep_seeds)]
    names += [f"hard-topk-s{s}" for s in range(1, seeds)]
    return names


def data_identity(dataset: str) -> dict:
    manifest = Path(dataset) / "manifest.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        return {name: f["sha256"] for name, f in sorted(files.items())}
    return {"dataset": dataset}


# settings that do not change a unit's numbers: where it ran and wrote, the corpus's path (its content counts),
# which experiments and how many seeds the whole recipe has, the trackers, and whether the soft relaxation ran
# compiled (equal to eager within fp32 rounding, tested; less than a GPU run's own drift, docs/results.md)
NOT_NUMBERS = ("output", "resume", "overwrite", "device", "dataset", "experiments", "seeds", "report_to",
               "gate_compile")


def recipe(settings: dict, data: dict | None, sweep: dict | None) -> dict:
    """What decides a unit's numbers besides its name: the settings that matter, the data's identity (None: not
    known here) and the sweep's settings (sweep units only). Two units belong to one report when theirs agree."""
    return {"settings": {k: v for k, v in settings.items() if k not in NOT_NUMBERS}, "data": data, "sweep": sweep}


def recipe_of(record: dict) -> dict:
    """``recipe`` of a unit's JSON record."""
    return recipe(record["settings"], record.get("data"), record.get("sweep_settings"))


def fingerprint(name: str, cfg: AbsorbConfig, sweep: SweepSettings) -> str:
    """sha256 of what determines a unit's numbers: its name, the settings and the data (not paths or device)."""
    payload = {"unit": name, **recipe(asdict(cfg), data_identity(cfg.dataset),
                                      asdict(sweep) if parse_unit(name)[0] == "sweep" else None),
               "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _train_record(r: dict) -> dict:
    keep = ("mode", "seed", "ppl_as_trained", "loss_as_trained", "seconds", "tokens_per_second", "processes",
            "gate_grad", "mass_outside", "evals")
    curve = r["loss_curve"]
    stride = max(1, len(curve) // 200)  # at most ~200 points of the training loss
    return {k: r.get(k) for k in keep} | {"loss_curve": curve[::stride] + ([curve[-1]] if curve[-1:] and
                                                                          curve[::stride][-1:] != curve[-1:] else [])}


def _distilled(runner: _Runner, run: str, model_dir: str, cfg: AbsorbConfig, curve: bool) -> dict:
    """A gate distilled post hoc onto ``model_dir`` and deployed: its row of finding 3 (recall, F1, mass, the four
    perplexities at k), and with ``curve`` the post-hoc curve (every snapshot's deployed perplexity)."""
    from ..distill.loop import SNAPSHOT_DIR

    d = runner.distill(run, model_dir)
    ev = runner.evaluate(f"{run}-distilled", model_dir, "dense,oracle,gate,random", gates=d["path"])
    row = {"recall": ev["gate"]["recall"], "f1": ev["gate"]["f1"], "mass": ev["gate"]["mass"],
           "ppl_dense": ev["dense"]["ppl"], "ppl_oracle": ev["oracle"]["ppl"], "ppl_gate": ev["gate"]["ppl"],
           "ppl_random": ev["random"]["ppl"], "random_recall": ev["random"]["recall"],
           "gate_over_oracle": ev["gate"]["ppl"] / ev["oracle"]["ppl"], "recall_curve": d["recall_curve"],
           "window_nll": {m: ev[m]["window_nll"] for m in ("dense", "oracle", "gate", "random")}}
    if curve:
        snaps = sorted((Path(d["path"]) / SNAPSHOT_DIR).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        row["posthoc_curve"] = []
        for snap in snaps:
            step = int(snap.name.split("-")[1])
            e = runner.evaluate(f"{run}-posthoc-{step}", model_dir, "gate", gates=str(snap))
            row["posthoc_curve"].append({"step": step, "ppl_gate": e["gate"]["ppl"], "recall": e["gate"]["recall"]})
        row["distill_loss_curve"] = d["loss_curve"]
    return row


def _sweep(runner: _Runner, cfg: AbsorbConfig, sweep: SweepSettings, seed: int, model_dir: str, gates: str) -> dict:
    from .sweep import SweepConfig, run_sweep

    report = run_sweep(SweepConfig(
        model=model_dir, gates=gates, dataset=cfg.dataset, layers=sweep.fractions, k=cfg.k, steps=sweep.steps,
        seq_len=cfg.seq_len, batch_size=sweep.batch_size, lr=sweep.lr, warmup=sweep.warmup,
        eval_windows=sweep.eval_windows, seed=seed, output=str(runner.out / "sweep"), resume=True,
        device=cfg.device), on_event=lambda kind, info: runner.emit(f"sweep:{kind}", info))
    return {"table": report["table"], "points": report["points"]}


def run_unit(name: str, cfg: AbsorbConfig, sweep: SweepSettings, work: Path, done: Path | None = None,
             out: Path | None = None, on_event: Callable[[str, dict], None] | None = None, before: float = 0.0
             ) -> dict:
    """Run unit ``name`` in the folder ``work`` (its models, gates and evals; resumable there), write its record to
    ``out/<name>.json`` (default: ``done``) and return it; or return the record in ``done/<name>.json`` when its
    fingerprint matches (a finished unit is reused, not recomputed). ``before``: seconds the caller spent on this
    unit already (its training run in other processes, ``unit_training``), counted in the record's ``seconds``."""
    from ..devices import resolve_device

    emit = on_event or (lambda kind, info: None)
    kind, seed = parse_unit(name)
    fp, reused = _open(name, cfg, sweep, work, done, emit, emit, cfg.batch_size)
    if reused is not None:
        return reused
    runner = _Runner(replace(cfg, output=str(work), resume=True), emit, work)
    t0 = time.perf_counter()
    mode = "dense" if kind == "sweep" else kind
    r = runner.train(f"{mode}-s{seed}", mode, seed)
    record: dict = {"unit": name, "kind": kind, "seed": seed, "train": _train_record(r)}
    ks = ",".join(str(k) for k in sorted({16, 32, cfg.k} if cfg.k > 32 else {cfg.k}))
    if kind in ("dense", "stochastic"):
        record["eval"] = runner.evaluate(f"{mode}-s{seed}", r["path"], "dense,oracle,random", ks=ks)
    if kind.startswith("soft"):  # as trained, deployed with the hard top-k of its own gate, and without it
        ev = runner.evaluate(f"{mode}-s{seed}", r["path"], "dense,oracle,gate", gates=str(Path(r["path"]) / GATE_DIR))
        record["eval"] = ev
        record["gate_moved"] = _gate_moved(r["path"], seed)
    if kind == "hard-topk":
        record["gate_moved"] = _gate_moved(r["path"], seed)
    if kind in ("dense", "soft-learned", "hard-topk"):  # finding 3: a gate distilled post hoc onto this model
        record["distilled"] = _distilled(runner, f"{mode}-s{seed}", r["path"], cfg, curve=kind == "dense")
    if kind == "sweep":
        gates = runner.distill(f"dense-s{seed}", r["path"])["path"]
        record["sweep"] = _sweep(runner, cfg, sweep, seed, r["path"], gates)
    record |= {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fp,
               "settings": asdict(cfg) | {"output": None}, "sweep_settings": asdict(sweep) if kind == "sweep" else None,
               "data": data_identity(cfg.dataset), "seconds": before + time.perf_counter() - t0,
               "device": _device_name(resolve_device(cfg.device)), "versions": versions()}
    target = out or done
    if target is not None:
        from ..io import atomic_write_json

        atomic_write_json(target / f"{name}.json", record)
    emit("unit", {"unit": name, "seconds": record["seconds"]})
    return record


def unit_training(name: str, cfg: AbsorbConfig, sweep: SweepSettings, work: Path, done: Path | None = None,
                  on_event: Callable[[str, dict], None] | None = None, processes: int = 1) -> PretrainConfig | None:
    """The training run unit ``name`` needs, for a caller that runs it first in other processes (data parallel over
    several GPUs: ``benchmarks/gpu_units.py run --train-processes N`` launches it with ``torchrun``, each process
    taking ``batch_size / N`` windows a step); ``run_unit`` then finds it finished and goes on in one process. None
    when the unit is reused from ``done`` or its run is already finished in ``work``. Claims ``work`` as
    ``run_unit`` does, so what it writes there counts for the unit; a partly trained run of another number of
    ``processes`` (another batch per process, which a checkpoint cannot resume) is started over."""
    emit = on_event or (lambda kind, info: None)
    kind, seed = parse_unit(name)
    _, reused = _open(name, cfg, sweep, work, done, lambda kind, info: None, emit, cfg.batch_size // processes)
    run = _run_dir(work, name)
    if reused is not None or finished_run(run):  # reused: run_unit says so
        return None
    mode = "dense" if kind == "sweep" else kind
    return replace(cfg, output=str(work), resume=True).pretrain_config(mode, seed, str(run))


def _run_dir(work: Path, name: str) -> Path:
    """Where unit ``name``'s training run lives in ``work`` (where ``_Runner.train`` puts it): a sweep unit's is
    its seed's dense model."""
    kind, seed = parse_unit(name)
    return work / "runs" / f"{'dense' if kind == 'sweep' else kind}-s{seed}"


def _open(name: str, cfg: AbsorbConfig, sweep: SweepSettings, work: Path, done: Path | None,
          emit_reuse: Callable[[str, dict], None], emit: Callable[[str, dict], None], batch_size: int
          ) -> tuple[str, dict | None]:
    """The start of a unit, shared by ``run_unit`` and ``unit_training``: (its fingerprint, the record in ``done``
    when it was made under that fingerprint); without one, ``work`` is claimed for the unit, a sweep unit's dense
    run borrowed from beside it, and a partly trained run of another ``batch_size`` per process (another number of
    GPUs) started over."""
    cfg.validate()
    fp = fingerprint(name, cfg, sweep)
    reused = _reused(name, fp, done, emit_reuse)
    if reused is not None:
        return fp, reused
    _claim_work(work, fp, emit)
    kind, seed = parse_unit(name)
    if kind == "sweep":
        _borrow_dense(work, cfg, sweep, seed, emit)
    _restart_other_batch(_run_dir(work, name), batch_size, emit)
    return fp, None


def _restart_other_batch(run: Path, batch_size: int, emit: Callable[[str, dict], None]) -> None:
    """Remove the partly trained ``run`` when its checkpoint has another batch per process than ``batch_size``
    (it was trained over another number of GPUs): pretrain refuses to resume it, so it starts over."""
    import shutil

    from ..training import STATE_JSON
    from .pretrain import CHECKPOINT_DIR

    state = run / CHECKPOINT_DIR / STATE_JSON
    if finished_run(run) or not state.is_file():
        return
    try:
        saved = json.loads(state.read_text())["meta"]["config"]["batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not ours to judge: pretrain's resume says what is wrong with it
    if saved != batch_size:
        emit("restart", {"path": str(run), "why": f"trained with {saved} windows a process, now {batch_size}"})
        shutil.rmtree(run)


def _reused(name: str, fp: str, done: Path | None, emit: Callable[[str, dict], None]) -> dict | None:
    """The record in ``done/<name>.json`` when it was made under fingerprint ``fp``, else None."""
    if done is None or not (done / f"{name}.json").is_file():
        return None
    record = json.loads((done / f"{name}.json").read_text())
    if record.get("fingerprint") == fp:
        emit("reused", {"unit": name, "path": str(done / f"{name}.json")})
        return record
    emit("stale", {"unit": name, "path": str(done / f"{name}.json")})
    return None


def _borrow_dense(work: Path, cfg: AbsorbConfig, sweep: SweepSettings, seed: int,
                  emit: Callable[[str, dict], None]) -> None:
    """A sweep unit trains the model of ``dense-sN`` and distills the same gate onto it (the same runs, names and
    settings). When ``dense-sN`` ran beside it (``work``'s sibling folder, stamped with the dense unit's fingerprint
    under these settings and data), copy its finished training run and distilled gate instead of repeating them:
    one call then holds ``dense-sN`` and ``sweep-sN``."""
    import shutil

    sibling = work.parent / f"dense-s{seed}"
    stamp = sibling / "fingerprint.txt"
    if not stamp.is_file() or stamp.read_text().strip() != fingerprint(f"dense-s{seed}", cfg, sweep):
        return
    for part, finished in (("runs", finished_run), ("distill", finished_gate)):  # as _Runner tells them cached
        src, dst = sibling / part / f"dense-s{seed}", work / part / f"dense-s{seed}"
        if dst.exists() or not finished(src):
            continue
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(dst)  # whole or not at all
        emit("borrowed", {"unit": f"sweep-s{seed}", "what": part, "from": str(src)})


def _claim_work(work: Path, fp: str, emit: Callable[[str, dict], None]) -> None:
    """Make ``work`` this unit's: what it holds is resumed only when it was made for the same fingerprint (the
    same settings and data); a folder left by other settings (or by none on record) is emptied first."""
    import shutil

    stamp = work / "fingerprint.txt"
    if work.exists() and (not stamp.is_file() or stamp.read_text().strip() != fp):
        emit("restart", {"path": str(work), "why": "made for other settings or data"})
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        stamp.write_text(fp + "\n")


def _device_name(dev: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else "cpu"


__all__ = ["KINDS", "SweepSettings", "fingerprint", "parse_unit", "plan", "run_unit", "unit_training"]
