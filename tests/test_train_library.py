"""The training library ``torchrec_cce.train``, module by module, without the example script:
evaluation protocol, plan selection, warm-up, hooks (alone and inside TorchRec's
TrainPipelineSparseDist at world size 2), defaults, fault injection and the report."""

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from multiprocess import run_multiprocess
from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, MPEConfig
from torchrec_cce.train import (Hooks, MPEHook, Optimizers, Protocol, ReclusterHook,
                                training_hooks)
from torchrec_cce.train import defaults
from torchrec_cce.train.checkpoint import FAULT_ENV
from torchrec_cce.train.optimizers import default_warmup_steps, warmup_factor
from torchrec_cce.train.plan_select import select_plan
from torchrec_cce.train.report import print_summary, run_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ evaluation protocol
def _record(step: int, val: float) -> Dict[str, Any]:
    return {"epoch": step, "step": step, "val_logloss": val, "val_auc": 0.5,
            "test_logloss": 10 + val, "test_auc": 0.5}


def test_protocol_best_ties_patience_and_state() -> None:
    p = Protocol(patience=2)
    assert p.best is None and not p.should_stop and p.last_step() is None
    news = [p.add(_record(s, v)) for s, v in enumerate([0.5, 0.4, 0.4, 0.45], start=1)]
    assert news == [True, True, False, False]  # an equal loss is not a new best
    assert p.best["step"] == 2 and p.since_best == 2 and p.should_stop
    q = Protocol(patience=3)
    q.load(p.state())
    assert q.evaluations == p.evaluations and q.best["step"] == 2 and not q.should_stop
    assert Protocol().add(_record(1, 1.0)) and not Protocol(None).should_stop


# ------------------------------------------------------------------ plan selection
def test_select_plan_keeps_the_lowest_validation_loss() -> None:
    vals = [0.52, 0.49, 0.49, 0.6]  # 1 and 2 tie: the earlier wins
    calls: List[int] = []
    lines: List[str] = []

    def candidate(i: int) -> Tuple[Dict[str, Any], str]:
        calls.append(i)
        m = {"plan_candidates": len(vals), "embedding_plan": {"i": i}, "method": f"m{i}",
             "val_logloss": vals[i], "val_auc": 0.7, "test_logloss": 1 + i, "test_auc": 0.6,
             "best_epoch": 1, "wall_seconds": 0.0, "args": {"plan_candidate": i},
             "reclusterings": [{"step": s} for s in range(i)]}
        return m, f"curves {i}"

    metrics, extra = select_plan(candidate, lines.append)
    assert calls == [0, 1, 2, 3] and extra == "curves 1"
    sel = metrics["plan_selection"]
    assert sel["chosen"] == 1 and [c["val_logloss"] for c in sel["candidates"]] == vals
    assert [c["plan"] for c in sel["candidates"]] == [{"i": i} for i in range(4)]
    assert [c["reclusterings"] for c in sel["candidates"]] == [0, 1, 2, 3]
    assert metrics["test_logloss"] == 2 and metrics["args"]["plan_candidate"] is None
    assert "plan_candidates" not in metrics
    assert lines[0].startswith("-- candidate plan 1 ") and "1: m1 0.4900 *" in lines[-1]


# ------------------------------------------------------------------ warm-up
def test_default_warmup_is_a_quarter_of_the_run_at_most_100_steps() -> None:
    assert [default_warmup_steps(n) for n in (1, 3, 9, 12, 40, 399, 400, 10**6)] == \
        [1, 1, 2, 3, 10, 99, 100, 100]


def test_warmup_sets_every_learning_rate_without_dmp() -> None:
    assert [warmup_factor(s, 4) for s in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert warmup_factor(1, 0) == 1.0
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1))
    apply_optimizer_in_backward(torch.optim.Adagrad, model[0].parameters(), {"lr": 0.2})
    optim = Optimizers(model, lambda ps: torch.optim.SGD(ps, lr=0.1), dense_lr=0.1,
                       sparse_lr=0.2, warmup_steps=4)
    assert optim.fused is None and len(optim.in_backward) == 1
    assert set(optim.dense.params) == {"1.weight", "1.bias"}  # in-backward params left out
    optim.before_step(1)
    assert optim.dense.param_groups[0]["lr"] == pytest.approx(0.025)
    assert optim.in_backward[0].param_groups[0]["lr"] == pytest.approx(0.05)
    optim.before_step(6)
    assert optim.dense.param_groups[0]["lr"] == 0.1
    assert optim.in_backward[0].param_groups[0]["lr"] == 0.2


# ------------------------------------------------------------------ hooks
TABLES = [EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=500,
                             feature_names=["a"]),
          EmbeddingBagConfig(name="t_b", embedding_dim=8, num_embeddings=300,
                             feature_names=["b"])]


def _kjt(seed: int, n: int = 64) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, 500, (n,), generator=g),
                        torch.randint(0, 300, (n,), generator=g)])
    return KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=values,
                                               lengths=torch.ones(2 * n, dtype=torch.int64))


def test_recluster_hook_fires_at_its_steps_and_changes_the_assignment() -> None:
    torch.manual_seed(0)
    ebc = CCEEmbeddingBagCollection(TABLES, {"t_a": CCEConfig(rows=16, chunks=2)})
    hooks = training_hooks(ebc, steps_per_epoch=8, recluster_at=(0.25, 0.5), kmeans_iters=2)
    (hook,) = hooks.hooks
    assert isinstance(hook, ReclusterHook) and hook.schedule.at_steps == [2, 4]
    assert hooks.of_type(MPEHook) is None
    table = ebc.tables["t_a"]
    for step in range(1, 5):
        ebc(_kjt(step))  # the re-clustering samples the ids it saw
        before = table.remap(torch.arange(500))
        lines = hooks.after_step(step)
        after = table.remap(torch.arange(500))
        changed = any(not torch.equal(x, y) for x, y in zip(before, after))
        assert bool(lines) == changed == (step in (2, 4)), step
    assert [r["step"] for r in hook.log] == [2, 4] and hook.seconds > 0
    assert lines == [f"re-clustered 1 tables at step 4 in "
                     f"{sum(s['seconds'] for s in hook.log[-1]['tables'].values()):.2f} s"]
    # a collection without CCE tables gets no hook
    assert training_hooks(CCEEmbeddingBagCollection(TABLES, {}), 8).hooks == []


def test_mpe_hook_checks_counts_at_step_1_and_selects_after_the_search() -> None:
    cfg = MPEConfig(groups=4, bits=(0, 2, 4))
    ebc = CCEEmbeddingBagCollection(TABLES, {"t_a": cfg})
    with pytest.raises(ValueError, match=r"MPE tables \['t_a'\] have no per-id counts"):
        training_hooks(ebc, 8, mpe_warmup_steps=0).after_step(1)
    hooks = training_hooks(ebc, steps_per_epoch=20, mpe_search_steps=3)
    (hook,) = hooks.hooks
    assert isinstance(hook, MPEHook)
    assert hook.schedule.warmup_steps == 2  # no counts: a tenth of an epoch counts the ids
    events = {}
    for step in range(1, 6):
        ebc.train()
        ebc(_kjt(step))
        lines = hooks.after_step(step)
        if lines:
            events[step] = lines
    assert events == {2: ["MPE groups_built for 1 tables at step 2"],
                      5: ["MPE selected for 1 tables at step 5"]}
    assert [r["events"] for r in hook.log] == [["groups_built"], ["selected"]]
    assert hook.log[-1]["tables"]["t_a"]["stage"] == "retrain"


class _Counting:
    def __init__(self) -> None:
        self.log: List[Any] = []
        self.last_message = ""

    def due(self, step: int) -> bool:
        return step % 3 == 0

    def run(self, model: Any, step: int, optimizers: Any = ()) -> Dict[str, Any]:
        self.log.append((model, step, list(optimizers)))
        self.last_message = f"ran at {step}"
        return {"step": step}


def test_hooks_run_any_hook_when_due_with_the_optimizers() -> None:
    hook, model, opt = _Counting(), object(), object()
    hooks = Hooks(model, [hook], optimizers=[opt])
    lines = [line for step in range(1, 8) for line in hooks.after_step(step)]
    assert lines == ["ran at 3", "ran at 6"]
    assert hook.log == [(model, 3, [opt]), (model, 6, [opt])]


# the pipelined loop with hooks (and no pipeline call) equals the plain loop with
# re-clustering (test_pipeline's)
def _hooked_pipeline_losses(rank: int, world: int) -> Tuple[List[float], List[float]]:
    from test_pipeline import RECLUSTER_AT, STEPS, build, make_batch, plain_losses

    dmp, dense = build(world)
    pipeline = TrainPipelineSparseDist(dmp, dense, torch.device("cpu"))
    hooks = training_hooks(dmp, steps_per_epoch=2 * RECLUSTER_AT, recluster_at=[0.5],
                           optimizers=[dense])  # no pipeline call after the re-clustering
    batches = iter([make_batch(step, rank) for step in range(1, STEPS + 1)])
    losses = []
    for step in range(1, STEPS + 1):
        loss, _, _ = pipeline.progress(batches)
        losses.append(float(loss))
        hooks.after_step(step)
    assert [r["step"] for r in hooks.of_type(ReclusterHook).log] == [RECLUSTER_AT]
    return plain_losses(rank, world), losses


@pytest.mark.timeout(900)
def test_hooks_keep_the_pipeline_equal_to_the_plain_loop_at_world_2() -> None:
    for rank, (plain, hooked) in enumerate(run_multiprocess(_hooked_pipeline_losses, 2)):
        for step, (a, b) in enumerate(zip(plain, hooked), start=1):
            assert abs(a - b) < 2e-6, f"rank {rank} step {step}: plain {a} vs hooked {b}"


def _placed_assignment(rank: int, world: int, below: int) -> Dict[str, Any]:
    """``train.shard`` of a collection with one CCE table of 40,000 ids (p: 40,000 ids x 2
    chunks x 4 bits = 40,000 bytes) at ``replicate_assignment_below = below``."""
    from torchrec_cce.train import shard

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=40_000,
                                 feature_names=["f"])]
    ebc = CCEEmbeddingBagCollection(tables, {"big": CCEConfig(rows=16, chunks=2)},
                                    device=torch.device("meta"))
    dmp, table = shard(torch.nn.ModuleDict({"sparse_arch": ebc}), world, torch.device("cpu"),
                       batch_size=64, replicate_assignment_below=below)
    m = dmp.module["sparse_arch"].tables["big"]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.arange(rank, 40_000, 97),
                                              lengths=torch.tensor([len(range(rank, 40_000, 97))]))
    out = dmp.module["sparse_arch"](kjt).wait().values()
    return {"stored": (m.stored_lo, m.stored_hi), "bytes": m.packed_assignment_bytes(
        m.stored_hi - m.stored_lo), "table": table, "out_finite": bool(out.isfinite().all())}


@pytest.mark.timeout(900)
def test_shard_replicates_small_assignments_and_splits_large_ones() -> None:
    """``train.shard(replicate_assignment_below=)``: p under the threshold is whole on every
    rank; at the threshold or above it is split by id range, half per rank."""
    whole = run_multiprocess(_placed_assignment, 2, 40_001)
    split = run_multiprocess(_placed_assignment, 2, 40_000)
    assert [r["stored"] for r in whole] == [(0, 40_000), (0, 40_000)]
    assert [r["bytes"] for r in whole] == [40_000, 40_000]
    assert [r["stored"] for r in split] == [(0, 20_000), (20_000, 40_000)]
    assert [r["bytes"] for r in split] == [20_000, 20_000]
    assert all(r["out_finite"] for r in whole + split)


def test_replicate_below_flag_in_bytes() -> None:
    from torchrec_cce.distributed.assignment import DEFAULT_REPLICATE_ASSIGNMENT_BELOW

    args = argparse.Namespace(replicate_assignment_below_mb=None)
    assert defaults.replicate_below(args) == DEFAULT_REPLICATE_ASSIGNMENT_BELOW
    args.replicate_assignment_below_mb = 2.5
    assert defaults.replicate_below(args) == int(2.5 * 2 ** 20)
    args.replicate_assignment_below_mb = -1
    with pytest.raises(ValueError, match="--replicate-assignment-below-mb"):
        defaults.replicate_below(args)


# ------------------------------------------------------------------ defaults
def _flags(**kw: Any) -> argparse.Namespace:
    base = dict(recluster_at=None, recluster_every_epoch=None, no_recluster=False, epochs=3,
                cce_init=None, cce_keep_remainder=None, kmeans_iters=None, codebook_dtype=None,
                planner_methods=None, embedding_budget_mb=None, method="cce")
    return argparse.Namespace(**{**base, **kw})


def test_cce_defaults_and_their_overrides() -> None:
    cs = defaults.cce_settings(_flags())
    assert cs == {"recluster_at": defaults.DEFAULT_RECLUSTER_AT,
                  "recluster_every_epoch": defaults.default_recluster_epochs(3),
                  "kmeans_iters": defaults.DEFAULT_KMEANS_ITERS, "init": defaults.DEFAULT_CCE_INIT,
                  "keep_remainder": defaults.DEFAULT_CCE_KEEP_REMAINDER,
                  "codebook_dtype": defaults.DEFAULT_CCE_CODEBOOK_DTYPE}
    assert defaults.recluster_fractions(cs) == [
        float(f) for f in defaults.DEFAULT_RECLUSTER_AT.split(",")]
    off = defaults.cce_settings(_flags(no_recluster=True, cce_init="hash", kmeans_iters=5))
    assert (off["recluster_at"], off["recluster_every_epoch"]) == ("", 0)
    assert off["init"] == "hash" and off["keep_remainder"] is False and off["kmeans_iters"] == 5
    # float16 is CCE's default only: a planner choosing per table keeps float32 unless asked
    assert defaults.codebook_dtype(_flags()) == torch.float16
    assert defaults.codebook_dtype(_flags(embedding_budget_mb=1.0)) is None
    assert defaults.codebook_dtype(_flags(method="qr")) is None
    assert defaults.codebook_dtype(_flags(codebook_dtype="bfloat16")) == torch.bfloat16


# ------------------------------------------------------------------ fault injection
@pytest.mark.parametrize("rank,killed", [(1, True), (0, False)])
def test_fault_injection_kills_rank_1_at_the_attempts_step(rank: int, killed: bool) -> None:
    code = ("from torchrec_cce.train.checkpoint import inject_fault\n"
            f"inject_fault(4, {rank}, 2)\ninject_fault(5, {rank}, 2)\nprint('alive')")
    env = dict(os.environ, **{FAULT_ENV: "5,4"}, TORCHELASTIC_RESTART_COUNT="0",
               PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    if killed:  # attempt 0: step 5 (step 4 is attempt 1's)
        assert out.returncode == -9 and "SIGKILL of rank 1 after step 5 (attempt 0)" in out.stdout
    else:
        assert out.returncode == 0 and "alive" in out.stdout


def test_fault_injection_inside_a_checkpoint_save() -> None:
    code = ("from torchrec_cce.train.checkpoint import inject_fault\n"
            "inject_fault(5, 1, 2)\nprint('after the step')\ninject_fault(5, 1, 2, 'save')\n"
            "print('alive')")
    env = dict(os.environ, **{FAULT_ENV: "save:5"}, TORCHELASTIC_RESTART_COUNT="0",
               PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -9 and "after the step" in out.stdout and "alive" not in out.stdout
    assert "SIGKILL of rank 1 while saving step 5 (attempt 0)" in out.stdout


# ------------------------------------------------------------------ report
def test_run_metrics_report_the_best_evaluation_and_the_bytes_stored(capsys: Any) -> None:
    from torchrec_cce import memory_report, summarize

    ebc = CCEEmbeddingBagCollection(TABLES, {"t_a": CCEConfig(rows=16, chunks=2)})
    protocol = Protocol()
    for step, val in ((4, 0.5), (8, 0.45), (12, 0.47)):
        protocol.add(_record(step, val))
    import time

    m = run_metrics(model=ebc, protocol=protocol, method="cce", world=2,
                    progress={"step": 12, "epoch": 3, "step_in_epoch": 0}, samples=1200,
                    train_seconds=3.0, recluster_seconds=0.5, eval_seconds=0.5,
                    start=time.perf_counter(), table_configs=TABLES,
                    compression={"t_a": CCEConfig(rows=16, chunks=2)})
    totals = summarize(memory_report(ebc))
    # the re-clustering workspace: an upper bound, refined by the table's counts when given
    from torchrec_cce.clustering.recluster import recluster_workspace_bytes

    a = ebc.tables["t_a"]
    skewed = {"t_a": (1000.0 / torch.arange(1, 501, dtype=torch.float64) ** 2).ceil().numpy()}
    assert m["recluster_workspace_bytes"] == recluster_workspace_bytes(a, 2)
    refined = run_metrics(model=ebc, protocol=protocol, method="cce", world=2,
                          progress={"step": 12, "epoch": 3, "step_in_epoch": 0}, samples=1200,
                          train_seconds=3.0, recluster_seconds=0.5, eval_seconds=0.5,
                          start=time.perf_counter(), table_configs=TABLES,
                          compression={"t_a": CCEConfig(rows=16, chunks=2)}, counts=skewed)
    assert refined["recluster_workspace_bytes"] == recluster_workspace_bytes(
        a, 2, counts=skewed["t_a"])
    assert (m["best_step"], m["val_logloss"], m["test_logloss"]) == (8, 0.45, 10.45)
    assert m["embedding_bytes"] == totals["compressed_bytes"] < m["full_embedding_bytes"]
    assert m["train_samples_per_s"] == pytest.approx(1200 / 2.0)
    assert m["table_rows"] == {"t_a": 500, "t_b": 300} and m["steps"] == 12
    m["bayes_logloss"] = None
    print_summary(m)
    out = capsys.readouterr().out
    assert "== cce on 2 ranks, 12 steps, 3 evaluations ==" in out
    assert "best (min val log loss): epoch 8, step 8" in out
    assert "test log loss      10.4500" in out
