"""The unfreeze sweep: learned vs random gate as more of the model co-adapts to the mask (docs/unfreeze-sweep.md).

For each fraction f, round(f * L) layers are unfrozen (their attention projections by default) and trained
with the language-model loss under deployed hard top-k masks, once with the distilled gate (frozen) and
once with the random gate (frozen), on identical data, steps and seed. Both are evaluated closed loop on
held-out windows, with the co-adapted model's dense perplexity too. f = 0 is the post-hoc point (no
training). Each (f, gate) point is saved when done; ``resume`` skips finished points. Launched as several
processes, each trains on its slice of every global batch (gradients averaged) and evaluates its share of the
held-out windows (sums added); the main process writes the points and the report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention.interface import SparseAttention, attention_modules
from ..attention.policies import policy_for
from ..config import (EMBEDDED_DATASET, EMBEDDED_MODEL, REPORT_TO, REPORT_TO_HELP, SEED_MAX, TEXT_FIELD_HELP,
                      DistillConfig, check_fields, comma_items, option)
from ..distill.checkpoint import describe_checkpoint
from ..errors import UserError
from ..evaluate.perplexity import windows_nll
from ..gates.io import GATE_CONFIG_NAME, check_gate_matches, load_gates, read_gate_config
from ..gates.modules import random_control
from ..io import atomic_write_json, write_report
from ..parallel import Processes
from ..runs import output_run
from ..training import (DivergenceGuard, Tracker, check_report_to, check_resume, lr_at, nested_error, resume_settings,
                        step_seed, versions)

POINTS_DIR = "points"
REPORT_NAME = "sweep.json"
TABLE_NAME = "sweep.md"  # the table as markdown, whole at any terminal width
PLOT_NAME = "sweep.png"
MAX_LOSS_RATIO = 10.0  # the divergence guard of each point's training (training.DivergenceGuard)
LOSS_BLOCKS = 20  # a point keeps its training loss as the means of this many equal blocks of its steps
# What a saved point must share with the run resuming it (with the model, data, k and seq_len it resolved).
_POINT_KEYS = ("gates", "which", "params", "steps", "batch_size", "grad_accum", "lr", "warmup", "eval_windows", "seed",
               "dtype")
# The flags of `sparsify distill` that the sweep's own distillation (no --gates) takes from the sweep's.
_DISTILL_FLAGS = ("--model", "--dataset", "--text-field", "--report-to", "--k", "--seq-len", "--seed", "--dtype",
                  "--device", "--output", "--resume", "--overwrite", "--trust-remote-code")


@dataclass(frozen=True)
class SweepConfig:
    """``sparsify unfreeze-sweep``."""

    model: str | None = option(None, "Model; if not given, the gate's base model (else the embedded model).")
    gates: str | None = option(None, "Distilled gate folder; without it one is distilled first (same k), into "
                                     "OUTPUT/gates.")
    dataset: str | None = option(None, "Text; if not given, the gate's dataset (else the embedded one).")
    text_field: str | None = option(None, f"{TEXT_FIELD_HELP} If not given, the gate's (else text).")
    layers: str = option("0,0.1,0.2,0.29", "Fractions of layers to unfreeze, e.g. 0.29 or 0,0.1,0.2,0.29.")
    which: str = option("spread", "Which layers: spread, first, last, or a list of layer indices like 0,5,9.")
    params: str = option("attention", "attention (the attention module's parameters) or layer (the whole decoder "
                                      "layer).")
    k: int | None = option(None, "Keys kept per query; if not given, the gate's k (else 64).", gt=0)
    steps: int = option(200, "LM training steps per point.", ge=0)
    seq_len: int | None = option(None, "Window length; if not given, the gate's (else 512).", ge=2)
    batch_size: int = option(1, "Windows per micro-batch.", gt=0)
    grad_accum: int = option(1, "Micro-batches per step.", gt=0)
    lr: float = option(1e-4, "AdamW learning rate.", gt=0)
    warmup: int = option(10, "Linear warm-up steps of the learning rate.", ge=0)
    eval_windows: int = option(16, "Held-out windows per evaluation.", gt=0)
    distill_steps: int | None = option(None, "Distillation steps when no --gates is given; if not given, those of "
                                             "`sparsify distill`.", gt=0)
    gradient_checkpointing: bool = option(False, "Trade compute for memory.")
    seed: int = option(0, "Seed for the data order.", ge=0, le=SEED_MAX)
    report_to: str = option("none", REPORT_TO_HELP, choices=REPORT_TO)
    output: str = option("sweeps/default", "Folder for sweep.json, sweep.png, points/.", flags=("--output", "-o"))
    resume: bool = option(False, "Skip the points already saved in --output, which must exist (made with the same "
                                  "settings).")
    overwrite: bool = option(False, "Replace an existing --output folder.")
    dtype: str = option("auto", "Weights dtype: auto (fp32 weights, bf16 autocast on GPU).")
    device: str = option("auto", "auto, cpu, cuda, cuda:N.")
    trust_remote_code: bool = option(False, "Allow the model's own code.")

    def validate(self) -> None:
        """Check every setting that needs no model, before any model is loaded or gate distilled."""
        check_fields(self)
        check_report_to(self.report_to)  # the tracker's package is installed
        self.fractions()
        if self.which not in ("spread", "first", "last"):
            choose_layers(1 << 30, 1.0, self.which)  # a list of integers (checked against the layers in _check_which)
        if self.params not in ("attention", "layer"):
            raise UserError(f"--params must be attention or layer, got {self.params!r}")

    def fractions(self) -> list[float]:
        try:
            fs = [float(x) for x in comma_items(self.layers, "--layers")]
        except ValueError:
            raise UserError(f"--layers takes fractions separated by commas, got {self.layers!r}") from None
        if not fs or any(not 0 <= f <= 1 for f in fs):
            raise UserError(f"--layers fractions must lie in [0, 1], got {self.layers!r}")
        return sorted(set(fs))


def choose_layers(num_layers: int, fraction: float, which: str) -> list[int]:
    """The layers to unfreeze: round(f * L) of them, evenly spread, first, last, or an explicit list."""
    if which not in ("spread", "first", "last"):
        try:
            chosen = sorted({int(x) for x in comma_items(which, "--which")})
        except ValueError:
            raise UserError(f"--which must be spread, first, last or a list like 0,5,9, got {which!r}") from None
        if any(not 0 <= i < num_layers for i in chosen):
            raise UserError(f"--which lists layers outside 0..{num_layers - 1}: {which!r}")
        return chosen if fraction > 0 else []
    n = round(fraction * num_layers)
    if which == "first":
        return list(range(n))
    if which == "last":
        return list(range(num_layers - n, num_layers))
    return sorted({int((i + 0.5) * num_layers / n) for i in range(n)}) if n else []


def trainable_parameters(model, layers: list[int], params: str) -> list[torch.nn.Parameter]:
    """Parameters to unfreeze, chosen by object: attention modules, or their whole decoder layers."""
    attns = attention_modules(model)
    if params == "attention":
        return [p for i in layers for p in attns[i].parameters()]
    if params == "layer":
        parents = {}
        for name, mod in model.named_modules():
            for child in mod.children():
                if any(child is attns[i] for i in layers):
                    parents[id(mod)] = mod
        return [p for mod in parents.values() for p in mod.parameters()]
    raise UserError(f"--params must be attention or layer, got {params!r}")


def lm_train(model, params: list[torch.nn.Parameter], policy, windows: torch.Tensor, cfg: SweepConfig,
             device, on_step: Callable[[int, float, float], None] | None = None,
             procs: Processes | None = None) -> list[float]:
    """Train ``params`` with the LM loss under ``policy``; same data order for every call (seeded).

    Each step draws a global batch of ``batch_size * grad_accum`` windows per process; with ``procs`` this
    process trains on its slice and gradients and losses are averaged across processes, so N processes
    with batch size b follow one process with batch size N * b."""
    world, rank = (procs.world, procs.rank) if procs is not None else (1, 0)
    per_process = cfg.batch_size * cfg.grad_accum
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    use_amp = device.type == "cuda"
    losses = []
    guard = DivergenceGuard(MAX_LOSS_RATIO)
    model.train()
    with SparseAttention(model, policy):
        for step in range(cfg.steps):
            torch.manual_seed(step_seed(cfg.seed, step, rank))  # this step's dropout: its own in every process
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, len(windows), (per_process * world,), generator=gen)  # the global batch
            idx = idx[rank * per_process : (rank + 1) * per_process]  # this process's slice
            total = 0.0
            for micro in idx.split(cfg.batch_size):
                ids = windows[micro].to(device)  # (B, T)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
            if world > 1:
                (mean,) = procs.average_gradients(params, torch.tensor([total], dtype=torch.float64,
                                                                        device=procs.state.device))
                total = float(mean)
            guard.check(total, step, "the language-model loss")
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
            if on_step:
                on_step(step + 1, total, lr)
    model.eval()
    return losses


def loss_summary(losses: list[float]) -> dict:
    """A point's training loss in a few numbers: ``curve``, the means of at most ``LOSS_BLOCKS`` consecutive blocks
    of ``block`` steps (the last one may be shorter), and ``change_last_quarter``, the relative change of the mean
    loss from the third quarter of the steps to the last (near 0 when the loss has flattened; None under 4 steps).
    One step's loss at batch 8 is too noisy to tell that by itself."""
    n = len(losses)
    block = max(1, -(-n // LOSS_BLOCKS))
    curve = [sum(losses[i:i + block]) / len(losses[i:i + block]) for i in range(0, n, block)]
    q = n // 4
    change = None
    if q:
        third, last = losses[n - 2 * q:n - q], losses[n - q:]
        change = (sum(last) / q - sum(third) / q) / (sum(third) / q)
    return {"block": block, "curve": curve, "change_last_quarter": change}


def _saved_state(work: Path) -> str | None:
    """What an interrupted sweep keeps for --resume: finished points and the gate it distilled (or its checkpoint)."""
    n = len(list((work / POINTS_DIR).glob("*.json")))
    gate = ("the distilled gate" if (work / "gates" / GATE_CONFIG_NAME).is_file()
            else describe_checkpoint(work / "gates" / "checkpoint"))
    return " and ".join(([f"{n} finished points"] if n else []) + ([gate] if gate else [])) or None


def run_sweep(cfg: SweepConfig, on_event: Callable[[str, dict], None] | None = None) -> dict:
    """Run every (fraction, gate) point; returns the report dict also written to ``sweep.json``. The output folder
    is locked for the run; a failed run keeps only finished points and the distilled gate (``runs.output_run``)."""
    cfg.validate()
    _check_which(cfg)
    procs = Processes(cfg.device)
    with output_run(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume, main=procs.is_main, barrier=procs.barrier,
                    resumable=_saved_state) as run:
        return _sweep(cfg, procs, on_event, run.work)


def _check_which(cfg: SweepConfig) -> None:
    """An explicit ``--which`` list checked against the layer count before any model is loaded or gate distilled,
    where a file says it: the gate's config, or a local model folder's config.json (a hub id or a GGUF file is
    checked once the model is loaded)."""
    if cfg.which in ("spread", "first", "last"):
        return
    n = None
    if cfg.gates is not None and (Path(cfg.gates).expanduser() / GATE_CONFIG_NAME).is_file():
        n = read_gate_config(cfg.gates).get("num_layers")
    elif cfg.model and (Path(cfg.model).expanduser() / "config.json").is_file():
        from transformers import AutoConfig

        from ..loading import text_config

        n = getattr(text_config(AutoConfig.from_pretrained(Path(cfg.model).expanduser())), "num_hidden_layers", None)
    choose_layers(n if isinstance(n, int) else 1 << 30, 1.0, cfg.which)  # UserError for a bad list


def _sweep(cfg: SweepConfig, procs: Processes, on_event, out: Path) -> dict:
    from ..data import build_windows
    from ..loading import check_positions, load_model, model_fingerprint

    emit = on_event if on_event is not None and procs.is_main else (lambda kind, info: None)
    fractions = cfg.fractions()
    points_dir = out / POINTS_DIR

    gate_path = cfg.gates
    if gate_path is None:
        gate_path = str(out / "gates")
        if not (Path(gate_path) / GATE_CONFIG_NAME).exists():  # a resumed sweep resumes its distillation too
            from ..distill.loop import distill

            dcfg = DistillConfig(model=cfg.model or EMBEDDED_MODEL, dataset=cfg.dataset or EMBEDDED_DATASET,
                                 text_field=cfg.text_field or "text", report_to=cfg.report_to,
                                 output=gate_path, k=cfg.k or 64, seq_len=cfg.seq_len or 512, seed=cfg.seed,
                                 steps=cfg.distill_steps, dtype=cfg.dtype, device=cfg.device, resume=cfg.resume,
                                 trust_remote_code=cfg.trust_remote_code)
            emit("distill", {"output": gate_path, "steps": dcfg.resolved_steps()})
            try:
                distill(dcfg, on_event=lambda kind, info: emit(f"distill.{kind}", info))
            except UserError as e:  # its advice may name flags of distill alone
                raise nested_error(e, "sparsify distill", _DISTILL_FLAGS, "distill the gate there, pass it as --gates")
    gate_cfg = read_gate_config(gate_path)
    k = cfg.k or gate_cfg["k"]
    seq_len = cfg.seq_len or gate_cfg.get("seq_len") or 512
    dataset = cfg.dataset or gate_cfg.get("dataset") or EMBEDDED_DATASET
    loaded = load_model(cfg.model or gate_cfg.get("base_model") or EMBEDDED_MODEL, dtype="float32"
                        if cfg.dtype == "auto" else cfg.dtype, device=procs.model_device(),
                        trust_remote_code=cfg.trust_remote_code)
    model, device = loaded.model, loaded.model.device
    check_positions(model, seq_len)
    check_gate_matches(gate_cfg, model, model_fingerprint(model.config))
    learned, _ = load_gates(gate_path, device=device)
    random = random_control(learned.spec, gate_cfg.get("random_seed", cfg.seed + 1)).to(device)
    banks = {"learned": learned, "random": random}
    text_field = cfg.text_field or gate_cfg.get("text_field") or "text"
    train, train_info = build_windows(loaded.tokenizer, dataset, "train", seq_len, text_field=text_field)
    heldout, held_info = build_windows(loaded.tokenizer, dataset, "heldout", seq_len, max_windows=cfg.eval_windows,
                                       text_field=text_field)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    num_layers = learned.spec.num_layers
    emit("loaded", {"model": loaded.source, "device": str(device), "processes": procs.world,
                    "fractions": fractions, "k": k, "points": 2 * len(fractions)})
    settings = resume_settings(cfg, _POINT_KEYS, model=loaded.source, dataset=dataset, k=k, seq_len=seq_len)

    tracker = Tracker(cfg.report_to, out, "posthoc-sparse-sweep", asdict(cfg), enabled=procs.is_main)
    points = []
    for f in fractions:
        layers = choose_layers(num_layers, f, cfg.which)
        for gate_name, bank in banks.items():
            path = points_dir / f"f{f:.4f}-{gate_name}.json"
            if cfg.resume and path.exists():
                point = _read_point(path)
                check_resume(point.get("settings", {}), cfg, (), path, resolved=settings)
                emit("point", point | {"skipped": True})
                points.append(point)
                continue
            params = trainable_parameters(model, layers, cfg.params)
            saved = [p.detach().clone() for p in params]
            for p in params:
                p.requires_grad_(True)
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            policy = policy_for("gate", k, bank)
            tag = f"f{f:.2f}-{gate_name}"  # one curve per point: loss and lr against the point's steps

            def track(step: int, loss: float, lr: float) -> None:
                tracker.log({f"{tag}/loss": loss, f"{tag}/lr": lr}, step)

            losses = lm_train(model, params, policy, train, cfg, device, on_step=track, procs=procs) \
                if params and cfg.steps else []
            with SparseAttention(model, policy_for("gate", k, bank)):
                nll, count = windows_nll(model, heldout, cfg.batch_size, device, procs)
            with SparseAttention(model, policy_for("dense")):
                dense_nll, _ = windows_nll(model, heldout, cfg.batch_size, device, procs)
            point = {
                "fraction": f, "gate": gate_name, "layers": layers, "n_layers_unfrozen": len(layers),
                "n_params_trained": sum(p.numel() for p in params), "steps": cfg.steps if params else 0,
                "ppl": math.exp(nll / count), "dense_ppl_after": math.exp(dense_nll / count), "tokens": count,
                "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
                "train_loss": loss_summary(losses) if losses else None,
                "seconds": time.perf_counter() - t0,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "settings": settings,
            }
            with torch.no_grad():  # back to the frozen base model for the next point
                for p, s in zip(params, saved):
                    p.copy_(s)
                    p.requires_grad_(False)
            for b in banks.values():
                assert not any(p.requires_grad for p in b.parameters())
            tracker.log({f"{tag}/perplexity": point["ppl"], f"{tag}/dense_perplexity": point["dense_ppl_after"]},
                        point["steps"])
            if procs.is_main:
                atomic_write_json(path, point)
            points.append(point)
            emit("point", point)

    table = []
    for f in fractions:
        by = {p["gate"]: p for p in points if p["fraction"] == f}
        table.append({"fraction": f, "n_layers_unfrozen": by["learned"]["n_layers_unfrozen"],
                      "ppl_learned": by["learned"]["ppl"], "ppl_random": by["random"]["ppl"],
                      "gap": by["random"]["ppl"] - by["learned"]["ppl"],
                      "dense_ppl_learned_run": by["learned"]["dense_ppl_after"],
                      "dense_ppl_random_run": by["random"]["dense_ppl_after"],
                      "loss_change_learned": _loss_change(by["learned"]),
                      "loss_change_random": _loss_change(by["random"])})
    report = {
        "table": table, "points": points,
        "settings": asdict(cfg) | {"k": k, "seq_len": seq_len, "dataset": dataset,
                                   "gates": cfg.gates or str(Path(cfg.output) / "gates")},
        "model": loaded.source, "model_fingerprint": model_fingerprint(model.config), "gate_config": gate_cfg,
        "data": {"train": train_info, "heldout": held_info}, "device": str(device), "processes": procs.world,
        "versions": versions(),
    }
    tracker.close()
    written = []
    if procs.is_main:  # the plot first: a sweep.json is always complete with its plot
        from .plots import plot_sweep

        plotted = plot_sweep(report, out / PLOT_NAME)
        written = write_report(out, REPORT_NAME, report, TABLE_NAME, sweep_table(report), Path(cfg.output))
        written += [str(Path(cfg.output) / PLOT_NAME)] if plotted else []
    report["files"] = written  # what was written (not in sweep.json)
    procs.barrier()
    return report


def _loss_change(point: dict) -> float | None:
    """A point's ``train_loss.change_last_quarter`` (None for a point that did not train, or from before it was kept)."""
    return (point.get("train_loss") or {}).get("change_last_quarter")


def _read_point(path: Path) -> dict:
    try:
        point = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot resume: {path} is not readable JSON ({e}); remove it to recompute that point") from None
    if not isinstance(point, dict) or not all(key in point for key in ("fraction", "gate", "ppl")):
        raise UserError(f"cannot resume: {path} is not a sweep point; remove it to recompute that point")
    return point


def sweep_table(report: dict) -> tuple[str, list[str], list[list[str]]]:
    """(title, headers, rows) of the sweep: one row per fraction (the CLI prints it, sweep.md holds it)."""
    def fmt(x: float | None) -> str:
        return "-" if x is None or x != x else f"{x:.3f}"

    def pct(x: float | None) -> str:
        return "-" if x is None or x != x else f"{100 * x:+.1f}%"

    headers = ["fraction", "layers unfrozen", "ppl learned", "ppl random", "gap (random - learned)",
               "dense ppl after (learned run)", "dense ppl after (random run)", "loss change, last quarter (l / r)"]
    rows = [[f"{r['fraction']:.2f}", str(r["n_layers_unfrozen"]), fmt(r["ppl_learned"]), fmt(r["ppl_random"]),
             fmt(r["gap"]), fmt(r["dense_ppl_learned_run"]), fmt(r["dense_ppl_random_run"]),
             f"{pct(r.get('loss_change_learned'))} / {pct(r.get('loss_change_random'))}"] for r in report["table"]]
    return f"unfreeze sweep, top-{report['settings']['k']}, {report['model']}", headers, rows
