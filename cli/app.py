"""The Typer application object and consoles shared by the command modules."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="sparsify",
    help="Post-hoc top-k attention gates for Hugging Face causal LMs: distill, evaluate, deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()
