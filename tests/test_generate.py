"""`sparsify generate` and generate_text: gated generation, comparison with dense, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from posthoc_sparse.errors import UserError
from posthoc_sparse.generate import GenerateConfig, generate_text

WIDE = {**os.environ, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def gates(tiny_gates):
    return tiny_gates[2]


def test_generate_with_compare_dense(gates):
    res = generate_text(GenerateConfig(gates=str(gates), prompt="the city river king", max_new_tokens=8,
                                       compare_dense=True))
    assert len(res.tokens) == 8 and len(res.dense_tokens) == 8
    assert 0.0 <= res.agreement <= 1.0 and res.mean_kl >= 0 and len(res.per_token_kl) == 8
    for rate, prefill in ((res.tokens_per_second, res.prefill_seconds),
                          (res.dense_tokens_per_second, res.dense_prefill_seconds)):
        assert rate > 0 and prefill > 0  # the decode rate and the prefill's time, both measured
    one = generate_text(GenerateConfig(gates=str(gates), prompt="the city", max_new_tokens=1))
    assert one.tokens_per_second is None and one.prefill_seconds > 0  # no decode step to time


def test_k_above_the_length_agrees_with_dense_exactly(gates):
    res = generate_text(GenerateConfig(gates=str(gates), prompt="the city river king", max_new_tokens=6, k=64,
                                       compare_dense=True))
    assert res.tokens == res.dense_tokens and res.agreement == 1.0 and res.mean_kl < 1e-6


def test_bad_generate_inputs(gates):
    with pytest.raises(UserError, match="empty"):
        generate_text(GenerateConfig(gates=str(gates), prompt="  "))
    with pytest.raises(UserError, match="max-new-tokens"):
        generate_text(GenerateConfig(gates=str(gates), max_new_tokens=0))


def test_cli_generate(gates):
    cmd = [sys.executable, "-m", "sparsify_cli", "generate", "--gates", str(gates), "--prompt", "the city river",
           "--max-new-tokens", "5", "--compare-dense"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=WIDE)
    assert run.returncode == 0, run.stderr
    assert "the city river" in run.stdout and "token agreement" in run.stdout


def test_a_prompt_file_and_a_static_cache_give_what_the_prompt_and_a_dynamic_cache_give(gates, tmp_path):
    text = "the city river king " * 40  # longer than the tiny gate's k: the selection is at work
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    base = dict(gates=str(gates), max_new_tokens=6, k=8)
    plain = generate_text(GenerateConfig(**base, prompt=text))
    from_file = generate_text(GenerateConfig(**base, prompt_file=str(tmp_path / "prompt.txt")))
    static = generate_text(GenerateConfig(**base, prompt=text, cache="static"))
    assert not plain.dense_equivalent and plain.context > 8
    assert from_file.prompt == text and from_file.tokens == plain.tokens
    assert static.tokens == plain.tokens


def test_compare_dense_scores_the_logits_that_chose_the_new_tokens(gates):
    """The KL is taken over the logits at the positions before each new token (only those are computed): greedy
    dense decoding picks the argmax of exactly those logits, so with mode dense the KL is 0 and the texts agree."""
    res = generate_text(GenerateConfig(gates=str(gates), prompt="the city river king", max_new_tokens=5,
                                       mode="dense", compare_dense=True))
    assert res.tokens == res.dense_tokens and max(res.per_token_kl) < 1e-6


def test_bad_prompt_files(gates, tmp_path):
    base = dict(gates=str(gates), max_new_tokens=2)
    with pytest.raises(UserError, match="no such file"):
        generate_text(GenerateConfig(**base, prompt_file=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        generate_text(GenerateConfig(**base, prompt_file=str(tmp_path / "empty.txt")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        generate_text(GenerateConfig(**base, prompt_file=str(tmp_path / "latin1.txt")))
    with pytest.raises(UserError, match="a folder"):
        generate_text(GenerateConfig(**base, prompt_file=str(tmp_path)))
    with pytest.raises(UserError, match="not both"):
        generate_text(GenerateConfig(**base, prompt="the city", prompt_file=str(tmp_path / "empty.txt")))
    with pytest.raises(UserError, match="cache"):
        generate_text(GenerateConfig(**base, cache="paged"))


def test_cli_generate_from_a_long_prompt_file_shows_its_end(gates, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("the city river king " * 30 + "END OF PROMPT", encoding="utf-8")
    cmd = [sys.executable, "-m", "sparsify_cli", "generate", "--gates", str(gates), "--prompt-file", str(prompt),
           "--max-new-tokens", "3", "--k", "8"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=WIDE)
    assert run.returncode == 0, run.stderr
    first = run.stdout.splitlines()[0]
    assert first.startswith("gate@8: (613 characters; the last 300:) ") and "END OF PROMPT" in first
