#!/usr/bin/env bash
# GPU check for a machine with one NVIDIA GPU and no network: every loader feedrate can import runs a
# short ResNet-50 AMP training on a small synthetic dataset; one table at the end (loader, decode device,
# img/s, data-wait fraction, AU). Finishes in under 6 minutes on one H100.
#
#   scripts/gpu_check.sh                       # uses the python3 on PATH (it must have torch, torchvision)
#   WHEELS_DIR=/path/to/wheels scripts/gpu_check.sh
#   DEVICE=cpu SAMPLES=256 TEST_SAMPLES=64 SHARD_SIZE=64 BATCH=32 EPOCHS=2 MAX_BATCHES=2 ARCH=small \
#       LOADERS=torchvision,dali scripts/gpu_check.sh     # a rehearsal on a CPU machine
#   DRY_RUN=1 scripts/gpu_check.sh             # the plan; installs what is missing, trains nothing
#
# No virtual environment: the Python that the node has is the one that holds its CUDA build of torch.
# Packages it lacks are installed only from the local wheel folder WHEELS_DIR (never from an index), into
# $GPU_CHECK_DIR/site, which goes first on PYTHONPATH. Required: numpy, pillow, tqdm, pyyaml,
# braceexpand, webdataset (shardgen writes tars with it). Optional: nvidia-dali-cuda120 (without it the
# dali row says why it was skipped). Logs, runs, data and the table land in GPU_CHECK_DIR (default
# results/gpu_check); the other settings are read by scripts/gpu_check.py (see its docstring).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${GPU_CHECK_DIR:-$ROOT/results/gpu_check}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
mkdir -p "$out/logs"
export GPU_CHECK_DIR="$out"
cd "$ROOT"

say() { echo "gpu_check: $*"; }
die() {
    echo "gpu_check: error: $*" >&2
    exit 2
}

PY="${PYTHON:-$(command -v python3 || true)}"
[ -n "$PY" ] || die "no python3 on PATH; set PYTHON to the interpreter that has torch and torchvision"
ENV_PROBE='
import sys, torch, torchvision
print("python:", sys.executable, sys.version.split()[0])
print("torch:", torch.__version__, "torchvision:", torchvision.__version__)
print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available")
'
"$PY" -c "$ENV_PROBE" >"$out/env.txt" 2>/dev/null ||
    die "$PY cannot import torch and torchvision; set PYTHON to the interpreter that has them"

SITE="$out/site"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
REQUIRED="numpy:numpy PIL:pillow tqdm:tqdm yaml:pyyaml braceexpand:braceexpand webdataset:webdataset"
OPTIONAL="nvidia.dali:nvidia-dali-cuda120"
MISSING_PROBE='
import importlib, sys
for pair in sys.argv[1:]:
    module, package = pair.split(":")
    try:
        importlib.import_module(module)
    except Exception:
        print(package)
'

missing() { # the packages (of module:package pairs) whose module does not import; one interpreter
    "$PY" -c "$MISSING_PROBE" "$@"
}

install_wheel() { # one package from WHEELS_DIR into $SITE, without dependencies (we name them all)
    local pkg="$1" norm wheel
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS_DIR" \
            --no-deps --no-compile --upgrade --target "$SITE" "$pkg" >>"$out/logs/install.log" 2>&1 && return 0
    else # no pip: a wheel is a zip laid out for site-packages
        norm="$(echo "$pkg" | tr 'A-Z-' 'a-z_')"
        wheel="$(find "$WHEELS_DIR" -maxdepth 1 -iname "${norm}-*.whl" | sort | tail -n 1)"
        [ -n "$wheel" ] && "$PY" -m zipfile -e "$wheel" "$SITE" >>"$out/logs/install.log" 2>&1 && return 0
    fi
    return 1
}

# shellcheck disable=SC2086  # word splitting of the pair lists is intended
need="$(missing $REQUIRED $OPTIONAL)"
if [ -n "$need" ]; then
    if [ -n "${WHEELS_DIR:-}" ]; then
        [ -d "$WHEELS_DIR" ] || die "WHEELS_DIR=$WHEELS_DIR is not a directory"
        mkdir -p "$SITE"
        for pkg in $need; do
            if install_wheel "$pkg"; then
                say "installed $pkg from $WHEELS_DIR"
            else
                say "no usable wheel for $pkg in $WHEELS_DIR"
            fi
        done
    else
        say "not installed: $(echo $need); set WHEELS_DIR to a folder of wheels to install them"
    fi
fi
# shellcheck disable=SC2086
still="$(missing $REQUIRED)"
[ -z "$still" ] || die "required packages missing: $(echo $still) (put their wheels in WHEELS_DIR)"

{
    echo "date: $(date -u +%FT%TZ)"
    "$PY" -c 'import nvidia.dali as d; print("dali:", d.__version__)' 2>/dev/null || echo "dali: not importable"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    fi
} >>"$out/env.txt" 2>&1
sed 's/^/gpu_check: /' "$out/env.txt"

exec "$PY" scripts/gpu_check.py
