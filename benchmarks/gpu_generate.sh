#!/usr/bin/env bash
# Generation as users run it, in one GPU call (under 10 minutes on an H200): the GPU-marked static-cache tests,
# then benchmarks/compiled_generate.py (model.generate with a static cache, compiled, dense against gated; prefill
# and decode timed apart; then PROFILE=8 new tokens under torch.profiler: graph replays or kernel launches) at
# batch 1 and at batch 8. Qwen3-1.7B shape, random weights and gate.
# Results under $OUT: gpu.txt (device, versions), static-tests.log, compiled-b1.json, compiled-b8.json (+ .log).
#     OUT=/tmp/out S=32768 bash benchmarks/gpu_generate.sh
#     OUT=/tmp/out BATCHES=8 GEN_TIMEOUT=540 TESTS=0 bash benchmarks/gpu_generate.sh   # batch 8 alone: its gated compile is long
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # PY, the offline environment
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=${S:-32768}; NEW=${NEW:-32}; K=${K:-2048}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0 skips them (a second call for another batch)
    timeout "${TEST_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_head_topk.py -k "static_caches or left_padded" \
        -rfE 2>&1 | tail -20 | tee "$OUT/static-tests.log"
fi
for b in ${BATCHES:-1 8}; do
    timeout "${GEN_TIMEOUT:-220}" env TORCH_LOGS=recompiles,perf_hints "$PY" benchmarks/compiled_generate.py --size gpu --s "$S" \
        --k "$K" --new "$NEW" --modes "${MODES:-dense,gate}" --batch "$b" --calls "${CALLS:-2}" --profile "${PROFILE:-8}" --out "$OUT/compiled-b$b.json" 2>&1 \
        | tail -40 | tee "$OUT/compiled-b$b.log"
done
