"""PNG plot of an eval report: the headline (perplexity relative to dense against k, gate / oracle written on it)
and, with routing metrics, the gate's recall and every mode's attention mass per layer at the largest k."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot, save_png, value_axis

COLORS = {"oracle": "C2", "gate": "C0", "random": "C3"}


def plot_eval(report, path: Path) -> Path | None:
    """Write ``path`` (a PNG) and return it; None if matplotlib is missing or nothing sparse was evaluated."""
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    ks = sorted({r.k for r in report.results if r.k is not None})
    if not ks:
        return None
    dense = next((r.perplexity for r in report.results if r.mode == "dense"), None)
    kmax = max(ks)
    layered = [r for r in report.results if r.k == kmax and r.per_layer]
    fig, axes = plt.subplots(1, 3 if layered else 1, figsize=(15 if layered else 6, 4.2), squeeze=False)
    ax, ys = axes[0][0], [1.0] if dense else []
    for mode in ("oracle", "gate", "random"):
        pts = sorted((r.k, r.perplexity / dense if dense else r.perplexity) for r in report.results if r.mode == mode)
        if pts:
            ax.plot(*zip(*pts), marker="o", color=COLORS[mode], label=f"{mode} top-k")
            ys += [y for _, y in pts]
    if dense:
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.3f})")
    for row in report.summary:  # the headline at each k: gate / oracle
        if row.get("gate_over_oracle") is not None:
            y = row["gate"] / dense if dense else row["gate"]
            ax.annotate(f"gate/oracle\n{row['gate_over_oracle']:.3f}", (row["k"], y), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8, color=COLORS["gate"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlim(min(ks) / 1.5, max(ks) * 1.5)  # room for the gate/oracle notes at the first and last k
    value_axis(ax, ys)
    ax.set(xlabel="k (keys kept per query)", title="closed-loop perplexity" + (" relative to dense" if dense else ""),
           ylabel="perplexity / dense perplexity" if dense else "perplexity")
    ax.legend(fontsize=8)
    if layered:
        for r in layered:
            layers = [row["layer"] for row in r.per_layer]
            if r.mode != "oracle":  # the oracle's recall against itself is 1 by definition
                axes[0][1].plot(layers, [row.get("recall") for row in r.per_layer], marker="o", color=COLORS[r.mode],
                                label=r.mode)
            axes[0][2].plot(layers, [row.get("mass") for row in r.per_layer], marker="o", color=COLORS[r.mode],
                            label=r.mode)
        axes[0][1].set(title=f"recall of the oracle's top-{kmax}, per layer", xlabel="layer", ylabel="recall",
                       ylim=(0, 1.02))
        axes[0][2].set(title=f"attention mass kept at k={kmax}, per layer", xlabel="layer",
                       ylabel="dense attention mass kept", ylim=(0, 1.02))
        for side in axes[0][1:]:
            side.xaxis.set_major_locator(MaxNLocator(integer=True))
            side.legend(fontsize=8)
    fig.suptitle(f"{report.setup['model']}  T={report.setup['seq_len']}  {report.setup['tokens_scored']} tokens "
                 f"({report.setup['windows']} windows)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
