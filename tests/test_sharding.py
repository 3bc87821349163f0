"""Sharded CCE collections under DistributedModelParallel: real processes (gloo, world size 2).

Each test spawns 2 processes (tests/multiprocess.py) and compares with an unsharded module
built from the same seed in the same process.
"""

import os
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import SGD

from multiprocess import run_multiprocess
from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, HashingTrickConfig, QRConfig
from torchrec_cce.distributed import (
    CCEEmbeddingBagCollectionSharder,
    CCEStorageReservation,
    plan_memory,
)
from torchrec_cce.distributed.tensors import gather_full, scatter_full
from torchrec_cce.clustering.kmeans import ProcessGroupCollective

V_BIG = 20_000
LR = 0.5


def tables() -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="big", embedding_dim=16, num_embeddings=V_BIG,
                           feature_names=["f0", "f1"]),
        EmbeddingBagConfig(name="mid", embedding_dim=16, num_embeddings=3000,
                           feature_names=["f2"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="qr", embedding_dim=16, num_embeddings=4000,
                           feature_names=["f3"]),
        EmbeddingBagConfig(name="small", embedding_dim=16, num_embeddings=50,
                           feature_names=["f4"]),
    ]


COMPRESSION = {"big": CCEConfig(rows=32, chunks=2), "mid": HashingTrickConfig(rows=64),
               "qr": QRConfig(collisions=100, operation="add")}
# CCEConfig(init="qr", keep_remainder=True) variant of "big" (tests/test_cce_qr_init.py): its
# remap has no fused description, so sharded and unsharded take the torch reference path.
COMPRESSION_QR = dict(COMPRESSION, big=CCEConfig(rows=32, chunks=2, init="qr",
                                                 keep_remainder=True))
SIZES = {"f0": V_BIG, "f1": V_BIG, "f2": 3000, "f3": 4000, "f4": 50}


def batch(seed: int, batch_size: int = 8) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = list(SIZES), [], []
    for k in keys:
        lens = torch.randint(0, 4, (batch_size,), generator=g)
        lengths.append(lens)
        values.append(torch.randint(0, SIZES[k], (int(lens.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                               lengths=torch.cat(lengths))


def reference(init: str = "hash") -> CCEEmbeddingBagCollection:
    torch.manual_seed(0)
    ref = CCEEmbeddingBagCollection(tables(), COMPRESSION if init == "hash" else COMPRESSION_QR)
    with torch.no_grad():  # a non-trivial hash generation and assignment, so both are tested
        ref.tables["big"].h_generation.fill_(3)
        ids = torch.arange(0, V_BIG, 7)
        ref.tables["big"].write_assignment(ids, torch.full((ids.numel(), 2), 5))
    return ref


def shard(kind: str, replicate_below: int, world: int, rank: int,
          sgd: bool = False, init: str = "hash") -> Tuple[DistributedModelParallel, CCEEmbeddingBagCollectionSharder]:
    # "dp" places codebooks data-parallel on purpose (an opt-in of the sharder).
    sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=replicate_below,
                                               allow_data_parallel=kind == "dp")
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION if init == "hash" else COMPRESSION_QR,
                                       device=torch.device("meta"))
    if sgd:
        apply_optimizer_in_backward(SGD, module.parameters(), {"lr": LR})
    names = [c.name for c in module.codebook_table_configs()]
    if kind == "planner_twcw":
        constraints = {n: ParameterConstraints(sharding_types=["table_column_wise"],
                                               min_partition=4) for n in names}
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device="cpu"),
            constraints=constraints)
        plan = planner.collective_plan(module, [sharder], dist.GroupMember.WORLD)
    else:
        gens = {"tw": lambda i: table_wise(rank=i % world, compute_kernel="fused"),
                "cw": lambda i: column_wise(ranks=list(range(world)), compute_kernel="fused"),
                "dp": lambda i: data_parallel()}[kind]
        plan = ShardingPlan({"": construct_module_sharding_plan(
            module, {n: gens(i) for i, n in enumerate(names)}, sharder=sharder,
            local_size=world, world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=[sharder], device=torch.device("cpu"))
    return dmp, sharder


def load_full_state(dmp: torch.nn.Module, full: Dict[str, torch.Tensor]) -> None:
    for key, value in dmp.state_dict().items():
        scatter_full(value, full[key])


def gathered_state(dmp: torch.nn.Module) -> Dict[str, torch.Tensor]:
    collective = ProcessGroupCollective()
    out = {}
    for key, value in dmp.state_dict().items():
        shape = tuple(value.size())
        if value.dtype.is_floating_point:
            out[key] = gather_full(value, shape, collective)
        else:  # integer state (assignment): sum of zero-padded pieces, in int64
            full = torch.zeros(shape, dtype=torch.int64)
            from torchrec_cce.distributed.tensors import local_pieces
            if hasattr(value, "local_shards"):
                for t, off in local_pieces(value):
                    full[tuple(slice(o, o + n) for o, n in zip(off, t.shape))] = t.to(torch.int64)
                dist.all_reduce(full)
            else:
                full = value.to(torch.int64).clone()
            out[key] = full
    return out


# ---------------------------------------------------------------- forward and update
def _forward_and_update(rank: int, world: int, kind: str, replicate_below: int,
                        init: str = "hash"):
    ref = reference(init)
    dmp, _ = shard(kind, replicate_below, world, rank, sgd=True, init=init)
    load_full_state(dmp, ref.state_dict())
    kjts = [batch(100 + r) for r in range(world)]
    out = dmp(kjts[rank]).wait()
    expected = ref(kjts[rank])
    forward_err = (out.values() - expected.values()).abs().max().item()
    # One SGD step on sum(out * w): the sharded update uses every rank's batch.
    w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(rank))
    (out.values() * w).sum().backward()
    # Fused (TBE) codebooks stepped in backward; data_parallel ones use TorchRec's dense kernel
    # and are stepped by the dense optimizer, as in training: emulate it with plain SGD.
    with torch.no_grad():
        for p in dmp.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    after = gathered_state(dmp)
    m = dmp.module.tables["big"]
    local_assignment_rows = m.stored_hi - m.stored_lo
    assert dmp.module.assignment_shard("big").numel() * 4 == m.packed_assignment_bytes(
        local_assignment_rows)
    return forward_err, {k: v for k, v in after.items()}, local_assignment_rows


_ID_RANGE, _REPLICATED = 0, 1 << 30


@pytest.mark.parametrize("kind,replicate_below,init", [
    *[(k, r, "hash") for k in ["tw", "cw", "dp", "planner_twcw"] for r in (_ID_RANGE, _REPLICATED)],
    ("tw", _ID_RANGE, "qr"), ("cw", _REPLICATED, "qr"), ("planner_twcw", _ID_RANGE, "qr")])
def test_sharded_matches_unsharded(kind: str, replicate_below: int, init: str) -> None:
    results = run_multiprocess(_forward_and_update, 2, kind, replicate_below, init)
    # Reference update: the same SGD step on the unsharded module over both ranks' batches.
    ref = reference(init)
    params = dict(ref.named_parameters())
    loss = 0
    for r in range(2):
        out = ref(batch(100 + r))
        w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(r))
        loss = loss + (out.values() * w).sum()
    loss.backward()
    for rank, (forward_err, after, local_rows) in enumerate(results):
        assert forward_err < 1e-5, f"rank {rank} forward differs by {forward_err}"
        # id-range: each rank stores ceil(V/2) rows of p; replicated: all V.
        assert local_rows == (V_BIG // 2 if replicate_below == 0 else V_BIG)
        for name, p in params.items():
            key = name
            # TorchRec averages embedding gradients over ranks like DDP does for dense ones
            # (comm_ops gradient division), so the step uses the mean of the ranks' gradients.
            scale = 0.5
            expected = p.detach() - LR * scale * p.grad
            assert torch.allclose(after[key].float(), expected, atol=1e-5), \
                f"rank {rank} {kind}: {key} update differs by " \
                f"{(after[key].float() - expected).abs().max().item()}"
        ref_state = ref.state_dict()
        assert torch.equal(after["tables.big.assignment"], ref_state["tables.big.assignment"].long())
        assert int(after["tables.big.h_generation"]) == 3


# ---------------------------------------------------------------- planner
def _plan(rank: int, world: int):
    sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=0)
    big = [EmbeddingBagConfig(name="huge", embedding_dim=16, num_embeddings=2_000_000,
                              feature_names=["u"]),
           EmbeddingBagConfig(name="other", embedding_dim=16, num_embeddings=1000,
                              feature_names=["v"])]
    module = CCEEmbeddingBagCollection(big, {"huge": CCEConfig(rows=1024, chunks=4)},
                                       device=torch.device("meta"))
    reservation = CCEStorageReservation()
    constraints = {"huge__cce": ParameterConstraints(sharding_types=["column_wise"]),
                   "other": ParameterConstraints(sharding_types=["table_wise"])}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                       constraints=constraints, storage_reservation=reservation)
    plan = planner.collective_plan(module, [sharder], dist.GroupMember.WORLD)
    mem = plan_memory(plan, module, world)
    types = {name: ps.sharding_type for name, ps in plan.get_plan_for_module("").items()}
    return types, mem, reservation.state_bytes


def test_planner_counts_assignment_and_honours_constraints() -> None:
    types, mem, reserved = run_multiprocess(_plan, 2)[0]
    assert types["huge__cce"] == "column_wise"
    assert types["other"] == "table_wise"
    per_rank_assignment = 1_000_000 * 4 * 10 // 8  # ceil(V/2) ids x 4 chunks x 10 bits, packed
    # and the hash generation (int64) and half of the id reservoir (256 x 1024 ids) per rank
    per_rank_state = per_rank_assignment + 8 + 8 * (256 * 1024 // 2)
    assert reserved == {"huge": [per_rank_state, per_rank_state]}  # "other" is a full table
    codebook_bytes = (2 * 4 * 1024) * 4 * 4  # one table: 2*chunks*rows rows of dim/chunks fp32
    assert sum(mem["huge"]["bytes_per_rank"]) == codebook_bytes + 2 * per_rank_state
    assert all(b >= per_rank_assignment for b in mem["huge"]["bytes_per_rank"])
    assert mem["huge"]["compressed_bytes"] == codebook_bytes + 2_000_000 * 4 * 10 // 8 + 8
    assert mem["huge"]["full_bytes"] == 2_000_000 * 16 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="row_wise and table_row_wise sharding "
                    "are GPU-only in TorchRec; this CPU machine cannot run them")
def test_row_wise_codebooks_on_cuda() -> None:
    sharder = CCEEmbeddingBagCollectionSharder()
    assert "row_wise" in sharder.sharding_types("cuda")
    assert "table_row_wise" in sharder.sharding_types("cuda")


def test_cpu_sharding_types_are_torchrecs_model_parallel_ones() -> None:
    """TorchRec's CPU types; data_parallel only on request (codebooks are model-parallel)."""
    torchrec_types = set(EmbeddingBagCollectionSharder().sharding_types("cpu"))
    types = CCEEmbeddingBagCollectionSharder().sharding_types("cpu")
    assert set(types) == torchrec_types - {"data_parallel"}
    assert {"table_wise", "column_wise", "table_column_wise"} <= set(types)
    allowed = CCEEmbeddingBagCollectionSharder(allow_data_parallel=True).sharding_types("cpu")
    assert set(allowed) == torchrec_types
    whole_rows = CCEEmbeddingBagCollectionSharder(
        excluded_sharding_types=("column_wise", "table_column_wise")).sharding_types("cpu")
    assert set(whole_rows) == torchrec_types - {"data_parallel", "column_wise",
                                                "table_column_wise"}


# ---------------------------------------------------------------- distributed re-clustering
def _sample_ids(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    # Zipf-like skew: many repeats of small ids, plus uniform ids.
    skewed = (torch.rand(1500, generator=g) ** 3 * V_BIG).long()
    return torch.cat([skewed, torch.randint(0, V_BIG, (1500,), generator=g)])


def _trained_reference() -> CCEEmbeddingBagCollection:
    """The reference after a few SGD steps, so codebook vectors have structure."""
    ref = reference()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(5):
        out = ref(batch(7 + step, batch_size=64))
        loss = (out.values() - 0.1).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref.tables["big"].reservoir.reset()  # the tests choose the re-clustering sample themselves
    return ref


def _distributed_recluster(rank: int, world: int, replicate_below: int):
    from torchrec_cce import recluster

    ref = _trained_reference()
    dmp, _ = shard("tw", replicate_below, world, rank)
    load_full_state(dmp, ref.state_dict())
    dmp.module.tables["big"].reservoir.observe(_sample_ids(rank))
    stats = recluster(dmp)
    state = gathered_state(dmp)
    out = dmp(batch(300 + rank)).wait().values()
    return stats["big"], state, out


@pytest.mark.parametrize("replicate_below", [0, 1 << 30], ids=["id_range", "replicated"])
def test_distributed_recluster_equals_single_process(replicate_below: int) -> None:
    from torchrec_cce import recluster

    results = run_multiprocess(_distributed_recluster, 2, replicate_below)
    ref = _trained_reference()
    ref.tables["big"].reservoir.observe(torch.cat([_sample_ids(0), _sample_ids(1)]))
    ref_stats = recluster(ref)["big"]
    expected = ref.state_dict()
    (stats0, state0, _), (stats1, state1, _) = results
    for key in state0:  # both ranks hold the same logical state
        assert torch.equal(state0[key], state1[key]), key
    assert stats0["num_samples"] == ref_stats["num_samples"] == 6000
    assert int(state0["tables.big.h_generation"]) == int(expected["tables.big.h_generation"]) == 4
    from torchrec_cce.methods.packed import unpack

    def dense(words):
        return unpack(words.to(torch.int32), torch.arange(V_BIG), 2, 5)
    agree = (dense(state0["tables.big.assignment"]) == dense(expected["tables.big.assignment"])
             ).float()
    assert agree.mean() > 0.999, f"assignments agree on {agree.mean():.5f}"
    for name in ("codebooks.embedding_bags.big__cce.weight",):
        torch.testing.assert_close(state0[name], expected[name], atol=1e-4, rtol=1e-3)
    assert stats0["kmeans_inertia_end"] == pytest.approx(ref_stats["kmeans_inertia_end"], rel=1e-3)
    # Untouched tables stay untouched.
    torch.testing.assert_close(state0["codebooks.embedding_bags.mid__hash.weight"],
                               expected["codebooks.embedding_bags.mid__hash.weight"])
    for rank, (_, _, out) in enumerate(results):
        torch.testing.assert_close(out, ref(batch(300 + rank)).values(), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------- checkpoints (DCP)
def _save_world2(rank: int, world: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp, _ = shard("cw", 0, world, rank)
    load_full_state(dmp, _trained_reference().state_dict())
    with torch.no_grad():  # make the assignment and hash generation distinctive
        m = dmp.module.tables["big"]
        ids = torch.arange(m.stored_lo, m.stored_hi)
        m.write_assignment(ids, torch.randint(0, 32, (ids.numel(), 2),
                                              generator=torch.Generator().manual_seed(rank)))
        m.h_generation.fill_(9)
    dcp.save(dmp.state_dict(), checkpoint_id=path)
    return [dmp(batch(500 + r)).wait().values() for r in range(world)]


def _load_world2(rank: int, world: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp, _ = shard("tw", 0, world, rank)
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state)
    return dmp(batch(600 + rank)).wait().values(), dmp.module.tables["big"].dense_assignment()


def test_dcp_world2_to_world1_and_back(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    path2 = str(tmp_path / "world2")
    outs = run_multiprocess(_save_world2, 2, path2)
    single = CCEEmbeddingBagCollection(tables(), COMPRESSION)
    state = single.state_dict()
    dcp.load(state, checkpoint_id=path2)
    single.load_state_dict(state)
    assert int(single.tables["big"].h_generation) == 9
    for r in range(2):
        torch.testing.assert_close(single(batch(500 + r)).values(), outs[0][r], atol=1e-6, rtol=0)
    # ... and back: world 1 -> world 2 (a different sharding), assignment included.
    path1 = str(tmp_path / "world1")
    with torch.no_grad():
        single.tables["big"].write_assignment(torch.arange(V_BIG), torch.randint(
            0, 32, (V_BIG, 2), generator=torch.Generator().manual_seed(5)))
    dcp.save(single.state_dict(), checkpoint_id=path1)
    loaded = run_multiprocess(_load_world2, 2, path1)
    for r, (out, shard_p) in enumerate(loaded):
        torch.testing.assert_close(out, single(batch(600 + r)).values(), atol=1e-6, rtol=0)
        half = V_BIG // 2
        assert torch.equal(shard_p, single.tables["big"].dense_assignment()[r * half:(r + 1) * half])


# ---------------------------------------------------------------- fbgemm's bounds check
def _codebook_bounds_check(rank: int, world: int):
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    dmp, _ = shard("tw", 0, world, rank)
    # The codebook EBC's TBEs hang below its lookups (not registered submodules).
    tbes = [m for lookup in dmp.module.codebooks._lookups for m in lookup.modules()
            if hasattr(m, "bounds_check_mode_int")]
    modes = sorted({m.bounds_check_mode_int for m in tbes})
    # A user's explicit choice is kept.
    kept = CCEEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder(
        fused_params={"bounds_check_mode": BoundsCheckMode.FATAL}))
    # The remap still rejects ids a full table cannot hold, sharded, before fbgemm sees them.
    ref = reference()
    load_full_state(dmp, ref.state_dict())
    bad = batch(7)
    values = bad.values().clone()
    values[-1] = 50  # the last feature is f4 (the uncompressed 'small' table, 50 rows)
    bad = KeyedJaggedTensor.from_lengths_sync(keys=bad.keys(), values=values,
                                              lengths=bad.lengths())
    try:
        dmp(bad).wait()
        error = ""
    except ValueError as e:
        error = str(e)
    good = batch(8)
    forward_err = (dmp(good).wait().values() - ref(good).values()).abs().max().item()
    return (modes, kept.fused_params["bounds_check_mode"] == BoundsCheckMode.FATAL, error,
            forward_err, BoundsCheckMode.NONE.value)


def test_codebook_tables_skip_fbgemm_bounds_check_but_bad_ids_still_raise() -> None:
    for modes, kept, error, forward_err, none in run_multiprocess(_codebook_bounds_check, 2,
                                                                  timeout=600):
        assert modes == [none]  # every codebook TBE runs without fbgemm's per-batch check
        assert kept
        assert "table 'small'" in error and "outside [0, 50)" in error, error
        assert forward_err < 1e-5
