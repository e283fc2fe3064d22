"""`sparsify unfreeze-sweep`."""

from __future__ import annotations

from posthoc_sparse.experiments.sweep import SweepConfig

from .common import RunProgress, esc, is_main_process, print_report, processes_note, run_reporting
from .app import app, console
from .options import config_command


@app.command("unfreeze-sweep")
@config_command(SweepConfig)
def unfreeze_sweep(cfg: SweepConfig) -> None:
    """Learned vs random gate as layers unfreeze and co-adapt to the mask (the absorption gradient)."""
    from posthoc_sparse.experiments.sweep import run_sweep

    progress = RunProgress("sweep")

    def on_event(kind: str, info: dict) -> None:
        if kind == "distill":
            console.print(f"no --gates given: distilling a gate first ({info['steps']} steps) into "
                          f"{esc(info['output'])}")
        elif kind == "loaded":
            console.print(f"model [bold]{esc(info['model'])}[/] on {info['device']}{processes_note(info)}; "
                          f"fractions {info['fractions']}, k={info['k']}")
            progress.start(info["points"])
        elif kind == "point":
            tag = " (saved earlier)" if info.get("skipped") else ""
            progress.done(f"f={info['fraction']:.2f} {info['gate']}: perplexity {info['ppl']:.3f}{tag}")

    report = run_reporting(lambda events: run_sweep(cfg, on_event=events), progress, on_event)
    if not is_main_process():  # the other processes of a launched group stay quiet
        return
    from posthoc_sparse.experiments.sweep import sweep_table

    print_report(sweep_table(report), report["files"])
