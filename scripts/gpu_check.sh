#!/usr/bin/env bash
# GPU check of torchrec_cce's CUDA kernels (scripts/gpu_check.py): builds the op library with
# remap_cuda.cu, checks every remap stream kind against the CPU kernel and a pure-torch
# reference on random inputs, times CUDA vs CPU, prints one summary line. Needs only torch
# (>= 2.4), a C++ compiler and nvcc (ninja optional: without it setuptools builds); no TorchRec,
# no fbgemm-gpu, no network.
# Without CUDA it runs the CPU-side checks and says "no CUDA: GPU part skipped".
#   scripts/gpu_check.sh [--seeds N] [--timing-batch B] [--cpu-only] [--no-ninja] [-v]
#   PYTHON=/path/to/python scripts/gpu_check.sh     (default: python3)
#   GPU_CHECK_TIMEOUT=seconds (default 480); TORCHREC_CCE_BUILD_DIR: where the library is built
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PATH="$(dirname "$(command -v "$PY")"):$PATH"  # a venv's ninja, if any (else setuptools builds)
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" scripts/gpu_check.py "$@"
