"""`sparsify corpus`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from posthoc_sparse.corpus import CorpusConfig

from .app import app, console, out_console
from .common import make_config

Opt = typer.Option


@app.command(no_args_is_help=False)
def corpus(
    output: Annotated[Optional[str], Opt("--output", "-o", help="Corpus folder to write. Default data/offline-en.")] = None,
    sources: Annotated[Optional[str], Opt(help="Comma list of wiki, bbc, shakespeare. Default all three.")] = None,
    overwrite: Annotated[Optional[bool], Opt("--overwrite", help="Replace an existing --output folder.")] = None,
    recipe: Annotated[Optional[str], Opt(help="A recipe name (recipes/) or TOML path.")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override a recipe key: --set key=value (repeatable).")] = None,
) -> None:
    """Build an English training corpus (train/held-out .jsonl + manifest) from text in offline packages."""
    from posthoc_sparse.corpus import build_corpus

    flags = {k_: v for k_, v in locals().items() if k_ not in ("recipe", "set_", "build_corpus")}
    cfg: CorpusConfig = make_config(CorpusConfig, recipe, set_, flags)

    def on_event(kind: str, info: dict) -> None:
        if kind == "source":
            console.print(f"read {info['name']}: {info['package']} {info['version']}, {info['documents']:,} documents")

    result = build_corpus(cfg, on_event=on_event)
    manifest = result.manifest
    table = Table(title=f"corpus -> {result.output}")
    for col in ("source", "package", "documents", "characters", "train / held-out docs", "duplicates dropped",
                "license"):
        table.add_column(col, justify="left" if col in ("source", "package", "license") else "right")
    for s in manifest["sources"]:
        table.add_row(s["name"], f"{s['package']} {s['version']}", f"{s['documents']:,}", f"{s['characters']:,}",
                      f"{s['train_documents']:,} / {s['heldout_documents']:,}", str(s["duplicates_dropped"]),
                      s["license"])
    out_console.print(table)
    for name, f in manifest["files"].items():
        out_console.print(f"{name}: {f['documents']:,} documents, {f['bytes']:,} bytes, sha256 {f['sha256']}")
    out_console.print(f"split: {manifest['split']['rule']}; pass the folder as --dataset {result.output}")
