"""`sparsify absorb`."""

from __future__ import annotations

from rich.markdown import Markdown

from posthoc_sparse.experiments.absorb import AbsorbConfig

from .app import app, console, out_console
from .common import esc, progress_bar, run_reporting
from .options import config_command


@app.command(no_args_is_help=False)
@config_command(AbsorbConfig)
def absorb(cfg: AbsorbConfig) -> None:
    """The routing-absorption experiments: end-to-end soft / hard / stochastic gating vs post-hoc distillation."""
    from posthoc_sparse.experiments.absorb import REPORT_NAME, SUMMARY_NAME, run_absorb

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

    report = run_reporting(lambda events: run_absorb(cfg, on_event=events), bar, on_event)
    from posthoc_sparse.experiments.absorb_summary import summary_markdown

    out_console.print(Markdown(summary_markdown(report)))
    out_console.print(f"report written to {esc(cfg.output)}/{REPORT_NAME} and {SUMMARY_NAME} "
                      f"(+ {len(report['plots'])} PNG)")
