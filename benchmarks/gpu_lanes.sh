#!/usr/bin/env bash
# Several GPU jobs of gpu_units.sh in one call, on every GPU of the machine at once (docs/absorb.md, "In units").
# Each argument is one lane: "GPU JOB[; JOB ...]"; a lane's jobs run one after the other on that GPU, the lanes side
# by side (two lanes may name the same GPU: their jobs then share it; a lane may name several, "0,1": its units then
# train their model data parallel over them, gpu_units.py run --train-processes, and do the rest on the first). A JOB
# is one of
#     NAME UNIT [recipe=NAME] [KEY=VALUE ...]   one unit of gpu_units.sh under that recipe (default paper-31m-units)
#                                               and those overrides
#     NAME --speed MODE:BATCH,... [--compile]   the step profile of `gpu_units.py speed` (the default recipe;
#                                               --compile: the soft relaxation under torch.compile)
#     NAME --decode [PARTS]                     benchmarks/gpu_decode.sh: the GPU-marked decode tests, then the
#                                               decode benchmark (PARTS, default decode_attention,decode_model)
#     NAME --tests PATH...                      the GPU-marked tests of those files or test ids (pytest -m gpu)
#     bash benchmarks/gpu_lanes.sh "0 s1 soft-learned-s1" "1 d0 dense-s0; d1 dense-s1"
# Each job writes into $JOBS/NAME/ and logs to $JOBS/NAME.log ($JOBS: /tmp/lanes-out, emptied first). Jobs of one
# recipe and the same overrides share a work folder, /tmp/lanes/<hash>/<unit>: a sweep-sN after dense-sN in a lane
# reuses its trained model and gate (units.py, _borrow_dense). A call brings
# back only a few files (8), so at the end all of $JOBS is packed into $OUT/lanes.tgz, and each unit that succeeded
# also puts its JSON at $OUT/NAME.json: at most 7 jobs a call. The exit status is 1 if any job failed.
# Carry .whl and data/offline-en-plus as for gpu_units.sh. LIMIT (seconds, default 570; 0: none) bounds the jobs:
# a job still running LIMIT seconds after the start is stopped (and counts as failed), one not yet started is skipped,
# so the logs are packed and come back before a 600-second call ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # PY, the offline environment, install_wheels
OUT=${OUT:-/tmp/out}
JOBS=${JOBS:-/tmp/lanes-out}
LIMIT=${LIMIT:-570}
START=$(date +%s)
die() { echo "gpu_lanes.sh: $*" >&2; exit 2; }
[[ $# -gt 0 ]] || die "usage: bash benchmarks/gpu_lanes.sh \"GPU NAME UNIT [KEY=VALUE ...][; ...]\" ..."

# check every lane before anything runs: a GPU index, at least one job, each job NAME UNIT..., names unique
names=()
runs=()
for spec in "$@"; do
    gpu=${spec%% *}
    [[ "$gpu" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "lane '$spec': it starts with a GPU index (or several: 0,1)"
    IFS=';' read -ra items <<< "${spec#"$gpu"}"
    jobs_here=0
    for item in "${items[@]}"; do
        read -ra words <<< "$item"
        [[ ${#words[@]} -eq 0 ]] && continue
        [[ ${#words[@]} -ge 2 ]] || die "job '$item': needs NAME UNIT (or NAME --speed MODE:BATCH,...)"
        if [[ "${words[1]}" == --tests ]]; then
            [[ ${#words[@]} -ge 3 ]] || die "job '$item': --tests needs at least one test file or id"
        elif [[ "${words[1]}" == --decode ]]; then
            [[ ${#words[@]} -le 3 ]] || die "job '$item': --decode takes one PARTS list or nothing"
        elif [[ "${words[1]}" == --speed ]]; then
            [[ ${#words[@]} -eq 3 || ( ${#words[@]} -eq 4 && "${words[3]}" == --compile ) ]] \
                || die "job '$item': --speed takes one MODE:BATCH list, then --compile or nothing"
        fi
        for n in "${names[@]}"; do [[ "$n" != "${words[0]}" ]] || die "two jobs are named ${words[0]}"; done
        for w in "${runs[@]}"; do [[ "$w" != "${words[*]:1}" ]] || die "two jobs run ${words[*]:1}"; done
        names+=("${words[0]}")
        runs+=("${words[*]:1}")
        jobs_here=$((jobs_here + 1))
    done
    [[ $jobs_here -gt 0 ]] || die "lane '$spec' has no job"
done
[[ ${#names[@]} -le 7 ]] || die "${#names[@]} jobs: a call brings back 8 files (lanes.tgz and one JSON per job)"

rm -rf "$JOBS"
mkdir -p "$OUT" "$JOBS"
install_wheels  # once, before the lanes
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true

limited() {  # CMD...: under the time left before LIMIT (exit 124 when stopped or not started)
    [[ "$LIMIT" -gt 0 ]] || { "$@"; return; }
    local left=$((LIMIT - ($(date +%s) - START)))
    [[ $left -gt 5 ]] || return 124
    timeout --kill-after=10 "$left" "$@"
}

job() {  # GPU NAME UNIT|--speed ARGS...
    local gpu=$1 name=$2 what=$3 rc=0
    shift 3
    echo "[$(date +%T)] GPU $gpu: $name $what $*"
    if [[ "$what" == --tests ]]; then
        mkdir -p "$JOBS/$name"
        CUDA_VISIBLE_DEVICES=$gpu limited "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfE \
            --junitxml "$JOBS/$name/junit.xml" "$@" > "$JOBS/$name.log" 2>&1 || rc=$?
    elif [[ "$what" == --decode ]]; then
        CUDA_VISIBLE_DEVICES=$gpu OUT="$JOBS/$name" PARTS="${1:-decode_attention,decode_model}" \
            limited bash benchmarks/gpu_decode.sh > "$JOBS/$name.log" 2>&1 || rc=$?
        if [[ $rc -eq 0 && -f "$JOBS/$name/decode.json" ]]; then cp "$JOBS/$name/decode.json" "$OUT/$name.json"; fi
    elif [[ "$what" == --speed ]]; then
        CUDA_VISIBLE_DEVICES=$gpu limited "$PY" benchmarks/gpu_units.py speed --out "$JOBS/$name" --work "/tmp/lanes/$name" \
            --speed "$@" > "$JOBS/$name.log" 2>&1 || rc=$?
    else
        local recipe=paper-31m-units sets=() kv
        for kv in "$@"; do
            if [[ "$kv" == recipe=* ]]; then recipe=${kv#recipe=}; else sets+=("$kv"); fi
        done
        local work
        work=/tmp/lanes/$(echo "$recipe ${sets[*]}" | md5sum | cut -c1-12)
        local gpus
        IFS=',' read -ra gpus <<< "$gpu"  # a lane over several GPUs trains its units' models on all of them
        CUDA_VISIBLE_DEVICES=$gpu OUT="$JOBS/$name" WORK="$work" SET="${sets[*]}" RECIPE=$recipe \
            TRAIN_PROCESSES=${#gpus[@]} limited bash benchmarks/gpu_units.sh "$what" > "$JOBS/$name.log" 2>&1 || rc=$?
        if [[ $rc -eq 0 && -f "$JOBS/$name/$what.json" ]]; then cp "$JOBS/$name/$what.json" "$OUT/$name.json"; fi
    fi
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "[$(date +%T)] GPU $gpu: $name stopped or skipped: LIMIT of $LIMIT s"
    else
        echo "[$(date +%T)] GPU $gpu: $name done (rc $rc)"
    fi
    return $rc
}

lane() {  # GPU JOB...
    local gpu=$1 failed=0 item words
    shift
    for item in "$@"; do
        read -ra words <<< "$item"
        [[ ${#words[@]} -eq 0 ]] && continue
        job "$gpu" "${words[@]}" || { echo "[$(date +%T)] GPU $gpu: job failed: $item"; failed=1; }
    done
    return $failed
}

pids=()
for spec in "$@"; do
    gpu=${spec%% *}
    IFS=';' read -ra items <<< "${spec#"$gpu"}"
    lane "$gpu" "${items[@]}" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
shopt -s nullglob
for log in "$JOBS"/*.log; do echo "== $log"; tail -n 4 "$log" || true; done
tar czf "$OUT/lanes.tgz" -C "$JOBS" .
exit $rc
