"""Standard downstream tasks through lm-evaluation-harness, every mode side by side (``sparsify lm-eval``).

The model is loaded once; for each mode and k its attention is routed through ``apply_gates`` (dense, oracle@k,
gate@k, random@k, closed loop as in ``sparsify eval``) and the harness scores the same tasks, documents and
few-shot examples (its seeds are fixed). The harness model is its own ``HFLM`` over the loaded model, as in
``lm_eval_model.SparsifyLM`` (``--model sparsify``). Needs ``pip install posthoc-sparse[lm-eval]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..attention.policies import MODES
from ..config import EMBEDDED_MODEL, comma_items, option
from ..errors import UserError, first_line
from .modes import ModesConfig, label

REPORT_NAME = "tasks.json"
TABLE_NAME = "tasks.md"


@dataclass(frozen=True)
class TasksConfig(ModesConfig):
    """``sparsify lm-eval``: lm-evaluation-harness tasks under dense, oracle@k, gate@k and random@k attention."""

    tasks: str | None = option(None, "lm-evaluation-harness task names, comma list (e.g. hellaswag,arc_easy,piqa; "
                                     "`lm_eval ls tasks` lists them).")
    num_fewshot: int | None = option(None, "Few-shot examples per prompt; if not given, each task's default.")
    limit: float | None = option(None, "Documents per task (a number below 1: that share); if not given, all.")
    batch_size: int = option(1, "Requests per forward.")
    include_path: str | None = option(None, "A folder of task YAML files of your own (as lm_eval's --include_path).")
    seed: int = option(0, "Seed of the harness (few-shot sampling, generation).")
    output: str | None = option(None, "Folder for tasks.json and tasks.md; if not given, nothing is written.",
                                flags=("--output", "-o"))
    overwrite: bool = option(False, "Replace an existing --output folder.")

    def task_list(self) -> list[str]:
        names = comma_items(self.tasks or "", "--tasks")
        if not names:
            raise UserError("--tasks is required: lm-evaluation-harness task names, e.g. --tasks hellaswag,arc_easy")
        return names

    def validate(self) -> None:
        self.task_list()
        self.check_modes()
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be positive, got {self.limit}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise UserError(f"--include-path {self.include_path} is not a folder of task YAML files")


@dataclass
class TasksReport:
    summary: list[dict]  # one row per (task, metric, k): the value under each mode
    results: dict  # "mode@k" (or "dense") -> lm-eval's results per task
    setup: dict
    files: list[str] = field(default_factory=list)  # what was written (not in the JSON)

    def to_json(self) -> dict:
        return {"summary": self.summary, "results": self.results, "setup": self.setup}


def tasks_table(report: TasksReport) -> tuple[str, list[str], list[list[str]]]:
    """(title, headers, rows): per task, metric and k, each mode's value (± its standard error when known)."""
    modes = report.setup["modes"]
    rows = []
    for row in report.summary:
        cells = [row["task"], row["metric"], "-" if row["k"] is None else str(row["k"])]
        for m in modes:
            v, se = row.get(m), row.get(f"{m}_stderr")
            cells.append("-" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else ""))
        rows.append(cells)
    limit = report.setup["limit"]
    title = f"lm-evaluation-harness, {report.setup['model']}" + (f", limit {limit:g}" if limit else "")
    return title, ["task", "metric", "k", *modes], rows


def _metrics(task_results: dict) -> dict[str, tuple[float, float | None]]:
    """{metric: (value, stderr)} of one task's results ("acc,none" -> "acc")."""
    out = {}
    for key, value in task_results.items():
        name, _, filt = key.partition(",")
        if name in ("alias", "sample_len", "sample_count") or name.endswith("_stderr") or not isinstance(
                value, (int, float)):
            continue
        metric = name if filt in ("", "none") else f"{name} ({filt})"
        se = task_results.get(f"{name}_stderr,{filt}") if filt else task_results.get(f"{name}_stderr")
        out[metric] = (float(value), float(se) if isinstance(se, (int, float)) else None)
    return out


def evaluate_tasks(cfg: TasksConfig, on_event: Callable[[str, dict], None] | None = None) -> TasksReport:
    """Score ``cfg.tasks`` with lm-evaluation-harness under each mode and k; write tasks.json and tasks.md if
    ``cfg.output``. ``on_event(kind, info)`` reports progress ("loaded", "result")."""
    from ..runs import report_folder

    cfg.validate()
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise UserError(f"`sparsify lm-eval` needs lm-evaluation-harness ({first_line(e, 80)}): pip install "
                        "'posthoc-sparse[lm-eval]'") from None
    with report_folder(cfg.output, cfg.overwrite) as out:
        return _evaluate_tasks(cfg, on_event or (lambda kind, info: None), out)


def _evaluate_tasks(cfg: TasksConfig, emit: Callable[[str, dict], None], out: Path | None) -> TasksReport:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..deploy import apply_gates
    from ..devices import device_summary
    from ..gates.io import load_gates, read_gate_config
    from ..io import write_report
    from ..loading import load_model
    from ..training import versions

    tasks, runs = cfg.task_list(), cfg.runs()
    manager = TaskManager(include_path=cfg.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-evaluation-harness task {', '.join(unknown)}; `lm_eval ls tasks` lists them "
                        "(--include-path adds a folder of your own task YAML files)")
    gate_cfg = read_gate_config(cfg.gates) if cfg.gates else {}
    loaded = load_model(cfg.model or gate_cfg.get("base_model") or EMBEDDED_MODEL, dtype=cfg.dtype, device=cfg.device,
                        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=cfg.batch_size)
    emit("loaded", {"model": loaded.source, "device": device_summary(loaded.model), "dtype": loaded.dtype,
                    "tasks": tasks, "runs": len(runs)})
    bank = None  # a gate that does not fit the model, or a corrupt one, refused before any run
    if any(cfg.gates_for(mode) is not None for mode, _ in runs):
        bank = load_gates(cfg.gates, model=loaded.model)[0]
    random_seed = cfg.random_seed if cfg.random_seed is not None else gate_cfg.get("random_seed", 1)
    results, raw = {}, {}
    for mode, k in runs:
        t0 = time.perf_counter()
        with apply_gates(loaded.model, bank if cfg.gates_for(mode) is not None else None, k=k or 1, mode=mode,
                         random_seed=random_seed, selection=cfg.selection, block_size=cfg.block_size):
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                          random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                          torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        name = label(mode, k)
        raw[name] = res
        results[name] = {t: _metrics(r) for t, r in res["results"].items()}
        emit("result", {"mode": mode, "k": k, "label": name, "seconds": time.perf_counter() - t0,
                        "metrics": {t: {m: v for m, (v, _) in ms.items()} for t, ms in results[name].items()}})
    summary = _summary(results, runs)
    first = next(iter(raw.values()))
    setup = {"model": loaded.source, "model_resolved": str(loaded.resolved), "gates": cfg.gates,
             "gate_config": gate_cfg, "tasks": tasks, "modes": [m for m in MODES if any(r[0] == m for r in runs)],
             "k": sorted({k for _, k in runs if k is not None}), "num_fewshot": cfg.num_fewshot, "limit": cfg.limit,
             "n_samples": first.get("n-samples"), "task_configs": first.get("configs"),
             "task_versions": first.get("versions"), "seed": cfg.seed, "selection": cfg.selection,
             "random_seed": cfg.random_seed if cfg.random_seed is not None else gate_cfg.get("random_seed", 1),
             "device": device_summary(loaded.model), "dtype": loaded.dtype, "closed_loop": True,
             "versions": versions() | {"lm_eval": getattr(lm_eval, "__version__", None)}}
    report = TasksReport(summary=summary, results={name: r["results"] for name, r in raw.items()}, setup=setup)
    if out is not None:
        report.files = write_report(out, REPORT_NAME, report.to_json(), TABLE_NAME, tasks_table(report),
                                    Path(cfg.output))
    return report


def _summary(results: dict, runs: list[tuple[str, int | None]]) -> list[dict]:
    """One row per (task, metric, k) with each mode's value and standard error; dense (no k) on every row."""
    ks = sorted({k for _, k in runs if k is not None}) or [None]
    rows = []
    dense = results.get("dense", {})
    tasks = next(iter(results.values()))
    for task, metrics in tasks.items():
        for metric in metrics:
            for k in ks:
                row = {"task": task, "metric": metric, "k": k}
                for mode, run_k in runs:
                    if run_k == k or mode == "dense":
                        value = (dense if mode == "dense" else results[label(mode, k)]).get(task, {}).get(metric)
                        if value is not None:
                            row[mode], row[f"{mode}_stderr"] = value
                rows.append(row)
    return rows
