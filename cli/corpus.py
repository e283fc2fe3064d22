"""`sparsify corpus`."""

from __future__ import annotations

from posthoc_sparse.corpus import CorpusConfig

from .app import app, console, out_console
from .common import esc, print_table
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
    headers = ["source", "package", "documents", "characters", "train / held-out docs", "duplicates dropped"]
    rows = [[s["name"], f"{s['package']} {s['version']}", f"{s['documents']:,}", f"{s['characters']:,}",
             f"{s['train_documents']:,} / {s['heldout_documents']:,}", str(s["duplicates_dropped"])]
            for s in manifest["sources"]]
    print_table(out_console, f"corpus -> {result.output}", headers, rows)  # every cell whole at any width
    for s in manifest["sources"]:  # licences are sentences: a line each, not a table column
        out_console.print(f"{esc(s['name'])} licence: {esc(s['license'])}", highlight=False)
    for name, f in manifest["files"].items():
        out_console.print(f"{name}: {f['documents']:,} documents, {f['bytes']:,} bytes, sha256 {f['sha256']}")
    out_console.print(f"split: {manifest['split']['rule']}; pass the folder as --dataset {esc(result.output)}")
