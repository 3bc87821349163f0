"""MPE under DistributedModelParallel (gloo, world size 2): master weights split by id range,
rows fetched from their owners, stepped there by the in-backward row-wise Adagrad; compared
with the unsharded module trained by the same rule (same seed)."""

from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim import RowWiseAdagrad as FusedRowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

import dist_state
from dist_state import PooledValues
from multiprocess import run_multiprocess
from torchrec_cce import CCEEmbeddingBagCollection, MPEConfig, MPESchedule, memory_report
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder, plan_memory
from torchrec_cce.distributed.sharder import shard_unplanned
from torchrec_cce.distributed.tensors import scatter_full
from torchrec_cce.methods.mpe import RETRAIN
from torchrec_cce.mpe import mpe_penalty
from torchrec_cce.optim import RowWiseAdagrad

V_BIG, V_MEAN, LR, DENSE_LR = 5001, 3000, 0.3, 0.5  # odd V: the two id ranges differ in size


def counts(n: int, ordered: bool) -> np.ndarray:
    rng = np.random.default_rng(n)
    c = np.sort(rng.zipf(1.3, n).clip(max=10 ** 6))[::-1].astype(np.int64)
    return c if ordered else c[rng.permutation(n)].copy()


def tables(with_full: bool = True) -> List[EmbeddingBagConfig]:
    out = [
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=V_BIG,
                           feature_names=["f0", "f1"]),
        EmbeddingBagConfig(name="mean", embedding_dim=4, num_embeddings=V_MEAN,
                           feature_names=["f2"], pooling=PoolingType.MEAN),
    ]
    if with_full:
        out.append(EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=50,
                                      feature_names=["f3"]))
    return out


# "big": frequency-ordered ids (contiguous groups); "mean": a per-id group index is kept.
COMPRESSION = {"big": MPEConfig(groups=8, counts=counts(V_BIG, True), lam=1e-2, tau=0.5),
               "mean": MPEConfig(groups=4, counts=counts(V_MEAN, False), lam=1e-2, tau=0.5,
                                 bits=(0, 2, 4, 8), seed=3)}
SIZES = {"f0": V_BIG, "f1": V_BIG, "f2": V_MEAN, "f3": 50}


def batch(seed: int, with_full: bool = True, batch_size: int = 8) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys = [k for k in SIZES if with_full or k != "f3"]
    values, lengths = [], []
    for k in keys:
        lens = torch.randint(0, 4, (batch_size,), generator=g)
        lengths.append(lens)
        values.append(torch.randint(0, SIZES[k], (int(lens.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                               lengths=torch.cat(lengths))


def reference(with_full: bool = True) -> CCEEmbeddingBagCollection:
    torch.manual_seed(0)
    return CCEEmbeddingBagCollection(tables(with_full), COMPRESSION)


def shard(world: int, with_full: bool = True) -> DistributedModelParallel:
    """DMP as train.py builds it: fused row-wise Adagrad on every 2-D table (the full table's
    TBE and the MPE master weights), the small MPE parameters left to a dense optimizer."""
    sharder = CCEEmbeddingBagCollectionSharder()
    module = CCEEmbeddingBagCollection(tables(with_full), COMPRESSION, device=torch.device("meta"))
    apply_optimizer_in_backward(FusedRowWiseAdagrad, _sparse_params(module), {"lr": LR, "eps": 1e-8})
    names = [c.name for c in module.codebook_table_configs()]
    env = ShardingEnv.from_process_group(dist.GroupMember.WORLD)
    plan = ShardingPlan({})
    if names:
        plan = ShardingPlan({"": construct_module_sharding_plan(
            module, {n: table_wise(rank=world - 1, compute_kernel="fused") for n in names},
            sharder=sharder, local_size=world, world_size=world, device_type="cpu")})
    wrapped = PooledValues(module)
    wrapped = shard_unplanned(wrapped, ShardingPlan({f"ebc.{k}" if k else "ebc": v
                                                     for k, v in plan.plan.items()}),
                              sharder, env, torch.device("cpu"))
    plan = ShardingPlan({"ebc": plan.plan[""]}) if names else ShardingPlan({})
    return DistributedModelParallel(wrapped, env=env, plan=plan, sharders=[sharder],
                                    device=torch.device("cpu"))


def gathered_state(dmp: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return dist_state.gathered_state(dmp, strip="ebc.")


def load_full_state(dmp: torch.nn.Module, full: Dict[str, torch.Tensor]) -> None:
    for key, value in dmp.state_dict().items():
        scatter_full(value, full[key.replace("ebc.", "", 1)])


def _loss(out: torch.Tensor, rank: int) -> torch.Tensor:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(rank))
    return (out * w).sum()


def _sparse_params(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.endswith("weight")]


def _dense_params(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters()
            if n.rsplit(".", 1)[-1] in ("logits", "alpha", "beta")]


# ---------------------------------------------------------------- forward and steps
def _train(rank: int, world: int, with_full: bool):
    dmp = shard(world, with_full)
    dense = torch.optim.SGD(_dense_params(dmp), lr=DENSE_LR)
    out = {"ranges": {t: (dmp.module.ebc.tables[t].id_lo, dmp.module.ebc.tables[t].id_hi)
                      for t in COMPRESSION},
           "initial": gathered_state(dmp)}  # built from the seed on each rank's id range
    load_full_state(dmp, reference(with_full).state_dict())  # the full table's TBE init
    for stage, seed in (("search", 100), ("retrain", 200)):
        x = batch(seed + rank, with_full)
        y = dmp(x)
        out[f"{stage}_forward"] = y.detach().clone()
        dense.zero_grad()
        (_loss(y, rank) + mpe_penalty(dmp)).backward()  # master rows stepped in backward
        dense.step()
        out[f"{stage}_state"] = gathered_state(dmp)
        if stage == "search":
            MPESchedule(search_steps=1).step(dmp, 1, optimizers=[dense])
            out["restarted"] = gathered_state(dmp)
            w = dmp.module.ebc.tables["big"].weight
            out["sum_after_select"] = w._in_backward_optimizers[0].state[w]["sum"].clone()
    return out


def _reference_run(with_full: bool, world: int = 2):
    ref = reference(with_full)
    opt = RowWiseAdagrad(_sparse_params(ref), lr=LR, eps=1e-8)
    dense = torch.optim.SGD(_dense_params(ref), lr=DENSE_LR)
    expected = {}
    for stage, seed in (("search", 100), ("retrain", 200)):
        outs = [ref(batch(seed + r, with_full)).values() for r in range(world)]
        expected[f"{stage}_forward"] = [o.detach().clone() for o in outs]
        loss = sum(_loss(o, r) for r, o in enumerate(outs)) / world + mpe_penalty(ref)
        opt.zero_grad()
        dense.zero_grad()
        loss.backward()
        opt.step()
        dense.step()
        expected[f"{stage}_state"] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        if stage == "search":
            MPESchedule(search_steps=1).step(ref, 1, optimizers=[dense, opt])
            expected["restarted"] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    return expected


@pytest.mark.parametrize("with_full", [True, False], ids=["with_codebooks", "all_mpe"])
def test_sharded_forward_and_steps_equal_unsharded(with_full: bool) -> None:
    """Search step, selection + restart, retrain step: outputs and every state tensor (master
    rows, logits, steps, offsets, the full table) equal the unsharded module's."""
    results = run_multiprocess(_train, 2, with_full, timeout=600)
    expected = _reference_run(with_full)
    assert results[0]["ranges"] == {"big": (0, 2501), "mean": (0, 1500)}
    assert results[1]["ranges"] == {"big": (2501, 5001), "mean": (1500, 3000)}
    initial = reference(with_full).state_dict()
    for rank, got in enumerate(results):
        for key, value in initial.items():
            if key.startswith("tables."):  # every MPE tensor, the master rows included
                assert torch.equal(got["initial"][key].to(value.dtype), value), key
        for stage in ("search", "retrain"):
            err = (got[f"{stage}_forward"] - expected[f"{stage}_forward"][rank]).abs().max()
            assert err < 1e-5, f"rank {rank} {stage}: forward differs by {err}"
            for key, value in expected[f"{stage}_state"].items():
                diff = (got[f"{stage}_state"][key].float() - value.float()).abs().max()
                assert diff < 1e-5, f"rank {rank} after {stage} step: {key} differs by {diff}"
        for key in ("tables.big.weight", "tables.mean.weight", "tables.big.selected",
                    "tables.big.stage"):
            assert torch.equal(got["restarted"][key], expected["restarted"][key]), key
        assert int(got["restarted"]["tables.big.stage"]) == RETRAIN
        assert float(got["sum_after_select"].abs().sum()) == 0  # row-wise state restarted
    # It trained: the master rows moved in both stages.
    before = reference(with_full).state_dict()["tables.big.weight"]
    assert (results[0]["search_state"]["tables.big.weight"] - before).abs().max() > 1e-3
    assert (results[0]["retrain_state"]["tables.big.weight"] - before).abs().max() > 1e-3


# ---------------------------------------------------------------- checkpoints (DCP)
def _step_and_save(rank: int, world: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp = shard(world)
    load_full_state(dmp, reference().state_dict())
    dense = torch.optim.SGD(_dense_params(dmp), lr=DENSE_LR)
    y = dmp(batch(300 + rank))
    (_loss(y, rank) + mpe_penalty(dmp)).backward()
    dense.step()
    dcp.save({"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()},
             checkpoint_id=path)
    w = dmp.module.ebc.tables["big"].weight
    return ([dmp(batch(500 + r)).detach() for r in range(2)],
            w._in_backward_optimizers[0].state[w]["sum"].clone())


def _load_world1(rank: int, world: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp = shard(world)
    state = {"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["optim"])
    w = dmp.module.ebc.tables["big"].weight
    return ([dmp(batch(500 + r)).detach() for r in range(2)],
            w._in_backward_optimizers[0].state[w]["sum"].clone(), tuple(w.shape))


def test_dcp_reshards_world2_to_world1(tmp_path) -> None:
    """A world-2 checkpoint (master rows and their row-wise Adagrad state split by id range)
    loads into the unsharded module and into DMP at world size 1: identical outputs."""
    import torch.distributed.checkpoint as dcp

    path = str(tmp_path / "world2")
    saved = run_multiprocess(_step_and_save, 2, path, timeout=600)
    outputs = saved[0][0]
    assert torch.equal(outputs[0], saved[1][0][0])
    single = PooledValues(reference())  # the same keys as the DMP-wrapped module
    state = {"model": single.state_dict()}
    dcp.load(state, checkpoint_id=path)
    single.load_state_dict(state["model"])
    single = single.ebc
    for r in range(2):
        torch.testing.assert_close(single(batch(500 + r)).values(), outputs[r], atol=0, rtol=0)
    (outs, row_sum, shape), = run_multiprocess(_load_world1, 1, path, timeout=600)
    assert shape == (V_BIG, 8)
    for r in range(2):
        torch.testing.assert_close(outs[r], outputs[r], atol=0, rtol=0)
    torch.testing.assert_close(row_sum, torch.cat([saved[0][1], saved[1][1]]), atol=0, rtol=0)
    assert float(row_sum.sum()) > 0


# ---------------------------------------------------------------- bytes per rank
def _bytes(rank: int, world: int):
    dmp = shard(world)
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION, device=torch.device("meta"))
    plan = ShardingPlan({"": dmp.plan.get_plan_for_module("ebc")})
    return memory_report(dmp), plan_memory(plan, module, world)


def test_per_rank_bytes_are_the_id_range_share() -> None:
    results = run_multiprocess(_bytes, 2, timeout=600)
    ref = memory_report(reference())
    # Replicated MPE state: logits [G, K], alpha [K], beta [dim], grad scales [K] (fp32);
    # stage (int64), selected [G] (int64), group weights [G] (fp32); "mean" keeps an int16
    # group index of V_MEAN ids.
    small_big = (8 * 7 + 7 + 8 + 7) * 4 + 8 + 8 * 8 + 8 * 4
    small_mean = (4 * 4 + 4 + 4 + 4) * 4 + 8 + 4 * 8 + 4 * 4 + 2 * V_MEAN
    for rank, (report, planned) in enumerate(results):
        big, mean = report["big"], report["mean"]
        rows_big, rows_mean = (2501, 1500) if rank == 0 else (2500, 1500)
        assert big["local_per_id_bytes"] == rows_big * 8 * 4
        assert big["local_training_bytes"] == rows_big * 8 * 4 + small_big
        assert mean["local_training_bytes"] == rows_mean * 4 * 4 + small_mean
        assert big["training_bytes"] == ref["big"]["training_bytes"] == V_BIG * 8 * 4 + small_big
        assert mean["training_bytes"] == ref["mean"]["training_bytes"]
        assert big["serving_bytes"] == ref["big"]["serving_bytes"]
        assert planned["big"]["bytes_per_rank"] == [2501 * 32 + small_big, 2500 * 32 + small_big]
        assert planned["mean"]["bytes_per_rank"] == [1500 * 16 + small_mean] * 2
        assert planned["small"]["bytes_per_rank"] == [0, 50 * 8 * 4]  # table-wise on rank 1


def test_initial_rows_of_any_id_range_equal_the_whole_table() -> None:
    """Seeded blocks of INIT_BLOCK_ROWS ids: a rank's id range (across block boundaries) gets
    exactly the unsharded table's initial rows, without generating the others."""
    from torchrec_cce.methods.mpe import INIT_BLOCK_ROWS, MPETable

    V = 2 * INIT_BLOCK_ROWS + 123
    t = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=V, feature_names=["f"])
    cfg = MPEConfig(groups=8, counts=np.arange(V, 0, -1))
    full = MPETable(t, cfg)
    cut = INIT_BLOCK_ROWS + 77
    parts = [MPETable(t, cfg, id_range=(0, cut)), MPETable(t, cfg, id_range=(cut, V))]
    assert torch.equal(torch.cat([p.weight for p in parts]), full.weight)
    ids = torch.tensor([0, INIT_BLOCK_ROWS - 1, INIT_BLOCK_ROWS, V - 1])
    assert torch.equal(full.initial_weight(ids), full.weight[ids])
    assert torch.equal(parts[1].alpha, full.alpha)  # the steps' init is the same on every rank
