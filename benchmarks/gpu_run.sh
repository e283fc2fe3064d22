#!/usr/bin/env bash
# One GPU call: the carried wheels, the GPU-marked tests, then benchmark parts at Qwen3-1.7B shape; results under
# $OUT. Settings: TESTS (test paths, default all), TEST_TIMEOUT, PARTS, REPS, PERF_TIMEOUT (seconds; keep the sum
# under the device's 600 s per command).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
# Packages the GPU image lacks (datasets, dill, multiprocess), carried as wheels in .whl/; pyarrow (.whl-pa/) only
# where the image's is older than datasets needs.
if ls .whl/*.whl >/dev/null 2>&1; then
    wheels=(.whl/*.whl)
    if ! $PY -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
        wheels+=(.whl-pa/*.whl)
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# the project itself, so that sparsify_cli imports too (no registry: no build isolation, no dependencies)
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || tail -3 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, triton, datasets, pyarrow; print(torch.__version__, transformers.__version__, \
triton.__version__, datasets.__version__, pyarrow.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
if [ "${TEST_TIMEOUT:-300}" != 0 ]; then
    timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -rfE -p no:cacheprovider -m gpu ${TESTS:-tests} > "$OUT/gpu-tests.log" 2>&1
    echo "tests exit $?"; tail -25 "$OUT/gpu-tests.log"
fi
if [ -n "${PARTS:-distill,eval}" ] && [ "${PERF_TIMEOUT:-240}" != 0 ]; then
    timeout "${PERF_TIMEOUT:-240}" $PY benchmarks/perf.py --size gpu --parts "${PARTS:-distill,eval}" \
        --reps "${REPS:-5}" --out "$OUT/perf.json" > "$OUT/perf.log" 2>&1
    echo "perf exit $?"; tail -40 "$OUT/perf.log"
fi
