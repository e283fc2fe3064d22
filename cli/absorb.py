"""`sparsify absorb`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markdown import Markdown

from posthoc_sparse.experiments.absorb import AbsorbConfig

from .app import app, console, out_console
from .common import make_config, progress_bar

Opt = typer.Option


@app.command(no_args_is_help=False)
def absorb(
    dataset: Annotated[Optional[str], Opt(help="Training and held-out text, as for `sparsify pretrain`. Default wikitext.")] = None,
    output: Annotated[Optional[str], Opt("--output", "-o", help="Report folder (runs, gates, absorb.json, summary.md, PNGs). Default reports/absorb.")] = None,
    experiments: Annotated[Optional[str], Opt(help="Comma list of soft, hard, coadapt, stochastic, posthoc. Default all.")] = None,
    seeds: Annotated[Optional[int], Opt(help="Seeds of the soft-gating experiment. Default 3.")] = None,
    steps: Annotated[Optional[int], Opt(help="Training steps of every run. Default 3000.")] = None,
    k: Annotated[Optional[int], Opt(help="Keys kept per query. Default 64.")] = None,
    tau: Annotated[Optional[float], Opt(help="Temperature of the soft top-k relaxation. Default 1.0.")] = None,
    d_g: Annotated[Optional[int], Opt("--d-g", help="Gate dimension per head. Default 32.")] = None,
    distill_steps: Annotated[Optional[int], Opt(help="Post-hoc distillation steps. Default 1000.")] = None,
    distill_every: Annotated[Optional[int], Opt(help="A convergence-curve point every N distillation steps. Default 100.")] = None,
    distill_lr: Annotated[Optional[float], Opt(help="Distillation learning rate. Default 2e-3.")] = None,
    distill_batch_size: Annotated[Optional[int], Opt(help="Distillation windows per step. Default 4.")] = None,
    eval_windows: Annotated[Optional[int], Opt(help="Held-out windows for every perplexity. Default 32.")] = None,
    tokenizer: Annotated[Optional[str], Opt(help="As for `sparsify pretrain`. Default embedded:gpt2.")] = None,
    arch: Annotated[Optional[str], Opt(help="gpt2 or llama. Default gpt2 (the paper's 31M).")] = None,
    n_layer: Annotated[Optional[int], Opt(help="Layers. Default 6.")] = None,
    d_model: Annotated[Optional[int], Opt(help="Hidden size. Default 256.")] = None,
    n_head: Annotated[Optional[int], Opt(help="Heads. Default 4.")] = None,
    d_ff: Annotated[Optional[int], Opt(help="MLP inner size. Default 1024.")] = None,
    seq_len: Annotated[Optional[int], Opt(help="Context. Default 512.")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Training windows per step. Default 16.")] = None,
    lr: Annotated[Optional[float], Opt(help="Training peak learning rate. Default 1e-3.")] = None,
    min_lr: Annotated[Optional[float], Opt(help="Learning rate at the end of the cosine. Default 1e-4.")] = None,
    warmup: Annotated[Optional[int], Opt(help="Warm-up steps. Default 200.")] = None,
    max_train_windows: Annotated[Optional[int], Opt(help="Use at most N training windows.")] = None,
    mixed_precision: Annotated[Optional[str], Opt(help="auto (bf16 on GPU), bf16, no.")] = None,
    device: Annotated[Optional[str], Opt(help="auto, cpu, cuda, cuda:N.")] = None,
    resume: Annotated[Optional[bool], Opt("--resume", help="Keep finished runs, gates and evaluations; continue the rest.")] = None,
    overwrite: Annotated[Optional[bool], Opt("--overwrite", help="Start over in an existing --output folder.")] = None,
    recipe: Annotated[Optional[str], Opt(help="A recipe name (recipes/) or TOML path, e.g. paper-31m-absorb.")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override a recipe key: --set key=value (repeatable).")] = None,
) -> None:
    """The routing-absorption experiments: end-to-end soft / hard / stochastic gating vs post-hoc distillation."""
    from posthoc_sparse.experiments.absorb import REPORT_NAME, SUMMARY_NAME, run_absorb

    flags = {k_: v for k_, v in locals().items() if k_ not in ("recipe", "set_", "run_absorb", "REPORT_NAME",
                                                                "SUMMARY_NAME")}
    cfg: AbsorbConfig = make_config(AbsorbConfig, recipe, set_, flags)
    bar = progress_bar()
    state = {"task": None, "run": None}

    def on_event(kind: str, info: dict) -> None:
        if kind == "run":
            state["run"] = info["name"]
            if info["cached"]:
                console.print(f"run {info['name']}: finished earlier, kept")
        elif kind == "pretrain:loaded":
            if state["task"] is None:
                bar.start()
                state["task"] = bar.add_task("", total=info["steps"], info="")
            bar.reset(state["task"], total=info["steps"], completed=info["resumed_from"],
                      description=f"train {state['run']}")
        elif kind == "pretrain:step" and state["task"] is not None:
            bar.update(state["task"], completed=info["step"], info=f"loss {info['loss']:.3f}")
        elif kind == "pretrain:done":
            console.print(f"run {info.get('run', state['run'])}: held-out perplexity {info['heldout_ppl']:.2f} "
                          f"({info['seconds']:.0f} s)")
        elif kind == "distill":
            console.print(f"distilling a gate onto {info['name']}" + (" (finished earlier, kept)" if info["cached"]
                                                                       else ""))
        elif kind == "distill:loaded" and state["task"] is not None:
            bar.reset(state["task"], total=info["steps"], completed=info["resumed_from"],
                      description=f"distill {info['run']}")
        elif kind == "distill:step" and state["task"] is not None:
            bar.update(state["task"], completed=info["step"], info=f"KL {info['loss']:.4f}")
        elif kind == "eval":
            console.print(f"evaluating {info['name']} ({info['modes']})")

    try:
        report = run_absorb(cfg, on_event=on_event)
    finally:
        bar.stop()
    from posthoc_sparse.experiments.absorb_summary import summary_markdown

    out_console.print(Markdown(summary_markdown(report)))
    out_console.print(f"report written to {cfg.output}/{REPORT_NAME} and {SUMMARY_NAME} (+ {len(report['plots'])} PNG)")
