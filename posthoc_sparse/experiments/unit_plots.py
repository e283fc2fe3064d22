"""Plots of the unit report (``unit_report.py``): one PNG per finding that has data."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot, save_png, value_axis
from .plots import plot_posthoc


PLOT_NAMES = ("absorb-plateau.png", "absorb-soft.png", "absorb-posthoc.png", "absorb-sweep.png")


def _m(d: dict | None) -> float | None:
    return None if not d else d.get("mean")


def plot_units(report: dict, out: Path) -> list[Path]:
    """The plots of ``PLOT_NAMES`` that have data, into ``out``; those that have none are removed from it (a report
    rebuilt from other units must not keep a plot of units it left out)."""
    plt = pyplot()
    f = report["findings"]
    if plt is None:
        return []
    if report["settings"] is None:
        return _drop_others(out, [])
    k, written = report["settings"]["k"], []
    if f["reference"]:
        p = f["reference"]["plateau"]
        curve = p["curve"]
        fig, (ax, zoom) = plt.subplots(1, 2, figsize=(9, 3.8))
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", ms=3)
        ax.set(xlabel="training step", ylabel="held-out perplexity",
               title=f"31M reference model (seed {f['reference']['seed']}): held-out curve")
        value_axis(ax, [c[1] for c in curve])
        late = [c for c in curve if c[0] >= curve[-1][0] / 2]  # the second half, linear: the plateau test's view
        zoom.plot([c[0] for c in late], [c[1] for c in late], marker="o", ms=3)
        if p["change_last_25pct"] is not None:
            start = dict(map(tuple, curve))[p["from_step"]]
            zoom.axvspan(p["from_step"], curve[-1][0], color="0.9", zorder=0)
            verdict = "plateau" if p["plateaued"] else "not at its plateau"
            zoom.set_title(f"second half; last 25% shaded: {100 * (curve[-1][1] / start - 1):+.1f}% ({verdict})",
                           fontsize=9)
        zoom.set(xlabel="training step")
        value_axis(zoom, [c[1] for c in late])
        fig.tight_layout()
        written.append(save_png(fig, out / "absorb-plateau.png"))
    if f["soft"] and f["soft"]["seeds"]:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        rows = f["soft"]["per_seed"]
        for i, (label, get) in enumerate((("dense", lambda r: r["dense"]),
                                          ("soft learned", lambda r: r["learned"]["ppl_as_trained"]),
                                          ("soft random", lambda r: r["random"]["ppl_as_trained"]))):
            ys = [y for y in map(get, rows) if y is not None]  # a seed may lack its dense unit
            ax.scatter([i] * len(ys), ys, zorder=3)
            ax.hlines(sum(ys) / len(ys), i - 0.2, i + 0.2, color="k")
        ax.set(xticks=[0, 1, 2], xticklabels=["dense", "soft learned", "soft random"], xlim=(-0.6, 2.6),
               ylabel="held-out perplexity as trained", title=f"finding 1, seeds {f['soft']['seeds']} (bar: mean)")
        fig.tight_layout()
        written.append(save_png(fig, out / "absorb-soft.png"))
    if f["posthoc"]:
        p = f["posthoc"]
        curve = [{"step": c["step"], "ppl_gate": _m(c["ppl_gate"])} for c in p["curve"]]
        written.append(plot_posthoc(plt, curve, _m(p["ppl_random"]), _m(p["ppl_oracle"]), _m(p["ppl_dense"]), k,
                                    "post hoc: gate perplexity against distillation steps", out / "absorb-posthoc.png"))
    if f["sweep"]:
        t = f["sweep"]["table"]
        fs = [r["fraction"] for r in t]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        learned, random = [_m(r["ppl_learned"]) for r in t], [_m(r["ppl_random"]) for r in t]
        ax.plot(fs, learned, marker="o", label="distilled gate (frozen)")
        ax.plot(fs, random, marker="s", label="random gate (frozen)")
        ax.set(xlabel="fraction of layers unfrozen", ylabel=f"held-out perplexity, top-{k}",
               title=f"absorption gradient, seeds {f['sweep']['seeds']}")
        value_axis(ax, learned + random)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_png(fig, out / "absorb-sweep.png"))
    return _drop_others(out, written)


def _drop_others(out: Path, written: list[Path]) -> list[Path]:
    for name in PLOT_NAMES:
        if out / name not in written:
            (out / name).unlink(missing_ok=True)
    return written
