"""The passkey test: prompts of exact length with the needle at its depth, the one-forward check equals greedy
decoding, oracle@k with k >= the context equals dense prompt by prompt, and the CLI prints the JSON's numbers."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from posthoc_sparse.errors import UserError
from posthoc_sparse.evaluate.passkey import (FILLER, INSTRUCTION, NEEDLE, QUESTION, PasskeyConfig, build_prompt,
                                             run_passkey, score_prompt)

from .tiny import VOCAB, tiny_model


def passkey_tokenizer():
    """A word-level tokenizer over the prompt's words, digits one token each (as SmolLM2's, Llama 3's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    words = dict.fromkeys(w for text in (INSTRUCTION, FILLER, NEEDLE.format(key=""), QUESTION)
                          for w, _ in split.pre_tokenize_str(text))
    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate([*words, *"0123456789"])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("passkey") / "model"
    tiny_model("llama").save_pretrained(path)
    passkey_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("length", [96, 131, 200])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_a_prompt_is_exactly_its_length_with_the_needle_at_its_depth(length, depth):
    tok = passkey_tokenizer()
    p = build_prompt(tok, length, depth, "90210")
    needle = tok(NEEDLE.format(key="90210"))["input_ids"]
    assert len(p.ids) == length and p.ids[p.needle_at : p.needle_at + len(needle)] == needle
    assert p.answer == tok(" 90210")["input_ids"] == [tok.convert_tokens_to_ids(d) for d in "90210"]
    head = len(tok(INSTRUCTION)["input_ids"])
    tail = length - len(tok(QUESTION)["input_ids"]) - len(needle)  # where the needle starts at depth 1
    unit = len(tok(FILLER)["input_ids"])
    assert head <= p.needle_at <= tail and (p.needle_at - head) % unit == 0  # at a sentence boundary
    if depth == 0.0:
        assert p.needle_at == head
    if depth == 1.0:
        assert tail - p.needle_at < unit


def test_the_one_forward_check_is_greedy_decoding(checkpoint):
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(checkpoint).eval(), passkey_tokenizer()
    for key in ("12345", "67890", "55555"):
        p = build_prompt(tok, 100, 0.5, key)
        s = score_prompt(model, p, "cpu")
        ids = torch.tensor([p.ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(p.answer),
                             do_sample=False, pad_token_id=1)[0, len(p.ids):].tolist()
        assert s["retrieved"] == (out == p.answer)
        assert s["greedy"][0] == out[0]  # the first token is greedy's own; later ones follow the passkey
        with torch.no_grad():
            logits = model(torch.tensor([p.ids + p.answer[:-1]])).logits[0, -len(p.answer):]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(p.answer)[:, None]).sum()
        assert s["logprob"] == pytest.approx(float(expected), abs=1e-4)


def test_oracle_with_k_above_the_context_is_dense_prompt_by_prompt(checkpoint, tmp_path):
    cfg = PasskeyConfig(model=str(checkpoint), modes="dense,oracle,random", k="4,200", lengths="96,128", depths=3,
                        trials=2, output=str(tmp_path / "r"))
    report = run_passkey(cfg)
    by = {(s["mode"], s["k"], s["length"], s["depth"], s["key"]): s for s in report.samples}
    dense = [s for s in report.samples if s["mode"] == "dense"]
    assert len(dense) == 2 * 3 * 2 and len(report.samples) == 5 * len(dense)
    for s in dense:
        o = by[("oracle", 200, s["length"], s["depth"], s["key"])]
        assert o["retrieved"] == s["retrieved"] and o["logprob"] == pytest.approx(s["logprob"], abs=1e-4)
    for row in report.summary:
        for mode in ("dense", "oracle", "random"):
            mine = [s for s in report.samples if s["mode"] == mode and s["length"] == row["length"]
                    and (mode == "dense" or s["k"] == row["k"])]
            assert row[mode] == sum(s["retrieved"] for s in mine) / len(mine)
    doc = json.loads((tmp_path / "r" / "passkey.json").read_text())
    assert doc["summary"] == report.summary and doc["setup"]["prompts_per_length"] == 6
    assert (tmp_path / "r" / "passkey.md").read_text().count("\n| ") == 1 + len(report.summary)


def test_bad_settings_are_user_errors(checkpoint):
    with pytest.raises(UserError, match="needs --gates"):
        run_passkey(PasskeyConfig(model=str(checkpoint), modes="gate"))
    with pytest.raises(UserError, match="too short"):
        run_passkey(PasskeyConfig(model=str(checkpoint), modes="dense", lengths="20"))
    with pytest.raises(UserError, match="--lengths takes integers"):
        run_passkey(PasskeyConfig(model=str(checkpoint), modes="dense", lengths="1k"))


def test_prompts_past_a_learned_position_table_are_refused(tmp_path):
    """GPT-2's positions are a learned table: a prompt past its end crashed (IndexError, exit 1) in passkey and
    generate; it is a user error now. (Rotary models run past max_position_embeddings, with a note.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    from posthoc_sparse.generate import GenerateConfig, generate_text

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB)).save_pretrained(
        tmp_path / "m")
    passkey_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="exceed the model's 64 learned positions"):
        run_passkey(PasskeyConfig(model=str(tmp_path / "m"), modes="dense", lengths="96", depths=1, trials=1))
    with pytest.raises(UserError, match="exceed the model's 64 learned positions"):
        generate_text(GenerateConfig(model=str(tmp_path / "m"), mode="dense", prompt="the key is " * 20,
                                     max_new_tokens=8))


def test_a_corrupt_gate_is_refused_before_any_run(checkpoint, tmp_path):
    """The gate is loaded and checked against the model before the dense and oracle runs, not when the gate's
    turn comes."""
    from posthoc_sparse.gates.io import gate_spec_for_model, save_gates
    from posthoc_sparse.gates.modules import GateBank

    save_gates(tmp_path / "g", GateBank(gate_spec_for_model(tiny_model("llama"), d_g=8)).reset_random(0), {"k": 4})
    (tmp_path / "g" / "gates.safetensors").write_bytes(b"\x00" * 64)
    events = []
    with pytest.raises(UserError, match="corrupt|safetensors|read"):
        run_passkey(PasskeyConfig(model=str(checkpoint), gates=str(tmp_path / "g"), modes="dense,oracle,gate",
                                  k="4", lengths="96", depths=1, trials=1),
                    on_event=lambda kind, info: events.append(kind))
    assert "result" not in events


def test_cli_passkey_prints_the_reports_numbers(checkpoint, tmp_path, capsys):
    from sparsify_cli.main import main

    out = tmp_path / "r"
    main(["passkey", "--model", str(checkpoint), "--modes", "dense,oracle,random", "--k", "8", "--lengths", "96,128",
          "--depths", "2", "--trials", "2", "--output", str(out)])
    shown = capsys.readouterr().out
    doc = json.loads((out / "passkey.json").read_text())
    for row in doc["summary"]:
        cells = [f"{row[m]:.0%}" for m in ("dense", "oracle", "random")]
        assert re.search(rf"{row['length']}\s+│\s+8\s+│\s+" + r"\s+│\s+".join(cells), shown), shown


def test_a_failed_passkey_run_leaves_no_output_and_keeps_an_old_one(checkpoint, tmp_path):
    """The report folder is built beside --output and swapped in only when the run ends well."""
    def fail(kind: str, info: dict) -> None:
        if kind == "result":
            raise RuntimeError("boom")

    cfg = PasskeyConfig(model=str(checkpoint), modes="dense", lengths="96", depths=1, trials=1,
                        output=str(tmp_path / "r"))
    with pytest.raises(RuntimeError):
        run_passkey(cfg, on_event=fail)
    assert not (tmp_path / "r").exists() and not list(tmp_path.iterdir())
    report = run_passkey(cfg)
    assert report.files == [str(tmp_path / "r" / "passkey.json"), str(tmp_path / "r" / "passkey.md")]
    old = (tmp_path / "r" / "passkey.json").read_text()
    with pytest.raises(RuntimeError):
        run_passkey(dataclasses.replace(cfg, overwrite=True), on_event=fail)
    assert (tmp_path / "r" / "passkey.json").read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["r"]
