#!/usr/bin/env bash
# Issue 21 in one GPU call (under 8 minutes on an H200): the GPU-marked decode tests, then the decode benchmark
# (one layer's call kernel by kernel, one layer's decode attention and the whole model's decode tokens/s, dense
# against gated, Qwen3-1.7B shape).
# Results under $OUT: gpu.txt (device, versions), decode-tests.log, decode.json (+ decode.log).
#     OUT=/tmp/out bash benchmarks/gpu_decode.sh
# (benchmarks/gpu_lanes.sh runs it as a job: NAME --decode [PARTS].)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # PY, the offline environment
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-180}" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_decode.py tests/test_graphs.py \
    -k "decode" -rfE 2>&1 | tail -40 | tee "$OUT/decode-tests.log"
timeout "${PERF_TIMEOUT:-270}" "$PY" benchmarks/perf.py --size gpu --parts "${PARTS:-decode_profile,decode_attention,decode_model}" \
    --reps "${REPS:-3}" --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log"
