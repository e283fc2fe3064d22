"""Counting sweeps of the token-level selection (``ops.token_select``'s ``_token_bracket``) on Gaussian inputs, per
head and per KV group, at each number of thresholds a sweep. Sweeps depend on the scores and the launch settings,
not on the machine, so the kernel runs here through ``TRITON_INTERPRET=1`` on the CPU; one sweep's time on a GPU is
in ``benchmarks/perf.py --parts prefill_tuning``.

    python benchmarks/counting_sweeps.py --T 4096 --out docs/data/counting-sweeps-gauss.json

Inputs: bf16-rounded standard normal selection queries and keys (d = 32), one head (per head) or two heads of one
KV group (per group), k = T / 128 and T / 16 (the shares of 256 and 2048 of 32768 keys); the kernel's default launch
(64 rows, 64 keys a tile) with the guess. Reports the mean and largest count of counting sweeps over the programs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import tuning  # noqa: E402
from posthoc_sparse.ops.token_select import triton as tst  # noqa: E402  (token_bracket: the counting alone)


def measure(t: int, cands: list[int], seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 2, t, 32, generator=gen).to(torch.bfloat16).float()
    b = torch.randn(1, 2, t, 32, generator=gen).to(torch.bfloat16).float()
    rows = []
    for selection, group, heads in (("head", 1, 1), ("group", 2, 2)):
        for k in (t // 128, t // 16):
            for r in cands:
                start = time.perf_counter()
                with tuning(tst.TUNING, select_cands=r):
                    _, _, counted = tst.token_bracket(a[:, :heads].contiguous(), b[:, :heads].contiguous(), k, 1.0,
                                                      group)
                rows.append({"selection": selection, "T": t, "k": k, "thresholds": r,
                             "sweeps_mean": round(counted.float().mean().item(), 3), "sweeps_max": int(counted.max()),
                             "programs": counted.numel(), "cpu_seconds": round(time.perf_counter() - start, 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--cands", default="4,8", help="thresholds a sweep to compare (2, 4 or 8)")
    p.add_argument("--guess-step", type=float, default=tst.TUNING["select_guess_step"],
                   help="the guessed first sweep's innermost thresholds, in sds of the row's scores")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    tst.TUNING["select_guess_step"] = a.guess_step
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {"what": "counting sweeps of ops.token_select on Gaussian inputs, through TRITON_INTERPRET=1",
              "commit": commit, "launch": {k: v for k, v in tst.TUNING.items() if k.startswith("select_")},
              "rows": measure(a.T, [int(c) for c in a.cands.split(",")])}
    out = Path(a.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)  # never a half-written file


if __name__ == "__main__":
    main()
