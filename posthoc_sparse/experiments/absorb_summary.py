"""The markdown summary of ``sparsify absorb``'s report (summary.md): one table per experiment."""

from __future__ import annotations

import math


def _f(x, spec=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ms(d: dict, spec=".2f") -> str:
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:{spec}} ± {d['std']:{spec}}" if d["n"] > 1 else format(d["mean"], spec)


def summary_markdown(report: dict) -> str:
    """The markdown summary: one table per experiment, with the settings that produced it."""
    c, res = report["config"], report["results"]
    lines = [
        "# Routing absorption: end-to-end gating vs post-hoc distillation", "",
        f"Model: {c['arch']}, {c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, d_ff {c['d_ff']}, "
        f"context {c['seq_len']}; data {c['dataset']}; {c['steps']} training steps per run (batch {c['batch_size']}); "
        f"k = {c['k']}, d_g {c['d_g']}, tau {c['tau']}"
        f"{' -> ' + str(c['tau_end']) if c.get('tau_end') else ''} ({c.get('scores', 'raw')} scores); {c['eval_windows']} held-out windows; device "
        f"{report['device']}; {report['seconds']:.0f} s.", "",
    ]
    if "soft" in res:
        st = res["soft"]["stats"]
        lines += ["## 1. Soft gating end to end: learned vs random gate", "",
                  f"Mean ± std over {c['seeds']} seeds. Dense baseline (seed 0): {_f(res['soft']['dense_ppl'])}.", "",
                  "| | learned gate | random gate | random − learned |", "|---|---|---|---|"]
        for key, label in (("ppl_as_trained", "perplexity as trained (soft gate)"),
                           ("ppl_gate_topk", f"perplexity, hard top-{c['k']} of the gate"),
                           ("recall", f"gate recall@{c['k']} vs oracle"),
                           ("ppl_dense", "perplexity, gate removed (dense)"),
                           ("mass_outside", f"attention mass outside the gate's top-{c['k']}, last step")):
            if key not in st:
                continue
            spec = ".3f" if key in ("recall", "mass_outside") else ".2f"
            lines.append(f"| {label} | {_ms(st[key]['learned'], spec)} | {_ms(st[key]['random'], spec)} | "
                         f"{_ms(st[key]['random_minus_learned'], spec)} |")
        lines.append("")
    if "hard" in res:
        h = res["hard"]
        lines += ["## 2. Hard top-k: the gate's gradient through the mask", "",
                  "| steps measured | steps where a gradient reached the gate | largest gate-gradient norm | "
                  "largest change of a gate weight | perplexity as trained | soft-learned mean gate-gradient norm |",
                  "|---|---|---|---|---|---|",
                  f"| {h['steps_measured']} | {h['steps_with_gradient']} | {h['max_gate_grad_norm']:.1e} | "
                  f"{h['gate_moved']:.1e} | {_f(h['ppl_as_trained'])} | {_f(h['soft_learned_gate_grad_mean'], '.2e')} |",
                  ""]
    if "coadapt" in res:
        lines += ["## 3. Distilling onto co-adapted vs mask-agnostic Q/K/V", "",
                  f"| model the gate is distilled onto | recall@{c['k']} | mass kept | dense | oracle | gate | random | "
                  "gate / oracle |", "|---|---|---|---|---|---|---|---|"]
        for row in res["coadapt"]:
            lines.append(f"| {row['label']} | {_f(row['recall'], '.3f')} | {_f(row['mass'], '.3f')} | "
                         f"{_f(row['ppl_dense'])} | {_f(row['ppl_oracle'])} | {_f(row['ppl_gate'])} | "
                         f"{_f(row['ppl_random'])} | {_f(row['gate_over_oracle'], '.3f')} |")
        lines.append("")
    if "stochastic" in res:
        s = res["stochastic"]
        lines += ["## 4. Stochastic mask randomization", "",
                  f"| model | as trained | deployed dense | oracle top-{c['k']} | random top-{c['k']} |",
                  "|---|---|---|---|---|"]
        for key, label in (("stochastic", "trained with random masks"), ("dense_baseline", "dense baseline")):
            r = s[key]
            lines.append(f"| {label} | {_f(r['ppl_as_trained'])} | {_f(r['ppl_dense'])} | {_f(r['ppl_oracle'])} | "
                         f"{_f(r['ppl_random'])} |")
        lines += ["", f"Deployed dense, stochastic / baseline: {s['dense_ratio']:.3f}.", ""]
    if "posthoc" in res:
        p = res["posthoc"]
        lines += ["## Post hoc: a gate distilled on the frozen dense model", "",
                  f"Dense {_f(p['ppl_dense'])}, oracle top-{c['k']} {_f(p['ppl_oracle'])}, random gate "
                  f"{_f(p['ppl_random'])}.", "", f"| distillation step | gate top-{c['k']} perplexity | recall |",
                  "|---|---|---|"]
        lines += [f"| {pt['step']} | {_f(pt['ppl_gate'])} | {_f(pt['recall'], '.3f')} |" for pt in p["curve"]]
        lines.append("")
    return "\n".join(lines)
