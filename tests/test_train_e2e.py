"""End-to-end runs of the training script ``examples/dlrm/train.py``.

Every test launches real processes (no mocks) on small synthetic Criteo-shaped data and checks
the numbers the script writes with ``--metrics-json``:

* the TorchX ``launch/components.py:dlrm`` component (local_cwd, 1 node x 2 gloo workers), the way
  ``scripts/demo.sh`` launches it, with CCE and one re-clustering;
* plain ``torchrun --nproc_per_node 2`` with another method (hashing);
* ``--resume`` from a DCP checkpoint: epoch 1 (the TorchX run above, which also writes a
  checkpoint) resumed under torchrun for epoch 2 must reproduce a straight 2-epoch run step for
  step (loss curve, test log loss, AUC), which needs model, CCE cluster assignments, fused sparse
  and dense optimizer state all restored;
* bad flags fail fast with a message naming the flag.

Sizes: 16 global train batches of 256 per rank, so 8 steps per epoch on 2 ranks. Each process
spends ~10 s importing torch/torchrec, so one 2-process run takes ~25-40 s here.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
BIN = VENV_BIN if (VENV_BIN / "torchrun").exists() else Path(sys.executable).parent
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
TRAIN = "examples/dlrm/train.py"
COMPONENT = "launch/components.py:dlrm"

# --warmup-steps 0: these runs are 8 steps long, a warm-up would keep the lr near 0 all along
# (the warm-up itself is tested in test_train_protocol.py).
SMALL = (
    "--data", "synthetic", "--batch-size", "256", "--warmup-steps", "0",
    "--synthetic-train-batches", "16", "--synthetic-test-batches", "4", "--no-progress",
)  # fmt: skip
# Dense lr 0.02 as for hashing below: in 8 steps at the default lr the QR-initialised default CCE
# (data-parallel codebooks on these small tables train with the dense optimizer) does not yet
# beat the constant predictor (0.571 vs 0.562 test log loss).
CCE = ("--method", "cce", "--recluster-at", "0.5", "--kmeans-iters", "3", "--dense-lr", "0.02")
WORLD = 2
STEPS_PER_EPOCH = 16 // WORLD  # --synthetic-train-batches counts global batches

# Log loss of the best constant predictor at the synthetic data's 0.25 click rate (~0.5623):
# a model that learned anything from the features must beat it.
CLICK_RATE = 0.25
CONSTANT_LOGLOSS = -(CLICK_RATE * math.log(CLICK_RATE) + (1 - CLICK_RATE) * math.log(1 - CLICK_RATE))

# Resume vs straight-through: measured bit-identical here (difference 0.0 for 1 and 2 processes,
# hashing and CCE). Resuming without the optimizer state (a control run, not kept as a test)
# changed the step-18 loss by ~0.9 and the test log loss by ~0.09, far above this tolerance.
RESUME_TOL = 1e-5

SLOW = pytest.mark.timeout(600)
RUN_TIMEOUT_S = 600  # a hang guard only; correctness never depends on it


@dataclass
class Run:
    cmd: List[str]
    returncode: int
    stdout: str
    stderr: str
    metrics: Optional[Dict[str, Any]]

    def log(self, tail: int = 4000) -> str:
        return (f"$ {' '.join(self.cmd)}\nexit {self.returncode}\n--- stdout\n{self.stdout[-tail:]}"
                f"\n--- stderr\n{self.stderr[-tail:]}")


def _env(home: Path) -> Dict[str, str]:
    env = dict(os.environ)
    # torchx's ddp component runs `torchrun`, which must be on PATH
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHXCONFIG"):
        env.pop(k, None)  # a world of one / torchrun's own values, the repo's .torchxconfig
    real_home = Path(env.get("HOME") or Path.home())
    # keep caches (matplotlib's font list, ...) where they were, but no user-level ~/.torchxconfig
    env.setdefault("XDG_CACHE_HOME", str(real_home / ".cache"))
    env.setdefault("XDG_CONFIG_HOME", str(real_home / ".config"))
    env["HOME"] = str(home)
    env["TORCHREC_CCE_BACKEND"] = "gloo"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: Sequence[str], home: Path, metrics_json: Optional[Path] = None) -> Run:
    if metrics_json is not None and metrics_json.exists():
        metrics_json.unlink()
    proc = subprocess.Popen(
        list(cmd), cwd=REPO_ROOT, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started (torchrun + workers)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {RUN_TIMEOUT_S} s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    metrics = None
    if metrics_json is not None and metrics_json.exists():
        metrics = json.loads(metrics_json.read_text())
    return Run(list(cmd), proc.returncode, out, err, metrics)


def _torchx(*script_args: str, home: Path, metrics_json: Path) -> Run:
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", COMPONENT, "-j", f"1x{WORLD}",
           "--cpu", "1", "--memMB", "2048", "--", *script_args, "--metrics-json", str(metrics_json)]
    return _run(cmd, home, metrics_json)


def _torchrun(*script_args: str, home: Path, metrics_json: Path) -> Run:
    # --standalone: rendezvous on a free local port (the static default 29500 may be taken)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(WORLD), TRAIN,
           *script_args, "--metrics-json", str(metrics_json)]
    return _run(cmd, home, metrics_json)


def _check_one_epoch_metrics(run: Run, method: str) -> Dict[str, Any]:
    assert run.returncode == 0, run.log()
    m = run.metrics
    assert m is not None, "no --metrics-json written\n" + run.log()
    assert m["method"] == method
    assert m["world_size"] == WORLD
    assert m["epochs"] == 1
    assert m["steps"] == STEPS_PER_EPOCH
    curve = m["train_loss_curve"]
    assert [s for s, _ in curve] == list(range(1, STEPS_PER_EPOCH + 1))
    assert all(math.isfinite(v) and v > 0 for _, v in curve), curve

    # one evaluation (end of the epoch); the reported test numbers are its own
    (ev,) = m["evaluations"]
    assert ev["epoch"] == 1 and ev["step"] == STEPS_PER_EPOCH
    assert m["best_epoch"] == 1 and m["best_step"] == STEPS_PER_EPOCH
    assert (m["test_logloss"], m["test_auc"]) == (ev["test_logloss"], ev["test_auc"])
    assert math.isfinite(ev["val_logloss"]) and 0.5 < ev["val_auc"] <= 1.0

    assert 0.5 < m["test_auc"] <= 1.0, m["test_auc"]
    assert math.isfinite(m["test_logloss"])
    assert m["test_logloss"] < CONSTANT_LOGLOSS, (m["test_logloss"], CONSTANT_LOGLOSS)
    assert math.isfinite(m["bayes_logloss"]) and 0 < m["bayes_logloss"] < m["test_logloss"]

    assert 0 < m["embedding_bytes"] < m["full_embedding_bytes"]
    assert 0 < m["embedding_params"] < m["full_embedding_params"]
    assert m["compression_ratio_params"] == pytest.approx(m["full_embedding_params"] / m["embedding_params"])
    assert m["compression_ratio_bytes"] == pytest.approx(m["full_embedding_bytes"] / m["embedding_bytes"])
    assert m["train_samples_per_s"] > 0
    return m


# ------------------------------------------------------------------ 1. TorchX, CCE, 2 workers


@pytest.fixture(scope="module")
def torchx_cce_epoch1(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """One epoch of CCE through the TorchX component; also writes the epoch-1 DCP checkpoint
    that the resume test continues from."""
    d = tmp_path_factory.mktemp("torchx_cce")
    ckpt = d / "ck"
    run = _torchx(*SMALL, *CCE, "--epochs", "1", "--checkpoint-dir", str(ckpt),
                  home=d, metrics_json=d / "m.json")
    return {"run": run, "ckpt": ckpt, "dir": d}


@SLOW
def test_torchx_component_cce_two_workers(torchx_cce_epoch1: Dict[str, Any]) -> None:
    run: Run = torchx_cce_epoch1["run"]
    m = _check_one_epoch_metrics(run, "cce")
    assert "Job finished: SUCCEEDED" in run.stdout + run.stderr, run.log()
    # CCE stores a cluster assignment on top of the codebooks, and still saves memory
    assert m["assignment_bytes"] > 0
    assert m["compression_ratio_params"] > 2
    # every rank keeps each CCE table's id reservoir; re-clustering's workspace is estimated
    cce_rows = [r for r in m["embedding_tables"].values() if r["method"] == "cce"]
    assert cce_rows and all(r["sample_bytes"] > 0 for r in cce_rows)
    assert m["embedding_sample_bytes_per_rank"] == sum(r["sample_bytes"] for r in cce_rows)
    assert m["recluster_workspace_bytes"] > 0
    # --recluster-at 0.5: exactly one re-clustering, half-way through the 8 steps
    assert len(m["reclusterings"]) == 1, m["reclusterings"]
    (rc,) = m["reclusterings"]
    assert rc["step"] == STEPS_PER_EPOCH // 2
    assert rc["tables"], "no table was re-clustered"
    for name, stats in rc["tables"].items():
        assert stats["kmeans_inertia_end"] <= stats["kmeans_inertia_start"] + 1e-6, (name, stats)
    assert m["recluster_seconds"] > 0
    ckpt: Path = torchx_cce_epoch1["ckpt"]
    step = ckpt / f"step_{STEPS_PER_EPOCH}"  # the epoch-end checkpoint, complete marker last
    assert (step / "complete").is_file() and (step / ".metadata").is_file()
    assert len(list(step.glob("*.distcp"))) == WORLD


# ------------------------------------------------------------------ 3. resume (2 workers)


@SLOW
def test_resume_continues_and_matches_straight_run(torchx_cce_epoch1: Dict[str, Any]) -> None:
    """Epoch 1 (TorchX run above) + `--resume` for epoch 2 (torchrun) == 2 epochs straight."""
    first: Run = torchx_cce_epoch1["run"]
    if first.returncode != 0 or first.metrics is None:
        pytest.fail("the epoch-1 TorchX run failed, nothing to resume from\n" + first.log())
    d: Path = torchx_cce_epoch1["dir"]
    ckpt = d / "ck_resume"
    shutil.copytree(torchx_cce_epoch1["ckpt"], ckpt)  # the resumed run overwrites its checkpoint

    resumed = _torchrun(*SMALL, *CCE, "--epochs", "2", "--resume", "--checkpoint-dir", str(ckpt),
                        home=d, metrics_json=d / "resumed.json")
    straight = _torchrun(*SMALL, *CCE, "--epochs", "2", home=d, metrics_json=d / "straight.json")
    assert resumed.returncode == 0 and resumed.metrics is not None, resumed.log()
    assert straight.returncode == 0 and straight.metrics is not None, straight.log()
    a, b, b1 = straight.metrics, resumed.metrics, first.metrics

    # continued, not restarted: the step counter and epoch come from the checkpoint
    assert b1["steps"] == STEPS_PER_EPOCH and b1["epochs"] == 1
    assert b["steps"] == 2 * b1["steps"] == a["steps"]
    assert b["epochs"] == 2 == a["epochs"]
    assert b["world_size"] == WORLD
    assert [s for s, _ in b["train_loss_curve"]] == list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))
    assert b["reclusterings"] == []  # the epoch-1 re-clustering is not redone on resume
    assert [r["step"] for r in a["reclusterings"]] == [STEPS_PER_EPOCH // 2]
    assert (ckpt / f"step_{2 * STEPS_PER_EPOCH}" / "complete").is_file()

    # the comparison below is only meaningful if the data and training are deterministic:
    # the straight run's first epoch must reproduce the checkpointed run's
    a_curve = dict((s, v) for s, v in a["train_loss_curve"])
    for s, v in b1["train_loss_curve"]:
        assert a_curve[s] == pytest.approx(v, abs=RESUME_TOL), (s, v, a_curve[s])
    # the restored model + cluster assignments + sparse/dense optimizer state give the same
    # epoch 2 step for step (a lost optimizer state shows up from the second resumed step on)
    for s, v in b["train_loss_curve"]:
        assert a_curve[s] == pytest.approx(v, abs=RESUME_TOL), (s, v, a_curve[s])
    assert math.isfinite(b["test_logloss"])
    assert b["test_logloss"] == pytest.approx(a["test_logloss"], abs=RESUME_TOL)
    assert b["test_auc"] == pytest.approx(a["test_auc"], abs=RESUME_TOL)
    assert b["embedding_bytes"] == a["embedding_bytes"] == b1["embedding_bytes"]
    # the epoch-1 evaluation came back with the checkpoint: best-epoch selection is unchanged
    assert [e["step"] for e in b["evaluations"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for ea, eb in zip(a["evaluations"], b["evaluations"]):
        assert eb["val_logloss"] == pytest.approx(ea["val_logloss"], abs=RESUME_TOL)
    assert b["best_epoch"] == a["best_epoch"]


# ------------------------------------------------------------------ 2. torchrun, hashing


@SLOW
def test_torchrun_hashing_two_workers(tmp_path: Path) -> None:
    # 8 steps: Adagrad's early jumps dominate; dense lr 0.02 (measured: test log loss 0.531 vs
    # 0.575 at 0.05) leaves a margin over the constant predictor (0.562)
    run = _torchrun(*SMALL, "--method", "hashing", "--epochs", "1", "--dense-lr", "0.02",
                    home=tmp_path, metrics_json=tmp_path / "m.json")
    m = _check_one_epoch_metrics(run, "hashing")
    assert m["assignment_bytes"] == 0  # hashing needs no stored assignment
    assert m["reclusterings"] == [] and m["recluster_seconds"] == 0
    assert "== hashing on 2 ranks, 8 steps, 1 evaluations ==" in run.stdout, run.log()
    _check_console(run)


@SLOW
def test_torchrun_plan_select_validation_two_workers(tmp_path: Path) -> None:
    """--plan-select validation at world 2: every rank trains the same candidate plans one
    after the other (a fresh DMP each) and keeps the same one, the lowest validation loss."""
    run = _torchrun(*SMALL, "--embedding-budget-mb", "0.1", "--plan-select", "validation",
                    "--epochs", "1", "--dense-lr", "0.02", home=tmp_path,
                    metrics_json=tmp_path / "m.json")
    assert run.returncode == 0, run.log()
    m = run.metrics
    sel = m["plan_selection"]
    assert len(sel["candidates"]) >= 2, run.log()
    vals = [c["val_logloss"] for c in sel["candidates"]]
    assert sel["chosen"] == vals.index(min(vals)) and m["val_logloss"] == min(vals)
    assert m["world_size"] == 2 and m["embedding_plan"] == sel["candidates"][sel["chosen"]]["plan"]
    assert m["embedding_bytes"] == m["embedding_plan"]["total_bytes"]
    assert run.stdout.count("== ") == 1, run.log()  # one summary, the chosen run's


# Messages known to be harmless that train.py filters; they must not reach the console.
FILTERED = ("caching params will be ignored", "Sharding spec not found", "is_fx_tracing",
            "broadcast_buffers", "dense_embedding_codegen_lookup_function", "HeuristicalStorage",
            "constructed directly rather than via TopologyFactory", "dense tensor size calculation")


def _check_console(run: Run, max_lines: int = 50) -> None:
    """A 2-process run's whole console output fits on one screen, without the filtered noise."""
    text = run.stdout + run.stderr
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) <= max_lines, run.log(10000)
    for msg in FILTERED:
        assert msg not in text, (msg, run.log(10000))


# ------------------------------------------------------------------ 2b. torchrun, preprocessed


@SLOW
def test_torchrun_preprocessed_two_workers(tmp_path: Path) -> None:
    """--data preprocessed at world 2: tables of the vocabulary sizes (multi-hot bag included),
    no dense column, evaluations every 3 steps and at each epoch end, best = min val."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = ["label,user,item,tags"]
    for _ in range(2000):
        u, i = rng.integers(0, 80), rng.integers(0, 50)
        tags = "|".join(rng.choice(list("abcde"), rng.integers(1, 4), replace=False))
        rows.append(f"{int(rng.random() < 1 / (1 + math.exp(-(u % 4 - 1.5))))},u{u},i{i},{tags}")
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    pre = tmp_path / "pre"
    prep = _run([PYTHON, "-m", "torchrec_cce.data.preprocess", "--format", "csv", "--input",
                 str(tmp_path / "d.csv"), "--multi-hot-columns", "tags", "--no-progress",
                 "--out", str(pre)], tmp_path)
    assert prep.returncode == 0, prep.log()
    meta = json.loads((pre / "meta.json").read_text())
    run = _torchrun("--data", "preprocessed", "--data-dir", str(pre), "--method", "full",
                    "--batch-size", "64", "--epochs", "2", "--eval-every", "3", "--patience", "20",
                    "--warmup-steps", "4", "--no-progress", home=tmp_path,
                    metrics_json=tmp_path / "m.json")
    assert run.returncode == 0, run.log()
    m = run.metrics
    assert m["world_size"] == WORLD
    assert m["table_rows"] == {f"t_{f['name']}": f["vocab_size"] for f in meta["features"]}
    assert m["embedding_params"] == m["full_embedding_params"] == 16 * sum(m["table_rows"].values())
    per_epoch = meta["splits"]["train"]["rows"] // (64 * WORLD)
    expected = sorted(set(list(range(3, 2 * per_epoch + 1, 3)) + [per_epoch, 2 * per_epoch]))
    assert [e["step"] for e in m["evaluations"]] == expected
    vals = [e["val_logloss"] for e in m["evaluations"]]
    best = m["evaluations"][vals.index(min(vals))]
    assert (m["best_step"], m["test_logloss"], m["test_auc"]) == (
        best["step"], best["test_logloss"], best["test_auc"])
    assert all(math.isfinite(v) for _, v in m["train_loss_curve"])
    assert "no dense features: DLRM gets one constant-1 dense column" in run.stdout
    _check_console(run)


# ------------------------------------------------------------------ 4. bad input


@pytest.mark.parametrize(
    "args, names",
    [
        (["--data", "criteo_tsv"], ["--train-path", "criteo_tsv"]),
        (["--method", "hashing", "--recluster-at", "0.5"], ["--recluster-at", "cce"]),
        (["--data", "preprocessed"], ["--data-dir", "preprocess"]),
        (["--embedding-dropout", "1"], ["--embedding-dropout", "[0, 1)"]),
    ],
    ids=["criteo_tsv-without-train-path", "recluster-at-without-cce", "preprocessed-without-dir",
         "embedding-dropout-1"],
)
def test_bad_flags_fail_with_usage_error(tmp_path: Path, args: List[str], names: List[str]) -> None:
    run = _run([PYTHON, TRAIN, *args, "--metrics-json", str(tmp_path / "m.json")], tmp_path,
               tmp_path / "m.json")
    assert run.returncode == 2, run.log()  # argparse usage error
    assert "error:" in run.stderr
    for name in names:
        assert name in run.stderr, run.log()
    assert run.metrics is None
    assert "Traceback" not in run.stderr


@SLOW
def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    # One command line serves the first start and every restart: no checkpoint yet -> fresh.
    missing = tmp_path / "no_such_ck"
    run = _run([PYTHON, TRAIN, *SMALL, "--method", "hashing", "--max-steps", "2", "--resume",
                "--checkpoint-dir", str(missing), "--metrics-json", str(tmp_path / "m.json")],
               tmp_path, tmp_path / "m.json")
    assert run.returncode == 0, run.log()
    assert f"no checkpoint in {missing} yet: starting fresh" in run.stdout, run.log()
    assert run.metrics["steps"] == 2 and run.metrics["resumed_from_step"] is None
    assert (missing / "step_2" / "complete").is_file()
    # --resume without a checkpoint directory is a usage error.
    bad = _run([PYTHON, TRAIN, *SMALL, "--resume"], tmp_path)
    assert bad.returncode == 2 and "--resume needs --checkpoint-dir" in bad.stderr, bad.log()


# ------------------------------------------------------------------ 4. a short run's defaults

SHARED = Path(os.environ.get("TORCHREC_CCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@SLOW
def test_short_run_on_the_criteo_head_beats_the_constant_predictor(tmp_path: Path) -> None:
    """A run of a few steps learns with the default warm-up (scaled to the run's length): the
    Criteo head at world 2, 3 epochs, CCE at 4,096 parameters per table. With the former fixed
    100-step warm-up every step stayed below 1/10 of the learning rate (test log loss 0.559,
    worse than a constant)."""
    import argparse

    import torch

    from torchrec_cce.data import sources

    head = SHARED / "criteo_kaggle_head10k.tsv"
    if not head.exists():
        pytest.skip(f"{head} not found (shared real data absent)")
    flags = ("--data", "criteo_tsv", "--train-path", str(head), "--test-fraction", "0.2")
    # ids capped at 100,000 per table: the scheduled re-clusterings of Kaggle-sized vocabularies
    # (33.8M ids) would take 60 of the run's 75 s and do not change what is tested
    run = _torchrun(*flags, "--method", "cce", "--max-params-per-table", "4096", "--epochs", "3",
                    "--max-ids-per-feature", "100000", "--no-progress", home=tmp_path,
                    metrics_json=tmp_path / "m.json")
    assert run.returncode == 0, run.log()
    m = run.metrics
    # the best constant predictor on the very test rows both ranks evaluate
    args = argparse.Namespace(
        data="criteo_tsv", train_path=str(head), val_path=None, test_path=None,
        test_fraction=0.2, shuffle_buffer=0, num_embeddings_per_feature=None,
        max_ids_per_feature=100_000, batch_size=1024, seed=0)
    labels = torch.cat([b.labels for rank in range(WORLD)
                        for b in sources.load_data(args, rank, WORLD).test()]).double()
    rate = float(labels.mean())
    constant = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert len(labels) >= 1000 and 0 < m["args"]["warmup_steps"] < m["steps"] <= 12, m["args"]
    assert m["test_logloss"] < constant, (m["test_logloss"], constant, m["evaluations"])
