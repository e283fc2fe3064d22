"""`sparsify eval`."""

from __future__ import annotations

from posthoc_sparse.evaluate.perplexity import EvalConfig

from .common import RunProgress, esc, is_main_process, print_report, processes_note, run_reporting
from .app import app, console, out_console
from .options import config_command


@app.command("eval")
@config_command(EvalConfig)
def eval_(cfg: EvalConfig) -> None:
    """Closed-loop perplexity of dense, oracle@k, gate@k and random@k attention, with routing metrics."""
    from posthoc_sparse.evaluate.perplexity import evaluate_perplexity

    progress = RunProgress("eval")

    def on_event(kind: str, info: dict) -> None:
        if kind == "loaded":
            d = info["data"]
            console.print(f"model [bold]{esc(info['model'])}[/] on {info['device']}, {info['dtype']}"
                          f"{processes_note(info)}; text {esc(d['source'])} ({d['split']}): {d['n_windows']} windows "
                          f"of {d['seq_len']} tokens")
            progress.start(info["runs"])
        elif kind == "result":
            label = info["mode"] if info["k"] is None else f"{info['mode']}@{info['k']}"
            progress.done(f"{label}: perplexity {info['perplexity']:.3f} ({info['seconds']:.0f} s)")

    report = run_reporting(lambda events: evaluate_perplexity(cfg, on_event=events), progress, on_event)
    if not is_main_process():  # the other processes of a launched group stay quiet
        return
    from posthoc_sparse.evaluate.perplexity import summary_table

    dense = next((r for r in report.results if r.mode == "dense" and r.routing), None)
    if dense is not None:
        share = ", ".join(f"{row['first_token_share']:.2f}" for row in dense.per_layer)
        out_console.print(f"first-token attention share per layer (dense): {share}")
    print_report(summary_table(report), report.files)
