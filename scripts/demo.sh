#!/usr/bin/env bash
# README's first command (`make demo`): a short 2-process TorchX (local_cwd) DLRM + CCE run on
# synthetic Criteo-shaped data, 2 epochs with a validation split evaluated at each epoch's end.
# Prints the best epoch (lowest val log loss) and its val/test log loss and AUC, the Bayes floor,
# memory before/after compression; writes runs/demo/metrics.json and runs/demo/loss_curve.png.
set -euo pipefail
cd "$(dirname "$0")/.."
# torchx's ddp component starts `torchrun`, which must be on PATH: use the project's venv.
export PATH="$PWD/.venv/bin:$PATH"
# torchrun sets it to 1 anyway, with a banner when it is unset
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out=runs/demo
mkdir -p "$out"
start=$(date +%s)
torchx run -s local_cwd launch/components.py:dlrm -j 1x2 --cpu 1 --memMB 4096 -- \
  --data synthetic --method cce --epochs 2 --batch-size 512 --warmup-steps 20 \
  --synthetic-train-batches 160 --synthetic-val-batches 20 --synthetic-test-batches 40 \
  --recluster-at 0.25,0.5 --no-progress \
  --metrics-json "$out/metrics.json" --loss-curve-png "$out/loss_curve.png" \
  --tensorboard-dir "$out/tb" ${DEMO_ARGS:-}
echo "demo finished in $(( $(date +%s) - start )) s; metrics: $out/metrics.json; loss curve: $out/loss_curve.png"
