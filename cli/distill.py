"""`sparsify distill`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from posthoc_sparse.config import DistillConfig

from .common import fmt, is_main_process, make_config, processes_note, progress_bar
from .app import app, console, out_console

Opt = typer.Option


@app.command(no_args_is_help=False)
def distill(
    model: Annotated[Optional[str], Opt(help="Hub id, local folder or .gguf file. Default: the embedded SmolLM2-135M.")] = None,
    dataset: Annotated[Optional[str], Opt(help="Hub dataset (name[:config]) or local .txt/.jsonl/.json/.parquet file or folder. Default: embedded Wikipedia leads.")] = None,
    k: Annotated[Optional[int], Opt(help="Keys kept per query (top-k). Default 64.")] = None,
    steps: Annotated[Optional[int], Opt(help="Optimizer steps. Default 1000 (100 for the embedded model).")] = None,
    seq_len: Annotated[Optional[int], Opt(help="Tokens per window. Default 512.")] = None,
    output: Annotated[Optional[str], Opt("--output", "-o", help="Gate folder to write. Default gates/default.")] = None,
    resume: Annotated[Optional[bool], Opt("--resume", help="Continue from the checkpoint in --output.")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed for data order and gate init. Default 0.")] = None,
    lr: Annotated[Optional[float], Opt(help="AdamW peak learning rate. Default 2e-3.")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Windows per micro-batch. Default 1.")] = None,
    grad_accum: Annotated[Optional[int], Opt(help="Micro-batches per step. Default 1.")] = None,
    warmup: Annotated[Optional[int], Opt(help="Linear warm-up steps before cosine decay. Default 20.")] = None,
    d_g: Annotated[Optional[int], Opt("--d-g", help="Gate dimension per head. Default 32.")] = None,
    gate_input: Annotated[Optional[str], Opt(help="hidden (attention input + rotary) or qk (model's q, k). Default hidden.")] = None,
    gate_init: Annotated[Optional[str], Opt(help="model (model's own q/k rows) or random. Default model.")] = None,
    loss: Annotated[Optional[str], Opt(help="kl (against dense attention) or bce (against the oracle mask). Default kl.")] = None,
    row_fraction: Annotated[Optional[float], Opt(help="Estimate each step's loss from a random share of each layer's 128-token query blocks (unbiased; cheaper at long --seq-len). Default 1: every query.")] = None,
    cuda_graph: Annotated[Optional[bool], Opt("--cuda-graph/--no-cuda-graph", help="On a GPU, replay each step's forward and losses as one CUDA graph after the first step (KL, hidden gates, one GPU). Default on.")] = None,
    dtype: Annotated[Optional[str], Opt(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")] = None,
    device: Annotated[Optional[str], Opt(help="auto, cpu, cuda, cuda:N. Under torchrun / accelerate launch, auto gives each process its own GPU.")] = None,
    device_map: Annotated[Optional[str], Opt(help="auto, balanced or sequential: spread a model too large for one GPU over this process's GPUs (then CPU, disk). One process only.")] = None,
    max_memory: Annotated[Optional[str], Opt(help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")] = None,
    val_every: Annotated[Optional[int], Opt(help="Validate recall@k every N steps. Default 50.")] = None,
    val_windows: Annotated[Optional[int], Opt(help="Held-out windows for validation. Default 8.")] = None,
    checkpoint_every: Annotated[Optional[int], Opt(help="Checkpoint every N steps. Default 50.")] = None,
    save_every: Annotated[Optional[int], Opt(help="Also write the gate at step 0 and every N steps to OUTPUT/snapshots/step-N (0: off). Default 0.")] = None,
    max_train_windows: Annotated[Optional[int], Opt(help="Use at most N training windows.")] = None,
    overwrite: Annotated[Optional[bool], Opt("--overwrite", help="Replace an existing --output folder.")] = None,
    trust_remote_code: Annotated[Optional[bool], Opt("--trust-remote-code", help="Allow the model's own code.")] = None,
    revision: Annotated[Optional[str], Opt(help="Hub revision of --model.")] = None,
    recipe: Annotated[Optional[str], Opt(help="A recipe name (recipes/) or TOML path.")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override a recipe key: --set key=value (repeatable).")] = None,
) -> None:
    """Distill per-layer top-k gates against the frozen model's own dense attention (KL)."""
    from posthoc_sparse.distill.loop import distill as run_distill

    flags = {k_: v for k_, v in locals().items() if k_ not in ("recipe", "set_", "run_distill")}
    cfg: DistillConfig = make_config(DistillConfig, recipe, set_, flags)
    bar = progress_bar()
    state = {"task": None, "recall": float("nan"), "recall_random": float("nan")}

    def on_event(kind: str, info: dict) -> None:
        if kind == "loaded":
            tr, ho = info["train"], info["heldout"]
            console.print(f"model [bold]{info['model']}[/] ({info['resolved']}) on {info['device']}, {info['dtype']}"
                          f"{processes_note(info)}")
            console.print(f"text  [bold]{tr['source']}[/]: {tr['n_windows']} train windows, "
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
        elif kind == "note":
            console.print(f"[yellow]note[/]: {info['message']}")
        elif kind == "done":
            bar.stop()

    try:
        result = run_distill(cfg, on_event=on_event)
    finally:
        bar.stop()
    if not is_main_process():  # the other processes of a launched group stay quiet
        return
    table = Table(title=f"distilled gates -> {result.output}")
    for col in ("steps", "loss first", "loss last", f"recall@{cfg.k} gate", "gate at init", "random gate", "s/step", "tok/s"):
        table.add_column(col, justify="right")
    table.add_row(str(result.steps), fmt(result.loss_first), fmt(result.loss_last), fmt(result.recall, ".3f"),
                  fmt(result.recall_init, ".3f"), fmt(result.recall_random, ".3f"),
                  fmt(result.seconds_per_step, ".2f"), fmt(result.tokens_per_second, ".0f"))
    out_console.print(table)
    out_console.print(f"gates written to {result.output} (gate_config.json, gates.safetensors, distill_log.json)")
