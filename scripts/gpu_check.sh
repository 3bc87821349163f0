#!/usr/bin/env bash
# GPU check of torchrec_cce's CUDA kernels (scripts/gpu_check.py): builds the op library with
# remap_cuda.cu, checks every remap stream kind against the CPU kernel and a pure-torch
# reference on random inputs, times CUDA vs CPU, prints one summary line. Needs only torch
# (>= 2.4), a C++ compiler, nvcc and ninja; no TorchRec, no fbgemm-gpu, no network.
# Without CUDA it runs the CPU-side checks and says "no CUDA: GPU part skipped".
#   scripts/gpu_check.sh [--seeds N] [--timing-batch B] [--cpu-only] [-v]
#   PYTHON=/path/to/python scripts/gpu_check.sh     (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PATH="$(dirname "$(command -v "$PY")"):$PATH"  # a venv's ninja (pip install ninja)
if ! command -v ninja >/dev/null 2>&1; then
  echo "gpu_check: FAIL: ninja not found (torch.utils.cpp_extension needs it: pip install ninja," \
       "or put a ninja binary on PATH)"
  exit 1
fi
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" scripts/gpu_check.py "$@"
