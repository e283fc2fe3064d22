"""Plots of experiment reports (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot, save_png


def plot_sweep(report: dict, path: Path) -> Path | None:
    """Perplexity of the learned and random gate against the fraction of layers unfrozen, gap shaded."""
    plt = pyplot()
    if plt is None:
        return None

    rows = report["table"]
    fs = [r["fraction"] for r in rows]
    learned, random = [r["ppl_learned"] for r in rows], [r["ppl_random"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(fs, learned, marker="o", label="learned gate (distilled, frozen)")
    ax.plot(fs, random, marker="s", label="random gate (frozen)")
    ax.fill_between(fs, learned, random, alpha=0.2, label="gap")
    ax.set(xlabel="fraction of layers unfrozen", ylabel=f"held-out perplexity, top-{report['settings']['k']}",
           yscale="log", title=f"absorption gradient: {report['model']}")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
