"""`sparsify corpus`."""

from __future__ import annotations

from rich.table import Table

from posthoc_sparse.corpus import CorpusConfig

from .app import app, console, out_console
from .common import esc
from .options import config_command


@app.command(no_args_is_help=False)
@config_command(CorpusConfig)
def corpus(cfg: CorpusConfig) -> None:
    """Build an English training corpus (train/held-out .jsonl + manifest) from text in offline packages."""
    from posthoc_sparse.corpus import build_corpus

    def on_event(kind: str, info: dict) -> None:
        if kind == "source":
            console.print(f"read {info['name']}: {info['package']} {info['version']}, {info['documents']:,} documents")

    result = build_corpus(cfg, on_event=on_event)
    manifest = result.manifest
    table = Table(title=f"corpus -> {esc(result.output)}")
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
    out_console.print(f"split: {manifest['split']['rule']}; pass the folder as --dataset {esc(result.output)}")
