"""Training policy carried by the library, so a user's own TorchRec script is right by default
(issue 21 item 2), at world size 2 (gloo, spawned processes):

* placement: TorchRec's ``EmbeddingShardingPlanner`` and DMP's default planner never make a
  codebook data-parallel with ``CCEEmbeddingBagCollectionSharder`` (float16 codebooks train
  without NaN); ``allow_data_parallel=True`` opts back in.
"""

from typing import Dict, List

import math

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from multiprocess import run_multiprocess
from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, HashingTrickConfig
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

B = 64
SIZES = {"f0": 5000, "f1": 2000, "f2": 10}
CPU = torch.device("cpu")


def make_batch(step: int, rank: int, sizes: Dict[str, int] = SIZES) -> Batch:
    g = torch.Generator().manual_seed(10_000 * rank + step)
    ids = {f: torch.randint(0, n, (B,), generator=g) for f, n in sizes.items()}
    # Mostly learnable through the smallest table's 10 ids, a little through the others.
    small = min(sizes, key=sizes.get)
    signal = 0.8 * (ids[small].float() - 4.5) + sum(
        0.3 * ((x % 7).float() - 3) for f, x in ids.items() if f != small)
    labels = torch.bernoulli(torch.sigmoid(signal), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(sizes), values=torch.cat(list(ids.values())),
        lengths=torch.ones(B * len(sizes), dtype=torch.int64))
    return Batch(dense_features=torch.randn(B, 4, generator=g), sparse_features=kjt,
                 labels=labels)


def dlrm(compression: Dict, sizes: Dict[str, int] = SIZES, dim: int = 8) -> DLRMTrain:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n,
                                 feature_names=[f]) for f, n in sizes.items()]
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    return DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=4,
                          dense_arch_layer_sizes=[16, dim], over_arch_layer_sizes=[16, 1]))


def dense_optimizer(dmp: torch.nn.Module, lr: float = 0.05) -> KeyedOptimizerWrapper:
    return KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                 lambda params: torch.optim.Adagrad(params, lr=lr))


def plain_loop(dmp: torch.nn.Module, dense: KeyedOptimizerWrapper, rank: int, steps: int,
               sizes: Dict[str, int] = SIZES) -> List[float]:
    losses = []
    for step in range(1, steps + 1):
        dense.zero_grad()
        loss, _ = dmp(make_batch(step, rank, sizes))
        loss.backward()
        dense.step()
        losses.append(float(loss))
    return losses


# ---------------------------------------------------------------- 1. placement
FP16 = {"t_f0": CCEConfig(rows=16, chunks=2, codebook_dtype=torch.float16),
        "t_f1": HashingTrickConfig(rows=64, codebook_dtype=torch.float16)}


def _placements(rank: int, world: int) -> Dict[str, Dict[str, str]]:
    out = {}
    for allow in (False, True):
        model = dlrm(FP16)
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world,
                                                             compute_device="cpu"))
        sharders = [CCEEmbeddingBagCollectionSharder(allow_data_parallel=allow),
                    *get_default_sharders()]
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        out[f"planner allow={allow}"] = {
            t: p.sharding_type for t, p in
            plan.get_plan_for_module("model.sparse_arch.embedding_bag_collection").items()}
    model = dlrm(FP16)  # DMP's own planner (no plan passed), only our sharder
    dmp = DistributedModelParallel(model, sharders=[CCEEmbeddingBagCollectionSharder()],
                                   device=CPU)
    out["dmp default"] = {t: p.sharding_type for t, p in dmp.plan.get_plan_for_module(
        "model.sparse_arch.embedding_bag_collection").items()}
    return out


def test_planners_never_make_codebooks_data_parallel() -> None:
    for placements in run_multiprocess(_placements, 2):
        tables = {"t_f0__cce", "t_f1__hash", "t_f2"}
        for key in ("planner allow=False", "dmp default"):
            assert set(placements[key]) == tables, key
            assert "data_parallel" not in placements[key].values(), (key, placements[key])
        # The opt-in offers it again, and the planner takes it for these small tables: the
        # default above is the sharder's doing, not the planner's.
        assert "data_parallel" in placements["planner allow=True"].values()


def _train_fp16(rank: int, world: int, allow: bool) -> List[float]:
    model = dlrm(FP16)
    if allow:  # data-parallel codebooks stepped by torch's Adagrad (DDP, in backward)
        apply_optimizer_in_backward(torch.optim.Adagrad, model.model.sparse_arch.parameters(),
                                    {"lr": 0.1})
    else:
        apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(),
                                    {"lr": 0.1})
    dmp = DistributedModelParallel(
        model, sharders=[CCEEmbeddingBagCollectionSharder(allow_data_parallel=allow),
                         *get_default_sharders()], device=CPU)
    return plain_loop(dmp, dense_optimizer(dmp), rank, 30)


def test_float16_codebooks_train_without_nan_by_default() -> None:
    for losses in run_multiprocess(_train_fp16, 2, False):
        assert all(math.isfinite(x) for x in losses), losses
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.01, losses


def test_float16_codebooks_turn_nan_when_data_parallel() -> None:
    """Why the default matters: the same model with data-parallel codebooks under torch's
    Adagrad (float16 state: eps rounds to 0, rows without gradient divide 0 by 0)."""
    for losses in run_multiprocess(_train_fp16, 2, True):
        assert not all(math.isfinite(x) for x in losses), losses


def _hand_made_data_parallel_plan(rank: int, world: int) -> str:
    model = dlrm(FP16)
    ebc = model.model.sparse_arch.embedding_bag_collection
    sharder = CCEEmbeddingBagCollectionSharder()
    plan = ShardingPlan({"model.sparse_arch.embedding_bag_collection":
                         construct_module_sharding_plan(
                             ebc, {c.name: data_parallel() for c in ebc.codebook_table_configs()},
                             sharder=sharder, local_size=world, world_size=world,
                             device_type="cpu")})
    try:
        DistributedModelParallel(model, plan=plan, sharders=[sharder], device=CPU)
    except ValueError as e:
        return str(e)
    return ""


def test_hand_made_data_parallel_plan_is_refused_with_the_fix() -> None:
    for message in run_multiprocess(_hand_made_data_parallel_plan, 2):
        assert "data_parallel" in message and "allow_data_parallel=True" in message, message
        assert "t_f" in message, message
