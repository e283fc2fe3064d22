"""Confidence intervals for the reports: a paired bootstrap over held-out windows for perplexity ratios, and a
t interval for paired differences over seeds. Pure Python and torch (no scipy): the t quantiles are tabulated.

Letters: W windows, M tokens scored per window (T - 1 for windows of T tokens).
"""

from __future__ import annotations

import math
import statistics

import torch

# two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); beyond 30 the normal's 1.96 is used
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ppl_ratio_interval(num_nll: list[float], den_nll: list[float], tokens_per_window: int | list[int],
                       resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """``ppl(num) / ppl(den)`` over the same W windows, and its paired percentile-bootstrap interval.

    ``num_nll`` and ``den_nll`` are each window's NLL summed over its tokens (eval.json's ``window_nll``), in
    the same window order. Perplexity over a set of windows is ``exp(sum nll / sum tokens)``; each resample
    draws W windows with replacement and takes the ratio on the same draw for both (paired), seeded, so the
    interval is reproducible. Returns ``{"ratio", "low", "high", "level", "resamples", "windows"}``.
    """
    if len(num_nll) != len(den_nll) or not num_nll:
        raise ValueError(f"need the same non-zero number of windows, got {len(num_nll)} and {len(den_nll)}")
    w = len(num_nll)
    tokens = torch.as_tensor(tokens_per_window if isinstance(tokens_per_window, list) else [tokens_per_window] * w,
                             dtype=torch.float64)  # (W,)
    diff = torch.as_tensor(num_nll, dtype=torch.float64) - torch.as_tensor(den_nll, dtype=torch.float64)  # (W,)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, w, (resamples, w), generator=gen)  # (R, W)
    log_ratio = diff[idx].sum(1) / tokens[idx].sum(1)  # (R,)
    lo, hi = torch.quantile(log_ratio, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return {"ratio": math.exp(float(diff.sum() / tokens.sum())), "low": math.exp(float(lo)),
            "high": math.exp(float(hi)), "level": level, "resamples": resamples, "windows": w}


def mean_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean, sample std and the t interval of the mean of ``values`` (e.g. paired differences over seeds):
    ``{"mean", "std", "n", "low", "high", "values"}``; with one value the interval is None."""
    if level != 0.95:
        raise ValueError("only the 95% t quantiles are tabulated")
    xs = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not xs:
        return {"mean": None, "std": None, "n": 0, "low": None, "high": None, "values": []}
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return {"mean": mean, "std": 0.0, "n": 1, "low": None, "high": None, "values": xs}
    std = statistics.stdev(xs)
    half = (_T975[len(xs) - 2] if len(xs) - 1 <= len(_T975) else 1.96) * std / math.sqrt(len(xs))
    return {"mean": mean, "std": std, "n": len(xs), "low": mean - half, "high": mean + half, "values": xs}
