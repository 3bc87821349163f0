"""Tiered tables (TieredConfig) under DistributedModelParallel (gloo, world size 2): forward and
one in-backward SGD step equal the unsharded module's, for CCE (replicated p), QR-mult (MEAN
pooling) and hashing cold parts, table-wise and column-wise codebooks."""

from typing import List

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
from torchrec_cce import (CCEConfig, CCEEmbeddingBagCollection, HashingTrickConfig, QRConfig,
                          TieredConfig)
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
from torchrec_cce.distributed.tensors import scatter_full

LR = 0.5
SIZES = {"f_cce": 3001, "f_qr": 2000, "f_hash": 800}
HOT = {"f_cce": 100, "f_qr": 37, "f_hash": 1}


def tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f[2:], embedding_dim=8, num_embeddings=v, feature_names=[f],
                               pooling=PoolingType.MEAN if f == "f_qr" else PoolingType.SUM)
            for f, v in SIZES.items()]


COLD = {"cce": CCEConfig(rows=16, chunks=2, seed=1), "qr": QRConfig(collisions=20),
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
    return CCEEmbeddingBagCollection(tables(), COMPRESSION)


def shard(kind: str, world: int) -> DistributedModelParallel:
    sharder = CCEEmbeddingBagCollectionSharder()
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION, device=torch.device("meta"))
    apply_optimizer_in_backward(SGD, module.parameters(), {"lr": LR})
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
    w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(rank))
    (out.values() * w).sum().backward()
    return forward_err, gathered_state(dmp)


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
                 "codebooks.embedding_bags.cce__cce.weight",
                 "codebooks.embedding_bags.qr__qr_q.weight"):
        assert params[name].grad.abs().sum() > 0, name
    for rank, (forward_err, after) in enumerate(results):
        assert forward_err < 1e-5, f"rank {rank} {kind}: forward differs by {forward_err}"
        for name, p in params.items():
            expected = p.detach() - LR * 0.5 * p.grad  # the mean of the two ranks' gradients
            err = (after[name].float() - expected).abs().max().item()
            assert err < 1e-5, f"rank {rank} {kind}: {name} update differs by {err}"
