"""Tiered tables (TieredConfig) under DistributedModelParallel (gloo, world size 2): forward and
one in-backward SGD step equal the unsharded module's, for CCE (p whole on every rank, or split
by id range), QR-mult (MEAN pooling), MEmCom (per-id weights split by id range and fetched from
their owners), MPE (master rows likewise) and hashing cold parts, table-wise and column-wise
codebooks."""

from typing import List

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import SGD

from dist_state import gathered_state
from multiprocess import run_multiprocess
from torchrec_cce import (CCEConfig, CCEEmbeddingBagCollection, HashingTrickConfig, MEmComConfig,
                          MPEConfig, QRConfig, TieredConfig, memory_report,
                          recluster)
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
from torchrec_cce.distributed.tensors import scatter_full

LR = 0.5
SIZES = {"f_cce": 3001, "f_qr": 2000, "f_mem": 1501, "f_mpe": 900, "f_hash": 800}
HOT = {"f_cce": 100, "f_qr": 37, "f_mem": 250, "f_mpe": 30, "f_hash": 1}


def tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f[2:], embedding_dim=8, num_embeddings=v, feature_names=[f],
                               pooling=PoolingType.MEAN if f == "f_qr" else PoolingType.SUM)
            for f, v in SIZES.items()]


COLD = {"cce": CCEConfig(rows=16, chunks=2, seed=1), "qr": QRConfig(collisions=20),
        "mem": MEmComConfig(rows=32, seed=2),
        "mpe": MPEConfig(groups=4, bits=(0, 2, 4, 8), counts=np.arange(900, 0, -1), tau=0.5),
        "hash": HashingTrickConfig(rows=40, seed=3)}
COMPRESSION = {t: TieredConfig(hot_ids=HOT[f"f_{t}"], cold=c) for t, c in COLD.items()}


def batch(seed: int, batch_size: int = 8) -> KeyedJaggedTensor:
    """Random bags holding ids on both sides of every boundary (and empty bags)."""
    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for f, v in SIZES.items():
        lens = torch.randint(0, 4, (batch_size,), generator=g)
        ids = torch.randint(0, v, (int(lens.sum()),), generator=g)
        hot = torch.rand(ids.shape, generator=g) < 0.5  # half hot, boundary ids included
        ids[hot] = torch.randint(0, HOT[f], (int(hot.sum()),), generator=g)
        if ids.numel() > 2:
            ids[:2] = torch.tensor([HOT[f] - 1, HOT[f]])
        values.append(ids)
        lengths.append(lens)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(SIZES), values=torch.cat(values),
                                               lengths=torch.cat(lengths))


def reference() -> CCEEmbeddingBagCollection:
    torch.manual_seed(0)
    ref = CCEEmbeddingBagCollection(tables(), COMPRESSION)
    with torch.no_grad():  # non-trivial per-id weights, so fetching the right ones is tested
        w = ref.tables["mem"].cold.id_weight
        w.copy_(torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    return ref


def _mpe_dense(name: str) -> bool:
    return name.startswith("tables.mpe.cold.") and name != "tables.mpe.cold.weight"


def shard(kind: str, world: int) -> DistributedModelParallel:
    # "tw": p of the CCE cold part split by id range too (below: kept whole on every rank)
    sharder = CCEEmbeddingBagCollectionSharder(
        replicate_assignment_below=0 if kind == "tw" else 1 << 30)
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION, device=torch.device("meta"))
    # (MPE's logits and quantiser steps are dense parameters: not stepped here)
    apply_optimizer_in_backward(SGD, [p for n, p in module.named_parameters()
                                      if not _mpe_dense(n)], {"lr": LR})
    names = [c.name for c in module.codebook_table_configs()]
    gens = {"tw": lambda i: table_wise(rank=i % world, compute_kernel="fused"),
            "cw": lambda i: column_wise(ranks=list(range(world)), compute_kernel="fused")}[kind]
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {n: gens(i) for i, n in enumerate(names)}, sharder=sharder,
        local_size=world, world_size=world, device_type="cpu")})
    return DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    plan=plan, sharders=[sharder], device=torch.device("cpu"))


def _forward_and_step(rank: int, world: int, kind: str):
    ref = reference()
    dmp = shard(kind, world)
    for key, value in dmp.state_dict().items():
        scatter_full(value, ref.state_dict()[key])
    kjt = batch(100 + rank)
    out = dmp(kjt).wait()
    forward_err = (out.values() - ref(kjt).values()).abs().max().item()
    split = {t: dmp.module.id_range(t) is not None for t in COLD}
    sharded_bytes = {t: r["compressed_bytes"] for t, r in memory_report(dmp).items()}
    assert sharded_bytes == {t: r["compressed_bytes"] for t, r in memory_report(ref).items()}
    w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(rank))
    (out.values() * w).sum().backward()
    return forward_err, gathered_state(dmp), split


@pytest.mark.parametrize("kind", ["tw", "cw"])
def test_sharded_forward_and_step_equal_unsharded(kind: str) -> None:
    results = run_multiprocess(_forward_and_step, 2, kind, timeout=600)
    ref = reference()
    loss = 0
    for r in range(2):
        out = ref(batch(100 + r)).values()
        loss = loss + (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(r))).sum()
    loss.backward()
    params = dict(ref.named_parameters())
    for name in ("codebooks.embedding_bags.cce__hot.weight",
                 "codebooks.embedding_bags.cce__cce.weight", "tables.mem.cold.id_weight",
                 "tables.mpe.cold.weight", "codebooks.embedding_bags.qr__qr_q.weight"):
        assert params[name].grad.abs().sum() > 0, name
    for rank, (forward_err, after, split) in enumerate(results):
        # per-id state split by id range: MEmCom's and MPE's always, CCE's p when asked
        assert split == {"cce": kind == "tw", "qr": False, "mem": True, "mpe": True,
                         "hash": False}
        assert forward_err < 1e-5, f"rank {rank} {kind}: forward differs by {forward_err}"
        for name, p in params.items():
            expected = p.detach() - LR * 0.5 * p.grad  # the mean of the two ranks' gradients
            if _mpe_dense(name):
                expected = p.detach()
            err = (after[name].float() - expected).abs().max().item()
            assert err < 1e-5, f"rank {rank} {kind}: {name} update differs by {err}"


# ---------------------------------------------------------------- re-clustering a cold CCE part
def _recluster(rank: int, world: int):
    ref = reference()
    dmp = shard("tw", world)  # the cold CCE part's p split by id range
    for key, value in dmp.state_dict().items():
        scatter_full(value, ref.state_dict()[key])
    dmp.train()
    for seed in range(3):  # training batches fill the cold part's id reservoir
        dmp(batch(300 + 10 * seed + rank)).wait()
    before = gathered_state(dmp)["tables.cce.cold.assignment"].clone()
    stats = recluster(dmp)
    state = gathered_state(dmp)
    # (gathered_state sums float32 pieces: the packed int32 words of p are read exactly here)
    words = dmp.module.assignment_shard("cce").clone()
    kjt = batch(400)  # the same batch on both ranks
    return stats, words, state, dmp(kjt).wait().values().detach()


def test_recluster_of_a_split_cold_cce_part() -> None:
    results = run_multiprocess(_recluster, 2, timeout=600)
    (stats0, words0, state0, out0), (_, words1, state1, out1) = results
    assert "cce" in stats0 and int(state0["tables.cce.cold.h_generation"]) == 1
    ref = reference()
    p_before = ref.tables["cce"].cold.assignment.clone()
    p_after = torch.cat([words0, words1])  # rank 0's id range, then rank 1's
    assert p_after.shape == p_before.shape and not torch.equal(p_after, p_before)
    # the unsharded module with the re-clustered state computes what the sharded one does
    state = {k: v.to(ref.state_dict()[k].dtype) for k, v in state0.items()}
    state["tables.cce.cold.assignment"] = p_after
    ref.load_state_dict(state)
    torch.testing.assert_close(out0, ref(batch(400)).values(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1, out0)
