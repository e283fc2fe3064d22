"""`sparsify eval`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from posthoc_sparse.evaluate.perplexity import EvalConfig

from .common import fmt, is_main_process, make_config, processes_note, progress_bar
from .app import app, console, out_console

Opt = typer.Option


@app.command("eval")
def eval_(
    gates: Annotated[Optional[str], Opt(help="Gate folder from `sparsify distill` (its config names model and data).")] = None,
    model: Annotated[Optional[str], Opt(help="Hub id, local folder or .gguf. Default: the gate's base model.")] = None,
    dataset: Annotated[Optional[str], Opt(help="Held-out text (the held-out split is used). Default: the gate's dataset.")] = None,
    k: Annotated[Optional[str], Opt(help="Keys kept per query; several as 16,32,64. Default 64.")] = None,
    modes: Annotated[Optional[str], Opt(help="Comma list of dense, oracle, gate, random. Default all.")] = None,
    seq_len: Annotated[Optional[int], Opt(help="Window length. Default: the gate's, else 512.")] = None,
    max_windows: Annotated[Optional[int], Opt(help="Held-out windows to score. Default 16.")] = None,
    max_tokens: Annotated[Optional[int], Opt(help="Bound the tokens scored (rounded down to whole windows).")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Windows per forward. Default 1.")] = None,
    output: Annotated[Optional[str], Opt("--output", "-o", help="Folder for eval.json and eval.png.")] = None,
    random_seed: Annotated[Optional[int], Opt(help="Seed of the random gate. Default: the gate's random_seed.")] = None,
    selection: Annotated[Optional[str], Opt(help="head: top-k per query head (the method); group: one top-k shared by the query heads of each KV group (GQA); block: ceil(k/B) key blocks of B positions per KV group and query block (the fast Triton path on GPUs). Default head.")] = None,
    block_size: Annotated[Optional[int], Opt(help="With --selection block: positions per block, 16, 32, 64 or 128. Default 64.")] = None,
    block_score: Annotated[Optional[str], Opt(help="With --selection block: how the gate scores a block. bound: an upper bound of its largest gate score (fast); exact: the gate's softmax mass on it (closer to per-head quality, O(T^2) like dense attention). Default bound.")] = None,
    no_routing: Annotated[Optional[bool], Opt("--no-routing", help="Skip recall/mass/sink metrics (faster).")] = None,
    cuda_graph: Annotated[Optional[bool], Opt("--cuda-graph/--no-cuda-graph", help="With --no-routing on one GPU, replay each batch shape's forward as a CUDA graph after its first batch (every mode alike). Default on.")] = None,
    dtype: Annotated[Optional[str], Opt(help="auto, float32, bfloat16, float16.")] = None,
    device: Annotated[Optional[str], Opt(help="auto, cpu, cuda, cuda:N. Under torchrun / accelerate launch, auto gives each process its own GPU.")] = None,
    device_map: Annotated[Optional[str], Opt(help="auto, balanced or sequential: spread a model too large for one GPU over this process's GPUs (then CPU, disk). One process only.")] = None,
    max_memory: Annotated[Optional[str], Opt(help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")] = None,
    overwrite: Annotated[Optional[bool], Opt("--overwrite", help="Replace an existing --output folder.")] = None,
    trust_remote_code: Annotated[Optional[bool], Opt("--trust-remote-code")] = None,
    revision: Annotated[Optional[str], Opt(help="Hub revision of --model.")] = None,
    recipe: Annotated[Optional[str], Opt(help="A recipe name or TOML path.")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override a recipe key: --set key=value.")] = None,
) -> None:
    """Closed-loop perplexity of dense, oracle@k, gate@k and random@k attention, with routing metrics."""
    from posthoc_sparse.evaluate.perplexity import evaluate_perplexity

    flags = {k_: v for k_, v in locals().items() if k_ not in ("recipe", "set_", "no_routing", "evaluate_perplexity")}
    flags["routing"] = None if no_routing is None else not no_routing
    cfg: EvalConfig = make_config(EvalConfig, recipe, set_, flags)
    bar = progress_bar()
    state = {"task": None}

    def on_event(kind: str, info: dict) -> None:
        if kind == "loaded":
            d = info["data"]
            console.print(f"model [bold]{info['model']}[/] on {info['device']}, {info['dtype']}{processes_note(info)}; "
                          f"text {d['source']} ({d['split']}): {d['n_windows']} windows of {d['seq_len']} tokens")
            bar.start()
            state["task"] = bar.add_task("eval", total=info["runs"], info="")
        elif kind == "result":
            label = info["mode"] if info["k"] is None else f"{info['mode']}@{info['k']}"
            bar.update(state["task"], advance=1, info=f"{label}: ppl {info['perplexity']:.3f}")
            if not console.is_terminal:  # logs redirected to a file get a line per result
                console.print(f"{label}: perplexity {info['perplexity']:.3f} ({info['seconds']:.0f} s)")
        elif kind == "note":
            console.print(f"[yellow]note[/]: {info['message']}")

    try:
        report = evaluate_perplexity(cfg, on_event=on_event)
    finally:
        bar.stop()
    if not is_main_process():  # the other processes of a launched group stay quiet
        return
    table = Table(title=f"closed-loop perplexity, T={report.setup['seq_len']}, {report.setup['tokens_scored']} tokens")
    cols = ["k", "dense", "oracle", "gate", "random", "gate/oracle", "gap closed", "gate recall", "gate mass",
            "random recall", "sparsity (all / causal)"]
    for c in cols:
        table.add_column(c, justify="right")
    for row in report.summary:
        table.add_row(
            str(row["k"]), fmt(row.get("dense"), ".3f"), fmt(row.get("oracle"), ".3f"), fmt(row.get("gate"), ".3f"),
            fmt(row.get("random"), ".3f"), fmt(row.get("gate_over_oracle"), ".3f"), fmt(row.get("gap_closed"), ".1%"),
            fmt(row.get("gate_recall"), ".3f"), fmt(row.get("gate_mass"), ".3f"), fmt(row.get("random_recall"), ".3f"),
            f"{fmt(row.get('sparsity_all_keys'), '.1%')} / {fmt(row.get('sparsity_causal'), '.1%')}",
        )
    if not report.summary:
        dense = report.results[0]
        table.add_row("-", fmt(dense.perplexity, ".3f"), *["-"] * (len(cols) - 2))
    out_console.print(table)
    dense = next((r for r in report.results if r.mode == "dense" and r.routing), None)
    if dense is not None:
        share = ", ".join(f"{row['first_token_share']:.2f}" for row in dense.per_layer)
        out_console.print(f"first-token attention share per layer (dense): {share}")
    if cfg.output:
        out_console.print(f"report written to {cfg.output}/eval.json (+ eval.png)")
