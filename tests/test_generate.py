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
