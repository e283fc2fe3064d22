"""`sparsify push`."""

from __future__ import annotations

from posthoc_sparse.gates.hub import PushConfig

from .app import app, out_console
from .common import esc
from .options import config_command


@app.command(no_args_is_help=False)
@config_command(PushConfig, recipes=False)
def push(cfg: PushConfig) -> None:
    """Upload a gate folder to the Hugging Face hub: its config, weights and a generated model card."""
    from posthoc_sparse.gates.hub import push as run_push

    url = run_push(cfg)
    out_console.print(f"pushed {esc(cfg.gates)} to {esc(cfg.repo)}: {esc(url)}")
    out_console.print(f"load it with --gates {esc(cfg.repo)} or apply_gates(model, {esc(repr(cfg.repo))}, k=...)")
