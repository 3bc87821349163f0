"""Soak test of crash recovery (not part of CI): a 2-process DLRM + CCE job with 20
re-clusterings and a checkpoint every N steps, whose rank 1 is SIGKILLed twice, against the same
job uninterrupted.

    PYTHONPATH=$PWD python benchmarks/soak.py                      # ~10 min on a loaded 2-core VM
    PYTHONPATH=$PWD python benchmarks/soak.py --kills 23,58 --checkpoint-every 10

Both jobs go through the TorchX component (``launch/components.py:dlrm -j 1x2``, local_cwd); the
faulty one with ``--max_retries <kills>`` (``torchrun --max_restarts``) and
``TORCHREC_CCE_FAULT_AT_STEP=a,b``: attempt ``i`` (``TORCHELASTIC_RESTART_COUNT=i``) kills rank 1
right after step ``kills[i]``, torchrun restarts the worker group, and ``train.py --resume``
continues from the newest complete checkpoint. Reported (``benchmarks/results/soak.json``):
restarts, for every kill the step it hit, the checkpoint the restart resumed from and the steps
lost, wall times, and the final metrics of both jobs (on CPU they should be bit-identical).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = REPO_ROOT / "benchmarks" / "results" / "soak.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reclusterings", type=int, default=20, help="spread over the first epoch")
    p.add_argument("--steps-per-epoch", type=int, default=40, help="per rank")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="per rank")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--kills", default="23,58", help="steps after which rank 1 is killed, one "
                                                    "per attempt")
    p.add_argument("--kmeans-iters", type=int, default=5)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--workdir", default=None, help="keep checkpoints and logs here")
    return p.parse_args()


def train_flags(a: argparse.Namespace, ckpt: Path, metrics: Path) -> List[str]:
    fractions = ",".join(f"{(i + 1) / a.reclusterings:.6g}" for i in range(a.reclusterings))
    return ["--data", "synthetic", "--batch-size", str(a.batch_size),
            "--synthetic-train-batches", str(2 * a.steps_per_epoch),
            "--synthetic-test-batches", "8", "--epochs", str(a.epochs), "--no-progress",
            "--warmup-steps", "10",
            "--method", "cce", "--recluster-at", fractions, "--kmeans-iters", str(a.kmeans_iters),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(a.checkpoint_every),
            "--keep-checkpoints", "2", "--resume", "--metrics-json", str(metrics)]


def run_job(a: argparse.Namespace, work: Path, name: str, kills: Optional[List[int]]
            ) -> Dict[str, Any]:
    ckpt, metrics = work / f"ck_{name}", work / f"{name}.json"
    shutil.rmtree(ckpt, ignore_errors=True)
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", "launch/components.py:dlrm",
           "-j", "1x2", "--cpu", "1", "--memMB", "2048"]
    if kills:
        cmd += ["--max_retries", str(len(kills)),
                "--env", f"TORCHREC_CCE_FAULT_AT_STEP={','.join(map(str, kills))}"]
    cmd += ["--", *train_flags(a, ckpt, metrics)]
    env = dict(os.environ, TORCHREC_CCE_BACKEND="gloo", PYTHONUNBUFFERED="1",
               PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHREC_CCE_FAULT_AT_STEP", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (work / f"{name}.log").write_text(log)
    if proc.returncode != 0 or not metrics.exists():
        raise SystemExit(f"{name} job failed (exit {proc.returncode}):\n{log[-6000:]}")
    return {"cmd": cmd, "wall_seconds": wall, "log": log, "metrics": json.loads(metrics.read_text())}


def faults(log: str) -> List[Dict[str, int]]:
    killed = [int(s) for s in re.findall(r"injected fault: SIGKILL of rank \d+ after step (\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", log)]
    return [{"killed_after_step": k, "resumed_from_step": r, "steps_lost": k - r}
            for k, r in zip(killed, resumed)]


def summary(job: Dict[str, Any]) -> Dict[str, Any]:
    """Final metrics (of the last attempt) and, from the log, what every attempt did."""
    m, log = job["metrics"], job["log"]
    reclustered = [int(s) for s in re.findall(r"re-clustered \d+ tables at step (\d+)", log)]
    writes = sorted(float(s) for s in re.findall(r"checkpoint \S+ written in ([\d.]+) s", log))
    return {"wall_seconds": round(job["wall_seconds"], 1), "steps": m["steps"],
            "test_logloss": m["test_logloss"], "test_auc": m["test_auc"],
            "val_logloss": m.get("val_logloss"), "best_epoch": m.get("best_epoch"),
            "reclusterings_run": len(reclustered), "reclustering_steps": sorted(set(reclustered)),
            "checkpoints_written": len(writes),
            "checkpoint_write_seconds_median": writes[len(writes) // 2] if writes else None,
            "restart_count": m.get("restart_count")}


def main() -> None:
    a = parse_args()
    kills = [int(x) for x in a.kills.split(",") if x]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="soak_"))
    work.mkdir(parents=True, exist_ok=True)
    base = run_job(a, work, "uninterrupted", None)
    hit = run_job(a, work, "killed", kills)
    f = faults(hit["log"])
    mb, mk = base["metrics"], hit["metrics"]
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "config": {"world_size": 2, "steps_per_epoch": a.steps_per_epoch, "epochs": a.epochs,
                   "batch_size_per_rank": a.batch_size, "reclusterings": a.reclusterings,
                   "checkpoint_every": a.checkpoint_every, "kills_after_steps": kills},
        "restarts": mk.get("restart_count"),
        "faults": f,
        "steps_lost_total": sum(x["steps_lost"] for x in f),
        "uninterrupted": summary(base),
        "interrupted": summary(hit),
        "test_logloss_abs_diff": abs(mk["test_logloss"] - mb["test_logloss"]),
        "test_auc_abs_diff": abs(mk["test_auc"] - mb["test_auc"]),
        "bit_identical": (mk["test_logloss"] == mb["test_logloss"]
                          and mk["test_auc"] == mb["test_auc"]
                          and mk["evaluations"] == mb["evaluations"]),
        "note": "2-core CPU VM shared with other jobs (wall times are noisy); gloo; both jobs "
                "launched through the TorchX component (local_cwd)",
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1))
    if len(f) != len(kills):
        raise SystemExit(f"expected {len(kills)} kills and resumes, found {f} (logs in {work})")


if __name__ == "__main__":
    main()
