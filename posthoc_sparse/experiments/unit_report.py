"""The absorption report built from whatever units exist (``units.py``): absorb.json, summary.md and the plots.

The same units give the same report whatever order they are read in (every table iterates sorted names and
seeds). A finding whose units are missing is reported as pending, naming them. Statistics: mean ± sample std
over seeds; paired differences (same seed = same init and data order) with a 95% t interval.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluate.intervals import mean_interval
from .units import parse_unit, plan, recipe_of

REPORT_NAME, SUMMARY_NAME = "absorb.json", "summary.md"
PLATEAU_TOLERANCE = 0.02  # held-out perplexity may change by less than 2% over the last 25% of steps


def load_units(folder: Path) -> dict[str, dict]:
    """Every unit JSON in ``folder`` (``<unit>.json``), by unit name."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("format") == "posthoc-sparse absorb unit":
            out[record["unit"]] = record
    return out


def _by_kind(units: dict[str, dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for name in sorted(units):
        kind, seed = parse_unit(name)
        out.setdefault(kind, {})[seed] = units[name]
    return out


def plateau(record: dict) -> dict:
    """The held-out curve of a training run and whether it has plateaued: the relative change of held-out
    perplexity over the last 25% of the steps (from the evaluation nearest 75% of the run to the last)."""
    evals = record["train"]["evals"]
    curve = [[e["step"], e["heldout_ppl"]] for e in evals]
    last_step, last = curve[-1]
    ref = min(curve, key=lambda c: abs(c[0] - 0.75 * last_step))
    change = abs(last - ref[1]) / ref[1] if ref[0] < last_step else None
    return {"curve": curve, "final_ppl": last, "change_last_25pct": change, "from_step": ref[0],
            "plateaued": change is not None and change < PLATEAU_TOLERANCE,
            "min_ppl": min(c[1] for c in curve), "overfit": last > 1.01 * min(c[1] for c in curve)}


def _stats(rows: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: mean_interval([r[k] for r in rows if r.get(k) is not None]) for k in keys}


def _soft(kinds: dict) -> dict:
    """Finding 1 over the seeds with both soft arms (the learned − random pairs); the dense baseline, and each arm
    against it, over those of them that also have the dense unit."""
    dense = kinds.get("dense", {})
    seeds = sorted(set(kinds.get("soft-learned", {})) & set(kinds.get("soft-random", {})))
    rows = []
    for s in seeds:
        row = {"seed": s, "dense": dense[s]["train"]["ppl_as_trained"] if s in dense else None}
        for v in ("learned", "random"):
            u = kinds[f"soft-{v}"][s]
            gg = u["train"]["gate_grad"] or {}
            row[v] = {"ppl_as_trained": u["train"]["ppl_as_trained"], "ppl_gate_topk": u["eval"]["gate"]["ppl"],
                      "recall": u["eval"]["gate"]["recall"], "ppl_dense": u["eval"]["dense"]["ppl"],
                      "mass_outside": (u["train"]["mass_outside"] or {}).get("last"),
                      "gate_grad_mean": gg.get("sum_norm", 0.0) / max(1, gg.get("steps", 0)),
                      "gate_moved": u["gate_moved"]}
        rows.append(row)
    keys = ("ppl_as_trained", "ppl_gate_topk", "recall", "ppl_dense", "mass_outside")
    with_dense = [r for r in rows if r["dense"] is not None]
    out = {"seeds": seeds, "dense_seeds": [r["seed"] for r in with_dense], "per_seed": rows,
           "dense": mean_interval([r["dense"] for r in with_dense]),
           "learned": _stats([r["learned"] for r in rows], keys), "random": _stats([r["random"] for r in rows], keys),
           "random_minus_learned": {k: mean_interval([r["random"][k] - r["learned"][k] for r in rows
                                                      if r["random"][k] is not None and r["learned"][k] is not None])
                                    for k in keys},
           "random_minus_dense": mean_interval([r["random"]["ppl_as_trained"] - r["dense"] for r in with_dense]),
           "learned_minus_dense": mean_interval([r["learned"]["ppl_as_trained"] - r["dense"] for r in with_dense])}
    d = out["random_minus_learned"]["ppl_as_trained"]
    out["learned_beats_random"] = None if d["low"] is None else d["low"] > 0
    return out


def _coadapt(kinds: dict) -> list[dict]:
    rows = []
    for kind, label in (("soft-learned", "(a) soft-learned: Q/K/V co-adapted with its own learned gate"),
                        ("hard-topk", "(b) hard top-k: Q/K/V co-adapted with a fixed gate's mask"),
                        ("dense", "(c) dense: mask-agnostic Q/K/V")):
        units = [kinds.get(kind, {})[s] for s in sorted(kinds.get(kind, {}))]
        ds = [u["distilled"] for u in units if "distilled" in u]
        keys = ("recall", "f1", "mass", "ppl_dense", "ppl_oracle", "ppl_gate", "ppl_random", "gate_over_oracle")
        rows.append({"model": kind, "label": label, "seeds": [u["seed"] for u in units if "distilled" in u]}
                    | _stats(ds, keys))
    return rows


def _hard(kinds: dict) -> dict | None:
    units = [kinds.get("hard-topk", {})[s] for s in sorted(kinds.get("hard-topk", {}))]
    if not units:
        return None
    rows = [{"seed": u["seed"], "steps_measured": u["train"]["gate_grad"]["steps"],
             "steps_with_gradient": u["train"]["gate_grad"]["steps_with_gradient"],
             "max_gate_grad_norm": u["train"]["gate_grad"]["max_norm"], "gate_moved": u["gate_moved"],
             "ppl_as_trained": u["train"]["ppl_as_trained"]} for u in units]
    return {"per_seed": rows, "steps_with_gradient_total": sum(r["steps_with_gradient"] for r in rows),
            "gate_moved_max": max(r["gate_moved"] for r in rows)}


def _stochastic(kinds: dict, k: int) -> dict | None:
    seeds = sorted(set(kinds.get("stochastic", {})) & set(kinds.get("dense", {})))
    rows = []
    for s in seeds:
        st, de = kinds["stochastic"][s]["eval"], kinds["dense"][s]["eval"]
        rows.append({"seed": s, "stochastic_dense": st["dense"]["ppl"], "baseline_dense": de["dense"]["ppl"],
                     "stochastic_oracle": st[f"oracle@{k}"]["ppl"], "baseline_oracle": de[f"oracle@{k}"]["ppl"],
                     "stochastic_random": st[f"random@{k}"]["ppl"], "baseline_random": de[f"random@{k}"]["ppl"],
                     "dense_ratio": st["dense"]["ppl"] / de["dense"]["ppl"]})
    return {"per_seed": rows, "dense_ratio": mean_interval([r["dense_ratio"] for r in rows])} if rows else None


def _posthoc(kinds: dict, k: int) -> dict | None:
    dense = {s: u for s, u in kinds.get("dense", {}).items() if "posthoc_curve" in u.get("distilled", {})}
    if not dense:
        return None
    steps = sorted({p["step"] for u in dense.values() for p in u["distilled"]["posthoc_curve"]})
    curve = [{"step": st, "ppl_gate": mean_interval([p["ppl_gate"] for u in dense.values()
                                                      for p in u["distilled"]["posthoc_curve"] if p["step"] == st]),
              "recall": mean_interval([p["recall"] for u in dense.values()
                                       for p in u["distilled"]["posthoc_curve"] if p["step"] == st])} for st in steps]
    return {"seeds": sorted(dense), "curve": curve,
            "ppl_random": mean_interval([u["eval"][f"random@{k}"]["ppl"] for u in dense.values()]),
            "ppl_oracle": mean_interval([u["eval"][f"oracle@{k}"]["ppl"] for u in dense.values()]),
            "ppl_dense": mean_interval([u["eval"]["dense"]["ppl"] for u in dense.values()])}


def _sweep(kinds: dict) -> dict | None:
    units = [kinds.get("sweep", {})[s] for s in sorted(kinds.get("sweep", {}))]
    if not units:
        return None
    fractions = sorted({row["fraction"] for u in units for row in u["sweep"]["table"]})
    table = []
    for f in fractions:
        rows = [row for u in units for row in u["sweep"]["table"] if row["fraction"] == f]
        table.append({"fraction": f, "n_layers_unfrozen": rows[0]["n_layers_unfrozen"],
                      "ppl_learned": mean_interval([r["ppl_learned"] for r in rows]),
                      "ppl_random": mean_interval([r["ppl_random"] for r in rows]),
                      "gap": mean_interval([r["gap"] for r in rows]),
                      "ratio": mean_interval([r["ppl_random"] / r["ppl_learned"] for r in rows]),
                      # the points' training loss, third quarter to last (units from before it was kept: None)
                      **{f"loss_change_{g}": _mean_known([r.get(f"loss_change_{g}") for r in rows])
                         for g in ("learned", "random")}})
    gaps = [t["gap"]["mean"] for t in table]

    def shrinks(seq: list[float]) -> bool | None:  # toward 0: a gap that turns and grows the other way does not
        return all(abs(a) > abs(b) for a, b in zip(seq, seq[1:])) if len(seq) > 1 else None

    per_seed = [shrinks([row["gap"] for row in sorted(u["sweep"]["table"], key=lambda r: r["fraction"])])
                for u in units]
    return {"seeds": [u["seed"] for u in units], "table": table, "gap_shrinks": shrinks(gaps),
            "gap_shrinks_every_seed": all(per_seed) if per_seed and None not in per_seed else None}


def _mean_known(values: list) -> dict | None:
    """``mean_interval`` of the values, or None when any is missing (a unit that did not record it)."""
    return None if not values or any(v is None for v in values) else mean_interval(values)


def same_recipe(record: dict, want: dict) -> bool:
    """Whether a unit ran under ``want`` (a ``units.recipe``): its settings, its data unless ``want`` has none, and
    a sweep unit's sweep settings unless ``want`` has none."""
    got = recipe_of(record)
    return (got["settings"] == want["settings"] and (want["data"] is None or got["data"] == want["data"])
            and (want["sweep"] is None or got["sweep"] is None or got["sweep"] == want["sweep"]))


FINDINGS = ("reference", "soft", "hard", "coadapt", "stochastic", "posthoc", "sweep")


def build_report(units: dict[str, dict], seeds: int = 3, sweep_seeds: int = 2, want: dict | None = None,
                 covers: tuple[str, ...] = FINDINGS) -> dict:
    """The report of ``units`` ({name: record}); the same dict for the same units, whatever their order.

    ``covers``: the findings (of ``FINDINGS``) this report is for; the others are None and nothing is pending
    for them (a recipe that only trains the reference model, for instance).

    Only units run under the recipe ``want`` (``units.recipe``; default: dense-s0's, else the first unit's) enter
    the findings: a paired difference between models trained under different recipes would mean nothing. The
    others are listed under ``mixed_settings`` and left out (they count as pending)."""
    every = sorted(units)
    if want is None:
        ref = units.get("dense-s0") or (units[every[0]] if every else None)
        want = recipe_of(ref) | {"sweep": None} if ref else None
    mixed = sorted(n for n in every if want is not None and not same_recipe(units[n], want))
    units = {n: units[n] for n in every if n not in mixed}
    kinds = _by_kind(units)
    names = sorted(units)
    ref = units.get("dense-s0") or (units[names[0]] if names else None)
    settings = ref["settings"] if ref else None
    k = settings["k"] if settings else 64
    dense = kinds.get("dense", {})
    ks = [int(key.split("@")[1]) for key in (dense[min(dense)]["eval"] if dense else {}) if key.startswith("oracle@")]
    reference = None
    if dense:
        u = dense[min(dense)]
        reference = {"seed": min(dense), "plateau": plateau(u), "ppl_dense": u["eval"]["dense"]["ppl"],
                     "oracle": {str(kk): {"ppl": u["eval"][f"oracle@{kk}"]["ppl"], "mass": u["eval"][f"oracle@{kk}"]["mass"]}
                                for kk in sorted(ks)},
                     "random": {str(kk): u["eval"][f"random@{kk}"]["ppl"] for kk in sorted(ks)},
                     "plateau_all_seeds": {str(s): plateau(dense[s])["change_last_25pct"] for s in sorted(dense)}}
    findings = {"reference": reference, "soft": _soft(kinds), "hard": _hard(kinds), "coadapt": _coadapt(kinds),
                "stochastic": _stochastic(kinds, k), "posthoc": _posthoc(kinds, k), "sweep": _sweep(kinds)}
    needs = {"reference": ["dense-s0"], "soft": [f"{m}-s{s}" for s in range(seeds)
                                                 for m in ("dense", "soft-learned", "soft-random")],
             "hard": ["hard-topk-s0"], "coadapt": [f"{m}-s{s}" for s in range(seeds)
                                                   for m in ("dense", "soft-learned", "hard-topk")],
             "stochastic": ["stochastic-s0", "dense-s0"], "posthoc": ["dense-s0"],
             "sweep": [f"sweep-s{s}" for s in range(sweep_seeds)]}
    unknown = set(covers) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; known: {', '.join(FINDINGS)}")
    findings = {f: (v if f in covers else None) for f, v in findings.items()}
    needs = {f: need for f, need in needs.items() if f in covers}
    pending = {f: [n for n in need if n not in units] for f, need in needs.items()}
    wanted = {n for need in needs.values() for n in need}
    return {"settings": settings, "mixed_settings": mixed, "covers": list(covers), "findings": findings,
            "pending": {f: p for f, p in pending.items() if p},
            "plan": [n for n in plan(seeds, sweep_seeds) if n in wanted],
            "units": {n: {"fingerprint": units[n]["fingerprint"], "seconds": units[n]["seconds"],
                          "device": units[n]["device"]} for n in names}}


def write_report(units: dict[str, dict], out: Path, seeds: int = 3, sweep_seeds: int = 2,
                 want: dict | None = None, covers: tuple[str, ...] = FINDINGS) -> dict:
    """build_report, then absorb.json, summary.md and the plots into ``out``; returns the report."""
    from ..io import atomic_write_bytes, atomic_write_json
    from .unit_plots import plot_units
    from .unit_summary import summary_markdown

    report = build_report(units, seeds, sweep_seeds, want, covers)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / REPORT_NAME, report)
    atomic_write_bytes(out / SUMMARY_NAME, summary_markdown(report).encode())
    report["plots"] = [p.name for p in plot_units(report, out)]
    return report


__all__ = ["FINDINGS", "PLATEAU_TOLERANCE", "build_report", "load_units", "plateau", "same_recipe", "write_report"]
