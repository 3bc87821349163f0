"""Checkpoints (torchrec_cce/checkpoint.py): atomic writes, pruning, exact resume, resharding,
corrupt/partial checkpoints and the non-finite guard.

The distributed tests train a small model (a CCE table whose assignment is split by id range, a
hashing table and a full table under DistributedModelParallel, fused row-wise Adagrad, a dense
MLP with dropout and Adagrad) in real 2-process gloo worlds, with a per-epoch shuffle, two
re-clusterings and a checkpoint every 4 steps. A run killed after step 6 and resumed from its
step-4 checkpoint must reproduce the straight run bit for bit: that needs the model, both
optimizers, the re-clustering reservoirs, the shuffle position and the dropout RNG restored.
The single-process tests use the unsharded module and a plain torch optimizer.
"""

import json
import os
import shutil
from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from multiprocess import run_multiprocess
from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, HashingTrickConfig
from torchrec_cce.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointReshardError,
    NonFiniteError,
    cce_tables,
    check_finite,
    guard_loss,
)
from torchrec_cce.schedules import ReclusterSchedule

SIZES = {"user": 2000, "item": 500, "ctx": 40}
DIM = 8
BATCH = 32  # per rank
GLOBAL_BATCHES = 12  # per epoch
EPOCHS = 2
EVERY = 4
RECLUSTER_AT = [3, 7]
ROWS = 2  # CCE rows per chunk: reservoir capacity 256 x 2 = 512 ids, exceeded in training
CAPACITY = 256 * ROWS
CONFIG = {"method": "cce", "rows": ROWS, "dim": DIM}


def tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n,
                               feature_names=[f]) for f, n in SIZES.items()]


def compression(rows: int = ROWS) -> Dict[str, Any]:
    return {"t_user": CCEConfig(rows=rows, chunks=2, seed=1), "t_item": HashingTrickConfig(rows=64)}


class Tiny(nn.Module):
    """Pooled embeddings -> MLP with dropout -> BCE loss."""

    def __init__(self, rows: int = ROWS, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.ebc = CCEEmbeddingBagCollection(tables(), compression(rows), device=device)
        self.dense = nn.Sequential(nn.Linear(len(SIZES) * DIM, 8, device=device), nn.ReLU(),
                                   nn.Dropout(0.3), nn.Linear(8, 1, device=device))

    def forward(self, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> torch.Tensor:
        pooled = self.ebc(kjt)
        logits = self.dense(pooled.values()).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def make_batch(index: int, batch_size: int = BATCH):
    """Global batch ``index``: Zipf-like ids (many repeats), labels from the user id's parity."""
    g = torch.Generator().manual_seed(1000 + index)
    keys, values, lengths = list(SIZES), [], []
    for k, n in SIZES.items():
        lens = torch.randint(1, 5, (batch_size,), generator=g)
        lengths.append(lens)
        u = torch.rand(int(lens.sum()), generator=g)
        values.append((n * u ** 3).long().clamp_max(n - 1))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                              lengths=torch.cat(lengths))
    labels = (torch.rand(batch_size, generator=g) < 0.3).float()
    return kjt, labels


def order(epoch: int, seed: int = 7) -> torch.Tensor:
    """The epoch's shuffled order of global batches."""
    return torch.randperm(GLOBAL_BATCHES, generator=torch.Generator().manual_seed(seed * 100 + epoch))


# ---------------------------------------------------------------- distributed training
def build_dmp(rank: int, world: int):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    torch.manual_seed(0)
    model = Tiny(device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.1, "eps": 1e-8})
    sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=0)
    names = [c.name for c in model.ebc.codebook_table_configs()]
    plan = ShardingPlan({"ebc": construct_module_sharding_plan(
        model.ebc, {n: table_wise(rank=i % world, compute_kernel="fused")
                    for i, n in enumerate(names)},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=[sharder], device=torch.device("cpu"))
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.05))
    return dmp, dense, CombinedOptimizer([dmp.fused_optimizer, dense])


def reservoirs(model: nn.Module) -> Dict[str, Any]:
    out = {}
    for name, t in cce_tables(model).items():
        r = t.reservoir
        gen = r._generator.get_state() if r._generator is not None else None
        out[name] = {"ids": r.sample().clone(), "seen": r.seen, "rng": gen}
    return out


def local_state(dmp: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's pieces of every state-dict entry (compared rank by rank)."""
    from torchrec_cce.distributed.tensors import local_pieces

    out = {}
    for k, v in dmp.state_dict().items():
        for i, (t, off) in enumerate(local_pieces(v)):
            out[f"{k}#{i}@{off}"] = t.detach().clone()
    return out


def fused_state(optimizer: Any) -> Dict[str, torch.Tensor]:
    """This rank's fused (row-wise Adagrad) optimizer state, as plain tensors by key."""
    from torchrec_cce.distributed.tensors import local_pieces

    out = {}
    for param, state in optimizer.state_dict()["state"].items():
        for name, v in state.items():
            if hasattr(v, "local_shards"):
                for t, _ in local_pieces(v):
                    out[f"{param}.{name}"] = t.detach().clone()
    return out


def train(rank: int, world: int, ckpt_dir: str, stop_after: Optional[int] = None,
          resume: bool = False, keep: int = 2) -> Dict[str, Any]:
    dmp, dense, optimizer = build_dmp(rank, world)
    manager = CheckpointManager(ckpt_dir, keep=keep, config=CONFIG, batch_size=BATCH)
    steps_per_epoch = GLOBAL_BATCHES // world
    progress = {"epoch": 0, "step": 0, "step_in_epoch": 0}
    resumed = manager.load(dmp, optimizer) if resume else None
    if resumed is not None:
        progress = resumed.progress
    schedule = ReclusterSchedule(at_steps=RECLUSTER_AT, iters=3)
    losses: Dict[int, float] = {}
    step = progress["step"]
    for epoch in range(progress["epoch"], EPOCHS):
        perm = order(epoch)
        start = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        for i in range(start, steps_per_epoch):
            kjt, labels = make_batch(int(perm[i * world + rank]))
            loss = dmp(kjt, labels)
            dense.zero_grad()
            loss.backward()
            dense.step()
            step += 1
            losses[step] = float(loss.detach())
            guard_loss(loss, step, dmp)
            schedule.step(dmp, step, optimizers=[dense])
            if stop_after is not None and step == stop_after:
                return {"losses": losses, "stopped": step}
            end = i == steps_per_epoch - 1
            if step % EVERY == 0 or end:
                manager.save(step, dmp, optimizer, {"epoch": epoch + end, "step": step,
                                                    "step_in_epoch": 0 if end else i + 1})
    probe, probe_labels = make_batch(999)
    dmp.eval()
    with torch.no_grad():
        probe_loss = float(dmp(probe, probe_labels))
    return {"losses": losses, "state": local_state(dmp), "reservoirs": reservoirs(dmp),
            "fused": fused_state(optimizer),
            "probe_loss": probe_loss, "rng": torch.get_rng_state(),
            "resumed_step": None if resumed is None else resumed.step,
            "checkpoints": sorted(os.listdir(ckpt_dir))}


def _nan_guard(rank: int, world: int) -> List[str]:
    """Only rank 1's loss is NaN / only one rank's shard of a table is NaN: both ranks stop."""
    dmp, _, _ = build_dmp(rank, world)
    messages = []
    try:
        guard_loss(torch.tensor(float("nan") if rank == 1 else 0.5), 11)
    except NonFiniteError as e:
        messages.append(str(e))
    with torch.no_grad():
        for k, v in dmp.state_dict().items():
            if k.endswith("t_user__cce.weight"):
                for shard in v.local_shards():
                    shard.tensor[0, 0] = float("inf")
    try:
        check_finite(dmp, 12)
    except NonFiniteError as e:
        messages.append(str(e))
    return messages


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Dict[str, Any]:
    d = str(tmp_path_factory.mktemp("straight"))
    return {"dir": d, "ranks": run_multiprocess(train, 2, d, None, False, 0, timeout=900)}


@pytest.mark.timeout(1800)
def test_resume_mid_epoch_equals_straight_run(straight, tmp_path) -> None:
    d = str(tmp_path / "ckpt")
    # First attempt dies after step 6 (2 steps past its step-4 checkpoint, after the first
    # re-clustering at step 3 and before the second at step 7).
    first = run_multiprocess(train, 2, d, 6, True, 2, timeout=900)
    assert first[0]["stopped"] == 6
    assert sorted(os.listdir(d)) == ["step_4"]
    again = run_multiprocess(train, 2, d, None, True, 2, timeout=900)
    steps_per_rank = EPOCHS * GLOBAL_BATCHES // 2
    for rank in range(2):
        ref, got = straight["ranks"][rank], again[rank]
        assert got["resumed_step"] == 4
        assert sorted(got["losses"]) == list(range(5, steps_per_rank + 1))
        for s, loss in got["losses"].items():
            assert loss == ref["losses"][s], (rank, s)  # bitwise
        assert got["probe_loss"] == ref["probe_loss"]
        assert got["state"].keys() == ref["state"].keys()
        for k in ref["state"]:
            assert torch.equal(got["state"][k], ref["state"][k]), (rank, k)
        for name, res in ref["reservoirs"].items():
            assert res["seen"] > CAPACITY  # past its capacity: the replacement RNG was exercised
            assert got["reservoirs"][name]["seen"] == res["seen"]
            assert torch.equal(got["reservoirs"][name]["ids"], res["ids"])
            assert torch.equal(got["reservoirs"][name]["rng"], res["rng"])
        assert torch.equal(got["rng"], ref["rng"])  # dropout's RNG stream continued exactly
    # keep=2: only the two newest complete checkpoints are left.
    assert again[0]["checkpoints"] == ["step_12", "step_8"]
    # keep=0 (the straight run): every checkpoint kept, 4-step ones and epoch ends.
    assert straight["ranks"][0]["checkpoints"] == ["step_12", "step_4", "step_6", "step_8"]


def _load_world1(rank: int, world: int, ckpt_dir: str, batch_size: int):
    dmp, dense, optimizer = build_dmp(rank, world)
    manager = CheckpointManager(ckpt_dir, config=CONFIG, batch_size=batch_size, log=print)
    try:
        resumed = manager.load(dmp, optimizer)
    except CheckpointReshardError as e:
        return {"error": str(e)}
    probe, labels = make_batch(999)
    dmp.eval()
    with torch.no_grad():
        loss = float(dmp(probe, labels))
    return {"progress": resumed.progress, "probe_loss": loss, "reservoirs": reservoirs(dmp),
            "world": resumed.world_size,
            "fused": fused_state(optimizer)}


@pytest.mark.timeout(1800)
def test_reshard_world2_to_world1(straight) -> None:
    # The straight run's last checkpoint (step 12 = end of epoch 1 at world 2, 2 x 32 rows).
    d = straight["dir"]
    only = os.path.join(os.path.dirname(d), "only_step12")
    shutil.copytree(os.path.join(d, "step_12"), os.path.join(only, "step_12"))
    (one,) = run_multiprocess(_load_world1, 1, only, BATCH, timeout=900)
    assert one["world"] == 2
    # 12 steps x 64 rows = 24 steps of 32 rows on one rank.
    assert one["progress"] == {"epoch": 2, "step": 24, "step_in_epoch": 0}
    # Model resharded: the same function as the world-2 model (eval mode, no dropout).
    assert abs(one["probe_loss"] - straight["ranks"][0]["probe_loss"]) < 1e-6
    # Fused optimizer state resharded: every table now on the one rank, with the values of the
    # rank that held it at world 2 (table-wise sharding).
    world2 = {**straight["ranks"][0]["fused"], **straight["ranks"][1]["fused"]}
    # one state per codebook table: t_user__cce, t_item__hash, t_ctx
    assert one["fused"].keys() == world2.keys() and len(world2) == 3
    for k, v in world2.items():
        assert torch.equal(one["fused"][k], v), k
    # Re-clustering samples: both ranks' reservoirs merged into the one rank's.
    name = "ebc.tables.t_user"
    parts = [straight["ranks"][r]["reservoirs"][name] for r in range(2)]
    # under DMP each of the 2 ranks kept half of the table's sample (CCETable.share_sample)
    assert [p["ids"].numel() for p in parts] == [-(-CAPACITY // 2)] * 2
    merged = one["reservoirs"][name]
    assert merged["seen"] == parts[0]["seen"] + parts[1]["seen"]
    assert merged["ids"].numel() == CAPACITY  # full
    union = torch.cat([p["ids"] for p in parts])
    union_counts = torch.bincount(union, minlength=SIZES["user"])
    merged_counts = torch.bincount(merged["ids"], minlength=SIZES["user"])
    assert bool((merged_counts <= union_counts).all())  # a sub-multiset of the two samples
    # 768 rows (12 x 2 x 32) are not a whole number of 1 x 40 batches: the error says so.
    (bad,) = run_multiprocess(_load_world1, 1, only, 40, timeout=900)
    assert "step_12" in bad["error"] and "1 ranks x 40 rows cannot continue" in bad["error"]


@pytest.mark.timeout(900)
def test_nonfinite_guard_is_collective() -> None:
    for messages in run_multiprocess(_nan_guard, 2, timeout=900):
        assert len(messages) == 2
        assert "step 11: the loss is non-finite (rank 1: nan)" in messages[0]
        assert "embedding table 't_user' (codebook 't_user__cce'): 1 non-finite" in messages[1]


# ---------------------------------------------------------------- single process
class Small(nn.Module):
    def __init__(self, rows: int = ROWS) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ebc = CCEEmbeddingBagCollection(tables(), compression(rows))
        self.head = nn.Linear(len(SIZES) * DIM, 1)

    def forward(self, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.ebc(kjt).values()).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def small_setup(rows: int = ROWS):
    model = Small(rows)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    return model, opt


def step_once(model: nn.Module, opt: torch.optim.Optimizer, index: int) -> float:
    kjt, labels = make_batch(index, 8)
    loss = model(kjt, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def saved_run(d: str, steps: List[int], keep: int = 0, log: Optional[list] = None):
    model, opt = small_setup()
    manager = CheckpointManager(d, keep=keep, config=CONFIG, batch_size=8,
                                log=None if log is None else log.append)
    snaps = {}
    for s in range(1, max(steps) + 1):
        step_once(model, opt, s)
        if s in steps:
            manager.save(s, model, opt, {"epoch": 0, "step": s, "step_in_epoch": s})
            snaps[s] = snapshot(model)
    return model, opt, manager, snaps


def load_fresh(d: str, log: Optional[list] = None, config=CONFIG, rows: int = ROWS,
               batch_size: int = 8):
    model, opt = small_setup(rows)
    manager = CheckpointManager(d, config=config, batch_size=batch_size,
                                log=None if log is None else log.append)
    return model, opt, manager.load(model, opt)


def assert_state(model: nn.Module, snap: Dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k in snap:
        assert torch.equal(state[k], snap[k]), k


def test_fresh_start_is_logged(tmp_path) -> None:
    log: List[str] = []
    model, _, resumed = load_fresh(str(tmp_path / "none"), log)
    assert resumed is None
    assert log == [f"no checkpoint in {tmp_path / 'none'} yet: starting fresh"]


def test_roundtrip_restores_model_optimizer_reservoir_rng(tmp_path) -> None:
    d = str(tmp_path)
    model, opt, _, snaps = saved_run(d, [3])
    rng_after_save = torch.get_rng_state()
    res = model.ebc.tables["t_user"].reservoir
    expected_ids, expected_seen = res.ids.clone(), res.seen
    # Continue the original for one step; a resumed copy must do exactly the same step.
    torch.manual_seed(123)  # the resumed copy must get the saved RNG back, not this
    ref_loss = step_once(model, opt, 4)
    loaded, lopt, resumed = load_fresh(d)
    assert resumed.step == 3 and resumed.progress == {"epoch": 0, "step": 3, "step_in_epoch": 3}
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    lres = loaded.ebc.tables["t_user"].reservoir
    assert lres.seen == expected_seen > 0 and torch.equal(lres.ids, expected_ids)
    assert step_once(loaded, lopt, 4) == ref_loss
    assert_state(loaded, snapshot(model))


def test_keep_n_prunes_oldest(tmp_path) -> None:
    d = str(tmp_path)
    saved_run(d, [1, 2, 3, 4, 5], keep=2)
    assert sorted(os.listdir(d)) == ["step_4", "step_5"]
    saved_run(str(tmp_path / "all"), [1, 2, 3], keep=0)
    assert sorted(os.listdir(tmp_path / "all")) == ["step_1", "step_2", "step_3"]


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch) -> None:
    import torchrec_cce.checkpoint as ckpt

    d = str(tmp_path)
    model, opt, manager, snaps = saved_run(d, [2])
    real_save = ckpt.dcp.save

    def crash_after_shards(state, checkpoint_id):  # the process dies before the marker/rename
        real_save(state, checkpoint_id=checkpoint_id)
        raise SystemExit("killed")

    monkeypatch.setattr(ckpt.dcp, "save", crash_after_shards)
    step_once(model, opt, 3)
    with pytest.raises(SystemExit):
        manager.save(3, model, opt, {"epoch": 0, "step": 3, "step_in_epoch": 3})
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    assert sorted(os.listdir(d)) == [".tmp-step_3", "step_2"]
    # A newer checkpoint directory without its marker (e.g. a copy that did not finish).
    shutil.copytree(os.path.join(d, "step_2"), os.path.join(d, "step_4"))
    os.remove(os.path.join(d, "step_4", "complete"))
    log: List[str] = []
    loaded, _, resumed = load_fresh(d, log)
    assert resumed.step == 2
    assert_state(loaded, snaps[2])
    assert any(".tmp-step_3: a partial write" in m for m in log)
    assert any("step_4 is incomplete" in m and "falling back" in m for m in log)
    assert any(m.endswith("step_2 (step 2)") for m in log)
    # The next save cleans up the partial write.
    manager.save(5, model, opt, {"epoch": 0, "step": 5, "step_in_epoch": 5})
    assert sorted(os.listdir(d)) == ["step_2", "step_4", "step_5"]


def _shard_file(path: str) -> str:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".distcp"))[0]


def test_truncated_shard_falls_back_with_log_then_errors(tmp_path) -> None:
    d = str(tmp_path)
    _, _, _, snaps = saved_run(d, [2, 4])
    shard = _shard_file(os.path.join(d, "step_4"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    log: List[str] = []
    loaded, _, resumed = load_fresh(d, log)
    assert resumed.step == 2
    assert_state(loaded, snaps[2])
    assert any("step_4 is corrupt" in m and "truncated" in m and "falling back" in m for m in log)
    # Once step_2 is damaged too, nothing is usable: an error, never a fresh start.
    os.remove(_shard_file(os.path.join(d, "step_2")))
    with pytest.raises(CheckpointError) as e:
        load_fresh(d)
    msg = str(e.value)
    assert "no usable checkpoint" in msg and "step_4 is corrupt" in msg and "truncated" in msg
    assert "step_2 is corrupt" in msg and "is missing" in msg and "fresh run" in msg


def test_corrupt_marker_and_dcp_metadata(tmp_path) -> None:
    d = str(tmp_path)
    saved_run(d, [2])
    with open(os.path.join(d, "step_2", "complete"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="step_2: its 'complete' marker is unreadable"):
        load_fresh(d)
    shutil.rmtree(d)
    saved_run(d, [2])
    meta_path = os.path.join(d, "step_2", ".metadata")
    size = os.path.getsize(meta_path)
    with open(meta_path, "r+b") as f:  # same size, garbage content: only unpickling finds it
        f.write(b"\0" * size)
    with pytest.raises(CheckpointError, match=r"step_2 is corrupt: DCP metadata \(.metadata\) is "
                                              r"unreadable"):
        load_fresh(d)


def test_other_model_config_is_refused(tmp_path) -> None:
    d = str(tmp_path)
    saved_run(d, [2])
    with pytest.raises(CheckpointMismatchError) as e:
        load_fresh(d, config={**CONFIG, "method": "hashing"})
    assert "step_2 was written by another model config: method='cce' there, 'hashing' here" \
        in str(e.value)
    assert "same model flags" in str(e.value)
    # Same declared config but a different model (more CCE rows): the shapes give it away.
    with pytest.raises(CheckpointMismatchError) as e:
        load_fresh(d, rows=4)
    assert "does not fit this model" in str(e.value)
    assert "model.ebc.codebooks.embedding_bags.t_user__cce.weight: (8, 4) there, (16, 4) here" \
        in str(e.value)


def test_position_that_cannot_reshard(tmp_path) -> None:
    d = str(tmp_path)
    saved_run(d, [3])  # 3 steps x 8 rows = 24 rows
    _, _, resumed = load_fresh(d, batch_size=4)
    assert resumed.progress["step"] == 6 and resumed.progress["step_in_epoch"] == 6
    with pytest.raises(CheckpointReshardError, match=r"step_3 stopped at step=3 with 1 ranks x 8 "
                                                     r"rows \(24 rows\); 1 ranks x 16 rows"):
        load_fresh(d, batch_size=16)


def test_nonfinite_codebook_stops_without_writing(tmp_path) -> None:
    d = str(tmp_path)
    model, opt, manager, _ = saved_run(d, [2])
    with torch.no_grad():
        model.ebc.codebooks.embedding_bags["t_user__cce"].weight[3, 1] = float("nan")
    with pytest.raises(NonFiniteError) as e:
        manager.save(3, model, opt, {"epoch": 0, "step": 3, "step_in_epoch": 3})
    msg = str(e.value)
    assert "embedding table 't_user' (codebook 't_user__cce'): 1 non-finite values" in msg
    assert "step_2 is untouched" in msg
    assert sorted(os.listdir(d)) == ["step_2"]
    with pytest.raises(NonFiniteError, match="embedding table 't_user'"):
        guard_loss(torch.tensor(float("nan")), 3, model)
    clean = Small()
    with pytest.raises(NonFiniteError, match=r"step 9: the loss is non-finite \(rank 0: inf\)"):
        guard_loss(torch.tensor(float("inf")), 9, clean)
    guard_loss(torch.tensor(0.7), 9, clean)  # finite: no error


def test_keep_must_be_non_negative(tmp_path) -> None:
    with pytest.raises(ValueError, match="keep must be >= 0"):
        CheckpointManager(str(tmp_path), keep=-1)


def test_unwritable_directory_and_same_step_twice(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model, opt = small_setup()
    with pytest.raises(CheckpointError, match="cannot create the checkpoint directory"):
        CheckpointManager(str(blocker)).save(1, model, opt, {"step": 1})
    # Saving a step that already exists (e.g. a restart reaching it again) replaces it whole.
    d = str(tmp_path / "ck")
    manager = CheckpointManager(d, config=CONFIG, batch_size=8)
    manager.save(1, model, opt, {"epoch": 0, "step": 1, "step_in_epoch": 1})
    step_once(model, opt, 1)
    snap = snapshot(model)
    manager.save(1, model, opt, {"epoch": 0, "step": 1, "step_in_epoch": 1})
    assert sorted(os.listdir(d)) == ["step_1"]
    loaded, _, resumed = load_fresh(d)
    assert resumed.step == 1
    assert_state(loaded, snap)


# ---------------------------------------------------------------- MPE through train.py + DCP
MPE_RUN = ("--data", "synthetic", "--batch-size", "64", "--synthetic-train-batches", "8",
           "--synthetic-val-batches", "2", "--synthetic-test-batches", "2", "--method", "mpe",
           "--max-params-per-table", "1000", "--mpe-groups", "8", "--mpe-warmup-steps", "2",
           "--mpe-search-steps", "4", "--mpe-tau", "0.5", "--warmup-steps", "0", "--epochs", "2",
           "--no-progress")


@pytest.mark.timeout(1800)
def test_mpe_resume_mid_warmup_search_and_retrain_is_exact(tmp_path) -> None:
    """``train.py --method mpe`` (no counts: ids counted in a 2-step warm-up, search steps 3-6,
    selection after step 6, retraining to step 16) stopped after step 1 (warm-up), 4 (search)
    and 9 (retrain), each time resumed from its DCP checkpoint: the loss of every step, the
    selection, the evaluations and the final MPE state equal one uninterrupted run. So the
    stage, the warm-up counts, groups, logits, LSQ+ steps/offsets, selected widths, master
    weights and their optimizer state round-trip, and the retrain restart (initial weights
    regenerated from the seed) happens at the same step with the same values."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_train_protocol import losses, run

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ck, ck_straight = str(tmp_path / "ck"), str(tmp_path / "ck_straight")
    straight = run(*MPE_RUN, "--checkpoint-dir", ck_straight)
    parts = []
    for stop in (1, 4, 9, None):
        extra = ("--max-steps", str(stop)) if stop else ()
        resume = ("--resume",) if parts else ()
        parts.append(run(*MPE_RUN, "--checkpoint-dir", ck, *extra, *resume))
    assert straight["steps"] == 16
    assert [[s for s, _ in p["train_loss_curve"]][:1] for p in parts] == [[1], [2], [5], [10]]
    assert sum((losses(p) for p in parts), []) == losses(straight)  # bitwise, every step
    events = {e["step"]: e for p in parts for e in p["mpe"]}
    assert sorted(events) == [2, 6] == [e["step"] for e in straight["mpe"]]
    for e in straight["mpe"]:
        assert events[e["step"]]["events"] == e["events"]
        assert events[e["step"]]["tables"] == e["tables"]
    # Evaluations at the same steps agree (a --max-steps stop adds its own evaluation, kept
    # in the checkpoint, so the interrupted run has more of them and may pick another best).
    got = {v["step"]: v for v in parts[-1]["evaluations"]}
    assert sorted(got) == [1, 4, 8, 9, 16], sorted(got)
    for v in straight["evaluations"]:
        for k in ("val_logloss", "val_auc", "test_logloss", "test_auc"):
            assert got[v["step"]][k] == v[k], (v["step"], k)
    # The final checkpoints (model and optimizer state, every MPE buffer) are identical.
    dcp_to_torch_save(os.path.join(ck_straight, "step_16"), str(tmp_path / "a.pt"))
    dcp_to_torch_save(os.path.join(ck, "step_16"), str(tmp_path / "b.pt"))
    a = torch.load(str(tmp_path / "a.pt"), weights_only=False)
    b = torch.load(str(tmp_path / "b.pt"), weights_only=False)
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    mpe_keys = [k for k in flat_a if ".tables." in k and k.rsplit(".", 1)[-1] in (
        "weight", "logits", "alpha", "beta", "stage", "selected", "group_of", "seen_counts")]
    assert {k.rsplit(".", 1)[-1] for k in mpe_keys} >= {"logits", "alpha", "beta", "stage",
                                                        "selected", "seen_counts", "group_of"}
    for k in flat_a:
        if isinstance(flat_a[k], torch.Tensor):
            assert torch.equal(flat_a[k], flat_b[k]), k
    for k in mpe_keys:
        if k.endswith(".stage"):
            assert int(flat_a[k]) == 2  # retrain


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        return _flatten(dict(enumerate(tree)), prefix)
    return {prefix[:-1]: tree}


@pytest.mark.slow  # world 1 covers the same exactness: test_mpe_resume_mid_warmup_search_and_retrain_is_exact
@pytest.mark.timeout(2400)
def test_mpe_resume_mid_search_and_retrain_two_processes(tmp_path) -> None:
    """The same at world size 2 under torchrun (MPE tables replicated by DMP's DDP, the other
    tables sharded): stopped after step 4 (search) and 9 (retrain), resumed each time; every
    step's loss, the selection and the final DCP checkpoint equal one uninterrupted run."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_train_e2e import _torchrun
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    args = [a for a in MPE_RUN]
    args[args.index("--synthetic-train-batches") + 1] = "16"  # 8 steps an epoch per rank

    def launch(name: str, *extra: str):  # noqa: ANN202
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        r = _torchrun(*args, *extra, home=home, metrics_json=home / "m.json")
        assert r.returncode == 0, r.log()
        return r.metrics

    ck, ck_straight = str(tmp_path / "ck"), str(tmp_path / "ck_straight")
    straight = launch("straight", "--checkpoint-dir", ck_straight)
    parts = [launch("a", "--checkpoint-dir", ck, "--max-steps", "4"),
             launch("b", "--checkpoint-dir", ck, "--max-steps", "9", "--resume"),
             launch("c", "--checkpoint-dir", ck, "--resume")]
    assert straight["world_size"] == 2 and straight["steps"] == 16
    curve = [x for p in parts for x in p["train_loss_curve"]]
    assert curve == straight["train_loss_curve"]  # steps and losses, bitwise
    assert [e["step"] for e in straight["mpe"]] == [2, 6]
    assert [e for p in parts for e in p["mpe"]] == straight["mpe"]
    dcp_to_torch_save(os.path.join(ck_straight, "step_16"), str(tmp_path / "a.pt"))
    dcp_to_torch_save(os.path.join(ck, "step_16"), str(tmp_path / "b.pt"))
    a = _flatten(torch.load(str(tmp_path / "a.pt"), weights_only=False))
    b = _flatten(torch.load(str(tmp_path / "b.pt"), weights_only=False))
    assert a.keys() == b.keys() and any(k.endswith(".selected") for k in a)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
