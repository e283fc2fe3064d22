"""PNG plots of an eval report (matplotlib, optional: without it no plot is written)."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot, save_png


def plot_eval(report, path: Path) -> Path | None:
    """Per-layer recall and mass of each sparse mode at the largest k; perplexity against k if several k."""
    plt = pyplot()
    if plt is None:
        return None

    sparse = [r for r in report.results if r.k is not None and r.per_layer]
    ks = sorted({r.k for r in report.results if r.k is not None})
    ncols = 3 if len(ks) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    if sparse:
        kmax = max(r.k for r in sparse)
        for r in sparse:
            if r.k != kmax:
                continue
            layers = [row["layer"] for row in r.per_layer]
            axes[0].plot(layers, [row.get("recall") for row in r.per_layer], marker="o", label=r.mode)
            axes[1].plot(layers, [row.get("mass") for row in r.per_layer], marker="o", label=r.mode)
        axes[0].set(title=f"recall vs oracle top-{kmax}", xlabel="layer", ylabel="recall", ylim=(0, 1.02))
        axes[1].set(title=f"attention mass kept, k={kmax}", xlabel="layer", ylabel="mass", ylim=(0, 1.02))
        axes[0].legend()
        axes[1].legend()
    if len(ks) > 1:
        ax = axes[2]
        for mode in ("oracle", "gate", "random"):
            pts = sorted((r.k, r.perplexity) for r in report.results if r.mode == mode)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        dense = next((r.perplexity for r in report.results if r.mode == "dense"), None)
        if dense:
            ax.axhline(dense, color="black", linestyle="--", label="dense")
        ax.set(title="perplexity vs k", xlabel="k", ylabel="perplexity", xscale="log", yscale="log")
        ax.legend()
    fig.suptitle(f"{report.setup['model']}  T={report.setup['seq_len']}  windows={report.setup['windows']}")
    fig.tight_layout()
    return save_png(fig, path)
