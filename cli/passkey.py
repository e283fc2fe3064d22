"""`sparsify passkey`."""

from __future__ import annotations

from posthoc_sparse.evaluate.passkey import PasskeyConfig

from .app import app, console
from .common import RunProgress, esc, print_report, run_reporting
from .options import config_command


@app.command(no_args_is_help=False)
@config_command(PasskeyConfig)
def passkey(cfg: PasskeyConfig) -> None:
    """Long-context retrieval: a passkey hidden in filler text, found or not, per mode, k and context length."""
    from posthoc_sparse.evaluate.modes import label
    from posthoc_sparse.evaluate.passkey import passkey_table, run_passkey

    progress = RunProgress("passkey")

    def on_event(kind: str, info: dict) -> None:
        if kind == "loaded":
            console.print(f"model [bold]{esc(info['model'])}[/] on {info['device']}, {info['dtype']}; "
                          f"{info['prompts']} prompts")
            progress.start(info["runs"])
        elif kind == "result":
            progress.done(f"{label(info['mode'], info['k'])}, {info['length']} tokens: {info['accuracy']:.0%} "
                          f"retrieved ({info['seconds']:.0f} s)")

    report = run_reporting(lambda events: run_passkey(cfg, on_event=events), progress, on_event)
    print_report(passkey_table(report), report.files, key_columns=2)
