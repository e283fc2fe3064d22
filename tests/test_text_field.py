"""--text-field on every command that reads text: distill, eval, unfreeze-sweep, pretrain and absorb read the field
they are told; a gate remembers it, so eval and the sweep of that gate read the same text."""

from __future__ import annotations

import json

import pytest

from posthoc_sparse.config import DistillConfig
from posthoc_sparse.data import build_windows
from posthoc_sparse.errors import UserError
from posthoc_sparse.gates.io import read_gate_config

from .tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def body_jsonl(trained_tiny, tmp_path_factory):
    """The tiny corpus as JSON Lines with the text under "body" (and a decoy "text" field of other words)."""
    _, corpus = trained_tiny
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    docs = [d for d in corpus.read_text().split("\n\n") if d.strip()]
    path.write_text("".join(json.dumps({"body": d, "text": "the the the"}) + "\n" for d in docs))
    return path


@pytest.mark.parametrize("command", ["distill", "eval", "unfreeze-sweep", "pretrain", "absorb"])
def test_every_command_that_reads_text_has_the_flag(command):
    from sparsify_cli.app import app
    from sparsify_cli.main import _register_commands

    _register_commands()
    import typer.main

    info = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command.replace("-", "_")
                or c.name == command)
    cmd = typer.main.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=None)
    assert "--text-field" in {o for p in cmd.params for o in p.opts}


def test_distill_reads_the_field_and_the_gate_remembers_it(trained_tiny, body_jsonl, tmp_path):
    from posthoc_sparse.distill.loop import distill
    from posthoc_sparse.evaluate.perplexity import EvalConfig, evaluate_perplexity

    model, corpus = trained_tiny
    out = tmp_path / "g"
    result = distill(DistillConfig(model=str(model), dataset=str(body_jsonl), text_field="body", output=str(out),
                                   k=4, steps=2, seq_len=32, d_g=8, val_windows=2))
    expected, _ = build_windows(tiny_tokenizer(), str(corpus), "train", 32)
    assert result.data["train"]["sha256"] == build_windows(tiny_tokenizer(), str(body_jsonl), "train", 32,
                                                           text_field="body")[1]["sha256"]
    assert result.data["train"]["n_windows"] == len(expected)  # the same documents as the text file
    assert read_gate_config(out)["text_field"] == "body"
    report = evaluate_perplexity(EvalConfig(gates=str(out), k="4", modes="dense", max_windows=2))
    assert report.setup["data"]["source"] == str(body_jsonl)
    held, _ = build_windows(tiny_tokenizer(), str(corpus), "heldout", 32, max_windows=2)
    assert report.setup["data"]["sha256"] == build_windows(tiny_tokenizer(), str(body_jsonl), "heldout", 32,
                                                           max_windows=2, text_field="body")[1]["sha256"]
    assert report.results[0].tokens == held.numel() - len(held)


def test_a_missing_field_names_the_flag(trained_tiny, body_jsonl, tmp_path):
    from posthoc_sparse.evaluate.perplexity import EvalConfig, evaluate_perplexity

    model, _ = trained_tiny
    with pytest.raises(UserError, match=r"no field 'content'.*--text-field"):
        evaluate_perplexity(EvalConfig(model=str(model), dataset=str(body_jsonl), text_field="content",
                                       modes="dense", seq_len=32))


def test_pretrain_reads_the_field(trained_tiny, body_jsonl, tmp_path):
    from posthoc_sparse.experiments.pretrain import PretrainConfig, pretrain

    model, corpus = trained_tiny
    result = pretrain(PretrainConfig(dataset=str(body_jsonl), text_field="body", output=str(tmp_path / "m"),
                                     tokenizer=str(model), n_layer=1, d_model=32, n_head=2, d_ff=64, seq_len=32,
                                     steps=1, batch_size=2, warmup=1, eval_windows=2, device="cpu"))
    assert result.data["train"]["n_windows"] == len(build_windows(tiny_tokenizer(), str(corpus), "train", 32)[0])
