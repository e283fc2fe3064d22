"""`sparsify unfreeze-sweep`."""

from __future__ import annotations

from posthoc_sparse.experiments.sweep import SweepConfig

from .common import esc, is_main_process, print_note, print_report, processes_note, progress_bar
from .app import app, console
from .options import config_command


@app.command("unfreeze-sweep")
@config_command(SweepConfig)
def unfreeze_sweep(cfg: SweepConfig) -> None:
    """Learned vs random gate as layers unfreeze and co-adapt to the mask (the absorption gradient)."""
    from posthoc_sparse.experiments.sweep import run_sweep

    bar = progress_bar()
    state = {"task": None}

    def on_event(kind: str, info: dict) -> None:
        if kind in ("note", "distill.note"):
            print_note(info)
        elif kind == "distill":
            console.print(f"no --gates given: distilling a gate first ({info['steps']} steps) into "
                          f"{esc(info['output'])}")
        elif kind == "loaded":
            console.print(f"model [bold]{esc(info['model'])}[/] on {info['device']}{processes_note(info)}; "
                          f"fractions {info['fractions']}, k={info['k']}")
            bar.start()
            state["task"] = bar.add_task("sweep", total=info["points"], info="")
        elif kind == "point" and state["task"] is not None:
            tag = " (saved earlier)" if info.get("skipped") else ""
            bar.update(state["task"], advance=1,
                       info=f"f={info['fraction']:.2f} {info['gate']}: ppl {info['ppl']:.3f}{tag}")
            if not console.is_terminal:
                console.print(f"f={info['fraction']:.2f} {info['gate']}: perplexity {info['ppl']:.3f}{tag}")

    try:
        report = run_sweep(cfg, on_event=on_event)
    finally:
        bar.stop()
    if not is_main_process():  # the other processes of a launched group stay quiet
        return
    from posthoc_sparse.experiments.sweep import sweep_table

    print_report(sweep_table(report), report["files"])
