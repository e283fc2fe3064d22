"""summary.md of the unit report (``unit_report.py``): one table per finding, pending findings named."""

from __future__ import annotations

import math


def _f(x, spec=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ms(d: dict | None, spec=".2f") -> str:
    """mean ± std (n), or the value when n = 1, or '-'."""
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:{spec}} ± {d['std']:{spec}} (n={d['n']})" if d["n"] > 1 else format(d["mean"], spec)


def _pct(d: dict | None) -> str:
    """A relative change as mean ± std in percent, or 'not recorded'."""
    if not d or d.get("mean") is None:
        return "not recorded"
    m, sd = 100 * d["mean"], 100 * d["std"]
    return f"{m:+.1f}% ± {sd:.1f}% (n={d['n']})" if d["n"] > 1 else f"{m:+.1f}%"


def _ci(d: dict | None, spec=".2f") -> str:
    if not d or d.get("mean") is None:
        return "-"
    if d.get("low") is None:
        return f"{d['mean']:{spec}} (n=1, no interval)"
    return f"{d['mean']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}] (n={d['n']})"


def _pending(report: dict, key: str) -> list[str]:
    names = report["pending"].get(key)
    return [f"Pending GPU units: {', '.join(names)}.", ""] if names else []


def summary_markdown(report: dict) -> str:
    s, f = report["settings"], report["findings"]
    if s is None:
        return ("# Routing absorption on the 31M model, from units\n\nNo unit has run yet. Pending GPU units, in order: "
                + ", ".join(report["plan"]) + ".\n")
    k = s["k"]
    lines = ["# Routing absorption on the 31M model, from units", "",
             f"Model {s['arch']}, {s['n_layer']} layers, d_model {s['d_model']}, {s['n_head']} heads, context "
             f"{s['seq_len']}; {s['steps']} steps of {s['batch_size']} windows per run, dropout {s['dropout']}, weight "
             f"decay {s['weight_decay']}; k = {k}; soft relaxation: {s['scores']} scores, tau {s['tau']} -> "
             f"{s['tau_end']}; {s['eval_windows']} held-out windows. Units: "
             + ", ".join(f"{n} ({u['device']}, {u['seconds']:.0f} s)" for n, u in report["units"].items()) + ".", ""]
    if report["mixed_settings"]:
        lines += [f"Left out, run with other settings than this report's: {', '.join(report['mixed_settings'])}.",
                  ""]
    covers = set(report.get("covers", f))
    ref = f["reference"]
    if "reference" in covers:
        lines += ["## The reference model", ""] + _pending(report, "reference")
    if ref:
        p = ref["plateau"]
        lines += [f"Held-out perplexity (seed {ref['seed']}): " + ", ".join(f"{st}: {v:.2f}" for st, v in p["curve"]),
                  "", f"Change over the last 25% of steps (from step {p['from_step']}): "
                  f"{_f(p['change_last_25pct'] and 100 * p['change_last_25pct'])}% -> "
                  f"{'plateau' if p['plateaued'] else 'NOT at its plateau'}"
                  f"{'; the last evaluation is above the best one (overfitting)' if p['overfit'] else ''}.", "",
                  "| k | dense | oracle top-k | attention mass kept by the oracle | random top-k |", "|---|---|---|---|---|"]
        lines += [f"| {kk} | {_f(ref['ppl_dense'])} | {_f(o['ppl'])} | {_f(o['mass'], '.3f')} | "
                  f"{_f(ref['random'][kk])} |" for kk, o in ref["oracle"].items()]
        lines.append("")
    soft = f["soft"]
    if "soft" in covers:
        lines += ["## 1. Soft gating end to end: learned vs random gate", ""] + _pending(report, "soft")
    if soft and soft["seeds"]:
        lines += [f"Seeds {soft['seeds']} (paired: same init and data order). Dense baseline (seeds "
                  f"{soft['dense_seeds']}): {_ms(soft['dense'])}.",
                  "", "| | learned gate | random gate | random − learned, 95% CI |", "|---|---|---|---|"]
        for key, label, spec in (("ppl_as_trained", "perplexity as trained (soft gate)", ".2f"),
                                 ("ppl_gate_topk", f"perplexity, hard top-{k} of the gate", ".2f"),
                                 ("recall", f"gate recall@{k} vs oracle", ".3f"),
                                 ("ppl_dense", "perplexity, gate removed (dense)", ".2f"),
                                 ("mass_outside", f"attention mass outside the gate's top-{k}, last step", ".3f")):
            lines.append(f"| {label} | {_ms(soft['learned'][key], spec)} | {_ms(soft['random'][key], spec)} | "
                         f"{_ci(soft['random_minus_learned'][key], spec)} |")
        verdict = {True: "yes: the interval excludes 0", False: "no: the interval includes 0 (or is below it)",
                   None: "undecided (fewer than 2 seeds)"}[soft["learned_beats_random"]]
        lines += ["", f"Soft-random − dense: {_ci(soft['random_minus_dense'])}; soft-learned − dense: "
                  f"{_ci(soft['learned_minus_dense'])}. Learned beats random beyond noise: {verdict}.", ""]
    if "hard" in covers:
        lines += ["## 2. Hard top-k: the gate's gradient through the mask", ""] + _pending(report, "hard")
    if f["hard"]:
        lines += ["| seed | steps measured | steps with a gate gradient | largest norm | largest weight change | "
                  "perplexity as trained |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['steps_measured']} | {r['steps_with_gradient']} | "
                  f"{r['max_gate_grad_norm']:.1e} | {r['gate_moved']:.1e} | {_f(r['ppl_as_trained'])} |"
                  for r in f["hard"]["per_seed"]]
        lines.append("")
    if "coadapt" in covers:
        lines += ["## 3. A gate distilled post hoc onto co-adapted vs mask-agnostic Q/K/V", ""]
        lines += _pending(report, "coadapt")
        lines += [f"| model distilled onto | seeds | recall@{k} | F1 | mass kept | dense | oracle | gate | random | "
                  "gate / oracle |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['seeds']} | {_ms(r['recall'], '.3f')} | {_ms(r['f1'], '.3f')} | "
                  f"{_ms(r['mass'], '.3f')} | {_ms(r['ppl_dense'])} | {_ms(r['ppl_oracle'])} | {_ms(r['ppl_gate'])} | "
                  f"{_ms(r['ppl_random'])} | {_ms(r['gate_over_oracle'], '.3f')} |" for r in f["coadapt"]]
        lines.append("")
    if "stochastic" in covers:
        lines += ["## 4. Stochastic masks", ""] + _pending(report, "stochastic")
    if f["stochastic"]:
        lines += [f"| seed | deployed dense: stochastic / baseline | oracle top-{k} | random top-{k} |", "|---|---|---|---|"]
        lines += [f"| {r['seed']} | {_f(r['stochastic_dense'])} / {_f(r['baseline_dense'])} | "
                  f"{_f(r['stochastic_oracle'])} / {_f(r['baseline_oracle'])} | {_f(r['stochastic_random'])} / "
                  f"{_f(r['baseline_random'])} |" for r in f["stochastic"]["per_seed"]]
        lines += ["", f"Deployed dense, stochastic / baseline: {_ms(f['stochastic']['dense_ratio'], '.3f')}.", ""]
    if "posthoc" in covers:
        lines += ["## Post hoc: a gate distilled on the frozen dense model", ""] + _pending(report, "posthoc")
    if f["posthoc"]:
        p = f["posthoc"]
        lines += [f"Seeds {p['seeds']}. Dense {_ms(p['ppl_dense'])}, oracle top-{k} {_ms(p['ppl_oracle'])}, random "
                  f"gate {_ms(p['ppl_random'])}.", "", f"| distillation step | gate top-{k} perplexity | recall |",
                  "|---|---|---|"]
        lines += [f"| {pt['step']} | {_ms(pt['ppl_gate'])} | {_ms(pt['recall'], '.3f')} |" for pt in p["curve"]]
        lines.append("")
    if "sweep" in covers:
        lines += ["## The unfreeze sweep on the trained model", ""] + _pending(report, "sweep")
    if f["sweep"]:
        sw = f["sweep"]
        lines += [f"Seeds {sw['seeds']}.", "", "| fraction | layers | learned gate | random gate | gap (random − "
                  "learned) | random / learned | training loss, last quarter (learned / random) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {t['fraction']:.3f} | {t['n_layers_unfrozen']} | {_ms(t['ppl_learned'])} | "
                  f"{_ms(t['ppl_random'])} | {_ms(t['gap'])} | {_ms(t['ratio'], '.3f')} | "
                  + (f"{_pct(t.get('loss_change_learned'))} / {_pct(t.get('loss_change_random'))} |"
                     if t["n_layers_unfrozen"] else "nothing trained |") for t in sw["table"]]
        lines += ["", f"The gap shrinks at every step of the fraction: {sw['gap_shrinks']} (of the means), "
                  f"{sw.get('gap_shrinks_every_seed')} (on every seed). The training loss's last column: its relative "
                  "change from the third quarter of a point's steps to the last (units from before it was kept: "
                  "not recorded).", ""]
    return "\n".join(lines)
