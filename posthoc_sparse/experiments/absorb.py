"""``sparsify absorb``: the routing-absorption paper's four lines of evidence, and the post-hoc counterpart.

Every experiment trains small models from scratch with ``pretrain`` (a gate or mask in the loop through
``PretrainConfig.gate_mode``), distills with ``distill`` and measures with ``evaluate_perplexity``, all on the
same held-out windows. The experiments (``--experiments``, comma list):

- ``soft``: soft gating end to end, the gate trained with the model ("soft-learned") vs the same gate frozen
  at its random init ("soft-random"), over ``seeds`` seeds: perplexity as trained, deployed with hard top-k of
  that gate, and the gate's recall against the oracle.
- ``hard``: the learned gate behind a hard top-k mask ("hard-topk"): the gradient that reaches the gate,
  measured at every training step, and whether its weights moved from their init.
- ``coadapt``: a gate distilled post hoc (KL, frozen model) onto the co-adapted Q/K/V of the hard-topk model
  vs onto the mask-agnostic Q/K/V of the dense model: recall and deployed perplexity of each.
- ``stochastic``: a model trained with a fresh random top-k mask at every forward, deployed dense, vs the
  dense baseline.
- ``posthoc``: a gate distilled on the frozen dense model; deployed gate perplexity against distillation steps,
  with the random gate, the oracle and dense as references.

Layout of ``output``: ``runs/<run>/`` (HF checkpoints, ``gate/``), ``distill/<model>/`` (gate folders with
``snapshots/``), ``evals/<name>.json`` (eval reports), then ``absorb.json``, ``summary.md`` and one PNG per
experiment. Finished pieces are kept: ``resume`` skips them and continues an interrupted one.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import REPORT_TO_HELP, TEXT_FIELD_HELP, _positive, check_fields, name_list, option
from ..errors import UserError
from ..gates.io import check_rotary_width
from ..training import check_report_to, versions
from .absorb_summary import summary_markdown
from .pretrain import GATE_DIR, LOG_NAME, PretrainConfig

EXPERIMENTS = ("soft", "hard", "coadapt", "stochastic", "posthoc")
REPORT_NAME = "absorb.json"
SUMMARY_NAME = "summary.md"
_P = PretrainConfig  # the model and its training default to the paper's 31M model (PretrainConfig's defaults)


@dataclass(frozen=True)
class AbsorbConfig:
    """``sparsify absorb``. Model and training fields mean what they mean in ``PretrainConfig``."""

    dataset: str = option(_P.dataset, "Training and held-out text, as for `sparsify pretrain`.")
    text_field: str = option(_P.text_field, TEXT_FIELD_HELP)
    output: str = option("reports/absorb", "Report folder (runs, gates, absorb.json, summary.md, PNGs).",
                         flags=("--output", "-o"))
    experiments: str = option(",".join(EXPERIMENTS), f"Comma list of {', '.join(EXPERIMENTS)}.")
    seeds: int = option(3, "Seeds of the soft-gating experiment (the other runs use seed 0).")
    steps: int = option(_P.steps, "Training steps of every run.")
    k: int = option(64, "Keys kept per query.")
    tau: float = option(_P.gate_tau, "Temperature of the soft top-k relaxation (its start, when annealed).")
    tau_end: float = option(_P.gate_tau_end, "Anneal tau geometrically to this value (0: constant).", ge=0)
    scores: str = option(_P.gate_scores, "The soft relaxation's gate scores: standardized (per row) or raw.",
                         choices=("standardized", "raw"))
    d_g: int = option(_P.gate_d_g, "Gate dimension per head.")
    distill_steps: int = option(1000, "Post-hoc distillation steps.")
    distill_every: int = option(100, "A convergence-curve point every N distillation steps.")
    distill_lr: float = option(2e-3, "Distillation learning rate.")
    distill_batch_size: int = option(4, "Distillation windows per step.")
    eval_windows: int = option(32, "Held-out windows for every perplexity.")
    tokenizer: str = option(_P.tokenizer, "As for `sparsify pretrain`.")
    arch: str = option(_P.arch, "gpt2 or llama, as for `sparsify pretrain`.")
    n_layer: int = option(_P.n_layer, "Layers.")
    d_model: int = option(_P.d_model, "Hidden size.")
    n_head: int = option(_P.n_head, "Heads.")
    d_ff: int = option(_P.d_ff, "MLP inner size.")
    seq_len: int = option(_P.seq_len, "Context.")
    batch_size: int = option(_P.batch_size, "Training windows per step.")
    lr: float = option(_P.lr, "Training peak learning rate.")
    min_lr: float = option(_P.min_lr, "Learning rate at the end of the cosine.")
    warmup: int = option(_P.warmup, "Warm-up steps.")
    dropout: float = option(_P.dropout, "Dropout of every training run.")
    weight_decay: float = option(_P.weight_decay, "AdamW weight decay of every training run.")
    eval_every: int | None = option(None, "Held-out perplexity every N training steps (if not given: at the end).")
    max_train_windows: int | None = option(None, "Use at most N training windows (if not given: all).")
    mixed_precision: str = option(_P.mixed_precision, "auto (bf16 on GPU), bf16, no.")
    gate_compile: bool = option(False, "torch.compile the soft relaxation of the soft-gated runs, as "
                                       "`sparsify pretrain --gate-compile` (equal to eager within fp32 rounding).")
    device: str = option("auto", "auto, cpu, cuda, cuda:N.")
    report_to: str = option("none", REPORT_TO_HELP + " Each training run and distillation logs in its own folder.")
    resume: bool = option(False, "Keep finished runs, gates and evaluations in --output, which must exist; continue "
                                  "the rest.")
    overwrite: bool = option(False, "Start over in an existing --output folder.")

    def experiment_list(self) -> list[str]:
        names = name_list(self.experiments, EXPERIMENTS, "--experiments")
        return [e for e in EXPERIMENTS if e in names]

    def validate(self) -> None:
        check_fields(self)
        check_report_to(self.report_to)  # the tracker's package is installed
        _positive(self, "seeds", "steps", "k", "d_g", "distill_steps", "distill_every", "distill_batch_size",
                  "eval_windows")
        self.experiment_list()
        if self.k >= self.seq_len:
            raise UserError(f"--k {self.k} keeps every key of a {self.seq_len}-token window; choose k < --seq-len")
        if self.d_g % 2 or not self.tau > 0:  # the gated arms' settings, checked before the dense arm trains
            raise UserError(f"--d-g must be even and --tau positive, got {self.d_g} and {self.tau}")
        if self.distill_every > self.distill_steps:
            raise UserError(f"--distill-every {self.distill_every} exceeds --distill-steps {self.distill_steps}")
        self.pretrain_config("dense", 0, "x").validate()
        if self.arch == "llama":  # every experiment puts a gate of --d-g dims on the model; refused before any run
            check_rotary_width(self.d_g, self.d_model // self.n_head, "--d-g")

    def pretrain_config(self, mode: str, seed: int, output: str) -> PretrainConfig:
        return PretrainConfig(
            dataset=self.dataset, output=output, tokenizer=self.tokenizer, arch=self.arch, n_layer=self.n_layer,
            d_model=self.d_model, n_head=self.n_head, d_ff=self.d_ff, seq_len=self.seq_len, steps=self.steps,
            batch_size=self.batch_size, lr=self.lr, min_lr=self.min_lr, warmup=min(self.warmup, self.steps),
            seed=seed, mixed_precision=self.mixed_precision, device=self.device, dropout=self.dropout,
            weight_decay=self.weight_decay, eval_every=self.eval_every or self.steps, eval_windows=self.eval_windows,
            checkpoint_every=max(1, self.steps // 4), max_train_windows=self.max_train_windows, gate_mode=mode,
            gate_k=self.k, gate_tau=self.tau, gate_tau_end=self.tau_end, gate_scores=self.scores, gate_d_g=self.d_g,
            gate_compile=self.gate_compile, resume=self.resume, text_field=self.text_field, report_to=self.report_to)


def _runs_needed(cfg: AbsorbConfig) -> list[tuple[str, str, int]]:
    """(run name, gate mode, seed) of every training run the chosen experiments need, in order."""
    exps = set(cfg.experiment_list())
    runs = [("dense-s0", "dense", 0)]
    if "soft" in exps:
        for s in range(cfg.seeds):
            runs += [(f"soft-learned-s{s}", "soft-learned", s), (f"soft-random-s{s}", "soft-random", s)]
    if exps & {"hard", "coadapt"}:
        runs.append(("hard-topk-s0", "hard-topk", 0))
    if "stochastic" in exps:
        runs.append(("stochastic-s0", "stochastic", 0))
    return runs


def _mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs),
            "values": xs}


def finished_run(run: Path) -> bool:
    """Whether the training run in ``run`` has finished (its log and config written at the end)."""
    return (run / LOG_NAME).is_file() and (run / "config.json").is_file()


def finished_gate(out: Path) -> bool:
    """Whether the distillation in ``out`` has finished (its gate config and history written)."""
    from ..distill.loop import HISTORY_NAME
    from ..gates.io import GATE_CONFIG_NAME

    return (out / GATE_CONFIG_NAME).is_file() and (out / HISTORY_NAME).is_file()


class _Runner:
    """Runs and caches the pieces (training runs, distillations, evaluations) under ``cfg.output``."""

    def __init__(self, cfg: AbsorbConfig, emit: Callable[[str, dict], None], out: Path):
        self.cfg, self.emit, self.out = cfg, emit, out

    def train(self, name: str, mode: str, seed: int) -> dict:
        from .pretrain import pretrain

        run = self.out / "runs" / name
        cached = finished_run(run)
        self.emit("run", {"name": name, "mode": mode, "seed": seed, "cached": cached})
        if not cached:
            pretrain(self.cfg.pretrain_config(mode, seed, str(run)),
                     on_event=lambda kind, info: self.emit(f"pretrain:{kind}", info | {"run": name}))
        log = _read_json(run / LOG_NAME)
        last = log["evals"][-1]
        return {"name": name, "mode": mode, "seed": seed, "path": str(run), "ppl_as_trained": last["heldout_ppl"],
                "loss_as_trained": last["heldout_loss"], "seconds": log["seconds"],
                "tokens_per_second": log["tokens_per_second"], "processes": log.get("processes", 1),
                "gate_grad": log.get("gate_grad"),
                "mass_outside": log.get("mass_outside"), "evals": log["evals"],
                "loss_curve": [[h["step"], h["loss_mean"]] for h in log["history"]]}

    def distill(self, name: str, model_dir: str) -> dict:
        from ..config import DistillConfig
        from ..distill.loop import HISTORY_NAME, distill

        c = self.cfg
        out = self.out / "distill" / name
        cached = finished_gate(out)
        self.emit("distill", {"name": name, "model": model_dir, "cached": cached})
        if not cached:
            distill(DistillConfig(
                model=model_dir, dataset=c.dataset, output=str(out), k=c.k, steps=c.distill_steps, seq_len=c.seq_len,
                batch_size=c.distill_batch_size, lr=c.distill_lr, d_g=c.d_g, gate_init="random",
                val_every=c.distill_every, val_windows=8, checkpoint_every=c.distill_every,
                save_every=c.distill_every, device=c.device, resume=c.resume, text_field=c.text_field,
                report_to=c.report_to,
            ), on_event=lambda kind, info: self.emit(f"distill:{kind}", info | {"run": name}))
        log = _read_json(out / HISTORY_NAME)
        return {"path": str(out), "loss_curve": [[h["step"], h["loss"]] for h in log["history"]],
                "recall_curve": [[h["step"], h["recall"]] for h in log["history"] if "recall" in h]}

    def evaluate(self, name: str, model_dir: str, modes: str, gates: str | None = None, ks: str | None = None
                 ) -> dict:
        """{mode: {"ppl", "recall", "f1", "mass"}} at k (with several ``ks``: {"mode@k": ...}, dense as
        "dense"), cached in evals/<name>.json."""
        from ..evaluate.perplexity import EvalConfig, evaluate_perplexity
        from ..io import atomic_write_json

        c = self.cfg
        path = self.out / "evals" / f"{name}.json"
        if path.is_file():
            report = _read_json(path)
        else:
            self.emit("eval", {"name": name, "modes": modes})
            report = evaluate_perplexity(EvalConfig(
                gates=gates, model=model_dir, dataset=c.dataset, k=ks or str(c.k), modes=modes, seq_len=c.seq_len,
                max_windows=c.eval_windows, batch_size=4, d_g=c.d_g, device=c.device, text_field=c.text_field,
            )).to_json()
            atomic_write_json(path, report)
        out = {}
        for r in report["results"]:
            routing = r.get("routing") or {}
            key = r["mode"] if ks is None or r["k"] is None else f"{r['mode']}@{r['k']}"
            out[key] = {"ppl": r["perplexity"], "recall": routing.get("recall"), "f1": routing.get("f1"),
                        "mass": routing.get("mass"), "tokens": r["tokens"], "window_nll": r.get("window_nll")}
        return out


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def _gate_moved(run_dir: str, seed: int) -> float:
    """Largest |w - w_init| over the gate saved with a run (its init is the seeded random init)."""
    from ..gates.io import load_gates
    from ..gates.modules import GateBank

    bank, _ = load_gates(Path(run_dir) / GATE_DIR)
    init = GateBank(bank.spec).reset_random(seed)
    with torch.no_grad():
        return max(float((a - b).abs().max()) for a, b in zip(bank.parameters(), init.parameters(), strict=True))


def run_absorb(cfg: AbsorbConfig, on_event: Callable[[str, dict], None] | None = None) -> dict:
    """Run the chosen experiments; write absorb.json, summary.md and the plots into ``cfg.output``; return the
    report (the dict written to absorb.json). ``on_event(kind, info)`` reports progress. The output folder is
    locked for the run; ``overwrite`` starts over in a new folder swapped in at the end (``runs.output_run``)."""
    from ..runs import output_run

    cfg.validate()

    def finished(work: Path) -> str | None:  # what an interrupted run keeps for --resume
        return "the finished runs" if any(any((work / sub).glob("*")) for sub in ("runs", "distill", "evals")) else None

    with output_run(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume, resumable=finished) as run:
        return _run_absorb(cfg, on_event, run.work)


def _run_absorb(cfg: AbsorbConfig, on_event: Callable[[str, dict], None] | None, out: Path) -> dict:
    from ..io import atomic_write_bytes, atomic_write_json

    emit = on_event or (lambda kind, info: None)
    exps = cfg.experiment_list()
    runner = _Runner(cfg, emit, out)
    t0 = time.perf_counter()
    runs = {name: runner.train(name, mode, seed) for name, mode, seed in _runs_needed(cfg)}
    dense = runs["dense-s0"]
    dense_eval = runner.evaluate("dense-s0", dense["path"], "dense,oracle,random")
    results: dict[str, dict] = {}

    if "soft" in exps:
        per_seed = []
        for s in range(cfg.seeds):
            row = {"seed": s}
            for variant in ("learned", "random"):
                r = runs[f"soft-{variant}-s{s}"]
                ev = runner.evaluate(r["name"], r["path"], "dense,gate", gates=str(Path(r["path"]) / GATE_DIR))
                gg = r["gate_grad"] or {}
                row[variant] = {"ppl_as_trained": r["ppl_as_trained"], "ppl_gate_topk": ev["gate"]["ppl"],
                                "recall": ev["gate"]["recall"], "ppl_dense": ev["dense"]["ppl"],
                                "gate_grad_mean": gg.get("sum_norm", 0.0) / max(1, gg.get("steps", 0)),
                                "mass_outside": (r["mass_outside"] or {}).get("last"),
                                "gate_moved": _gate_moved(r["path"], s)}
            per_seed.append(row)
        stats = {}
        for key in ("ppl_as_trained", "ppl_gate_topk", "recall", "ppl_dense", "mass_outside"):
            stats[key] = {v: _mean_std([row[v][key] for row in per_seed]) for v in ("learned", "random")}
            stats[key]["random_minus_learned"] = _mean_std(
                [row["random"][key] - row["learned"][key] for row in per_seed
                 if row["random"][key] is not None and row["learned"][key] is not None])
        results["soft"] = {"per_seed": per_seed, "stats": stats, "dense_ppl": dense["ppl_as_trained"]}

    if "hard" in exps:
        r = runs["hard-topk-s0"]
        gg = r["gate_grad"] or {}
        soft = runs.get("soft-learned-s0")
        results["hard"] = {
            "ppl_as_trained": r["ppl_as_trained"], "steps_measured": gg.get("steps", 0),
            "steps_with_gradient": gg.get("steps_with_gradient", 0), "max_gate_grad_norm": gg.get("max_norm", 0.0),
            "gate_moved": _gate_moved(r["path"], 0), "dense_ppl": dense["ppl_as_trained"],
            "soft_learned_gate_grad_mean": None if soft is None or not soft["gate_grad"] else
            soft["gate_grad"]["sum_norm"] / max(1, soft["gate_grad"]["steps"]),
        }

    distilled = {}
    if "coadapt" in exps or "posthoc" in exps:
        distilled["dense"] = runner.distill("dense", dense["path"])
    if "coadapt" in exps:
        distilled["coadapted"] = runner.distill("coadapted", runs["hard-topk-s0"]["path"])
        rows = []
        for key, name, model_dir in (("dense", "mask-agnostic (dense model)", dense["path"]),
                                     ("coadapted", "co-adapted (hard-topk model)", runs["hard-topk-s0"]["path"])):
            ev = runner.evaluate(f"coadapt-{key}", model_dir, "dense,oracle,gate,random",
                                 gates=distilled[key]["path"])
            rows.append({"model": key, "label": name, "ppl_dense": ev["dense"]["ppl"], "ppl_oracle": ev["oracle"]["ppl"],
                         "ppl_gate": ev["gate"]["ppl"], "ppl_random": ev["random"]["ppl"],
                         "recall": ev["gate"]["recall"], "mass": ev["gate"]["mass"],
                         "gate_over_oracle": ev["gate"]["ppl"] / ev["oracle"]["ppl"],
                         "recall_curve": distilled[key]["recall_curve"]})
        results["coadapt"] = rows  # a list: mask-agnostic first

    if "stochastic" in exps:
        r = runs["stochastic-s0"]
        ev = runner.evaluate("stochastic-s0", r["path"], "dense,oracle,random")
        results["stochastic"] = {
            "stochastic": {"ppl_as_trained": r["ppl_as_trained"], "ppl_dense": ev["dense"]["ppl"],
                           "ppl_oracle": ev["oracle"]["ppl"], "ppl_random": ev["random"]["ppl"]},
            "dense_baseline": {"ppl_as_trained": dense["ppl_as_trained"], "ppl_dense": dense_eval["dense"]["ppl"],
                               "ppl_oracle": dense_eval["oracle"]["ppl"], "ppl_random": dense_eval["random"]["ppl"]},
        }
        results["stochastic"]["dense_ratio"] = ev["dense"]["ppl"] / dense_eval["dense"]["ppl"]

    if "posthoc" in exps:
        from ..distill.loop import SNAPSHOT_DIR

        snaps = sorted((Path(distilled["dense"]["path"]) / SNAPSHOT_DIR).glob("step-*"),
                       key=lambda p: int(p.name.split("-")[1]))
        curve = []
        for snap in snaps:
            step = int(snap.name.split("-")[1])
            ev = runner.evaluate(f"posthoc-step-{step}", dense["path"], "gate", gates=str(snap))
            curve.append({"step": step, "ppl_gate": ev["gate"]["ppl"], "recall": ev["gate"]["recall"]})
        results["posthoc"] = {"curve": curve, "ppl_random": dense_eval["random"]["ppl"],
                              "ppl_oracle": dense_eval["oracle"]["ppl"], "ppl_dense": dense_eval["dense"]["ppl"],
                              "loss_curve": distilled["dense"]["loss_curve"]}

    report = {
        "config": asdict(cfg), "experiments": exps, "results": results,
        "runs": {n: {k: v for k, v in r.items() if k != "loss_curve"} for n, r in runs.items()},
        "loss_curves": {n: r["loss_curve"] for n, r in runs.items()},
        "dense": dense_eval, "device": _device_name(cfg.device), "seconds": time.perf_counter() - t0,
        "versions": versions(),
    }
    atomic_write_json(out / REPORT_NAME, report)
    atomic_write_bytes(out / SUMMARY_NAME, summary_markdown(report).encode())
    from .plots import plot_absorb

    report["plots"] = [str(p) for p in plot_absorb(report, out)]
    emit("done", {"report": str(out / REPORT_NAME), "summary": str(out / SUMMARY_NAME), "plots": report["plots"]})
    return report


def _device_name(device: str) -> str:
    from ..devices import resolve_device

    dev = resolve_device(device)
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    return "cpu"


__all__ = ["EXPERIMENTS", "AbsorbConfig", "run_absorb"]
