"""`sparsify lm-eval`."""

from __future__ import annotations

from posthoc_sparse.evaluate.harness import TasksConfig

from .app import app, console
from .common import RunProgress, esc, print_report, run_reporting
from .options import config_command


@app.command("lm-eval")
@config_command(TasksConfig)
def lm_eval(cfg: TasksConfig) -> None:
    """lm-evaluation-harness tasks under dense, oracle@k, gate@k and random@k attention, side by side."""
    import os

    from posthoc_sparse.evaluate.harness import evaluate_tasks, tasks_table

    if not console.is_terminal:  # lm-eval's own progress bars would fill a log file; ours prints a line per mode
        os.environ.setdefault("TQDM_DISABLE", "1")
    progress = RunProgress("lm-eval")

    def on_event(kind: str, info: dict) -> None:
        if kind == "loaded":
            console.print(f"model [bold]{esc(info['model'])}[/] on {info['device']}, {info['dtype']}; tasks "
                          f"{esc(', '.join(info['tasks']))}")
            progress.start(info["runs"])
        elif kind == "result":
            scores = "; ".join(f"{t} {m} {v:.4f}" for t, ms in info["metrics"].items() for m, v in ms.items())
            progress.done(f"{info['label']}: {scores} ({info['seconds']:.0f} s)")

    report = run_reporting(lambda events: evaluate_tasks(cfg, on_event=events), progress, on_event)
    print_report(tasks_table(report), report.files, key_columns=3)
