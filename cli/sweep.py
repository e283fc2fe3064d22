"""`sparsify unfreeze-sweep`."""

from __future__ import annotations

from rich.table import Table

from posthoc_sparse.experiments.sweep import SweepConfig

from .common import fmt, is_main_process, processes_note, progress_bar
from .app import app, console, out_console
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
            console.print(f"[yellow]note[/]: {info['message']}")
        elif kind == "distill":
            console.print(f"no --gates given: distilling a gate first ({info['steps']} steps) into {info['output']}")
        elif kind == "loaded":
            console.print(f"model [bold]{info['model']}[/] on {info['device']}{processes_note(info)}; "
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
    table = Table(title=f"unfreeze sweep, top-{report['settings']['k']}, {report['model']}")
    for c in ("fraction", "layers unfrozen", "ppl learned", "ppl random", "gap (random - learned)",
              "dense ppl after (learned run)", "dense ppl after (random run)"):
        table.add_column(c, justify="right")
    for r in report["table"]:
        table.add_row(f"{r['fraction']:.2f}", str(r["n_layers_unfrozen"]), fmt(r["ppl_learned"], ".3f"),
                      fmt(r["ppl_random"], ".3f"), fmt(r["gap"], ".3f"), fmt(r["dense_ppl_learned_run"], ".3f"),
                      fmt(r["dense_ppl_random_run"], ".3f"))
    out_console.print(table)
    out_console.print(f"report written to {cfg.output}/sweep.json (+ sweep.png)")
