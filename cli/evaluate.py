"""`sparsify eval`."""

from __future__ import annotations

from rich.table import Table

from posthoc_sparse.evaluate.perplexity import EvalConfig

from .common import fmt, is_main_process, processes_note, progress_bar
from .app import app, console, out_console
from .options import config_command


@app.command("eval")
@config_command(EvalConfig)
def eval_(cfg: EvalConfig) -> None:
    """Closed-loop perplexity of dense, oracle@k, gate@k and random@k attention, with routing metrics."""
    from posthoc_sparse.evaluate.perplexity import evaluate_perplexity

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
