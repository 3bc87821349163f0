#!/usr/bin/env bash
# Create .venv and install the known-good pins. Idempotent: a second run only checks a stamp.
# Usage: bash scripts/bootstrap.sh        (called by `make setup`, `make demo`, `make test`)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

# Pins that work together (see docs/stack.md). fbgemm-gpu-cpu where there is no CUDA.
TORCH=torch==2.13.0
TORCHREC=torchrec==1.8.0
TORCHX=torchx==0.7.0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM=fbgemm-gpu==1.8.0
else
  FBGEMM=fbgemm-gpu-cpu==1.8.0
fi
DEPS="tensordict torchmetrics==1.0.3 tqdm pyarrow pyre-extensions numpy iopath pytest pytest-timeout hypothesis matplotlib tensorboard faiss-cpu scikit-learn scipy"

stamp="$VENV/.torchrec_cce-$(echo "$TORCH $TORCHREC $TORCHX $FBGEMM $DEPS" | cksum | cut -d' ' -f1)"
# The fused remap op (torchrec_cce/ops/csrc), JIT-built once per source version into build/;
# without a compiler this prints one notice and the package uses its torch-ops path.
op_stamp="build/.torchrec_cce_ops-$(cat torchrec_cce/ops/csrc/* | cksum | cut -d' ' -f1)"
build_op() {
  if [ ! -f "$op_stamp" ] && "$VENV/bin/python" -m torchrec_cce.ops; then mkdir -p build && touch "$op_stamp"; fi
}
if [ -f "$stamp" ]; then
  build_op
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts"
$PIP "$TORCH"
# torchrec's metadata pulls the CUDA fbgemm-gpu, which breaks CPU hosts: install it without deps.
$PIP "$FBGEMM"
$PIP --no-deps "$TORCHREC"
$PIP "$TORCHX" $DEPS "$TORCH"
$PIP --no-deps -e .
"$VENV/bin/python" -c "import torchrec, fbgemm_gpu, torchx, torchrec_cce; print('bootstrap ok: torch', __import__('torch').__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec,'__version__') else '1.8.0')"
touch "$stamp"
build_op
