"""Test log loss / AUC of every method at the same embedding budget, side by side in one run.

    .venv/bin/python benchmarks/quality.py                 # ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/quality.py --quick         # a smoke run

Each method trains the same DLRM on the same synthetic Criteo-shaped data (planted cluster
structure, Zipf ids; the generator reports the Bayes-optimal log loss) with the paper's
protocol: every table above ``--max-params-per-table`` is compressed to that many parameters,
smaller tables stay full. Each run is ``examples/dlrm/train.py`` under ``torchrun`` with 2
processes. Results: ``benchmarks/results/quality.json`` and a PNG bar chart.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
METHODS = ["full", "hashing", "ce", "qr", "memcom", "cce_no_recluster", "cce"]


def run(method: str, args: argparse.Namespace, workdir: str) -> dict:
    out = os.path.join(workdir, f"{method}.json")
    real = "cce" if method.startswith("cce") else method
    cmd = [os.path.join(ROOT, ".venv", "bin", "torchrun"), "--standalone", "--nproc_per_node",
           str(args.nproc), os.path.join(ROOT, "examples", "dlrm", "train.py"),
           "--data", "synthetic", "--method", real, "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--synthetic-scale", str(args.scale),
           "--synthetic-train-batches", str(args.train_batches),
           "--synthetic-test-batches", str(args.test_batches),
           "--max-params-per-table", str(args.max_params), "--no-progress",
           "--metrics-json", out]
    if method == "cce":
        cmd += ["--recluster-at", args.recluster_at]
    if real == "memcom" and args.nproc > 1:
        # MEmCom's per-id weights are not shardable yet: train it in one process.
        cmd[cmd.index("--nproc_per_node") + 1] = "1"
        cmd[cmd.index("--batch-size") + 1] = str(args.batch_size * args.nproc)
    env = dict(os.environ, PATH=os.path.join(ROOT, ".venv", "bin") + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr[-3000:]}
    with open(out) as f:
        m = json.load(f)
    keys = ["test_logloss", "test_auc", "bayes_logloss", "embedding_params", "embedding_bytes",
            "full_embedding_bytes", "compression_ratio_params", "compression_ratio_bytes",
            "train_samples_per_s", "recluster_seconds", "wall_seconds", "world_size"]
    return {"method": method, **{k: m[k] for k in keys}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--scale", type=float, default=0.001)
    p.add_argument("--train-batches", type=int, default=800)
    p.add_argument("--test-batches", type=int, default=80)
    p.add_argument("--max-params", type=int, default=8192)
    p.add_argument("--recluster-at", default="0.1,0.25,0.5")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality.json"))
    args = p.parse_args()
    if args.quick:
        args.train_batches, args.test_batches = 32, 8
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for method in args.methods.split(","):
            row = run(method, args, workdir)
            rows.append(row)
            if "error" in row:
                print(f"{method:<18} FAILED\n{row['error']}", flush=True)
            else:
                print(f"{method:<18} logloss {row['test_logloss']:.4f}  AUC {row['test_auc']:.4f}  "
                      f"params {row['embedding_params']:>9,}  ({row['compression_ratio_params']:.1f}x)  "
                      f"{row['train_samples_per_s']:.0f} samples/s", flush=True)
    result = {"config": vars(args), "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, args.out.replace(".json", ".png"))


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["method"] for r in ok], [r["test_logloss"] for r in ok], color="C0")
    floor = ok[0]["bayes_logloss"]
    ax.axhline(floor, color="k", ls="--", label=f"Bayes floor {floor:.4f}")
    low = min(min(r["test_logloss"] for r in ok), floor)
    ax.set_ylim(low - 0.01, max(r["test_logloss"] for r in ok) + 0.01)
    ax.set_ylabel("test log loss")
    ax.set_title("DLRM on synthetic Criteo-shaped data, equal embedding budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
