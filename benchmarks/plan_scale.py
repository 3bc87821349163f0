"""Planned for 8 to 4,096 GPUs: TorchRec's planner on MLPerf DLRM-DCNv2's tables and a 1B-id set.

No GPU is needed: TorchRec's ``EmbeddingShardingPlanner`` plans a simulated CUDA topology
(``Topology(compute_device="cuda", world_size=W, local_world_size=8, hbm_cap=80 GiB)``) from this
CPU machine, for a ``DLRM_DCN`` whose ``CCEEmbeddingBagCollection`` lives on the meta device
(nothing is allocated). The planner sees the project's storage reservation
(:class:`torchrec_cce.distributed.CCEStorageReservation`: the O(V) state split by id range is
reserved on every rank) and the CCE sharder's sharding types (every codebook
model-parallel), with one constraint: the ``fused`` (HBM) kernel only, so "fits" means fits
in 80 GB of HBM, not in host memory via UVM.

Per cell (table set x method x world size) the JSON records, per rank:

* ``codebook``: bytes of the codebook shards the plan places on the rank (rows x cols x elem of
  every shard of ``plan.sharding_spec``);
* ``ov``: bytes of the O(V) state the rank holds (CCE's packed assignment split by id range,
  MEmCom's per-id weights, MPE's master rows: ``torchrec_cce.distributed.planning``'s
  ``*_bytes_per_rank``, the sharder's own split), and its share of CCE's id reservoirs (results
  written before 2026-12-07 11:00 UTC leave the reservoirs out: 2^21 ids x 8 bytes per CCE table
  over all ranks, 2 MiB per table per rank at 8 ranks);
* ``optimizer``: row-wise Adagrad state: one fp32 per row of every codebook shard on the rank
  (fbgemm's ``EXACT_ROWWISE_ADAGRAD`` keeps one momentum per local row, so a column-wise or grid
  shard keeps its own copy for its rows), plus one fp32 per id of MEmCom's per-id weights
  (torch Adagrad, element-wise). CCE's assignment is integer state: no optimizer state;

their max over ranks against the 80 GB cap, the sharding types chosen (codebooks per type), the
planner's wall seconds, and the id-range routing traffic of CCE's assignment per rank per batch
(:func:`routing_bytes`). A cell the planner cannot place records TorchRec's error.

    python benchmarks/plan_scale.py                      # every cell, resumable
    python benchmarks/plan_scale.py --worlds 8,64 --sets mlperf
    python benchmarks/plan_scale.py --markdown-only      # rewrite plan_scale.md from the JSON
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torchrec
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.models.dlrm import DLRM_DCN
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_cce import CCEEmbeddingBagCollection, plan_compression  # noqa: E402
from torchrec_cce.budget import CompressionPlan  # noqa: E402
from torchrec_cce.distributed import (  # noqa: E402
    CCEEmbeddingBagCollectionSharder,
    CCEStorageReservation,
    table_state_bytes_per_rank,
)
from torchrec_cce.distributed.assignment import DEFAULT_REPLICATE_ASSIGNMENT_BELOW  # noqa: E402
from torchrec_cce.distributed.id_routing import IdRange  # noqa: E402
from torchrec_cce.distributed.per_id_state import stored_id_range  # noqa: E402
from torchrec_cce.memory import _dtype_bytes  # noqa: E402
from torchrec_cce.methods import CCETable, CompressedTable  # noqa: E402

GiB = 1 << 30
HBM_CAP = 80 * GiB
LOCAL_WORLD = 8   # GPUs per host
DIM = 128

# MLPerf DLRM-DCNv2 (Criteo 1TB, 40M cap): --num_embeddings_per_feature and --multi_hot_sizes of
# mlcommons/training recommendation_v2/torchrec_dlrm (README.MD, the materialize_synthetic_
# multihot_dataset step). The uncapped Criteo 1TB counts are in facebookresearch/dlrm
# torchrec_dlrm/README.MD (45833188,36746,...; 177,944,275 ids): capping at 40M gives the
# MLPerf tables' sizes for the 4 largest, MLPerf's counts differ slightly for the others.
MLPERF_DCNV2_CARDINALITIES = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
    11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36)
MLPERF_DCNV2_MULTI_HOT = (
    3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
BILLION = 1_000_000_000

# DLRM-DCNv2's MLPs (MLPerf): dense 512,256,128; over 1024,1024,512,256,1; 3 low-rank DCN layers.
MLPERF_ARCH = dict(dense_in_features=13, dense_arch_layer_sizes=[512, 256, DIM],
                   over_arch_layer_sizes=[1024, 1024, 512, 256, 1], dcn_num_layers=3,
                   dcn_low_rank_dim=512)

BATCH_PER_RANK = 2048   # MLPerf DCNv2's 65,536 global batch at 32 GPUs; planner batch size too
METHODS = ("full", "cce@16", "cce@256", "qr@16", "qr@256", "plan@16", "plan@256")
WORLDS = (8, 64, 512, 4096)
SETS = ("mlperf", "1b")


def table_set(name: str) -> Tuple[List[EmbeddingBagConfig], Dict[str, int]]:
    """The tables of a set and ids per sample per feature.

    ``mlperf``: MLPerf DLRM-DCNv2's 26 tables (dim 128) with its multi-hot sizes. ``1b``: those
    plus one table of 1,000,000,000 ids (one id per sample), dim 128 (512 GB in fp32)."""
    tables = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=DIM, num_embeddings=v,
                                 feature_names=[f"cat_{i}"])
              for i, v in enumerate(MLPERF_DCNV2_CARDINALITIES)]
    hot = {f"cat_{i}": h for i, h in enumerate(MLPERF_DCNV2_MULTI_HOT)}
    if name == "1b":
        tables.append(EmbeddingBagConfig(name="t_1b", embedding_dim=DIM, num_embeddings=BILLION,
                                         feature_names=["cat_1b"]))
        hot["cat_1b"] = 1
    elif name != "mlperf":
        raise ValueError(f"unknown table set {name!r}; choose from {SETS}")
    return tables, hot


def compression_for(method: str, tables: Sequence[EmbeddingBagConfig]
                    ) -> Tuple[Dict[str, object], Optional[CompressionPlan]]:
    """``full``, or ``<cce|qr|plan>@<fraction>``: torchrec_cce.plan_compression at 1/fraction of
    the full fp32 bytes (``plan``: its own per-table rule, ``methods=None``)."""
    if method == "full":
        return {}, None
    kind, frac = method.split("@")
    full = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    plan = plan_compression(tables, full / int(frac),
                            methods=None if kind == "plan" else [kind])
    return plan.compression, plan


def build_model(tables: List[EmbeddingBagConfig], compression: Dict[str, object],
                arch: Optional[Dict[str, object]] = None) -> nn.Module:
    """DLRM_DCN (``arch``: its MLP sizes, default :data:`MLPERF_ARCH`) over a meta-device
    CCEEmbeddingBagCollection, codebooks marked for row-wise Adagrad (TorchRec's planner
    counts that optimizer's state: 1/dim of a shard's bytes)."""
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    model = DLRM_DCN(embedding_bag_collection=ebc, dense_device=torch.device("meta"),
                     **(arch or MLPERF_ARCH))
    params = [p for p in model.sparse_arch.parameters() if p.dim() == 2]
    apply_optimizer_in_backward(RowWiseAdagrad, params, {"lr": 0.01})
    return model


PROPOSERS = {"default": lambda: None, "greedy": lambda: [GreedyProposer()],
             "uniform": lambda: [UniformProposer()]}


def make_planner(model: nn.Module, sharder: CCEEmbeddingBagCollectionSharder, world: int,
                 hbm_cap: int, batch_size: int, proposer: str,
                 replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW
                 ) -> EmbeddingShardingPlanner:
    """TorchRec's planner for a ``world``-GPU topology with the project's reservation and
    constraints (every codebook model-parallel, HBM-only ``fused`` kernel).

    ``proposer``: ``default`` (TorchRec's four proposers), ``greedy`` (TorchRec's
    ``GreedyProposer`` alone) or ``uniform`` (``UniformProposer`` alone: one proposal per
    sharding type, every table alike): TorchRec's documented knobs for large topologies."""
    topology = Topology(world_size=world, compute_device="cuda",
                        local_world_size=min(LOCAL_WORLD, world), hbm_cap=hbm_cap)
    dense_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "sparse_arch" not in n)
    base = HeuristicalStorageReservation(percentage=0.15, dense_tensor_estimate=6 * dense_bytes)
    # The CCE sharder itself keeps codebooks model-parallel (no data_parallel); HBM kernel only.
    fused = [EmbeddingComputeKernel.FUSED.value]
    constraints = {c.name: ParameterConstraints(compute_kernels=fused)
                   for m in model.modules() if isinstance(m, CCEEmbeddingBagCollection)
                   for c in m.codebook_table_configs()}
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size,
        storage_reservation=CCEStorageReservation(base=base, replicate_below=replicate_below),
        constraints=constraints,
        proposer=PROPOSERS[proposer](), debug=False)


def rank_bytes(plan: ShardingPlan, model: nn.Module, world: int,
               replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW
               ) -> Dict[str, object]:
    """Per-rank bytes of codebooks, O(V) state and row-wise Adagrad state under ``plan``, and
    per-tensor totals (``tensors``: ``{name: [full bytes, bytes summed over ranks]}``) that
    the tests compare."""
    codebook, optim = [0] * world, [0] * world
    tensors: Dict[str, List[int]] = {}
    types: Counter = Counter()
    for path, module in model.named_modules():
        if not isinstance(module, CCEEmbeddingBagCollection):
            continue
        module_plan = plan.get_plan_for_module(path) or {}
        cb_types = {c.name: c.data_type for c in module.codebook_table_configs()}
        for cfg in module.codebook_table_configs():
            ps = module_plan.get(cfg.name)
            if ps is None:
                raise ValueError(f"codebook table '{cfg.name}' has no placement in the plan")
            types[ps.sharding_type] += 1
            elem = _dtype_bytes(cb_types[cfg.name])
            placed = 0
            if ps.sharding_type == "data_parallel" or ps.sharding_spec is None:
                shards = [(r, cfg.num_embeddings, cfg.embedding_dim)
                          for r in (ps.ranks or range(world))]
            else:
                shards = [(s.placement.rank(), s.shard_sizes[0], s.shard_sizes[1])
                          for s in ps.sharding_spec.shards]
            for rank, rows, cols in shards:
                codebook[rank] += rows * cols * elem
                optim[rank] += rows * 4
                placed += rows * cols * elem
            tensors[cfg.name] = [cfg.num_embeddings * cfg.embedding_dim * elem, placed]
    ov = [0] * world
    for name, per_rank in table_state_bytes_per_rank(model, world, replicate_below).items():
        for r, b in enumerate(per_rank):
            ov[r] += b
        tensors[f"{name}:ov"] = [_ov_total_bytes(_table(model, name), world, replicate_below),
                                 sum(per_rank)]
        method = _table(model, name)
        for r in range(world):  # row-wise Adagrad: one fp32 per stored row of trainable state
            rng = stored_id_range(method, r, world, replicate_below)
            optim[r] += sum(s.entries(s.num_ids if rng is None else rng.hi - rng.lo) * 4
                            for s in method.per_id_state() if s.trainable)
    total = [c + o + p for c, o, p in zip(codebook, ov, optim)]
    return {"codebook": codebook, "ov": ov, "optimizer": optim, "total": total,
            "sharding_types": dict(types), "tensors": tensors}


def _table(model: nn.Module, table: str) -> CompressedTable:
    for module in model.modules():
        if isinstance(module, CCEEmbeddingBagCollection) and table in module.tables:
            return module.tables[table]
    raise KeyError(table)


def _ov_total_bytes(method: CompressedTable, world: int, replicate_below: int) -> int:
    """The whole O(V) state of a table times its copies (kept whole: ``world`` copies), plus
    every rank's share of CCE's id reservoir."""
    copies = world if stored_id_range(method, 0, world, replicate_below) is None else 1
    return (sum(s.total_bytes for s in method.per_id_state()) * copies
            + (method.replicated_state_bytes() + method.sample_bytes(world)) * world)


def _routed_tables(model: nn.Module, world: int, replicate_below: int
                   ) -> Iterator[Tuple[EmbeddingBagConfig, CCETable]]:
    """``(table config, CCE table)`` of every CCE table whose assignment is split by id range
    (so its lookups are routed): none at world size 1 or below ``replicate_below`` bytes."""
    if world == 1:
        return
    for module in model.modules():
        if not isinstance(module, CCEEmbeddingBagCollection):
            continue
        for t in module.embedding_bag_configs():
            m = module.tables[t.name]
            if isinstance(m, CCETable) and m.logical_assignment_bytes() >= replicate_below:
                yield t, m


def routing_bytes(model: nn.Module, world: int, batch_size: int, ids_per_sample: Dict[str, int],
                  covered: Optional[Dict[str, float]] = None,
                  replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW) -> Dict[str, float]:
    """Expected off-rank bytes one rank sends/receives per batch to fetch CCE's assignments.

    The sharder's protocol (``torchrec_cce.distributed.assignment.lookup_sharded_assignments``,
    ``id_routing.route_to_owners`` / ``return_to_requesters``), one call per batch over every
    id-range CCE table of the collection: an ``all_to_all_single`` of the ``world`` int64 send
    counts, one of the covered ids (int64 codes, 8 bytes each) to their owners, one of the
    answers back (int64 ``[n, C]``, ``C`` = the largest ``chunks`` of those tables). With
    ``n = B * sum_t L_t * c_t`` covered lookups per batch (``L_t`` ids per sample of table
    ``t``'s features, ``c_t`` the share of them in the covered prefix ``[0, N)``) and each id
    owned by rank ``r`` with probability ``q_r`` (``sum q_r = 1``), a rank sends ``n (1 - q_self)``
    ids off-rank; averaged over ranks that is ``n (1 - 1/W)`` whatever the id distribution:

        ids_out     = 8 n (1 - 1/W)
        assign_back = 8 C n (1 - 1/W)
        counts      = 8 (W - 1)

    Replicated assignments (fewer than ``replicate_below`` bytes) and ``W == 1`` route nothing.
    ``covered``: ``{table: c_t}`` (default 1: every id covered)."""
    covered = covered or {}
    n, chunks = 0.0, 0
    for t, m in _routed_tables(model, world, replicate_below):
        chunks = max(chunks, m.chunks)
        n += batch_size * sum(ids_per_sample[f] for f in t.feature_names) * covered.get(
            t.name, 1.0)
    if n == 0:
        return {"lookups": 0, "ids_out": 0, "assign_back": 0, "counts": 0, "total": 0}
    off = 1 - 1 / world
    out = {"lookups": n, "ids_out": 8 * n * off, "assign_back": 8 * chunks * n * off,
           "counts": 8 * (world - 1)}
    out["total"] = out["ids_out"] + out["assign_back"] + out["counts"]
    return out


def _zipf1_mass(lo: int, hi: int) -> float:
    """``sum_{k=lo}^{hi-1} 1/(k+1)`` (Zipf(1) weight of ids ``[lo, hi)``, id 0 the most
    frequent), exact below 10^6 terms, else from the harmonic numbers' asymptotic series."""
    def harmonic(n: int) -> float:
        if n < 1_000_000:
            return float(sum(1.0 / k for k in range(1, n + 1))) if n else 0.0
        return math.log(n) + 0.5772156649015329 + 1 / (2 * n) - 1 / (12 * n * n)
    return harmonic(hi) - harmonic(lo)


def hot_owner_bytes(model: nn.Module, world: int, batch_size: int, ids_per_sample: Dict[str, int],
                    replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW
                    ) -> Dict[str, float]:
    """Off-rank routing bytes per batch at the busiest owner when every rank's ids follow
    Zipf(1) over a frequency-ordered vocabulary (id 0 the most frequent, as the budget
    planner assumes): rank ``r`` receives ``(W - 1) B L_t m_t(r)`` ids of table ``t``, with
    ``m_t(r)`` the Zipf(1) mass of its id range ``[lo, hi)`` within ``[0, V)``, and sends one
    ``C``-chunk int64 answer per id. Rank 0 owns the most frequent ids of every table, so
    it is the busiest: ``ids_in = 8 x``, ``assign_out = 8 C x``, ``x = sum_t (W - 1) B L_t
    m_t(0)``; ``ratio`` is its traffic over the mean rank's (:func:`routing_bytes`)."""
    x, chunks = 0.0, 0
    for t, m in _routed_tables(model, world, replicate_below):
        chunks = max(chunks, m.chunks)
        rng = IdRange(m.assigned_ids, 0, world, align=m.id_alignment())
        share = _zipf1_mass(rng.lo, rng.hi) / _zipf1_mass(0, t.num_embeddings)
        x += (world - 1) * batch_size * sum(ids_per_sample[f] for f in t.feature_names) * share
    return {"ids_in": 8 * x, "assign_out": 8 * chunks * x, "total": 8 * (1 + chunks) * x}


def plan_cell(set_name: str, method: str, world: int, hbm_cap: int = HBM_CAP,
              batch_size: int = BATCH_PER_RANK, proposer: str = "auto") -> Dict[str, object]:
    """Plan one cell of a named table set (see :func:`plan_tables`)."""
    tables, hot = table_set(set_name)
    return {"set": set_name, **plan_tables(tables, hot, method, world, hbm_cap, batch_size,
                                           proposer)}


def plan_tables(tables: List[EmbeddingBagConfig], hot: Dict[str, int], method: str, world: int,
                hbm_cap: int = HBM_CAP, batch_size: int = BATCH_PER_RANK,
                proposer: str = "auto",
                replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW,
                arch: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Plan ``tables`` compressed by ``method`` (:func:`compression_for`) for ``world`` GPUs;
    the planner's failure is recorded (``fits``, ``error``), not raised. ``hot``: ids per
    sample of every feature (for the routing bytes)."""
    compression, cplan = compression_for(method, tables)
    model = build_model(tables, compression, arch)
    sharder = CCEEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder(),
                                               replicate_assignment_below=replicate_below)
    if proposer == "auto":  # measured: mlperf cce@16 at 4,096 ranks, greedy 577 s, uniform 220 s
        proposer = "default" if world <= 64 else "greedy" if world <= 512 else "uniform"
    planner = make_planner(model, sharder, world, hbm_cap, batch_size, proposer, replicate_below)
    full = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    cell: Dict[str, object] = {
        "method": method, "world": world, "hbm_cap": hbm_cap,
        "batch_per_rank": batch_size, "proposer": proposer, "full_bytes": full,
        "compressed_bytes": cplan.total_bytes if cplan else full,
        "methods": dict(Counter(p.method for p in cplan.tables.values())) if cplan
        else {"full": len(tables)}}
    start = time.perf_counter()
    try:
        plan = planner.plan(model, [sharder])
    except PlannerError as e:
        cell["planner_seconds"] = time.perf_counter() - start
        cell["fits"] = False
        cell["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        return cell
    cell["planner_seconds"] = time.perf_counter() - start
    per_rank = rank_bytes(plan, model, world, replicate_below)
    covered = ({n: p.covered_mass for n, p in cplan.tables.items() if p.method == "cce"}
               if cplan else {})
    cell.update(
        fits=True,
        sharding_types=per_rank["sharding_types"],
        max_bytes={k: max(per_rank[k]) for k in ("codebook", "ov", "optimizer", "total")},
        sum_bytes={k: sum(per_rank[k]) for k in ("codebook", "ov", "optimizer", "total")},
        max_total_over_cap=max(per_rank["total"]) / hbm_cap,
        routing=routing_bytes(model, world, batch_size, hot, covered, replicate_below),
        hot_owner=hot_owner_bytes(model, world, batch_size, hot, replicate_below))
    return cell


def cell_key(set_name: str, method: str, world: int) -> str:
    return f"{set_name}/{method}/w{world}"


def smallest_world(set_name: str, method: str, hbm_cap: int = HBM_CAP, limit: int = 4096
                   ) -> Dict[str, object]:
    """The smallest power-of-two world size at which the planner finds a plan."""
    world, tried = 1, []
    while world <= limit:
        cell = plan_cell(set_name, method, world, hbm_cap)
        tried.append({"world": world, "fits": cell["fits"], "error": cell.get("error")})
        if cell["fits"]:
            return {"smallest_world": world, "tried": tried}
        world *= 2
    return {"smallest_world": None, "tried": tried}


# ---------------------------------------------------------------- results files
def _load(path: str) -> Dict[str, object]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"cells": {}, "thresholds": {}}


def _save(path: str, data: Dict[str, object]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def markdown(data: Dict[str, object]) -> str:
    """The results as markdown tables (GB = 1e9 bytes; MB per batch)."""
    meta = data.get("meta", {})
    lines = ["# Planned for 8 to 4,096 GPUs (`benchmarks/plan_scale.py`)", "",
             f"TorchRec {meta.get('torchrec', '?')} `EmbeddingShardingPlanner`, simulated CUDA "
             f"topology, {HBM_CAP // GiB} GiB HBM per GPU ({HBM_CAP / 1e9:.1f} GB), 8 GPUs per "
             "host, fused (HBM) kernel only, the project's `CCEStorageReservation` on top of "
             "TorchRec's 15% heuristic reservation. Per-rank batch "
             f"{meta.get('batch_per_rank', BATCH_PER_RANK)}. GB = 1e9 bytes; per-rank columns "
             "are the max over ranks. Optimizer = row-wise Adagrad, one fp32 per row of each "
             "codebook shard. Routing = CCE assignment id-range all-to-all, off-rank bytes sent "
             "+ received per rank per batch (ids out + assignments back + counts).", "",
             "Routing formula (`routing_bytes`): n = B x sum over id-range CCE tables of "
             "(ids per sample x covered share); per rank per batch ids out = 8 n (1 - 1/W), "
             "assignments back = 8 C n (1 - 1/W) (int64 answers, C = chunks), counts = "
             "8 (W - 1). The 1 - 1/W is the mean over ranks for any id distribution; under "
             "skew the owner of hot ids receives more than the mean: hot owner = the ids "
             "rank 0 receives + the assignments it sends back when every rank's ids follow "
             "Zipf(1) over frequency-ordered ids (`hot_owner_bytes`; rank 0 owns each "
             "table's most frequent ids).", ""]
    for set_name in SETS:
        cells = [c for c in data["cells"].values() if c["set"] == set_name]
        if not cells:
            continue
        lines += [f"## {set_name}", "",
                  "| method | world | plan | tables by method | compressed GB | codebook GB/rank | O(V) GB/rank | "
                  "optimizer GB/rank | total GB/rank | / cap | codebook tables by sharding type | routing MB/batch"
                  " | hot owner MB/batch | planner s |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        order = {m: i for i, m in enumerate(METHODS)}
        for c in sorted(cells, key=lambda c: (order.get(c["method"], 99), c["world"])):
            kinds = " ".join(f"{k} {v}" for k, v in sorted(c["methods"].items()))
            if not c["fits"]:
                lines.append(f"| {c['method']} | {c['world']} | no plan | {kinds} | "
                             f"{c['compressed_bytes'] / 1e9:.2f} | | | | | | "
                             f"{c['error'][:90]} | | | {c['planner_seconds']:.0f} |")
                continue
            mx = c["max_bytes"]
            types = ", ".join(f"{k} {v}" for k, v in sorted(c["sharding_types"].items()))
            lines.append(
                f"| {c['method']} | {c['world']} | ok | {kinds} | "
                f"{c['compressed_bytes'] / 1e9:.2f} | "
                f"{mx['codebook'] / 1e9:.3f} | {mx['ov'] / 1e9:.3f} | {mx['optimizer'] / 1e9:.4f}"
                f" | {mx['total'] / 1e9:.3f} | {c['max_total_over_cap']:.3f} | {types} | "
                f"{c['routing']['total'] / 1e6:.2f} | "
                f"{c.get('hot_owner', {}).get('total', float('nan')) / 1e6:.1f} | "
                f"{c['planner_seconds']:.0f} |")
        lines.append("")
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"* {n}" for n in data["notes"]] + [""]
    if data.get("thresholds"):
        lines += ["## Smallest world size with a plan (powers of two)", "",
                  "| set | method | smallest world | tried |", "|---|---|---:|---|"]
        for key, t in sorted(data["thresholds"].items()):
            set_name, method = key.split("/")
            tried = ", ".join(f"{x['world']}:{'ok' if x['fits'] else 'no'}" for x in t["tried"])
            lines.append(f"| {set_name} | {method} | {t['smallest_world']} | {tried} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default=",".join(map(str, WORLDS)))
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--thresholds", default="full,cce@16,cce@256",
                   help="methods whose smallest fitting world size is searched ('' to skip)")
    p.add_argument("--proposer", default="auto", choices=("auto",) + tuple(PROPOSERS),
                   help="auto: TorchRec's default proposers up to 64 ranks, GreedyProposer up to "
                        "512, UniformProposer above")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "plan_scale.json"))
    p.add_argument("--markdown-only", action="store_true")
    p.add_argument("--refresh-routing", action="store_true",
                   help="recompute every planned cell's routing bytes (no planning needed)")
    a = p.parse_args()
    torch.set_num_threads(1)
    # Topology(...) built directly, as the brief of this benchmark says: no per-cell warning.
    logging.getLogger("torchrec.distributed.planner.types").setLevel(logging.ERROR)
    logging.getLogger("torchrec.distributed.planner.storage_reservations").setLevel(logging.ERROR)
    data = _load(a.out)
    data["meta"] = {"torchrec": torchrec.__version__, "hbm_cap": HBM_CAP,
                    "batch_per_rank": BATCH_PER_RANK, "local_world_size": LOCAL_WORLD}
    md_path = os.path.splitext(a.out)[0] + ".md"
    if a.refresh_routing:
        for cell in data["cells"].values():
            if cell["fits"]:
                tables, hot = table_set(cell["set"])
                compression, cplan = compression_for(cell["method"], tables)
                model = build_model(tables, compression)
                covered = ({n: tp.covered_mass for n, tp in cplan.tables.items()
                            if tp.method == "cce"} if cplan else {})
                cell["routing"] = routing_bytes(model, cell["world"], cell["batch_per_rank"],
                                                hot, covered)
                cell["hot_owner"] = hot_owner_bytes(model, cell["world"],
                                                    cell["batch_per_rank"], hot)
    if not a.markdown_only:
        sets = [s for s in a.sets.split(",") if s]
        for set_name in sets:
            for method in [m for m in a.methods.split(",") if m]:
                for world in [int(w) for w in a.worlds.split(",") if w]:
                    key = cell_key(set_name, method, world)
                    if key in data["cells"]:
                        continue
                    cell = plan_cell(set_name, method, world, proposer=a.proposer)
                    data["cells"][key] = cell
                    _save(a.out, data)
                    print(key, "fits" if cell["fits"] else "NO PLAN",
                          f"{cell['planner_seconds']:.1f}s",
                          f"max {cell['max_bytes']['total'] / 1e9:.2f} GB"
                          if cell["fits"] else cell["error"][:120], flush=True)
            for method in [m for m in a.thresholds.split(",") if m]:
                key = f"{set_name}/{method}"
                if key not in data["thresholds"]:
                    data["thresholds"][key] = smallest_world(set_name, method)
                    _save(a.out, data)
                    print(key, "smallest world", data["thresholds"][key]["smallest_world"],
                          flush=True)
    _save(a.out, data)
    with open(md_path, "w") as f:
        f.write(markdown(data))


if __name__ == "__main__":
    main()
