"""`sparsify pretrain`."""

from __future__ import annotations

from posthoc_sparse.experiments.pretrain import PretrainConfig

from .app import app, console, out_console
from .common import esc, fmt, log_step, print_table, progress_bar, run_reporting
from .options import config_command


@app.command(no_args_is_help=False)
@config_command(PretrainConfig)
def pretrain(cfg: PretrainConfig) -> None:
    """Train a causal LM from a config on text; save an HF checkpoint (config, safetensors, tokenizer)."""
    from posthoc_sparse.experiments.pretrain import pretrain as run_pretrain

    bar = progress_bar()
    state = {"task": None, "ppl": float("nan")}

    def on_event(kind: str, info: dict) -> None:
        if kind == "loaded":
            tr, ho = info["train"], info["heldout"]
            console.print(f"model [bold]{esc(info['description'])}[/]")
            console.print(f"      on {info['device']} x {info['processes']}, mixed precision {info['mixed_precision']}, "
                          f"tokenizer {esc(info['tokenizer'])}")
            console.print(f"text  [bold]{esc(tr['source'])}[/]: {tr['n_windows']} train windows "
                          f"({tr['n_tokens']:,} tokens), {ho['n_windows']} held-out windows of {cfg.seq_len} tokens")
            if info["resumed_from"]:
                console.print(f"resuming at step {info['resumed_from']}")
            bar.start()
            state["task"] = bar.add_task("pretrain", total=info["steps"], completed=info["resumed_from"], info="")
        elif kind == "eval":
            state["ppl"] = info["heldout_ppl"]
            if state["task"] is not None and state.get("last"):  # the step's events come first: show the new ppl
                show(state["last"])
            if not console.is_terminal:  # logs redirected to a file get a line per evaluation
                console.print(f"step {info['step']}: held-out loss {info['heldout_loss']:.4f}, "
                              f"perplexity {info['heldout_ppl']:.2f}")
        elif kind == "step" and state["task"] is not None:
            state["last"] = info
            show(info)
            log_step(info, cfg.log_every)

    def show(info: dict) -> None:
        bar.update(state["task"], completed=info["step"], info=(
            f"loss {info['loss']:.4f}  held-out ppl {fmt(state['ppl'], '.2f')}  lr {info['lr']:.2e}  "
            f"{info['tokens_per_second']:,.0f} tok/s"))

    result = run_reporting(lambda events: run_pretrain(cfg, on_event=events), bar, on_event)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # the other processes of a launched group stay quiet
        return
    headers = ["steps", "parameters", "loss first", "loss last", "held-out ppl start", "held-out ppl end", "tok/s",
               "seconds"]
    row = [str(result.steps), f"{result.parameters:,}", fmt(result.loss_first), fmt(result.loss_last),
           fmt(result.heldout_ppl_first, ".2f"), fmt(result.heldout_ppl, ".2f"), fmt(result.tokens_per_second, ",.0f"),
           fmt(result.seconds, ".0f")]
    print_table(out_console, f"pretrained -> {result.output}", headers, [row])
    out_console.print(f"checkpoint written to {esc(result.output)} (config.json, model.safetensors, tokenizer, "
                      "pretrain_log.json); load it with AutoModelForCausalLM.from_pretrained")
