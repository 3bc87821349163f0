"""Per-rank memory of a sharded CCE table and distributed vs single-process re-clustering time.

    .venv/bin/python benchmarks/distributed.py            # V = 10M ids (a few minutes)
    .venv/bin/python benchmarks/distributed.py --ids 1000000
    .venv/bin/python benchmarks/distributed.py --memcom-only   # just the MEmCom row (fast)
    .venv/bin/python benchmarks/distributed.py --mpe-only      # just the MPE row (fast)

One CCE table (dim 16, rows 4096, 4 chunks) under DistributedModelParallel at world size 2
(gloo, CPU, one thread per rank) with its assignment sharded by id range: the memory each
rank really holds (read from its tensors) and the time of one ``recluster``; then the same
table unsharded in one process (two threads). Both clusterings use the same number of
samples (``--samples``). Then a MEmCom table of the same shape (rows 8192: the same codebook
bytes as CCE's A + B) under DMP at world size 2: its per-id weights split by id range, the
bytes each rank holds (read from its tensors) and the time of one training step. Then an MPE
table of the same shape (frequency-ordered ids, 128 groups, widths 0-6) under DMP at world size
2: its fp32 master weights split by id range, the bytes each rank holds (read from its tensors;
plus its row-wise Adagrad state, one float per row) and the time of one training step (search
stage, row-wise Adagrad in backward). Results: ``benchmarks/results/distributed.json`` (keys
``memcom``, ``mpe``).
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from torchrec import EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402

from torchrec_cce import (CCEConfig, CCEEmbeddingBagCollection, MEmComConfig,  # noqa: E402
                          MPEConfig, memory_report, recluster)

ROWS, CHUNKS, DIM = 4096, 4, 16


def tables(num_ids: int):
    return [EmbeddingBagConfig(name="big", embedding_dim=DIM, num_embeddings=num_ids,
                               feature_names=["ids"])]


def sample(num_ids: int, n: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return (torch.rand(n, generator=g) ** 4 * num_ids).long()  # skewed, like real traffic


def median_step_seconds(dmp: torch.nn.Module, num_ids: int, batch: int, rank: int) -> float:
    """Median wall time of 5 training steps (after one warm-up) on one skewed single-id batch."""
    import torch.distributed as dist

    ids = sample(num_ids, batch, rank)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["ids"], values=ids,
                                              lengths=torch.ones(batch, dtype=torch.int64))
    seconds = []
    for _ in range(6):
        dist.barrier()
        start = time.perf_counter()
        dmp(kjt).wait().values().sum().backward()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds[1:])[len(seconds[1:]) // 2]


def _sharded(rank: int, world: int, num_ids: int, samples: int):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=0)
    module = CCEEmbeddingBagCollection(tables(num_ids), {"big": CCEConfig(ROWS, CHUNKS)},
                                       device=torch.device("meta"))
    plan = construct_module_sharding_plan(
        module, {"big__cce": table_wise(rank=0, compute_kernel="fused")},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu")
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=ShardingPlan({"": plan}), sharders=[sharder],
                                   device=torch.device("cpu"))
    dmp.module.tables["big"].reservoir.observe(sample(num_ids, samples // world, rank))
    dist.barrier()
    start = time.perf_counter()
    stats = recluster(dmp)["big"]
    seconds = time.perf_counter() - start
    row = memory_report(dmp)["big"]
    return {"rank": rank, "seconds": seconds, "local_assignment_bytes": row["local_assignment_bytes"],
            "local_codebook_bytes": row["local_codebook_bytes"],
            "global_compressed_bytes": row["compressed_bytes"], "full_bytes": row["full_bytes"],
            "kmeans_inertia_end": stats["kmeans_inertia_end"]}


MEMCOM_ROWS = 2 * ROWS  # H: 8192 x 16 fp32 = CCE's A + B bytes


def _memcom_sharded(rank: int, world: int, num_ids: int, batch: int):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import SGD

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    sharder = CCEEmbeddingBagCollectionSharder()
    module = CCEEmbeddingBagCollection(tables(num_ids), {"big": MEmComConfig(MEMCOM_ROWS)},
                                       device=torch.device("meta"))
    apply_optimizer_in_backward(SGD, module.parameters(), {"lr": 0.1})
    plan = construct_module_sharding_plan(
        module, {"big__memcom": table_wise(rank=0, compute_kernel="fused")},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu")
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=ShardingPlan({"": plan}), sharders=[sharder],
                                   device=torch.device("cpu"))
    step_seconds = median_step_seconds(dmp, num_ids, batch, rank)
    row = memory_report(dmp)["big"]
    return {"rank": rank, "local_per_id_bytes": row["local_per_id_bytes"],
            "local_codebook_bytes": row["local_codebook_bytes"],
            "global_compressed_bytes": row["compressed_bytes"], "full_bytes": row["full_bytes"],
            "step_seconds_median": step_seconds}


def memcom_row(num_ids: int, batch: int) -> dict:
    from multiprocess import run_multiprocess

    ranks = run_multiprocess(_memcom_sharded, 2, num_ids, batch, timeout=3600)
    mib = 1 << 20
    print(f"MEmCom V={num_ids:,} rows={MEMCOM_ROWS}: {ranks[0]['global_compressed_bytes'] / mib:.2f} "
          f"MiB in all (full {ranks[0]['full_bytes'] / mib:.1f} MiB)")
    for r in ranks:
        print(f"  rank {r['rank']}: per-id weights {r['local_per_id_bytes'] / mib:.2f} MiB, "
              f"codebook {r['local_codebook_bytes'] / mib:.3f} MiB, step "
              f"{r['step_seconds_median'] * 1e3:.1f} ms (batch {batch}, median of 5)")
    return {"num_ids": num_ids, "rows": MEMCOM_ROWS, "dim": DIM, "world_size": 2,
            "batch": batch, "per_rank": ranks}


def _mpe_sharded(rank: int, world: int, num_ids: int, batch: int):
    import numpy as np
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder, plan_memory
    from torchrec_cce.distributed.sharder import shard_unplanned

    counts = np.arange(num_ids, 0, -1, dtype=np.int64)  # frequency-ordered ids: no group index
    config = MPEConfig(counts=counts)
    sharder = CCEEmbeddingBagCollectionSharder()
    module = CCEEmbeddingBagCollection(tables(num_ids), {"big": config}, device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, [module.tables["big"].weight], {"lr": 0.05})
    planned = plan_memory(ShardingPlan({}), module, world)["big"]["bytes_per_rank"]
    env = ShardingEnv.from_process_group(dist.GroupMember.WORLD)
    # An all-MPE collection has no codebook for the planner: sharded as train.py does.
    sharded = shard_unplanned(module, ShardingPlan({}), sharder, env, torch.device("cpu"))
    dmp = DistributedModelParallel(sharded, env=env, plan=ShardingPlan({}), sharders=[sharder],
                                   device=torch.device("cpu"))
    step_seconds = median_step_seconds(dmp, num_ids, batch, rank)
    row = memory_report(dmp)["big"]
    w = dmp.module.tables["big"].weight
    state = w._in_backward_optimizers[0].state[w]["sum"]
    return {"rank": rank, "local_per_id_bytes": row["local_per_id_bytes"],
            "local_training_bytes": row["local_training_bytes"],
            "planned_bytes": planned[rank],
            "local_optimizer_state_bytes": state.numel() * state.element_size(),
            "training_bytes": row["training_bytes"], "serving_bytes": row["serving_bytes"],
            "full_bytes": row["full_bytes"],
            "step_seconds_median": step_seconds}


def mpe_row(num_ids: int, batch: int) -> dict:
    from multiprocess import run_multiprocess

    ranks = run_multiprocess(_mpe_sharded, 2, num_ids, batch, timeout=3600)
    mib = 1 << 20
    print(f"MPE V={num_ids:,}: training {ranks[0]['training_bytes'] / mib:.2f} MiB in all, "
          f"serving bound now {ranks[0]['serving_bytes'] / mib:.2f} MiB (full "
          f"{ranks[0]['full_bytes'] / mib:.1f} MiB)")
    for r in ranks:
        print(f"  rank {r['rank']}: master rows {r['local_per_id_bytes'] / mib:.2f} MiB, training "
              f"state {r['local_training_bytes'] / mib:.2f} MiB (planned "
              f"{r['planned_bytes'] / mib:.2f}), row-wise Adagrad state "
              f"{r['local_optimizer_state_bytes'] / mib:.2f} MiB, step "
              f"{r['step_seconds_median'] * 1e3:.1f} ms (batch {batch}, median of 5)")
    return {"num_ids": num_ids, "dim": DIM, "world_size": 2, "batch": batch, "per_rank": ranks}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ids", type=int, default=10_000_000)
    p.add_argument("--samples", type=int, default=256 * ROWS // 4)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "distributed.json"))
    p.add_argument("--memcom-only", action="store_true",
                   help="only (re)measure the MEmCom row, keeping the CCE results in --out")
    p.add_argument("--memcom-batch", type=int, default=4096)
    p.add_argument("--mpe-only", action="store_true",
                   help="only (re)measure the MPE row, keeping the other results in --out")
    args = p.parse_args()
    if args.memcom_only or args.mpe_only:
        result = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                result = json.load(f)
        if args.memcom_only:
            result["memcom"] = memcom_row(args.ids, args.memcom_batch)
        if args.mpe_only:
            result["mpe"] = mpe_row(args.ids, args.memcom_batch)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return
    from multiprocess import run_multiprocess

    ranks = run_multiprocess(_sharded, 2, args.ids, args.samples, timeout=3600)
    torch.set_num_threads(2)
    single = CCEEmbeddingBagCollection(tables(args.ids), {"big": CCEConfig(ROWS, CHUNKS)})
    single.tables["big"].reservoir.observe(torch.cat([sample(args.ids, args.samples // 2, r)
                                                      for r in range(2)]))
    start = time.perf_counter()
    recluster(single)
    single_seconds = time.perf_counter() - start
    row = memory_report(single)["big"]
    result = {
        "num_ids": args.ids, "rows": ROWS, "chunks": CHUNKS, "dim": DIM, "samples": args.samples,
        "world_size": 2, "per_rank": ranks,
        "single_process": {"seconds": single_seconds, "assignment_bytes": row["assignment_bytes"],
                           "compressed_bytes": row["compressed_bytes"]},
        "full_table_bytes": row["full_bytes"],
        "distributed_seconds": max(r["seconds"] for r in ranks),
        "memcom": memcom_row(args.ids, args.memcom_batch),
        "mpe": mpe_row(args.ids, args.memcom_batch),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    mib = 1 << 20
    print(f"V={args.ids:,}: full table {row['full_bytes'] / mib:.1f} MiB; single process holds "
          f"{row['compressed_bytes'] / mib:.2f} MiB (assignment {row['assignment_bytes'] / mib:.2f})")
    for r in ranks:
        print(f"  rank {r['rank']}: assignment {r['local_assignment_bytes'] / mib:.2f} MiB, "
              f"codebooks {r['local_codebook_bytes'] / mib:.3f} MiB, recluster {r['seconds']:.1f} s")
    print(f"recluster: distributed (2 ranks x 1 thread) {result['distributed_seconds']:.1f} s vs "
          f"single process (2 threads) {single_seconds:.1f} s")


if __name__ == "__main__":
    main()
