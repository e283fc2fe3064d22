"""Confidence intervals of the reports: the paired bootstrap of perplexity ratios and the t interval of means."""

from __future__ import annotations

import math

import pytest

from posthoc_sparse.evaluate.intervals import mean_interval, ppl_ratio_interval


def test_ppl_ratio_of_the_same_windows_is_exactly_one():
    nll = [310.0, 290.5, 305.2, 299.9]
    r = ppl_ratio_interval(nll, nll, 100)
    assert r["ratio"] == r["low"] == r["high"] == 1.0 and r["windows"] == 4


def test_ppl_ratio_is_exp_of_the_nll_difference_per_token_and_brackets_it():
    den = [300.0, 280.0, 320.0, 310.0, 290.0, 305.0]
    num = [d + 10.0 + i for i, d in enumerate(den)]  # every window worse by 10..15 nats over 100 tokens
    r = ppl_ratio_interval(num, den, 100, resamples=4000, seed=1)
    assert r["ratio"] == pytest.approx(math.exp(sum(n - d for n, d in zip(num, den)) / 600))
    assert math.exp(0.10) <= r["low"] < r["ratio"] < r["high"] <= math.exp(0.15)
    assert ppl_ratio_interval(num, den, 100, resamples=4000, seed=1) == r  # seeded: reproducible
    with pytest.raises(ValueError):
        ppl_ratio_interval(num, den[:-1], 100)


def test_mean_interval_uses_students_t():
    r = mean_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)
    assert r["mean"] == 2.0 and r["std"] == 1.0 and r["n"] == 3
    assert r["low"] == pytest.approx(2.0 - half) and r["high"] == pytest.approx(2.0 + half)
    assert mean_interval([5.0])["low"] is None and mean_interval([])["mean"] is None
