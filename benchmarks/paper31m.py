"""Stages of benchmarks/gpu_paper31m.sh, each run in its own process (library calls, the same as the CLI's).

    python benchmarks/paper31m.py prepare  --corpus data/offline-en --tokenizer data/gpt2-tokenizer   # CPU machine
    python benchmarks/paper31m.py check    --corpus C --tokenizer T
    python benchmarks/paper31m.py pretrain --corpus C --tokenizer T --work W --steps 3000
    python benchmarks/paper31m.py distill  --corpus C --work W --steps 1000
    python benchmarks/paper31m.py eval     --work W --windows 64
    python benchmarks/paper31m.py summary  --corpus C --work W --out OUT
    (pretrain, distill and eval also take --set KEY=VALUE overrides of their recipe)

Each stage builds its config from the recipe TOML (recipes/paper-31m*.toml) plus overrides, with the library's
own ``build_config``: what runs is what `sparsify pretrain|distill|eval --recipe ...` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posthoc_sparse.config import build_config, load_recipe  # noqa: E402

RECIPES = ROOT / "recipes"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _steps(a) -> dict:
    """--steps and --set KEY=VALUE overrides of the stage's recipe."""
    sets = dict(item.split("=", 1) for item in a.set)
    return sets | ({} if a.steps is None else {"steps": a.steps})


def prepare(a) -> None:
    from posthoc_sparse.corpus import CorpusConfig, build_corpus
    from posthoc_sparse.tokenizers import EMBEDDED_TOKENIZER, load_tokenizer

    res = build_corpus(CorpusConfig(output=a.corpus, overwrite=True))
    log(f"corpus {res.output}: {res.manifest['totals']}")
    tmp = Path(a.tokenizer + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    load_tokenizer(EMBEDDED_TOKENIZER).save_pretrained(tmp)
    shutil.rmtree(a.tokenizer, ignore_errors=True)
    tmp.rename(a.tokenizer)
    log(f"tokenizer {a.tokenizer}: {sorted(p.name for p in Path(a.tokenizer).iterdir())}")


def _corpus_ok(corpus: Path) -> dict:
    manifest = json.loads((corpus / "manifest.json").read_text())
    for name, f in manifest["files"].items():
        digest = hashlib.sha256((corpus / name).read_bytes()).hexdigest()
        if digest != f["sha256"]:
            raise SystemExit(f"{corpus / name} does not match its manifest (sha256 {digest}); rebuild it")
    return manifest


def check(a) -> None:
    corpus, tok = Path(a.corpus), Path(a.tokenizer)
    hint = "build both on the CPU machine with `bash benchmarks/gpu_paper31m.sh --prepare` and carry them"
    if not (corpus / "manifest.json").is_file():
        raise SystemExit(f"no corpus at {corpus}: {hint}")
    if not (tok / "tokenizer.json").is_file() and not (tok / "vocab.json").is_file():
        raise SystemExit(f"no tokenizer at {tok}: {hint}")
    manifest = _corpus_ok(corpus)
    log(f"corpus {corpus} matches its manifest: {manifest['totals']}")


def pretrain(a) -> None:
    from posthoc_sparse.experiments.pretrain import PretrainConfig, pretrain as run

    cfg = build_config(PretrainConfig, load_recipe(str(RECIPES / "paper-31m.toml")), {
        "dataset": a.corpus, "tokenizer": a.tokenizer, "output": f"{a.work}/models/paper-31m", "overwrite": True}
        | _steps(a))

    def on_event(kind, info):
        if kind == "loaded":
            log(f"model {info['description']}; {info['device']}, mixed precision {info['mixed_precision']}")
            log(f"text {info['train']['n_windows']} train windows ({info['train']['n_tokens']:,} tokens), "
                f"{info['heldout']['n_windows']} held-out windows")
        elif kind == "eval":
            log(f"step {info['step']}: held-out loss {info['heldout_loss']:.4f}, perplexity {info['heldout_ppl']:.2f}")
        elif kind == "step" and (info["step"] % 100 == 0 or info["step"] == info["total"]):
            log(f"step {info['step']}/{info['total']}: loss {info['loss']:.4f}, lr {info['lr']:.2e}, "
                f"{info['tokens_per_second']:,.0f} tok/s")

    res = run(cfg, on_event=on_event)
    log(f"pretrained {res.steps} steps in {res.seconds:.0f} s ({res.tokens_per_second:,.0f} tok/s): held-out ppl "
        f"{res.heldout_ppl_first:.1f} -> {res.heldout_ppl:.2f}, {res.parameters:,} parameters")


def distill(a) -> None:
    from posthoc_sparse.config import DistillConfig
    from posthoc_sparse.distill.loop import distill as run

    cfg = build_config(DistillConfig, load_recipe(str(RECIPES / "paper-31m-distill.toml")), {
        "model": f"{a.work}/models/paper-31m", "dataset": a.corpus, "output": f"{a.work}/gates/paper-31m-k64",
        "overwrite": True} | _steps(a))

    def on_event(kind, info):
        if kind == "validate":
            log(f"step {info['step']}: recall@{cfg.k} {info['recall']:.3f} (random {info['recall_random']:.3f})")
        elif kind == "step" and info["step"] % 100 == 0:
            log(f"step {info['step']}/{info['total']}: loss {info['loss']:.4f}, {info['tokens_per_second']:,.0f} tok/s")

    res = run(cfg, on_event=on_event)
    log(f"distilled {res.steps} steps ({res.seconds_per_step * 1000:.1f} ms/step): KL {res.loss_first:.4f} -> "
        f"{res.loss_last:.4f}, recall {res.recall:.3f} (init {res.recall_init:.3f}, random {res.recall_random:.3f})")


def evaluate(a) -> None:
    from posthoc_sparse.evaluate.perplexity import EvalConfig, evaluate_perplexity

    cfg = build_config(EvalConfig, load_recipe(str(RECIPES / "paper-31m-eval.toml")), {
        "gates": f"{a.work}/gates/paper-31m-k64", "output": f"{a.work}/reports/paper-31m", "max_windows": a.windows,
        "overwrite": True} | _steps(a))

    def on_event(kind, info):
        if kind == "result":
            label = info["mode"] if info["k"] is None else f"{info['mode']}@{info['k']}"
            log(f"{label}: perplexity {info['perplexity']:.3f} ({info['seconds']:.1f} s)")

    report = evaluate_perplexity(cfg, on_event=on_event)
    for row in report.summary:
        log(f"k={row['k']}: dense {row['dense']:.3f} oracle {row['oracle']:.3f} gate {row['gate']:.3f} random "
            f"{row['random']:.3f} gate/oracle {row.get('gate_over_oracle', float('nan')):.4f} "
            f"gate recall {row.get('gate_recall') or float('nan'):.3f}")


def summary(a) -> None:
    import torch
    import transformers

    work, out = Path(a.work), Path(a.out)
    pre = json.loads((work / "models/paper-31m/pretrain_log.json").read_text())
    dis = json.loads((work / "gates/paper-31m-k64/distill_log.json").read_text())
    gate_cfg = json.loads((work / "gates/paper-31m-k64/gate_config.json").read_text())
    ev = json.loads((work / "reports/paper-31m/eval.json").read_text())
    manifest = _corpus_ok(Path(a.corpus))
    timings = json.loads(Path(a.timings).read_text()) if a.timings and Path(a.timings).is_file() else {}
    hist = dis["history"]
    result = {
        "model": {"parameters": pre["parameters"], "description": pre["description"]},
        "pretrain": {"steps": pre["history"][-1]["step"] if pre["history"] else 0, "seconds": pre["seconds"],
                     "tokens_per_second": pre["tokens_per_second"], "mixed_precision": pre["mixed_precision"],
                     "evals": pre["evals"], "train": pre["train"], "heldout": pre["heldout"]},
        "distill": {"steps": len(hist), "loss_first": hist[0]["loss"] if hist else None,
                    "loss_last": hist[-1]["loss"] if hist else None,
                    "recall_curve": [{"step": h["step"], "recall": h["recall"]} for h in hist if "recall" in h],
                    "seconds_per_step": sum(h["seconds"] for h in hist) / max(1, len(hist)), "gate_config": gate_cfg},
        "eval": {"summary": ev["summary"], "data": ev["setup"]["data"], "tokens_scored": ev["setup"]["tokens_scored"]},
        "corpus": {"totals": manifest["totals"], "files": manifest["files"],
                   "sources": [{k: s[k] for k in ("name", "package", "version", "documents", "input_sha256")}
                               for s in manifest["sources"]]},
        "stage_seconds": timings,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for src, name in ((work / "models/paper-31m/pretrain_log.json", "pretrain_log.json"),
                      (work / "gates/paper-31m-k64/distill_log.json", "distill_log.json"),
                      (work / "reports/paper-31m/eval.json", "eval.json"),
                      (work / "reports/paper-31m/eval.png", "eval.png")):
        if src.is_file():
            shutil.copyfile(src, out / name)
    log(f"summary written to {out / 'summary.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "check", "pretrain", "distill", "eval", "summary"])
    p.add_argument("--corpus", default="data/offline-en")
    p.add_argument("--tokenizer", default="data/gpt2-tokenizer")
    p.add_argument("--work", default="/tmp/paper31m")
    p.add_argument("--out", default="/tmp/out")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--timings", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    a = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as the CLI does: our log lines, not transformers' bars and notices
    hf_logging.set_verbosity_error()
    {"prepare": prepare, "check": check, "pretrain": pretrain, "distill": distill, "eval": evaluate,
     "summary": summary}[a.stage](a)


if __name__ == "__main__":
    main()
