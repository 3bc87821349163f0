"""Sharding a model that holds a ``CCEEmbeddingBagCollection``: TorchRec's planner with the
CCE storage reservation, DistributedModelParallel with the CCE sharder, and the train pipeline.

    dmp, plan_table = shard(model, world, device, batch_size=1024)
    pipeline = make_pipeline(dmp, optim.dense, device)
"""

import os
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv

from torchrec_cce.distributed import (
    CCEEmbeddingBagCollectionSharder,
    CCEStorageReservation,
    format_plan_memory,
    plan_memory,
)
from torchrec_cce.distributed.assignment import DEFAULT_REPLICATE_ASSIGNMENT_BELOW
from torchrec_cce.distributed.sharder import shard_unplanned


def shard(model: nn.Module, world: int, device: torch.device, batch_size: int,
          whole_rows: bool = False,
          replicate_assignment_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW
          ) -> Tuple[nn.Module, str]:
    """Plan and shard ``model`` over the default process group (collective).

    Every codebook is model-parallel (the CCE sharder offers no data-parallel placement), so it
    trains with the fused sparse optimizer like a full table. ``whole_rows`` also leaves out
    column-wise placements (serving INT-N rows quantises whole rows: evaluating the served
    values needs every codebook row on one rank). Returns the ``DistributedModelParallel`` and
    the plan's memory table (per table: method, bytes, bytes per rank). A collection the plan
    does not place (every table MPE: no codebook) is sharded by
    :func:`torchrec_cce.distributed.sharder.shard_unplanned`. CCE assignments smaller than
    ``replicate_assignment_below`` bytes are kept whole on every rank (no per-step routing of
    ids to the rank storing their ``p``), larger ones split by id range; the plan and its
    memory table count either placement."""
    sharder = CCEEmbeddingBagCollectionSharder(
        EmbeddingBagCollectionSharder(),
        excluded_sharding_types=("column_wise", "table_column_wise") if whole_rows else (),
        replicate_assignment_below=replicate_assignment_below)
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world,
                      local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world))),
        kernel_config=KernelConfig(compute_device=device.type))
    # TorchRec's default reservation, with the dense parts' size given explicitly (its own
    # heuristic: 6 x the dense parameter bytes, for weights, optimizer state and DDP buckets).
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if "sparse_arch" not in n)
    base = HeuristicalStorageReservation(percentage=0.15, dense_tensor_estimate=6 * dense_bytes)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size,
                                       storage_reservation=CCEStorageReservation(
                                           base=base, replicate_below=replicate_assignment_below))
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    # (before DMP swaps modules)
    table = format_plan(plan_memory(plan, model, world, replicate_assignment_below))
    env = ShardingEnv.from_process_group(dist.GroupMember.WORLD)
    model = shard_unplanned(model, plan, sharder, env, device)
    dmp = DistributedModelParallel(model, env=env, plan=plan, sharders=[sharder], device=device)
    return dmp, table


def make_pipeline(dmp: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                  sparse_dist: bool = True) -> Any:
    """``TrainPipelineSparseDist`` for a DMP; ``TrainPipelineBase`` otherwise or when
    ``sparse_dist`` is False (an all-MPE model has no codebook EBC: the sparse-dist pipeline's
    fx trace of the model fails on it, and it has no input dist to overlap)."""
    if sparse_dist and isinstance(dmp, DistributedModelParallel):
        return TrainPipelineSparseDist(dmp, optimizer, device)
    return TrainPipelineBase(dmp, optimizer, device)


def format_plan(rows: Dict[str, Dict[str, Any]], max_rows: int = 8) -> str:
    """The plan's memory table; beyond ``max_rows`` tables, the uncompressed ones are summed
    into one line so the table stays short."""
    if len(rows) <= max_rows:
        return format_plan_memory(rows)
    kept = {k: r for k, r in rows.items() if r["method"] != "full"}
    full = [r for r in rows.values() if r["method"] == "full"]
    mib = 1 << 20
    text = format_plan_memory(kept) if kept else ""
    if full:
        total = sum(r["full_bytes"] for r in full) / mib
        ranks = [sum(r["bytes_per_rank"][i] for r in full) / mib
                 for i in range(len(full[0]["bytes_per_rank"]))]
        line = (f"{f'+{len(full)} full':<16}{'full':<9}{total:>12.3f}{total:>16.3f}"
                + "".join(f"{b:>13.3f}" for b in ranks))
        text = f"{text}\n{line}" if text else line
    return text
