#!/usr/bin/env bash
# Several GPU jobs of gpu_units.sh in one call, on every GPU of the machine at once (docs/absorb.md, "In units").
# Each argument is one lane: "GPU JOB [; JOB ...]", its jobs run one after the other on that GPU, the lanes side by
# side. A JOB is "NAME UNIT [KEY=VALUE ...]" (one unit of gpu_units.sh under those recipe overrides; its JSON lands
# in $OUT/NAME/UNIT.json and its log in $OUT/NAME.log) or "NAME --speed MODE:BATCH,..." (the step profile of
# gpu_units.py speed into $OUT/NAME/speed.json). Two lanes may name the same GPU: their jobs then share it.
#     bash benchmarks/gpu_lanes.sh "0 lr2e-3 dense-s0 batch_size=32 lr=2e-3" "1 speed --speed dense:32,dense:64"
# Carry .whl and data/offline-en-plus as for gpu_units.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
JOBS=${JOBS:-/tmp/lanes-out}  # each job's folder and log, packed into $OUT/lanes.tgz at the end
mkdir -p "$OUT" "$JOBS"
[[ $# -gt 0 ]] || { echo "usage: bash benchmarks/gpu_lanes.sh \"GPU NAME UNIT [KEY=VALUE ...]; ...\" ..." >&2; exit 2; }
if ! "$PY" -c "import datasets" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then  # once, before the lanes
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true

job() {  # GPU NAME UNIT|--speed ARGS...
    local gpu=$1 name=$2 what=$3 rc=0
    shift 3
    echo "[$(date +%T)] GPU $gpu: $name $what $*"
    if [[ "$what" == --speed ]]; then
        CUDA_VISIBLE_DEVICES=$gpu "$PY" benchmarks/gpu_units.py speed --out "$JOBS/$name" --work "/tmp/lanes/$name" \
            --speed "$1" > "$JOBS/$name.log" 2>&1 || rc=$?
    else
        local recipe=paper-31m-units sets=()
        for kv in "$@"; do
            if [[ "$kv" == recipe=* ]]; then recipe=${kv#recipe=}; else sets+=("$kv"); fi
        done
        CUDA_VISIBLE_DEVICES=$gpu OUT="$JOBS/$name" WORK="/tmp/lanes/$name" SET="${sets[*]}" RECIPE=$recipe \
            bash benchmarks/gpu_units.sh "$what" > "$JOBS/$name.log" 2>&1 || rc=$?
        [[ -f "$JOBS/$name/$what.json" ]] && cp "$JOBS/$name/$what.json" "$OUT/$name.json"
    fi
    echo "[$(date +%T)] GPU $gpu: $name done (rc $rc)"
    return $rc
}

lane() {  # "GPU JOB; JOB ..."
    local gpu=${1%% *} rest=${1#* } item
    IFS=';' read -ra items <<< "$rest"
    for item in "${items[@]}"; do
        # shellcheck disable=SC2086
        job "$gpu" $item || echo "[$(date +%T)] GPU $gpu: job failed: $item"
    done
}

pids=()
for spec in "$@"; do
    lane "$spec" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
for log in "$JOBS"/*.log; do echo "== $log"; tail -n 4 "$log"; done
tar czf "$OUT/lanes.tgz" -C "$JOBS" .
exit $rc
