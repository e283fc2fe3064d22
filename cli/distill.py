"""`sparsify distill`."""

from __future__ import annotations

from posthoc_sparse.config import DistillConfig

from .common import (esc, fmt, is_main_process, log_step, print_table, processes_note, progress_bar,
                     run_reporting)
from .app import app, console, out_console
from .options import config_command


@app.command(no_args_is_help=False)
@config_command(DistillConfig)
def distill(cfg: DistillConfig) -> None:
    """Distill per-layer top-k gates against the frozen model's own dense attention (KL)."""
    from posthoc_sparse.distill.loop import distill as run_distill

    bar = progress_bar()
    state = {"task": None, "recall": float("nan"), "recall_random": float("nan")}

    def on_event(kind: str, info: dict) -> None:
        if kind == "loaded":
            tr, ho = info["train"], info["heldout"]
            console.print(f"model [bold]{esc(info['model'])}[/] ({esc(info['resolved'])}) on {info['device']}, "
                          f"{info['dtype']}{processes_note(info)}")
            console.print(f"text  [bold]{esc(tr['source'])}[/]: {tr['n_windows']} train windows, "
                          f"{ho['n_windows']} held-out windows of {cfg.seq_len} tokens")
            spec = info["spec"]
            console.print(f"gate  {spec['num_layers']} layers x {spec['num_heads']} heads, d_g={spec['d_g']}, "
                          f"input={spec['gate_input']}, init={cfg.gate_init}, loss={cfg.loss}, k={cfg.k}")
            if info["resumed_from"]:
                console.print(f"resuming at step {info['resumed_from']}")
            bar.start()
            state["task"] = bar.add_task("distill", total=info["steps"], completed=info["resumed_from"], info="")
        elif kind == "validate":
            state["recall"], state["recall_random"] = info["recall"], info["recall_random"]
            if not console.is_terminal:  # logs redirected to a file get a line per validation
                console.print(f"step {info['step']}: recall@{cfg.k} {info['recall']:.3f} "
                              f"(random {info['recall_random']:.3f})")
        elif kind == "step" and state["task"] is not None:
            bar.update(state["task"], completed=info["step"], info=(
                f"loss {info['loss']:.4f}  recall@{cfg.k} {fmt(state['recall'], '.3f')} "
                f"(random {fmt(state['recall_random'], '.3f')})  {info['tokens_per_second']:.0f} tok/s"))
            log_step(info, cfg.log_every)
        elif kind == "checkpoint" and not console.is_terminal:
            console.print(f"step {info['step']}: checkpoint written to {esc(info['path'])}", highlight=False)

    result = run_reporting(lambda events: run_distill(cfg, on_event=events), bar, on_event)
    if not is_main_process():  # the other processes of a launched group stay quiet
        return
    headers = ["steps", "loss first", "loss last", f"recall@{cfg.k} gate", "gate at init", "random gate", "s/step",
               "tok/s"]
    row = [str(result.steps), fmt(result.loss_first), fmt(result.loss_last), fmt(result.recall, ".3f"),
           fmt(result.recall_init, ".3f"), fmt(result.recall_random, ".3f"), fmt(result.seconds_per_step, ".2f"),
           fmt(result.tokens_per_second, ".0f")]
    print_table(out_console, f"distilled gates -> {result.output}", headers, [row])
    out_console.print(f"gates written to {esc(result.output)} (gate_config.json, gates.safetensors, distill_log.json)")
