"""Per-head against per-KV-group selection on the same held-out windows, from two ``sparsify eval`` reports.

    sparsify eval --gates gates/smol --modes dense,oracle,gate --k 16,64 --max-windows 8 --selection head \
        --output reports/smol-head
    sparsify eval --gates gates/smol --modes dense,oracle,gate --k 16,64 --max-windows 8 --selection group \
        --output reports/smol-group
    python benchmarks/selection_compare.py reports/smol-head/eval.json reports/smol-group/eval.json \
        --out docs/data/selection-group-smollm2-t512.json

Writes one JSON: for each mode and k both perplexities and group / head with a 95% paired bootstrap interval over
the windows (``evaluate.intervals.ppl_ratio_interval``), and within each selection gate / oracle and oracle / dense
the same way; plus both reports' setup. Refuses reports of other models, windows or gates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posthoc_sparse.evaluate.intervals import ppl_ratio_interval  # noqa: E402


def compare(head: dict, group: dict) -> dict:
    """The comparison of two eval.json reports (head selection, group selection) over the same windows."""
    same = ("model_fingerprint", "gates", "k")
    for key in same:
        if head["setup"].get(key) != group["setup"].get(key):
            raise ValueError(f"the reports differ in {key}: {head['setup'].get(key)!r} and {group['setup'].get(key)!r}")
    if head["setup"]["data"]["sha256"] != group["setup"]["data"]["sha256"]:
        raise ValueError("the reports scored different windows")
    m = head["setup"]["data"]["seq_len"] - 1
    per = {name: {(r["mode"], r["k"]): r for r in rep["results"]} for name, rep in (("head", head), ("group", group))}
    rows = []
    for k in head["setup"]["k"]:
        for mode in ("oracle", "gate", "random"):
            if (mode, k) not in per["head"] or (mode, k) not in per["group"]:
                continue
            h, g = per["head"][(mode, k)], per["group"][(mode, k)]
            rows.append({"mode": mode, "k": k, "head": h["perplexity"], "group": g["perplexity"],
                         "group_over_head": ppl_ratio_interval(g["window_nll"], h["window_nll"], m)})
    within = {}
    for name, table in per.items():
        within[name] = []
        for k in head["setup"]["k"]:
            row = {"k": k}
            for label, num, den in (("gate_over_oracle", ("gate", k), ("oracle", k)),
                                    ("oracle_over_dense", ("oracle", k), ("dense", None))):
                if num in table and den in table:
                    row[label] = ppl_ratio_interval(table[num]["window_nll"], table[den]["window_nll"], m)
            within[name].append(row)
    dense = per["head"].get(("dense", None), {}).get("perplexity")
    return {"dense": dense, "rows": rows, "within": within, "tokens": head["results"][0]["tokens"],
            "setup": {"head": head["setup"], "group": group["setup"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("head", type=Path, help="eval.json of --selection head")
    p.add_argument("group", type=Path, help="eval.json of --selection group")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    try:
        report = compare(json.loads(a.head.read_text()), json.loads(a.group.read_text()))
    except (OSError, ValueError, KeyError) as e:  # a missing, corrupt or mismatched report: one line, exit 2
        p.exit(2, f"selection_compare.py: {e}\n")
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, a.out)  # never a half-written file
    for r in report["rows"]:
        ci = r["group_over_head"]
        print(f"{r['mode']:>6} k={r['k']:<4} head {r['head']:.3f}  group {r['group']:.3f}  group/head "
              f"{ci['ratio']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]")


if __name__ == "__main__":
    main()
