#!/usr/bin/env bash
# The absorption evidence in GPU units, one call each (docs/absorb.md, "In units"; the plan: `bash
# benchmarks/gpu_units.sh --plan`). Each unit trains one 31M model from scratch and runs everything that needs it,
# under 8 minutes on one H100/H200, and writes $OUT/<unit>.json (small: no weights). A unit whose JSON is already
# in its recipe's folder (docs/data/units; docs/data/units-plateau for paper-31m-plateau) with the same fingerprint
# is reused, not recomputed.
#
# On the CPU machine first (the venv active; both folders are git-ignored, together under 64 MiB):
#     bash benchmarks/gpu_units.sh --prepare     # data/offline-en-plus (every corpus source) and .whl/ (wheels)
# On the GPU machine, carrying .whl and data/offline-en-plus (run tool: carry [".whl", "data/offline-en-plus"]):
#     bash benchmarks/gpu_units.sh dense-s0 [UNIT...]
#     bash benchmarks/gpu_units.sh --recipe paper-31m-plateau dense-s0   # the reference trained to its plateau
#     bash benchmarks/gpu_units.sh --probe [UNIT...]     # first time each mode (~1 min), then the units
#     bash benchmarks/gpu_units.sh --speed [UNIT...]     # where a step's time goes (profiler, ~2 min), then units
#     PARALLEL=1 bash benchmarks/gpu_units.sh dense-s1 dense-s2   # several units at once, one process each, one
#                                                 # GPU each where there are several (else they share the one)
# Back here: copy $OUT/<unit>.json into the recipe's folder, commit it, and rebuild the report:
#     python benchmarks/gpu_units.py aggregate   # docs/data/absorb-31m-units/{absorb.json,summary.md,*.png}
#     python benchmarks/gpu_units.py aggregate --recipe paper-31m-plateau   # docs/data/absorb-31m-plateau/
# Environment: OUT (/tmp/out), WORK (/tmp/units: models and gates, never brought back), PYTHON (python3),
# SET ("KEY=VALUE ..." overrides of the recipe, for smoke tests), RECIPE (as --recipe), TRAIN_PROCESSES (N: each
# unit's model trains data parallel over the first N visible GPUs, the rest of the unit on one; gpu_lanes.sh sets it
# for a lane over several GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # PY, the offline environment, install_wheels
DRIVER=benchmarks/gpu_units.py
recipe=(--recipe "${RECIPE:-paper-31m-units}")
if [[ "${1:-}" == --recipe ]]; then
    [[ $# -ge 2 ]] || { echo "gpu_units.sh: --recipe needs a name (recipes/NAME.toml)" >&2; exit 2; }
    recipe=(--recipe "$2")
    shift 2
fi
train=()  # TRAIN_PROCESSES=N: each unit's model trains data parallel over N GPUs (torchrun), the rest on one
if [[ "${TRAIN_PROCESSES:-1}" != 1 ]]; then train=(--train-processes "$TRAIN_PROCESSES"); fi
if [[ -n "${PARALLEL:-}" && ${#train[@]} -gt 0 ]]; then
    echo "gpu_units.sh: PARALLEL gives each unit one GPU; it cannot take TRAIN_PROCESSES" >&2; exit 2
fi
case "${1:-}" in
    --prepare) exec "$PY" "$DRIVER" prepare ;;
    --plan) exec "$PY" "$DRIVER" plan "${recipe[@]}" "${train[@]}" ;;
    --probe) shift; set -- __probe__ "$@" ;;
    --speed) shift; set -- __speed__ "$@" ;;
    "") echo "usage: bash benchmarks/gpu_units.sh [--recipe NAME] UNIT... | --prepare | --plan" >&2; exit 2 ;;
esac
for unit in "$@"; do  # an option after the units would reach the driver after ours and silently win
    [[ "$unit" != -* ]] || { echo "gpu_units.sh: options go before the units (got $unit)" >&2; exit 2; }
done
echo "recipe ${recipe[1]}"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
install_wheels  # the GPU image lacks them
"$PY" -c "import datasets, pyarrow; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" \
    || { echo "datasets does not import here: carry .whl (bash benchmarks/gpu_units.sh --prepare)" >&2; exit 2; }
[[ -f data/offline-en-plus/manifest.json ]] \
    || { echo "no corpus at data/offline-en-plus: build it with --prepare and carry it" >&2; exit 2; }
sets=()
read -ra setwords <<< "${SET:-}"  # split on spaces, no glob expansion
for kv in "${setwords[@]}"; do sets+=(--set "$kv"); done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS: a repeated unit reproduces its numbers
set -o pipefail
if [[ "$1" == __speed__ ]]; then  # where a training step's time goes, before the units
    shift
    "$PY" "$DRIVER" speed --out "$OUT" --work "${WORK:-/tmp/units}" "${recipe[@]}" "${sets[@]}" 2>&1 | tee "$OUT/speed.log"
    [[ $# -eq 0 ]] && exit 0
fi
if [[ "$1" == __probe__ ]]; then  # time each mode here and re-estimate the plan (before the long units)
    shift
    "$PY" "$DRIVER" probe --out "$OUT" --work "${WORK:-/tmp/units}" "${recipe[@]}" "${sets[@]}" 2>&1 | tee "$OUT/probe.log"
    [[ $# -eq 0 ]] && exit 0
fi
if [[ -n "${PARALLEL:-}" && $# -gt 1 ]]; then  # one process per unit, all at once, spread over the GPUs
    pids=()
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then  # the caller's GPUs, else every GPU (not MIG instances)
        IFS=',' read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
    else
        mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
    fi
    for unit in "$@"; do
        gpu=()  # one GPU per unit in turn
        if [[ ${#gpus[@]} -gt 1 ]]; then gpu=(env CUDA_VISIBLE_DEVICES="${gpus[$((${#pids[@]} % ${#gpus[@]}))]}"); fi
        "${gpu[@]}" "$PY" "$DRIVER" run "$unit" --out "$OUT" --work "${WORK:-/tmp/units}" "${recipe[@]}" "${sets[@]}" \
            > "$OUT/units-$unit.log" 2>&1 &
        pids+=($!)
    done
    rc=0
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { rc=1; echo "unit ${@:$((i + 1)):1} failed: see units-${@:$((i + 1)):1}.log" >&2; }
    done
    for unit in "$@"; do tail -n 3 "$OUT/units-$unit.log" || true; done
    exit $rc
fi
"$PY" "$DRIVER" run "$@" --out "$OUT" --work "${WORK:-/tmp/units}" "${recipe[@]}" "${sets[@]}" "${train[@]}" 2>&1 \
    | tee "$OUT/units.log"
