"""Training policy carried by the library, so a user's own TorchRec script is right by default
(issue 21 item 2), at world size 2 (gloo, spawned processes):

* placement: TorchRec's ``EmbeddingShardingPlanner`` and DMP's default planner never make a
  codebook data-parallel with ``CCEEmbeddingBagCollectionSharder`` (float16 codebooks train
  without NaN); ``allow_data_parallel=True`` opts back in.
* one in-backward optimizer over every sparse parameter (the golden example's line) works with
  MEmCom and MPE and equals the example's former split;
* a collection of MPE tables only is sharded by DMP itself and trains in
  ``TrainPipelineSparseDist`` (the re-clustering case is in tests/test_pipeline.py).
"""

import copy
import math
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from multiprocess import run_multiprocess
from torchrec_cce import (CCEConfig, CCEEmbeddingBagCollection, HashingTrickConfig, MEmComConfig,
                          MPEConfig)
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
from torchrec_cce.methods import MEmComTable
from torchrec_cce.methods.mpe import MPETable

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
    for placements in run_multiprocess(_placements, 2, timeout=900):
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
    for losses in run_multiprocess(_train_fp16, 2, False, timeout=900):
        assert all(math.isfinite(x) for x in losses), losses
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.01, losses


def test_float16_codebooks_turn_nan_when_data_parallel() -> None:
    """Why the default matters: the same model with data-parallel codebooks under torch's
    Adagrad (float16 state: eps rounds to 0, rows without gradient divide 0 by 0)."""
    for losses in run_multiprocess(_train_fp16, 2, True, timeout=900):
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
    for message in run_multiprocess(_hand_made_data_parallel_plan, 2, timeout=900):
        assert "data_parallel" in message and "allow_data_parallel=True" in message, message
        assert "t_f" in message, message


# ---------------------------------------------------------------- 2. one in-backward optimizer
MIXED_SIZES = {"f0": 5000, "f1": 2000, "f3": 3000, "f2": 10}


def mixed_compression() -> Dict:
    counts = torch.arange(3000, 0, -1)  # frequency-ordered ids: MPE searches from step 1
    return {"t_f0": CCEConfig(rows=16, chunks=2), "t_f1": MEmComConfig(rows=64),
            "t_f3": MPEConfig(groups=4, bits=(0, 2, 4, 8), counts=counts)}


def one_line(model: DLRMTrain, cls: type, kwargs: Dict) -> None:
    """The golden example's line: every sparse parameter, one optimizer."""
    apply_optimizer_in_backward(cls, model.model.sparse_arch.parameters(), kwargs)


def example_split(model: DLRMTrain, cls: type, kwargs: Dict, per_id_cls: type) -> None:
    """examples/dlrm/train.py's split before the library carried it: MPE's small replicated
    parameters left to the dense optimizer, MEmCom's per-id weights given ``per_id_cls``
    (torch's element-wise rule), every other sparse parameter ``cls``."""
    ebc = model.model.sparse_arch.embedding_bag_collection
    small = [p for m in ebc.tables.values() if isinstance(m, MPETable)
             for p in (m.logits, m.alpha, m.beta)]
    per_id = [m.id_weight for m in ebc.tables.values() if isinstance(m, MEmComTable)]
    skip = {id(p) for p in small + per_id}
    apply_optimizer_in_backward(cls, [p for p in model.model.sparse_arch.parameters()
                                      if id(p) not in skip], kwargs)
    apply_optimizer_in_backward(per_id_cls, per_id, kwargs)


def _mixed_losses(rank: int, world: int, optimizer: str, split: bool) -> List[float]:
    model = dlrm(mixed_compression(), MIXED_SIZES)
    cls, per_id_cls, kwargs = {
        "rowwise_adagrad": (RowWiseAdagrad, torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}),
        "sgd": (torch.optim.SGD, torch.optim.SGD, {"lr": 0.1}),
    }[optimizer]
    if split:
        example_split(model, cls, kwargs, per_id_cls)
    else:
        one_line(model, cls, kwargs)
    dmp = DistributedModelParallel(
        model, sharders=[CCEEmbeddingBagCollectionSharder(), *get_default_sharders()],
        device=CPU)
    return plain_loop(dmp, dense_optimizer(dmp), rank, 16, MIXED_SIZES)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
def test_one_in_backward_optimizer_over_all_sparse_params_equals_the_split(optimizer: str
                                                                          ) -> None:
    one = run_multiprocess(_mixed_losses, 2, optimizer, False, timeout=900)
    split = run_multiprocess(_mixed_losses, 2, optimizer, True, timeout=900)
    for rank, (a, b) in enumerate(zip(one, split)):
        # The same rules on the same values; only the operation order of one per-id update
        # differs (torch Adagrad's sparse step divides g by its std, then scales by -lr;
        # row-wise Adagrad's addcdiv does it the other way round): float32 rounding only.
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=2e-6)
        assert all(math.isfinite(x) for x in a)
        assert sum(a[-5:]) / 5 < sum(a[:5]) / 5 - 0.01, f"rank {rank}: {a}"


def test_one_line_row_wise_adagrad_on_per_id_columns_is_adagrad() -> None:
    """Unsharded: RowWiseAdagrad builds on every parameter of the collection (none is 1-D),
    and on MEmCom's [V, 1] weights and MPE's [K, 1] / [dim, 1] steps and offsets it is
    exactly torch's Adagrad (rows of one element)."""
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=n,
                                 feature_names=[f]) for f, n in MIXED_SIZES.items()]
    torch.manual_seed(0)
    one = CCEEmbeddingBagCollection(tables, mixed_compression())
    split = copy.deepcopy(one)
    assert all(p.dim() == 2 for p in one.parameters())
    kwargs = {"lr": 0.1, "eps": 1e-8}
    apply_optimizer_in_backward(RowWiseAdagrad, one.parameters(), kwargs)
    columns = {n for n, _ in one.named_parameters() if n.endswith(("id_weight", "alpha", "beta"))}
    assert len(columns) == 3
    named = dict(split.named_parameters())
    apply_optimizer_in_backward(RowWiseAdagrad, [p for n, p in named.items() if n not in columns],
                                kwargs)
    apply_optimizer_in_backward(torch.optim.Adagrad, [named[n] for n in columns], kwargs)
    before = {n: p.detach().clone() for n, p in named.items()}
    for step in range(3):
        kjt = make_batch(step, 0, MIXED_SIZES).sparse_features
        for m in (one, split):
            (m(kjt).values() ** 2).sum().backward()
    after = dict(one.named_parameters())
    for n in columns:
        assert not torch.equal(before[n], after[n].detach()), n  # stepped
    for n, p in named.items():
        torch.testing.assert_close(after[n].detach(), p.detach(), rtol=0, atol=0, msg=n)


# ---------------------------------------------------------------- 4. a collection of MPE tables only
MPE_SIZES = {"f0": 300, "f1": 10}


def _all_mpe_losses(rank: int, world: int, pipelined: bool):
    model = dlrm({f"t_{f}": MPEConfig(groups=2, bits=(0, 4, 8), counts=torch.arange(n, 0, -1))
                  for f, n in MPE_SIZES.items()}, MPE_SIZES)
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(),
                                {"lr": 0.1, "eps": 1e-8})
    dmp = DistributedModelParallel(model, sharders=[CCEEmbeddingBagCollectionSharder()],
                                   device=CPU)  # DMP's own planner, no helper
    sharded = dmp.module.model.sparse_arch.embedding_bag_collection
    local_rows = {t: sharded.tables[t].weight.shape[0] for t in ("t_f0", "t_f1")}
    dense = dense_optimizer(dmp)
    if not pipelined:
        return local_rows, plain_loop(dmp, dense, rank, 12, MPE_SIZES)
    pipeline = TrainPipelineSparseDist(dmp, dense, CPU)
    batches = iter([make_batch(step, rank, MPE_SIZES) for step in range(1, 13)])
    return local_rows, [float(pipeline.progress(batches)[0]) for _ in range(12)]


def test_all_mpe_collection_shards_under_dmp_and_trains_in_the_sparse_dist_pipeline() -> None:
    plain = run_multiprocess(_all_mpe_losses, 2, False, timeout=900)
    piped = run_multiprocess(_all_mpe_losses, 2, True, timeout=900)
    for rank, ((rows, a), (_, b)) in enumerate(zip(plain, piped)):
        # master weights split by id range: ceil(V / 2) ids on rank 0, the rest on rank 1
        assert rows == {"t_f0": 150, "t_f1": 5}, rows
        assert a == b, f"rank {rank}: plain {a} vs pipelined {b}"
        assert sum(a[-4:]) / 4 < sum(a[:4]) / 4, a
