#!/usr/bin/env bash
# bench/gpu_7b.py on a GPU machine that has torch and no network, in one command.
#
#   bash bench/gpu_device.sh fetch              # here, with the package index: the wheels it lacks -> .whl/
#                                               # (for the device's Python 3.12; PYTHON_VERSION=3.11 to rehearse here)
#   bash bench/gpu_device.sh run [ARGS...]      # there: install .whl/ beside its torch, run the bench
#
# `run` passes ARGS to bench/gpu_7b.py (default: --train-only --steps 6) and writes the results to
# $OUT/gpu_7b.json and the log to $OUT/gpu_7b.log when OUT is set (the device tool's folder). The
# versions are the lock's (constraints.txt), so the figures are for the tested set; the machine's own
# torch is used (a CUDA torch wheel is too large to carry). unsloth is not carried: its wheel and
# bitsandbytes' alone exceed what one call carries, and it pins older transformers and trl (the
# bench reports it as not run, with that reason). `run --cpu-check` rehearses the whole path on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacks, or has at another version than the lock's (see the device tool's KINDS.md).
PACKAGES=(trl bitsandbytes transformers peft accelerate datasets dill multiprocess hydra-core omegaconf
    antlr4-python3-runtime)

pinned() { grep -i "^$1==" constraints.txt | head -1; }

case "${1:-}" in
fetch)
    rm -rf .whl && mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    for name in "${PACKAGES[@]}"; do
        spec="$(pinned "$name")"
        [ -n "$spec" ] || { echo "error: constraints.txt pins no $name" >&2; exit 1; }
        # A pure-Python sdist (antlr4-python3-runtime) is built into a wheel here; the rest are wheels.
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec" 2>/dev/null ||
            python3 -m pip wheel -q --no-deps -w .whl "$spec"
    done
    du -ch .whl/*.whl | tail -1
    ;;
run)
    shift
    [ -d .whl ] || { echo "error: no .whl/ here: run 'bash bench/gpu_device.sh fetch' first, then carry .whl" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    out="${OUT:-$PWD}"
    args=("$@")
    [ ${#args[@]} -gt 0 ] || args=(--train-only --steps 6)
    nvidia-smi 2>/dev/null | head -15 || true
    python3 bench/gpu_7b.py "${args[@]}" --work /tmp/gpu-7b --out "$out/gpu_7b.json" 2>&1 | tee "$out/gpu_7b.log"
    ;;
*)
    echo "usage: bash bench/gpu_device.sh fetch | run [bench/gpu_7b.py arguments]" >&2
    exit 2
    ;;
esac
