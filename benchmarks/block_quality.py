"""Perplexity of per-head and block selection side by side on a real model (CPU or GPU), for docs/results.md.

    python benchmarks/block_quality.py --gates gates/smol --seq-len 2048 --windows 4 --out quality.json \
        --runs "dense;oracle,head,64;gate,head,64;oracle,block,16,64;gate,block,16,64;gate,block,64,256"

Each run is ``mode,selection,k`` or ``mode,block,B,k[,exact]`` (mode: dense, oracle, gate, random; ``exact``:
the gate's block score is its softmax mass, ``--block-score exact``). Every run scores
the same held-out windows of the gate's model and dataset. Writes JSON after each run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posthoc_sparse.attention.interface import SparseAttention  # noqa: E402
from posthoc_sparse.attention.policies import policy_for  # noqa: E402
from posthoc_sparse.data import build_windows  # noqa: E402
from posthoc_sparse.evaluate.perplexity import windows_nll  # noqa: E402
from posthoc_sparse.gates.io import load_gates, read_gate_config  # noqa: E402
from posthoc_sparse.gates.modules import GateBank, random_control  # noqa: E402
from posthoc_sparse.devices import input_device  # noqa: E402
from posthoc_sparse.loading import load_model  # noqa: E402


def run_policy(run: str, bank: GateBank, random_bank: GateBank):
    """The policy of one run label: "dense", or "MODE,head|group,K", or "MODE,block,B,K[,exact]"."""
    parts = run.split(",")
    if parts[0] == "dense":
        return policy_for("dense")
    mode, selection = parts[0], parts[1]
    block = int(parts[2]) if selection == "block" else 64
    score = "exact" if parts[-1] == "exact" else "bound"
    k = int(parts[3] if selection == "block" else parts[2])
    return policy_for(mode, k, {"gate": bank, "random": random_bank}.get(mode), selection=selection, block_size=block,
                      block_score=score)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gates", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="quality.json")
    args = ap.parse_args()
    cfg = read_gate_config(args.gates)
    loaded = load_model(cfg["base_model"], dtype="auto", device=args.device)
    model = loaded.model
    bank, _ = load_gates(args.gates)
    bank.to(input_device(model))
    random_bank = random_control(bank.spec, cfg.get("random_seed", 1)).to(input_device(model))
    windows, info = build_windows(loaded.tokenizer, cfg["dataset"], "heldout", args.seq_len, max_windows=args.windows)
    out = {"model": loaded.source, "gates": args.gates, "seq_len": args.seq_len, "windows": len(windows), "data": info,
           "results": {}}
    for run in args.runs.split(";"):
        t0 = time.perf_counter()
        with SparseAttention(model, run_policy(run, bank, random_bank)):
            nll, n = windows_nll(model, windows, 1, input_device(model))
        out["results"][run] = {"perplexity": math.exp(nll / n), "tokens": n, "seconds": time.perf_counter() - t0}
        print(run, round(out["results"][run]["perplexity"], 3), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
