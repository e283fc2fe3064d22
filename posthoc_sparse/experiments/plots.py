"""Plots of experiment reports (matplotlib; no plot, and None, where it is missing)."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot, save_png, value_axis


def plot_sweep(report: dict, path: Path) -> Path | None:
    """Perplexity of the learned and random gate against the fraction of layers unfrozen; the gap shaded green
    where the learned gate is better (random - learned > 0), red where it is worse."""
    plt = pyplot()
    if plt is None:
        return None

    rows = report["table"]
    fs = [r["fraction"] for r in rows]
    learned, random = [r["ppl_learned"] for r in rows], [r["ppl_random"] for r in rows]
    better = [r > le for le, r in zip(learned, random)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(fs, learned, marker="o", color="C0", label="learned gate (distilled, frozen)")
    ax.plot(fs, random, marker="s", color="C3", label="random gate (frozen)")
    ax.fill_between(fs, learned, random, where=better, interpolate=True, color="C2", alpha=0.25,
                    label="learned better (random - learned > 0)")
    ax.fill_between(fs, learned, random, where=[not b for b in better], interpolate=True, color="C3", alpha=0.25,
                    label="learned worse" if not all(better) else None)
    ax.set_xticks(fs, [f"{f:.2f}" for f in fs])
    ax.set(xlabel="fraction of layers unfrozen", ylabel=f"held-out perplexity, top-{report['settings']['k']}",
           title=f"absorption gradient: {report['model']}")
    value_axis(ax, learned + random)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_absorb(report: dict, out: Path) -> list[Path]:
    """One PNG per experiment of an absorb report: absorb-<experiment>.png. Returns the files written."""
    plt = pyplot()
    if plt is None:
        return []
    res, k, written = report["results"], report["config"]["k"], []

    if "soft" in res:  # per-seed perplexities, learned vs random, as trained and under hard top-k
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        rows = res["soft"]["per_seed"]
        for ax, key, title in ((axes[0], "ppl_as_trained", "as trained (soft gate)"),
                               (axes[1], "ppl_gate_topk", f"deployed: hard top-{k} of the gate")):
            for i, variant in enumerate(("learned", "random")):
                ys = [r[variant][key] for r in rows]
                ax.scatter([i] * len(ys), ys, label=f"{variant} gate", zorder=3)
                ax.hlines(sum(ys) / len(ys), i - 0.2, i + 0.2, color="k")
            ax.axhline(res["soft"]["dense_ppl"], ls="--", color="gray", label="dense baseline")
            ax.set(xticks=[0, 1], xticklabels=["learned", "random"], xlim=(-0.6, 1.6), ylabel="held-out perplexity",
                   title=title)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"soft gating end to end, {len(rows)} seeds (bar: mean)")
        fig.tight_layout()
        written.append(save_png(fig, out / "absorb-soft.png"))

    if "hard" in res or "soft" in res:  # the gate's gradient norm per training run
        curves = {n: r for n, r in report["runs"].items() if r.get("gate_grad")}
        if curves:
            fig, ax = plt.subplots(figsize=(6, 3.8))
            names = sorted(curves)
            means = [curves[n]["gate_grad"]["sum_norm"] / max(1, curves[n]["gate_grad"]["steps"]) for n in names]
            ax.bar(range(len(names)), means, color=["C3" if "hard" in n else "C0" for n in names])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set(ylabel="mean gate-gradient L2 norm per step", title="gradient reaching the gate during training")
            for i, m in enumerate(means):
                ax.annotate(f"{m:.1e}", (i, m), ha="center", va="bottom", fontsize=7)
            fig.tight_layout()
            written.append(save_png(fig, out / "absorb-hard.png"))

    if "coadapt" in res:
        rows = res["coadapt"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        for row in rows:
            steps = [s for s, _ in row["recall_curve"]]
            axes[0].plot(steps, [r for _, r in row["recall_curve"]], marker="o", label=row["label"])
        axes[0].set(xlabel="distillation step", ylabel=f"recall@{k} (open loop, validation)",
                    title="distilling a gate onto each model")
        axes[0].legend(fontsize=8)
        modes = ("ppl_dense", "ppl_oracle", "ppl_gate", "ppl_random")
        width = 0.38
        for i, row in enumerate(rows):
            axes[1].bar([j + i * width for j in range(len(modes))], [row[m] for m in modes], width, label=row["label"])
        axes[1].set_xticks([j + width / 2 for j in range(len(modes))], ["dense", "oracle", "gate", "random"])
        axes[1].set(ylabel="held-out perplexity", title=f"deployed, top-{k}")
        value_axis(axes[1], [row[m] for row in rows for m in modes])
        fig.tight_layout()
        written.append(save_png(fig, out / "absorb-coadapt.png"))

    if "stochastic" in res:
        s = res["stochastic"]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        modes = ("ppl_dense", "ppl_oracle", "ppl_random")
        for i, (key, label) in enumerate((("dense_baseline", "dense baseline"),
                                          ("stochastic", "trained with random masks"))):
            ax.bar([j + i * 0.38 for j in range(len(modes))], [s[key][m] for m in modes], 0.38, label=label)
        ax.set_xticks([j + 0.19 for j in range(len(modes))], ["deployed dense", f"oracle top-{k}", f"random top-{k}"])
        ax.set(ylabel="held-out perplexity", title="stochastic mask randomization")
        value_axis(ax, [s[key][m] for key in ("dense_baseline", "stochastic") for m in modes])
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_png(fig, out / "absorb-stochastic.png"))

    if "posthoc" in res:
        p = res["posthoc"]
        written.append(plot_posthoc(plt, p["curve"], p["ppl_random"], p["ppl_oracle"], p["ppl_dense"], k,
                                    "post hoc: distilling on the frozen dense model", out / "absorb-posthoc.png"))
    return written


def plot_posthoc(plt, curve: list[dict], ppl_random: float, ppl_oracle: float, ppl_dense: float, k: int, title: str,
                 path: Path) -> Path:
    """Gate perplexity against distillation steps (``curve``: {"step", "ppl_gate"}) beside the frozen random
    gate, the oracle top-k and dense; of an absorb report and of the GPU units' report."""
    gate = [c["ppl_gate"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([c["step"] for c in curve], gate, marker="o", label="learned gate (distilled, model frozen)")
    ax.axhline(ppl_random, color="C3", ls="--", label="frozen random gate")
    ax.axhline(ppl_oracle, color="C2", ls=":", label=f"oracle top-{k}")
    ax.axhline(ppl_dense, color="gray", ls="-.", label="dense")
    ax.set(xlabel="distillation step", ylabel=f"held-out perplexity, top-{k}", title=title)
    value_axis(ax, gate + [ppl_random, ppl_oracle, ppl_dense])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
