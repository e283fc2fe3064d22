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
# soft_wrap: a line longer than the terminal (or than the 80 columns of a pipe) is never broken by rich, so paths,
# prompts and generated text stay whole in logs; tables still fit the width (common.print_table).
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from posthoc_sparse import __version__

        def of(package: str) -> str:
            try:
                return version(package)
            except PackageNotFoundError:
                return "not installed"

        out_console.print(f"sparsify (posthoc-sparse) {__version__}; torch {of('torch')}, transformers "
                          f"{of('transformers')}, accelerate {of('accelerate')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version (and torch's, transformers', accelerate's) and exit.")
          ) -> None:
    """Post-hoc top-k attention gates for Hugging Face causal LMs: distill, evaluate, deploy."""
