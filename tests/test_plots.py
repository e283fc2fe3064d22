"""The report plots say their headline at a glance: eval's perplexity relative to dense with ticks at the evaluated
k and gate / oracle written on it, no oracle recall line (it is 1 by definition); the sweep's gap coloured by its
sign; tick labels are plain numbers, never 4.3275×10⁴."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from posthoc_sparse.evaluate.perplexity import EvalReport, ModeResult, summarize  # noqa: E402

KS = (16, 32, 64)
PPL = {"oracle": (43290.0, 43280.0, 43276.0), "gate": (43600.0, 43400.0, 43300.0), "random": (52000.0, 47000.0,
                                                                                                   44000.0)}


def _report() -> EvalReport:
    layers = [{"layer": i, "recall": 0.5 + 0.1 * i, "mass": 0.8 + 0.05 * i} for i in range(3)]
    results = [ModeResult("dense", None, 43275.0, 10.7, 1000, 1.0)]
    for mode, ppls in PPL.items():
        for k, ppl in zip(KS, ppls):
            per_layer = [{**row, "recall": 1.0} if mode == "oracle" else row for row in layers]
            results.append(ModeResult(mode, k, ppl, 10.7, 1000, 1.0, routing={"recall": 0.6}, per_layer=per_layer))
    setup = {"model": "tiny", "seq_len": 512, "windows": 2, "tokens_scored": 1022}
    return EvalReport(results=results, summary=summarize(results, 512), setup=setup)


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save (kept open for inspection)."""
    import posthoc_sparse.evaluate.plots as eval_plots
    import posthoc_sparse.experiments.plots as exp_plots

    saved = []

    def keep(fig, path):
        fig.canvas.draw()
        saved.append(fig)
        return path

    monkeypatch.setattr(eval_plots, "save_png", keep)
    monkeypatch.setattr(exp_plots, "save_png", keep)
    return saved


def _tick_texts(ax) -> list[str]:
    return [t.get_text() for axis in (ax.xaxis, ax.yaxis) for minor in (False, True)
            for t in axis.get_ticklabels(minor=minor) if t.get_text()]


def test_eval_plot_shows_perplexity_relative_to_dense_at_the_evaluated_k(figures, tmp_path):
    from posthoc_sparse.evaluate.plots import plot_eval

    report = _report()
    assert plot_eval(report, tmp_path / "eval.png") is not None
    head, recall, mass = figures[0].axes
    lines = {line.get_label(): line for line in head.get_lines()}
    for mode, ppls in PPL.items():
        assert list(lines[f"{mode} top-k"].get_xdata()) == list(KS)
        assert list(lines[f"{mode} top-k"].get_ydata()) == pytest.approx([p / 43275.0 for p in ppls])
    assert list(head.get_xticks()) == list(KS) and [t.get_text() for t in head.get_xticklabels()] == ["16", "32", "64"]
    notes = [t.get_text() for t in head.texts]
    for row in report.summary:
        assert any(f"{row['gate_over_oracle']:.3f}" in n and "gate/oracle" in n for n in notes)
    assert sorted(line.get_label() for line in recall.get_lines()) == ["gate", "random"]  # no oracle line at 1.0
    assert sorted(line.get_label() for line in mass.get_lines()) == ["gate", "oracle", "random"]
    for ax in figures[0].axes:
        assert not any("times" in t or "^" in t for t in _tick_texts(ax)), _tick_texts(ax)


def test_sweep_plot_colours_the_gap_by_sign_with_plain_ticks(figures, tmp_path):
    from matplotlib.colors import to_rgba

    from posthoc_sparse.experiments.plots import plot_sweep

    rows = [{"fraction": f, "ppl_learned": le, "ppl_random": r} for f, le, r in
            ((0.0, 10.0, 20.0), (0.1, 12.0, 13.0), (0.2, 15.0, 11.0))]
    plot_sweep({"table": rows, "settings": {"k": 64}, "model": "tiny"}, tmp_path / "sweep.png")
    (ax,) = figures[0].axes
    fills = {c.get_label(): c for c in ax.collections}
    better, worse = fills["learned better (random - learned > 0)"], fills["learned worse"]
    assert tuple(better.get_facecolor()[0][:3]) == to_rgba("C2")[:3]
    assert tuple(worse.get_facecolor()[0][:3]) == to_rgba("C3")[:3]
    assert not any("times" in t or "^" in t for t in _tick_texts(ax)), _tick_texts(ax)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.00", "0.10", "0.20"]


def test_posthoc_plots_of_both_reports_use_plain_ticks_on_a_span_below_and_above_10x(figures, tmp_path):
    """The post-hoc curve is one function for the absorb report and the GPU units' report; 300 -> 105 is a linear
    axis (below 10x), a curve from 53332 a log axis, and neither labels a tick 3x10^2 or 5e+04."""
    import matplotlib.pyplot as plt

    from posthoc_sparse.experiments.plots import plot_posthoc

    for first in (336.4, 53332.6):
        curve = [{"step": s, "ppl_gate": p} for s, p in ((0, first), (100, 106.7), (200, 106.5))]
        plot_posthoc(plt, curve, 300.2, 105.8, 99.1, 64, "post hoc", tmp_path / "p.png")
    linear, log = figures[0].axes[0], figures[1].axes[0]
    assert linear.get_yscale() == "linear" and log.get_yscale() == "log"
    for ax in (linear, log):
        assert not any("times" in t or "^" in t or "e+" in t for t in _tick_texts(ax)), _tick_texts(ax)
    assert sorted(line.get_label() for line in linear.get_lines()) == [
        "dense", "frozen random gate", "learned gate (distilled, model frozen)", "oracle top-64"]
