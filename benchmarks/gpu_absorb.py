"""The routing-absorption experiments (`sparsify absorb --recipe paper-31m-absorb`) in one GPU call of < 10 min.

    python benchmarks/gpu_absorb.py --corpus data/offline-en --tokenizer data/gpt2-tokenizer --out $OUT

(on the CPU machine first: `bash benchmarks/gpu_paper31m.sh --prepare`, which builds both folders; carry them.)

The recipe's step count (1000 per run, 9 runs) does not fit one 10-minute call, so this driver first times a few
training steps of a dense and a soft-gated 31M model, then sets ``steps`` so that the nine training runs take
about ``--train-budget`` seconds (rounded down to a multiple of 50, at most the recipe's). Everything else is the
recipe. Writes absorb.json, summary.md, the PNGs, probe.json and run.log under --out (a few hundred KB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posthoc_sparse.config import build_config, load_recipe  # noqa: E402

RECIPE = ROOT / "recipes" / "paper-31m-absorb.toml"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def probe(base: dict, work: Path, steps: int = 12) -> dict:
    """Median seconds per training step of a dense and a soft-learned run (first 2 steps dropped)."""
    from posthoc_sparse.experiments.pretrain import PretrainConfig, pretrain

    out = {}
    for mode in ("dense", "soft-learned", "hard-topk"):
        times = []
        cfg = build_config(PretrainConfig, {k: v for k, v in base.items() if k in PretrainConfig.__dataclass_fields__},
                           {"steps": steps, "gate_mode": mode, "output": str(work / f"probe-{mode}"), "overwrite": True,
                            "eval_every": 10_000, "eval_windows": 1, "checkpoint_every": 10_000, "warmup": 1,
                            "gate_k": base["k"], "gate_d_g": base["d_g"], "gate_tau": base["tau"]})
        pretrain(cfg, on_event=lambda kind, info: times.append(info["seconds"]) if kind == "step" else None)
        t = sorted(times[2:])
        out[mode] = t[len(t) // 2]
        log(f"probe {mode}: {out[mode] * 1000:.1f} ms/step")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="data/offline-en")
    ap.add_argument("--tokenizer", default="data/gpt2-tokenizer")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--work", default="/tmp/absorb")
    ap.add_argument("--train-budget", type=float, default=330.0)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of the recipe (smoke tests)")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    from posthoc_sparse.experiments.absorb import AbsorbConfig, run_absorb

    log(f"torch {torch.__version__} transformers {transformers.__version__} cuda {torch.cuda.is_available()} "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
    recipe = load_recipe(str(RECIPE)) | {"dataset": a.corpus, "tokenizer": a.tokenizer,
                                         "output": str(work / "report"), "overwrite": True}
    recipe |= {k: type(recipe[k])(v) if k in recipe and not isinstance(recipe[k], str) else v
               for k, v in (item.split("=", 1) for item in a.set)}
    t0 = time.perf_counter()
    per_step = probe(recipe, work)
    gated = max(per_step["soft-learned"], per_step["hard-topk"])
    n_gated = 2 * recipe["seeds"] + 2
    steps = int(a.train_budget / (per_step["dense"] + n_gated * gated)) // 50 * 50
    steps = max(50, min(recipe["steps"], steps))
    cfg = build_config(AbsorbConfig, recipe, {"steps": steps, "warmup": min(recipe["warmup"], steps // 5)})
    log(f"{steps} training steps per run (recipe: {recipe['steps']}); probe took {time.perf_counter() - t0:.0f} s")
    (out / "probe.json").write_text(json.dumps({"seconds_per_step": per_step, "steps": steps,
                                                "train_budget": a.train_budget}, indent=1))

    def on_event(kind: str, info: dict) -> None:
        if kind in ("run", "distill", "eval"):
            log(f"{kind} {info}")
        elif kind == "pretrain:done":
            log(f"  {info['run']}: held-out ppl {info['heldout_ppl']:.2f}, {info['seconds']:.0f} s, "
                f"{info['tokens_per_second']:.0f} tok/s, gate grad {info.get('gate_grad')}")
        elif kind == "distill:done":
            log(f"  distilled {info['run']}: KL {info['loss_first']:.4f} -> {info['loss_last']:.4f}, recall "
                f"{info['recall']:.3f} (random {info['recall_random']:.3f}), {info['seconds_per_step'] * 1000:.0f} ms/step")

    try:
        run_absorb(cfg, on_event=on_event)
    finally:
        report = Path(cfg.output)
        for p in [*report.glob("*.json"), *report.glob("*.md"), *report.glob("*.png")]:
            shutil.copy(p, out / p.name)
        evals = out / "evals"
        evals.mkdir(exist_ok=True)
        for p in (report / "evals").glob("*.json"):
            shutil.copy(p, evals / p.name)
        log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
