"""The training protocol of ``examples/dlrm/train.py`` (its command line, run in-process at world
size 1) and of the library it assembles (``torchrec_cce.train``, ``torchrec_cce.data.sources``).

* best-epoch selection: on data small enough to over-fit, the reported test metrics are the
  ones of the evaluation with the lowest validation log loss, and they are the test metrics of
  that very model state (a second run stopped at that epoch measures the same numbers);
* ``--patience`` stops after that many evaluations without a new best, on the same trajectory;
* ``--eval-every`` evaluates mid-epoch without changing the training trajectory;
* warm-up scales the first update of *every* parameter (dense MLP, fused fbgemm tables,
  replicated tables) by ``1/N``, and keeps every step's loss within 2x the first step's where
  training without it breaks that rule;
* ``--data preprocessed``: one table per feature with exactly the vocabulary's rows, multi-hot
  bags, a constant dense column when there are no dense features, counts reachable;
* the raw readers' modulo and its collision warning;
* shuffled training order reproducible by ``--seed``; ``--resume`` exact mid-warm-up.
"""
import argparse
import contextlib
import io
import json
import math
import os
import runpy
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
import torch

from torchrec_cce.data import sources
from torchrec_cce.data.preprocess import main as preprocess_main
from torchrec_cce.train import evaluate
from torchrec_cce.train.report import quiet_known_warnings

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "examples" / "dlrm" / "train.py"

# <repo>/../shared/data (see its README); $TORCHREC_CCE_SHARED_DATA overrides (e.g. worktrees)
SHARED = Path(os.environ.get("TORCHREC_CCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SLOW = pytest.mark.timeout(900)

# 32 train batches of 256 rows: a full-table DLRM over-fits it within a few epochs at lr 0.1
# without warm-up (validation log loss goes down, then up).
OVERFIT = ("--data", "synthetic", "--batch-size", "256", "--synthetic-train-batches", "32",
           "--synthetic-val-batches", "4", "--synthetic-test-batches", "4", "--method", "full",
           "--warmup-steps", "0", "--lr", "0.1", "--dense-lr", "0.05", "--no-progress")
OVERFIT_STEPS = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def world_of_one() -> Iterator[None]:
    """Env for a 1-process gloo group on a fresh port, removed afterwards."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHREC_CCE_BACKEND")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                      TORCHREC_CCE_BACKEND="gloo")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(*argv: str) -> Dict[str, Any]:
    """``python examples/dlrm/train.py argv`` in this process: the metrics it writes to
    ``--metrics-json``, with its console output in ``m['stdout']``."""
    out = io.StringIO()
    saved_argv = sys.argv
    with tempfile.TemporaryDirectory() as tmp, world_of_one(), contextlib.redirect_stdout(out):
        path = os.path.join(tmp, "metrics.json")
        sys.argv = [str(TRAIN_SCRIPT), *argv, "--metrics-json", path]
        try:
            runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
        finally:
            sys.argv = saved_argv
        with open(path) as f:
            m = json.load(f)
    m["stdout"] = out.getvalue()
    return m


def cli_error(*argv: str) -> str:
    """The script's command line on bad flags: it must exit with argparse's usage error;
    returns the message."""
    err, saved_argv = io.StringIO(), sys.argv
    sys.argv = [str(TRAIN_SCRIPT), *argv]
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    finally:
        sys.argv = saved_argv
    assert exit_info.value.code == 2, err.getvalue()
    return err.getvalue()


def data_args(**flags: Any) -> argparse.Namespace:
    """The data flags ``sources.load_data`` reads, at the script's defaults."""
    base = dict(data="synthetic", data_dir=None, train_path=None, val_path=None, test_path=None,
                test_fraction=0.1, shuffle_buffer=100_000, num_embeddings_per_feature=None,
                max_ids_per_feature=10_000_000, synthetic_scale=0.001,
                synthetic_train_batches=None, synthetic_val_batches=None,
                synthetic_test_batches=None, batch_size=1024, seed=0)
    return argparse.Namespace(**{**base, **flags})


def losses(m: Dict[str, Any]) -> List[float]:
    return [v for _, v in m["train_loss_curve"]]


# ------------------------------------------------------------------ best epoch, patience


@pytest.fixture(scope="module")
def overfit_run() -> Dict[str, Any]:
    return run(*OVERFIT, "--epochs", "4")


@SLOW
def test_best_epoch_is_the_minimum_validation_loss(overfit_run: Dict[str, Any]) -> None:
    m = overfit_run
    evals = m["evaluations"]
    assert [e["epoch"] for e in evals] == [1, 2, 3, 4]
    assert [e["step"] for e in evals] == [OVERFIT_STEPS * k for k in (1, 2, 3, 4)]
    for e in evals:
        assert set(e) >= {"epoch", "step", "val_logloss", "val_auc", "test_logloss", "test_auc"}
        assert all(math.isfinite(e[k]) for k in e)
    vals = [e["val_logloss"] for e in evals]
    best = int(np.argmin(vals))
    # the case is only meaningful if it over-fits: the last epoch is not the best one
    assert best < len(evals) - 1 and vals[-1] > vals[best] + 0.01, vals
    assert m["best_epoch"] == evals[best]["epoch"] and m["best_step"] == evals[best]["step"]
    assert m["val_logloss"] == evals[best]["val_logloss"]
    assert m["test_logloss"] == evals[best]["test_logloss"]
    assert m["test_auc"] == evals[best]["test_auc"]
    assert m["test_logloss"] != evals[-1]["test_logloss"]  # not the last epoch's numbers
    assert m["epochs"] == 4 and not m["stopped_early"]
    assert f"best (min val log loss): epoch {m['best_epoch']}" in m["stdout"]


@SLOW
def test_best_epoch_test_metrics_are_those_of_that_state(overfit_run: Dict[str, Any]) -> None:
    """A separate run trained for exactly best_epoch epochs ends in the same state: its final
    evaluation reproduces the reported test metrics."""
    m = overfit_run
    short = run(*OVERFIT, "--epochs", str(m["best_epoch"]))
    last = short["evaluations"][-1]
    assert last["step"] == m["best_step"]
    assert last["test_logloss"] == pytest.approx(m["test_logloss"], abs=1e-6)
    assert last["test_auc"] == pytest.approx(m["test_auc"], abs=1e-6)
    assert last["val_logloss"] == pytest.approx(m["val_logloss"], abs=1e-6)


@SLOW
def test_patience_stops_after_that_many_evaluations_without_improvement(
        overfit_run: Dict[str, Any]) -> None:
    full = overfit_run["evaluations"]
    vals = [e["val_logloss"] for e in full]
    # first evaluation that is not a new best, counting from the start
    best_so_far, first_bad = math.inf, None
    for i, v in enumerate(vals):
        if v < best_so_far:
            best_so_far = v
        elif first_bad is None:
            first_bad = i
    assert first_bad is not None, vals
    m = run(*OVERFIT, "--epochs", "4", "--patience", "1")
    assert m["stopped_early"]
    assert len(m["evaluations"]) == first_bad + 1 < 4
    assert m["epochs"] == first_bad + 1 and m["steps"] == OVERFIT_STEPS * (first_bad + 1)
    for a, b in zip(m["evaluations"], full):  # the same trajectory up to the stop
        assert a["val_logloss"] == pytest.approx(b["val_logloss"], abs=1e-6)
    # evaluations before the first non-improving one were all new bests
    assert m["best_step"] == full[first_bad - 1]["step"]
    assert m["test_logloss"] == pytest.approx(full[first_bad - 1]["test_logloss"], abs=1e-6)
    assert "stopped early" in m["stdout"]


@SLOW
def test_eval_every_evaluates_mid_epoch_without_changing_training() -> None:
    base = ("--data", "synthetic", "--batch-size", "128", "--synthetic-train-batches", "12",
            "--synthetic-val-batches", "2", "--synthetic-test-batches", "2", "--method", "cce",
            "--recluster-at", "0.5", "--kmeans-iters", "2", "--warmup-steps", "4", "--epochs", "2",
            "--no-progress")
    plain = run(*base)
    every = run(*base, "--eval-every", "5")
    assert [e["step"] for e in plain["evaluations"]] == [12, 24]
    assert [e["step"] for e in every["evaluations"]] == [5, 10, 12, 15, 20, 24]
    assert [e["epoch"] for e in every["evaluations"]] == [1, 1, 1, 2, 2, 2]
    # draining the pipeline for an evaluation (and re-clustering at step 6) leaves training as is
    assert losses(every) == pytest.approx(losses(plain), abs=1e-6)
    for step in (12, 24):
        a = next(e for e in plain["evaluations"] if e["step"] == step)
        b = next(e for e in every["evaluations"] if e["step"] == step)
        assert b["val_logloss"] == pytest.approx(a["val_logloss"], abs=1e-6)
        assert b["test_auc"] == pytest.approx(a["test_auc"], abs=1e-6)


# ------------------------------------------------------------------ warm-up


def _weights(dmp: torch.nn.Module) -> Dict[str, torch.Tensor]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for k, v in dmp.state_dict().items():
        if not (isinstance(v, ShardedTensor) or v.is_floating_point()):
            continue
        if isinstance(v, ShardedTensor):
            v = torch.cat([s.tensor.flatten() for s in v.local_shards()])
        out[k] = v.detach().clone().double()
    return out


def _first_step_deltas(warmup: int, method: str) -> Dict[str, torch.Tensor]:
    """One training step of a DLRM built and sharded by the library (``torchrec_cce.train``),
    with warm-up ``warmup``: every weight's change."""
    import torch.distributed as dist
    from torchrec.models.dlrm import DLRM, DLRMTrain

    from torchrec_cce import CCEEmbeddingBagCollection, compression_for_budget
    from torchrec_cce.train import (Optimizers, apply_sparse_optimizer, dense_optimizer, in_step,
                                    make_pipeline, shard)

    cpu = torch.device("cpu")
    with world_of_one():
        dist.init_process_group("gloo")
        try:
            torch.manual_seed(0)
            data = sources.load_data(data_args(batch_size=64, synthetic_train_batches=2), 0, 1)
            tables = sources.table_configs(data, 16)
            cap = max(t.num_embeddings for t in tables) * 16 // 16  # 1/16 of the largest
            ebc = CCEEmbeddingBagCollection(tables, compression_for_budget(tables, method, cap),
                                            device=torch.device("meta"))
            model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=13,
                                   dense_arch_layer_sizes=[64, 16],
                                   over_arch_layer_sizes=[64, 32, 1], dense_device=cpu))
            apply_sparse_optimizer(model.model.sparse_arch, "rowwise_adagrad", lr=0.05)
            dmp, _ = shard(model, 1, cpu, batch_size=64)
            optim = Optimizers(dmp, dense_optimizer("adagrad", 0.05), dense_lr=0.05,
                               sparse_lr=0.05, warmup_steps=warmup)
            pipeline = make_pipeline(dmp, optim.dense, cpu)
            kinds = {"fused_groups": len(optim.fused.param_groups),
                     "replicated_optimizers": len(optim.in_backward)}
            before = _weights(dmp)
            optim.before_step(1)
            pipeline.progress(in_step(data.train(0), stop_after=1))
            pipeline.reset()
            after = _weights(dmp)
        finally:
            dist.destroy_process_group()
    deltas = {k: after[k] - before[k] for k in before}
    deltas["__kinds__"] = kinds  # type: ignore[assignment]
    return deltas


@SLOW
@pytest.mark.parametrize("method", ["full", "cce"])
def test_warmup_scales_the_first_update_of_every_parameter(method: str) -> None:
    """Adagrad's (and row-wise Adagrad's) first update is lr * g / |g|: with warm-up N, step 1
    uses lr / N, so every parameter moves exactly 1/N as far. This reaches the fused fbgemm
    tables only if their KeyedOptimizer pushes the new lr into the TBE module."""
    quiet_known_warnings()
    a, b = _first_step_deltas(0, method), _first_step_deltas(4, method)
    kinds = a.pop("__kinds__")
    b.pop("__kinds__")
    # both kinds of embedding kernels are in play: fused fbgemm (sharded) and replicated
    assert kinds["fused_groups"] > 0 and kinds["replicated_optimizers"] > 0, kinds
    embeddings = [k for k in a if "embedding_bags" in k]
    dense = [k for k in a if "dense_arch" in k or "over_arch" in k]
    assert embeddings and dense
    for k in embeddings + dense:
        moved = a[k].abs().sum().item()
        assert moved > 0, f"{k} did not train"
        ratio = b[k].abs().sum().item() / moved
        assert ratio == pytest.approx(0.25, rel=1e-3), (k, ratio)


@SLOW
def test_warmup_keeps_every_step_within_twice_the_first_on_synthetic() -> None:
    base = ("--data", "synthetic", "--batch-size", "512", "--synthetic-train-batches", "16",
            "--synthetic-val-batches", "2", "--synthetic-test-batches", "2", "--method", "hashing",
            "--no-progress")
    without = run(*base, "--warmup-steps", "0")
    with_default = run(*base, "--warmup-steps", "8", "--epochs", "2")
    lw, ld = losses(without), losses(with_default)
    assert lw[0] == pytest.approx(ld[0], abs=1e-6)  # same model, same first batch
    assert max(lw) > 2 * lw[0], lw  # the control breaks the rule ...
    assert max(ld) <= 2 * ld[0], ld  # ... warm-up keeps it
    assert ld[-1] < ld[0]


# ------------------------------------------------------------------ preprocessed data


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """A hand-made CSV: 3 categorical features, a multi-hot one, one dense column."""
    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    n = 600
    users = rng.integers(0, 40, n)
    items = rng.integers(0, 25, n)
    city = rng.choice(["a", "b", "c"], n)
    tags = ["|".join(rng.choice(list("xyzw"), rng.integers(1, 4), replace=False)) for _ in range(n)]
    age = rng.normal(0, 1, n)
    label = (rng.random(n) < 1 / (1 + np.exp(-(users % 3 - 1 + 0.5 * age)))).astype(int)
    lines = ["label,user,item,city,tags,age"] + [
        f"{label[i]},u{users[i]},i{items[i]},{city[i]},{tags[i]},{age[i]:.4f}" for i in range(n)]
    csv = d / "tiny.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = d / "pre"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = preprocess_main(["--format", "csv", "--input", str(csv), "--categorical-columns",
                              "user,item,city", "--multi-hot-columns", "tags", "--dense-columns",
                              "age", "--no-progress", "--out", str(out)])
    assert rc in (0, None)
    meta = json.loads((out / "meta.json").read_text())
    return {"dir": str(out), "meta": meta, "users": len(set(users)), "items": len(set(items))}


@SLOW
def test_full_table_on_preprocessed_has_vocabulary_rows(tiny_dir: Dict[str, Any]) -> None:
    meta = tiny_dir["meta"]
    vocab = {f["name"]: f["vocab_size"] for f in meta["features"]}
    # the vocabulary is the data's: every distinct user / item plus the OOV id
    assert vocab["user"] == tiny_dir["users"] + 1 and vocab["item"] == tiny_dir["items"] + 1
    m = run("--data", "preprocessed", "--data-dir", tiny_dir["dir"], "--method", "full",
            "--batch-size", "32", "--epochs", "2", "--warmup-steps", "5", "--no-progress")
    assert m["table_rows"] == {f"t_{name}": v for name, v in vocab.items()}
    dim = 16
    assert m["full_embedding_params"] == sum(vocab.values()) * dim == m["embedding_params"]
    assert m["colliding_features"] == []
    steps_per_epoch = meta["splits"]["train"]["rows"] // 32
    assert m["steps"] == 2 * steps_per_epoch
    assert [e["step"] for e in m["evaluations"]] == [steps_per_epoch, 2 * steps_per_epoch]
    assert all(math.isfinite(v) for v in losses(m))
    assert 0 <= m["test_auc"] <= 1


@SLOW
def test_preprocessed_without_dense_gets_a_constant_column(tmp_path: Path) -> None:
    csv = tmp_path / "nodense.csv"
    rng = np.random.default_rng(1)
    rows = [f"{int(rng.random() < 0.3)},{rng.integers(0, 30)},{rng.integers(0, 9)}" for _ in range(300)]
    csv.write_text("label,user,item\n" + "\n".join(rows) + "\n")
    out = tmp_path / "pre"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        preprocess_main(["--format", "csv", "--input", str(csv), "--no-progress", "--out", str(out)])
    import torch.distributed as dist

    args = data_args(data="preprocessed", data_dir=str(out), batch_size=16)
    with world_of_one():
        dist.init_process_group("gloo")
        try:
            data = sources.load_data(args, 0, 1)
        finally:
            dist.destroy_process_group()
    assert data.dense_in == 1
    batch = next(iter(data.train(0)))
    assert batch.dense_features.shape == (16, 1) and bool((batch.dense_features == 1).all())
    assert any("constant-1 dense column" in n for n in data.notes)
    # the counts hook: per-id training frequencies of every table, from the directory
    tables = sources.table_configs(data, 16)
    counts = sources.table_counts(data, tables)
    for t in tables:
        expected = np.load(out / "counts" / f"{t.feature_names[0]}.npy")
        assert counts[t.name].shape == (t.num_embeddings,)
        np.testing.assert_array_equal(counts[t.name], expected)
    train_rows = json.loads((out / "meta.json").read_text())["splits"]["train"]["rows"]
    assert [int(c.sum()) for c in counts.values()] == [train_rows, train_rows]  # one id per row


def test_shuffled_order_reproducible_by_seed(tiny_dir: Dict[str, Any]) -> None:
    import torch.distributed as dist

    def labels_of(data: sources.Data, epoch: int) -> List[float]:
        return torch.cat([torch.cat([b.labels, b.sparse_features.values().float()])
                          for b in data.train(epoch)]).tolist()

    def load(kind: str, seed: int) -> sources.Data:
        flags = (dict(data="preprocessed", data_dir=tiny_dir["dir"], batch_size=32)
                 if kind == "pre" else dict(batch_size=16, synthetic_train_batches=6))
        return sources.load_data(data_args(**flags, seed=seed), 0, 1)

    with world_of_one():
        dist.init_process_group("gloo")
        try:
            for kind in ("pre", "synthetic"):
                a, b, c = load(kind, 0), load(kind, 0), load(kind, 1)
                assert labels_of(a, 0) == labels_of(b, 0)  # same seed, same epoch: same order
                assert labels_of(a, 1) == labels_of(b, 1)
                assert labels_of(a, 0) != labels_of(a, 1)  # a new order every epoch
                assert labels_of(a, 0) != labels_of(c, 0)  # and per seed
                if kind == "synthetic":  # the same fixed batches, permuted
                    assert sorted(labels_of(a, 0)) == sorted(labels_of(a, 1))
        finally:
            dist.destroy_process_group()


@SLOW
def test_resume_is_exact_mid_warmup(tmp_path: Path) -> None:
    """Epoch 1, then --resume for epoch 2, with the warm-up (12 steps) spanning the resume
    point: loss curve, evaluations and best-epoch numbers equal a straight 2-epoch run."""
    base = ("--data", "synthetic", "--batch-size", "128", "--synthetic-train-batches", "8",
            "--synthetic-val-batches", "2", "--synthetic-test-batches", "2", "--method", "cce",
            "--warmup-steps", "12", "--no-progress",
            # the default schedule follows --epochs (1 here, 2 there): pin it
            "--no-recluster")
    ck = str(tmp_path / "ck")
    first = run(*base, "--epochs", "1", "--checkpoint-dir", ck)
    resumed = run(*base, "--epochs", "2", "--checkpoint-dir", ck, "--resume")
    straight = run(*base, "--epochs", "2")
    assert [s for s, _ in resumed["train_loss_curve"]] == list(range(9, 17))
    assert losses(first) + losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    assert len(resumed["evaluations"]) == 2  # epoch 1's came back from the checkpoint
    for a, b in zip(resumed["evaluations"], straight["evaluations"]):
        assert a["step"] == b["step"]
        for k in ("val_logloss", "val_auc", "test_logloss", "test_auc"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["test_logloss"] == pytest.approx(straight["test_logloss"], abs=1e-6)


# ------------------------------------------------------------------ evaluation at world 2


class _DenseLogit(torch.nn.Module):
    """A stand-in model: the logit is the first dense feature."""

    def forward(self, batch: Any) -> Any:
        logits = batch.dense_features[:, 0]
        return logits.sum(), (logits.detach(), logits, batch.labels)


def _evaluate_uneven(rank: int, world: int) -> Dict[str, float]:
    from torchrec_cce.data.common import make_batch

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(10, generator=g), (torch.rand(10, generator=g) < 0.4).float()
    sizes = [[3, 3], [3, 1]][rank]  # same batch count, unequal rows (a smaller last batch)
    start = [0, 6][rank]
    batches = []
    for n in sizes:
        rows = slice(start, start + n)
        batches.append(make_batch(logits[rows].view(-1, 1), torch.zeros(n, 1, dtype=torch.long),
                                  labels[rows], ["f"]))
        start += n
    quiet_known_warnings()
    return evaluate(_DenseLogit(), batches, torch.device("cpu"))


@SLOW
def test_evaluation_over_two_ranks_with_unequal_batches_is_exact() -> None:
    from multiprocess import run_multiprocess
    from sklearn.metrics import log_loss, roc_auc_score

    results = run_multiprocess(_evaluate_uneven, 2, timeout=600)
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(10, generator=g), (torch.rand(10, generator=g) < 0.4).float()
    probs = torch.sigmoid(logits).double().numpy()
    for r in results:
        assert r["auc"] == pytest.approx(roc_auc_score(labels.numpy(), probs), abs=1e-6)
        assert r["logloss"] == pytest.approx(log_loss(labels.numpy(), probs), abs=1e-6)


def _evaluate_counting_trims(rank: int, world: int) -> Dict[str, Any]:
    from torchrec_cce.data.common import make_batch
    from torchrec_cce.train import evaluation, heap

    calls = []
    evaluation.release_free_heap = lambda: calls.append(1) or True
    g = torch.Generator().manual_seed(rank)
    logits, labels = torch.randn(260, generator=g), (torch.rand(260, generator=g) < 0.4).float()
    batches = [make_batch(logits[i:i + 2].view(-1, 1), torch.zeros(2, 1, dtype=torch.long),
                          labels[i:i + 2], ["f"]) for i in range(0, 260, 2)]
    quiet_known_warnings()
    out = evaluate(_DenseLogit(), batches, torch.device("cpu"))
    return {"trims": len(calls), "real_trim": heap.release_free_heap(), **out,
            "logits": logits, "labels": labels}


def test_evaluation_returns_free_heap_every_64_batches_and_at_the_end() -> None:
    """130 batches per rank: the heap is trimmed after batches 64 and 128 and once at the end
    (torchrec_cce.train.heap), and the metrics are those of every rank's rows."""
    from multiprocess import run_multiprocess
    from sklearn.metrics import log_loss, roc_auc_score

    from torchrec_cce.train.heap import TRIM_EVERY

    results = run_multiprocess(_evaluate_counting_trims, 2, timeout=600)
    logits = torch.cat([r["logits"] for r in results])
    labels = torch.cat([r["labels"] for r in results]).numpy()
    probs = torch.sigmoid(logits).double().numpy()
    for r in results:
        assert r["trims"] == 130 // TRIM_EVERY + 1
        assert r["real_trim"] is True  # glibc: malloc_trim exists on this Linux machine
        assert r["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)
        assert r["logloss"] == pytest.approx(log_loss(labels, probs), abs=1e-6)


# ------------------------------------------------------------------ raw readers


def test_modulo_ids_detects_collisions() -> None:
    from torchrec_cce.data.common import make_batch

    mod = sources.ModuloIds(["a", "b", "c"], [10, 10, 4])
    ids = torch.tensor([[3, 7, 1], [13, 7, 2], [3, 17, 3]])  # a: 3 and 13 share row 3
    out = mod(make_batch(torch.zeros(3, 0), ids, torch.zeros(3), ["a", "b", "c"]))
    assert out.sparse_features.values().tolist() == [3, 3, 3, 7, 7, 7, 1, 2, 3]
    assert mod.collided == [True, True, False]  # b: 7 and 17 share row 7; c: 1, 2, 3 fit in 4
    mod(make_batch(torch.zeros(1, 0), torch.tensor([[3, 7, 5]]), torch.zeros(1), ["a", "b", "c"]))
    assert mod.collided == [True, True, True]  # c: 5 lands on 1's row


@SLOW
def test_criteo_tsv_warns_about_kaggle_sized_collisions(tmp_path: Path) -> None:
    """cat_0 gets Kaggle's 1,460 rows: raw ids 0x1 and 0x5b5 (= 1 + 1460) collide, and the run
    says so in one line; the constant other features do not."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(1200):
        label = int(rng.random() < 0.3)
        dense = "\t".join(str(int(x)) for x in rng.integers(0, 5, 13))
        cats = ["00000001" if i % 2 else "000005b5"] + ["0000000a"] * 25
        lines.append(f"{label}\t{dense}\t" + "\t".join(cats))
    path = tmp_path / "small.tsv"
    path.write_text("\n".join(lines) + "\n")
    m = run("--data", "criteo_tsv", "--train-path", str(path), "--batch-size", "100",
            "--method", "full", "--warmup-steps", "2", "--no-progress")
    assert m["colliding_features"] == ["cat_0"]
    warning = [ln for ln in m["stdout"].splitlines() if ln.startswith("warning: ids taken modulo")]
    assert len(warning) == 1 and "cat_0 (1460 rows)" in warning[0], m["stdout"]
    # 12 batches per epoch: 0, 10 -> test, 1, 11 -> val (--test-fraction 0.1), the rest train
    assert m["steps"] == 8
    assert m["table_rows"]["t_cat_0"] == 1460


def test_raw_file_steps_per_epoch_is_what_every_rank_trains(tmp_path: Path) -> None:
    """A streamed TSV's epoch length (it scales the warm-up and the re-clustering steps) is the
    number of training batches each rank yields, held-out batches excluded."""
    rng = np.random.default_rng(0)
    for rows, batch, fraction in ((1234, 100, 0.2), (10_000, 1024, 0.2), (999, 64, 0.1)):
        lines = ["\t".join([str(int(rng.random() < 0.3))] + ["1"] * 13 + ["0000000a"] * 26)
                 for _ in range(rows)]
        path = tmp_path / f"r{rows}.tsv"
        path.write_text("\n".join(lines) + "\n")
        args = data_args(data="criteo_tsv", train_path=str(path), batch_size=batch,
                         test_fraction=fraction, shuffle_buffer=0)
        datas = [sources.load_data(args, rank, 2) for rank in range(2)]
        counts = [sum(1 for _ in d.train(0)) for d in datas]
        assert datas[0].steps_per_epoch == datas[1].steps_per_epoch == min(counts), counts


def test_bad_flags() -> None:
    assert "needs --data-dir" in cli_error("--data", "preprocessed")
    assert "does not apply to --data preprocessed" in cli_error(
        "--data", "preprocessed", "--data-dir", "x", "--num-embeddings-per-feature", "3")
    assert "--patience must be positive, got 0" in cli_error("--patience", "0")


def test_preprocessed_empty_split_is_a_clear_error(tmp_path: Path, tiny_dir: Dict[str, Any]) -> None:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(tiny_dir["dir"], d)
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["val"]["rows"] = 0
    (d / "meta.json").write_text(json.dumps(meta))
    args = data_args(data="preprocessed", data_dir=str(d), batch_size=16)
    with pytest.raises(ValueError, match="the val split is empty"):
        sources.load_data(args, 0, 1)


# ------------------------------------------------------------------ shared real data


@pytest.fixture(scope="module")
def frappe_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    src = SHARED / "frappe.csv"
    if not src.exists():
        pytest.skip(f"{src} not found (shared real data absent)")
    out = tmp_path_factory.mktemp("frappe") / "pre"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        preprocess_main(["--format", "csv", "--input", str(src), "--no-progress", "--out", str(out)])
    return str(out)


@SLOW
def test_defaults_train_stably_on_frappe(frappe_dir: str) -> None:
    """The default recipe on real data: every step within 2x the first, and it learns."""
    meta = json.loads((Path(frappe_dir) / "meta.json").read_text())
    m = run("--data", "preprocessed", "--data-dir", frappe_dir, "--method", "full",
            "--epochs", "2", "--no-progress")
    ls = losses(m)
    assert len(ls) == 2 * (meta["splits"]["train"]["rows"] // 1024)
    assert max(ls) <= 2 * ls[0], (max(ls), ls[0])
    rate = meta["splits"]["test"]["click_rate"]
    constant = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert m["test_logloss"] < constant - 0.1 and m["test_auc"] > 0.85, m["evaluations"]
