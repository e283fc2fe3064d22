# Sourced from the repository root by gpu_units.sh and gpu_lanes.sh: the environment of a GPU call (offline, the
# project on PYTHONPATH, PY the interpreter), and install_wheels, which installs the carried wheels the GPU image
# lacks (.whl/: datasets and its dependencies) into /tmp/site, once: when datasets already imports it does nothing.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}

install_wheels() {
    if ! "$PY" -c "import datasets" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
}
