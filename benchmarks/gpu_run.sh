#!/usr/bin/env bash
# One GPU call: GPU-marked tests, then the performance benchmark at Qwen3-1.7B shape. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-300} python -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$OUT/gpu-tests.log"
timeout ${PERF_TIMEOUT:-420} python benchmarks/perf.py --size gpu --parts "${PARTS:-distill,memory,eval,attention,sweep}" \
    --reps "${REPS:-5}" --out "$OUT/perf.json" 2>&1 | tee "$OUT/perf.log"
