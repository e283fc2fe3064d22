#!/usr/bin/env bash
# Data-parallel scaling of distill and eval (docs/multi-gpu.md): tokens/s on 1 GPU and on 2 GPUs, each
# launched with `accelerate launch`, on a random-init model of Qwen3-1.7B's shape (benchmarks/harness.py,
# SIZES["gpu"]; bf16), windows of T=2048 tokens, batch 1 per GPU (weak scaling: each GPU does the same work).
# Scaling efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU). Writes $OUT/multi_gpu.json, one JSON per
# run and the logs; under 8 minutes (DEADLINE seconds, default 450, bounds every launch).
#
#   bash benchmarks/multi_gpu.sh            # from the repository root, on a machine with 2 GPUs, offline
#   SMOKE=1 bash benchmarks/multi_gpu.sh    # the same flow on the CPU: small model, 2 gloo processes (torchrun)
#
# The text is made up: 151,936 word types ("w0" ... ) and a word-level tokenizer over them (the `tokenizers`
# library), documents of uniformly random words. Neither speed nor top-k work depends on the content, and a
# random-init model has no use for real text. Distill tokens/s: median over steps after the first MG_WARM
# (step times exclude validation); eval tokens/s: tokens scored / seconds per mode, after a warm-up pass.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0  # keep NVLink multicast off
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
DEADLINE=${DEADLINE:-450}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
if [ "$SMOKE" = 1 ]; then
    export MG_SIZE=cpu MG_T=128 MG_STEPS=8 MG_WARM=3 MG_K=16 MG_EVAL_WINDOWS=4 MG_DEVICE=cpu OMP_NUM_THREADS=1
else
    export MG_SIZE=gpu MG_T=2048 MG_STEPS=40 MG_WARM=5 MG_K=64 MG_EVAL_WINDOWS=32 MG_DEVICE=auto
fi

{
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null && nvidia-smi topo -m 2>/dev/null
    python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee "$OUT/env.txt"

# --- a model folder (random init, saved with save_pretrained), a word-level tokenizer, a text file ----------
python - "$WORK" <<'EOF' 2>&1 | tee "$OUT/setup.log"
import os, random, sys, time
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config
from benchmarks.harness import SIZES  # PYTHONPATH holds the repository root

work, t0 = sys.argv[1], time.time()
cfg = Qwen3Config(**SIZES[os.environ["MG_SIZE"]])
cuda = torch.cuda.is_available() and os.environ["MG_DEVICE"] != "cpu"
torch.manual_seed(0)
with torch.device("cuda" if cuda else "cpu"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32)
model.save_pretrained(f"{work}/model")
vocab = {f"w{i}": i for i in range(cfg.vocab_size - 1)} | {"<eos>": cfg.vocab_size - 1}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>").save_pretrained(f"{work}/model")
# Enough for every train step's windows and, in the ~5% of documents held out, the eval windows.
T, windows = int(os.environ["MG_T"]), int(os.environ["MG_EVAL_WINDOWS"])
n_docs, words = max(400, 40 * windows * T // 500), 500
rng = random.Random(0)
with open(f"{work}/text.txt", "w") as f:
    for _ in range(n_docs):
        f.write(" ".join(f"w{i}" for i in rng.choices(range(cfg.vocab_size - 1), k=words)) + "\n\n")
print(f"model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params), tokenizer and {n_docs} documents "
      f"in {time.time() - t0:.0f} s")
EOF

# --- one measured run per launch: the library calls `sparsify distill` / `sparsify eval` make ----------------
cat > "$WORK/run.py" <<'EOF'
import json, os, statistics, sys
from pathlib import Path

import torch

from posthoc_sparse.config import DistillConfig
from posthoc_sparse.distill.loop import distill
from posthoc_sparse.evaluate.perplexity import EvalConfig, evaluate_perplexity
from posthoc_sparse.parallel import is_main_process

mode, label, work, out = sys.argv[1:5]
T, steps, warm, k = (int(os.environ[key]) for key in ("MG_T", "MG_STEPS", "MG_WARM", "MG_K"))
world, device = int(os.environ.get("WORLD_SIZE", "1")), os.environ["MG_DEVICE"]
record = {"mode": mode, "processes": world, "seq_len": T, "batch_per_process": 1, "k": k}
if mode == "distill":
    res = distill(DistillConfig(model=f"{work}/model", dataset=f"{work}/text.txt", output=f"{work}/gates-{label}",
                                k=k, steps=steps, seq_len=T, batch_size=1, warmup=2, val_every=10**6,
                                val_windows=world, checkpoint_every=10**6, max_train_windows=steps * world,
                                device=device, overwrite=True))
    timed = res.history[warm:]
    record |= {"tokens_per_second": statistics.median(h["tokens_per_second"] for h in timed),
               "seconds_per_step": statistics.median(h["seconds"] for h in timed), "steps_timed": len(timed),
               "tokens_per_step": T * world, "tokens_per_second_with_validation": res.tokens_per_second}
else:
    common = dict(gates=f"{work}/gates-1gpu", k=str(k), modes="dense,gate", batch_size=1, device=device)
    evaluate_perplexity(EvalConfig(max_windows=world, **common))  # warm-up: one window per process
    report = evaluate_perplexity(EvalConfig(max_windows=int(os.environ["MG_EVAL_WINDOWS"]), **common))
    record |= {"windows": report.setup["windows"], "tokens": report.results[0].tokens, "modes": {
        r.mode: {"tokens_per_second": r.tokens / r.seconds, "seconds": r.seconds, "perplexity": r.perplexity}
        for r in report.results}}
if is_main_process():
    record["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and device != "cpu" else "cpu"
    Path(out, f"{mode}-{label}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
EOF

launch() {  # launch N_PROCESSES MODE LABEL: one run, bounded by what is left of DEADLINE
    local n=$1 mode=$2 label=$3 left=$((DEADLINE - SECONDS - 15)) cmd
    local limit=$((left < 180 ? left : 180))
    if ((limit < 20)); then echo "skipped $mode on $n: out of time" | tee -a "$OUT/log.txt"; return 1; fi
    if [ "$SMOKE" = 1 ]; then
        cmd=(python -m torch.distributed.run --standalone --nproc_per_node "$n")
    elif ((n == 1)); then
        cmd=(env CUDA_VISIBLE_DEVICES=0 python -m accelerate.commands.launch --num_processes 1 --num_machines 1
             --mixed_precision no --dynamo_backend no)
    else
        cmd=(python -m accelerate.commands.launch --multi_gpu --num_processes "$n" --num_machines 1
             --mixed_precision no --dynamo_backend no)
    fi
    echo "=== $mode, $n process(es): ${cmd[*]} $WORK/run.py $mode $label (limit ${limit}s)" | tee -a "$OUT/log.txt"
    timeout -k 10 "$limit" "${cmd[@]}" "$WORK/run.py" "$mode" "$label" "$WORK" "$OUT" >>"$OUT/log.txt" 2>&1
    local rc=$?
    echo "    rc=$rc after ${SECONDS}s" | tee -a "$OUT/log.txt"
    return $rc
}

NGPU=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
two() {  # the 2-process launches need 2 GPUs (or SMOKE); on one GPU this records the 1-GPU baseline only
    if [ "$SMOKE" = 1 ] || ((NGPU >= 2)); then launch 2 "$@"; else
        echo "skipped $1 on 2 GPUs: this machine has $NGPU GPU(s); 1-GPU baseline only" | tee -a "$OUT/log.txt"; fi
}
launch 1 distill 1gpu
two distill 2gpu
launch 1 eval 1gpu
two eval 2gpu

python - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in out.glob("*-[12]gpu.json")}
rows, summary = [], {"runs": runs, "efficiency": {}}
def add(name, one, two):
    if one and two:
        eff = two / (2 * one)
        summary["efficiency"][name] = eff
        rows.append(f"| {name} | {one:,.0f} | {two:,.0f} | {two / one:.2f}x | {eff:.1%} |")
    else:
        rows.append(f"| {name} | {one or '-'} | {two or '-'} | - | - (a run is missing; see log.txt) |")
d1, d2 = runs.get("distill-1gpu", {}), runs.get("distill-2gpu", {})
add("distill", d1.get("tokens_per_second"), d2.get("tokens_per_second"))
e1, e2 = runs.get("eval-1gpu", {}).get("modes", {}), runs.get("eval-2gpu", {}).get("modes", {})
for mode in ("dense", "gate"):
    add(f"eval {mode}", e1.get(mode, {}).get("tokens_per_second"), e2.get(mode, {}).get("tokens_per_second"))
head = ["| workload | tokens/s, 1 GPU | tokens/s, 2 GPUs | speed-up | scaling efficiency |", "|---|---|---|---|---|"]
print("\n".join(head + rows))
(out / "multi_gpu.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
EOF
echo "done in ${SECONDS}s; results in $OUT"
