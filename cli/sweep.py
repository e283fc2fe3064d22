"""`sparsify unfreeze-sweep`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from posthoc_sparse.experiments.sweep import SweepConfig

from .common import fmt, is_main_process, make_config, processes_note, progress_bar
from .app import app, console, out_console

Opt = typer.Option


@app.command("unfreeze-sweep")
def unfreeze_sweep(
    model: Annotated[Optional[str], Opt(help="Model; default: the gate's base model (else the embedded one).")] = None,
    gates: Annotated[Optional[str], Opt(help="Distilled gate folder; without it one is distilled first.")] = None,
    dataset: Annotated[Optional[str], Opt(help="Text; default: the gate's dataset.")] = None,
    layers: Annotated[Optional[str], Opt(help="Fractions of layers to unfreeze, e.g. 0.29 or 0,0.1,0.2,0.29.")] = None,
    which: Annotated[Optional[str], Opt(help="spread, first, last, or a list like 0,5,9. Default spread.")] = None,
    params: Annotated[Optional[str], Opt(help="attention (projections) or layer (whole layer). Default attention.")] = None,
    k: Annotated[Optional[int], Opt(help="Keys kept per query. Default: the gate's k.")] = None,
    steps: Annotated[Optional[int], Opt(help="LM training steps per point. Default 200.")] = None,
    seq_len: Annotated[Optional[int], Opt(help="Window length. Default: the gate's.")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Windows per micro-batch. Default 1.")] = None,
    grad_accum: Annotated[Optional[int], Opt(help="Micro-batches per step. Default 1.")] = None,
    lr: Annotated[Optional[float], Opt(help="AdamW learning rate. Default 1e-4.")] = None,
    eval_windows: Annotated[Optional[int], Opt(help="Held-out windows per evaluation. Default 16.")] = None,
    distill_steps: Annotated[Optional[int], Opt(help="Distillation steps when no --gates is given.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], Opt("--gradient-checkpointing", help="Trade compute for memory.")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed for the data order. Default 0.")] = None,
    output: Annotated[Optional[str], Opt("--output", "-o", help="Folder for sweep.json, sweep.png, points/.")] = None,
    resume: Annotated[Optional[bool], Opt("--resume", help="Skip the points already saved in --output.")] = None,
    overwrite: Annotated[Optional[bool], Opt("--overwrite", help="Replace an existing --output folder.")] = None,
    dtype: Annotated[Optional[str], Opt(help="Weights dtype: auto (fp32 weights, bf16 autocast on GPU).")] = None,
    device: Annotated[Optional[str], Opt(help="auto, cpu, cuda, cuda:N.")] = None,
    trust_remote_code: Annotated[Optional[bool], Opt("--trust-remote-code")] = None,
    recipe: Annotated[Optional[str], Opt(help="A recipe name or TOML path.")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override a recipe key: --set key=value.")] = None,
) -> None:
    """Learned vs random gate as layers unfreeze and co-adapt to the mask (the absorption gradient)."""
    from posthoc_sparse.experiments.sweep import run_sweep

    flags = {k_: v for k_, v in locals().items() if k_ not in ("recipe", "set_", "run_sweep")}
    cfg: SweepConfig = make_config(SweepConfig, recipe, set_, flags)
    bar = progress_bar()
    state = {"task": None}

    def on_event(kind: str, info: dict) -> None:
        if kind == "distill":
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
