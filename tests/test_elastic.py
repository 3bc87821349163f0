"""Elastic restart: a worker SIGKILLed mid-training, restarted by torchrun, finishes the run
exactly as an uninterrupted run does; under the TorchX component and under plain ``torchrun
--max-restarts`` (no TORCH_DISABLE_SHARE_RDZV_TCP_STORE: the workers prefix torchrun's shared
store by restart attempt, pytorch/pytorch#135712).

The interrupted job goes through the TorchX component (``launch/components.py:dlrm --max_retries
1``, i.e. ``torchrun --max_restarts 1``) with ``TORCHREC_CCE_FAULT_AT_STEP=6``: in the first
attempt (``TORCHELASTIC_RESTART_COUNT=0``) rank 1 kills itself with SIGKILL after step 6;
torchrun tears the worker group down and starts it again; ``--resume`` continues from the
step-3 checkpoint (re-clustering at step 4 included). The uninterrupted job runs the same flags
under plain torchrun. Both run on CPU with gloo, so the comparison is bitwise: the final test
log loss and AUC, every evaluation, and the per-step training losses after the resume point.

Small synthetic data (16 global batches of 256 rows per epoch, 2 epochs, 8 steps per rank and
epoch); each job costs ~1 min on a loaded 2-core machine (mostly imports, twice for the
restarted job).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
BIN = VENV_BIN if (VENV_BIN / "torchrun").exists() else Path(sys.executable).parent
TRAIN = "examples/dlrm/train.py"
COMPONENT = "launch/components.py:dlrm"
TIMEOUT_S = 900

FLAGS = (
    "--data", "synthetic", "--batch-size", "256", "--synthetic-train-batches", "16",
    "--synthetic-test-batches", "4", "--no-progress", "--epochs", "2",
    "--method", "cce", "--recluster-at", "0.5", "--kmeans-iters", "3",
    "--checkpoint-every", "3", "--keep-checkpoints", "2", "--resume",
)  # fmt: skip
KILL_AT = 6
LAST_CHECKPOINT_BEFORE_KILL = 3


def _env(home: Path, extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHXCONFIG", "TORCHELASTIC_RESTART_COUNT", "TORCHREC_CCE_FAULT_AT_STEP",
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        env.pop(k, None)
    real_home = Path(env.get("HOME") or Path.home())
    env.setdefault("XDG_CACHE_HOME", str(real_home / ".cache"))
    env.setdefault("XDG_CONFIG_HOME", str(real_home / ".config"))
    env.update(HOME=str(home), TORCHREC_CCE_BACKEND="gloo", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(cmd: Sequence[str], home: Path, metrics: Path, **extra: str) -> Dict[str, Any]:
    proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=_env(home, extra), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started
        out, _ = proc.communicate()
        pytest.fail(f"timed out: {' '.join(cmd)}\n{out[-4000:]}")
    log_file = metrics.with_suffix(".log")
    log_file.write_text(out)
    events = "\n".join(line for line in out.splitlines()
                       if any(w in line for w in ("fresh", "injected", "resumed", "Error",
                                                  "SIGTERM", "failed")))
    assert proc.returncode == 0 and metrics.exists(), (
        f"$ {' '.join(cmd)}\nexit {proc.returncode}; full log {log_file}\n{events[-3000:]}\n"
        f"...\n{out[-3000:]}")
    return {"log": out, "metrics": json.loads(metrics.read_text())}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """The uninterrupted run (plain torchrun)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    return _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", TRAIN,
                 *FLAGS, "--checkpoint-dir", str(tmp_path / "ck_straight"),
                 "--metrics-json", str(tmp_path / "straight.json")],
                tmp_path, tmp_path / "straight.json")


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_killed_worker_restarts_from_checkpoint_and_matches(
        tmp_path: Path, straight: Dict[str, Any]) -> None:
    killed = _run([str(BIN / "torchx"), "run", "-s", "local_cwd", COMPONENT, "-j", "1x2",
                   "--cpu", "1", "--memMB", "2048", "--max_retries", "1",
                   "--env", f"TORCHREC_CCE_FAULT_AT_STEP={KILL_AT}", "--",
                   *FLAGS, "--checkpoint-dir", str(tmp_path / "ck_killed"),
                   "--metrics-json", str(tmp_path / "killed.json")],
                  tmp_path, tmp_path / "killed.json")
    a, b = straight["metrics"], killed["metrics"]
    log = killed["log"]
    # The fault really happened, and the restart resumed from the last checkpoint before it.
    assert f"injected fault: SIGKILL of rank 1 after step {KILL_AT}" in log, log[-4000:]
    assert f"step_{LAST_CHECKPOINT_BEFORE_KILL} (step {LAST_CHECKPOINT_BEFORE_KILL})" in log, log[-4000:]
    assert a["restart_count"] == 0 and a["resumed_from_step"] is None
    assert b["restart_count"] == 1 and b["resumed_from_step"] == LAST_CHECKPOINT_BEFORE_KILL
    # ... and finished with the uninterrupted run's numbers, bitwise (CPU, same seed).
    assert b["steps"] == a["steps"] == 16
    assert b["test_logloss"] == a["test_logloss"]
    assert b["test_auc"] == a["test_auc"]
    assert b["evaluations"] == a["evaluations"]
    after: List = [x for x in a["train_loss_curve"] if x[0] > LAST_CHECKPOINT_BEFORE_KILL]
    assert b["train_loss_curve"] == after
    assert [r["step"] for r in b["reclusterings"]] == [4]  # redone after the restart


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_plain_torchrun_restarts_twice_without_env_workaround(
        tmp_path: Path, straight: Dict[str, Any]) -> None:
    """``torchrun --max-restarts 2``, rank 1 killed while the step-6 checkpoint is being written
    (attempt 0: its shards are on disk, the checkpoint incomplete: back to step 3) and after
    step 9 (attempt 1: back to the end of epoch 1, step 8), nothing else set: attempt 2
    finishes with the uninterrupted run's numbers."""
    killed = _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                   "--max-restarts", "2", TRAIN, *FLAGS,
                   "--checkpoint-dir", str(tmp_path / "ck_killed"),
                   "--metrics-json", str(tmp_path / "killed.json")],
                  tmp_path, tmp_path / "killed.json", TORCHREC_CCE_FAULT_AT_STEP="save:6,9")
    a, b, log = straight["metrics"], killed["metrics"], killed["log"]
    assert "while saving step 6 (attempt 0)" in log, log[-4000:]
    assert "after step 9 (attempt 1)" in log and "(step 3)" in log, log[-4000:]
    assert "a partial write left by an interrupted save" in log  # step 6's, removed
    assert "connectFullMesh" not in log
    assert b["restart_count"] == 2 and b["resumed_from_step"] == 8
    assert b["steps"] == a["steps"] == 16
    assert (b["test_logloss"], b["test_auc"]) == (a["test_logloss"], a["test_auc"])
    assert b["evaluations"] == a["evaluations"]
    assert b["train_loss_curve"] == [x for x in a["train_loss_curve"] if x[0] > 8]
