"""Make TorchRec's planner see the true bytes of CCE tables, and show a plan's memory per rank.

TorchRec 1.8's storage estimator counts only the tensors returned by ``shardable_parameters``
(the codebooks). The O(V) state split by id range is invisible to it: each method's declared
per-id state (``CompressedTable.per_id_state()``: CCE's bit-packed ``p``, MEmCom's per-id
weights, MPE's fp32 master weights) plus its small replicated state.
:class:`CCEStorageReservation` wraps any planner ``StorageReservation`` and additionally
reserves, on every device, the bytes of that state the rank will hold (placed by the sharder's
rule, :mod:`torchrec_cce.distributed.per_id_state`), so plans that would not fit are rejected
by the planner itself.
"""

import copy
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    StorageReservation,
    Topology,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from torchrec_cce.distributed.assignment import DEFAULT_REPLICATE_ASSIGNMENT_BELOW
from torchrec_cce.distributed.per_id_state import state_bytes_per_rank
from torchrec_cce.memory import _dtype_bytes, stored_bytes
from torchrec_cce.methods import codebook_table_name
from torchrec_cce.modules import CCEEmbeddingBagCollection


def table_state_bytes_per_rank(model: nn.Module, world_size: int,
                               replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW
                               ) -> Dict[str, List[int]]:
    """``{table: [bytes on rank 0, rank 1, ...]}`` of the non-codebook state of every table
    that has some, in every ``CCEEmbeddingBagCollection`` of ``model``: its per-id state (CCE's
    packed ``p``, MEmCom's per-id weights, MPE's master rows) placed as the sharder places it
    (:func:`~torchrec_cce.distributed.per_id_state.stored_id_range`), plus the state every rank
    keeps whole (CCE's hash generation, MPE's logits and buffers) and each rank's share of CCE's
    id reservoir."""
    out: Dict[str, List[int]] = {}
    for _, module in model.named_modules():
        if not isinstance(module, CCEEmbeddingBagCollection):
            continue
        for name, method in module.tables.items():
            if method.per_id_state() or method.replicated_state_bytes() or method.sample_bytes():
                out[name] = state_bytes_per_rank(method, world_size, replicate_below)
    return out


class CCEStorageReservation(StorageReservation):
    """Reserve the bytes of the tables' non-codebook state (:func:`table_state_bytes_per_rank`)
    on top of a base reservation.

    Args:
        base: the reservation for dense parts and inputs (default:
            ``HeuristicalStorageReservation(percentage=0.15)``, TorchRec's default).
        replicate_below: the sharder's ``replicate_assignment_below`` (must match it).
    """

    def __init__(self, base: Optional[StorageReservation] = None,
                 replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW) -> None:
        self._base = base or HeuristicalStorageReservation(percentage=0.15)
        # TorchRec's planner reads ``_percentage`` of any reservation that is not its own
        # heuristic one when it explains why no plan fits (planners.py, "Possible solutions");
        # without it that explanation raises AttributeError instead of the PlannerError.
        self._percentage = getattr(self._base, "_percentage", 0.0)
        self._replicate_below = replicate_below
        # {table: [bytes on each rank]} of the last reserve() (table_state_bytes_per_rank).
        self.state_bytes: Dict[str, List[int]] = {}
        self._last: Optional[Topology] = None

    def reserve(self, topology: Topology, batch_size: int, module: nn.Module,
                sharders: List[ModuleSharder[nn.Module]],
                constraints: Optional[Dict[str, ParameterConstraints]] = None) -> Topology:
        reserved = self._base.reserve(topology, batch_size, module, sharders, constraints)
        reserved = copy.deepcopy(reserved)
        self.state_bytes = table_state_bytes_per_rank(module, topology.world_size,
                                                      self._replicate_below)
        for rank, device in enumerate(reserved.devices):
            need = sum(b[rank] for b in self.state_bytes.values())
            if topology.compute_device == "cpu":
                device.storage.ddr -= need
            else:
                device.storage.hbm -= need
        self._last = copy.deepcopy(reserved)
        return reserved

    @property
    def last_reserved_topology(self) -> Optional[Topology]:
        return self._last


def plan_memory(plan: ShardingPlan, model: nn.Module, world_size: int,
                replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW
                ) -> Dict[str, Dict[str, object]]:
    """Per logical table: full bytes, compressed bytes, and bytes on each rank (codebook shards
    as placed by ``plan`` plus the non-codebook state), for every CCE collection in ``model``."""
    assign = table_state_bytes_per_rank(model, world_size, replicate_below)
    rows: Dict[str, Dict[str, object]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, CCEEmbeddingBagCollection):
            continue
        module_plan = plan.get_plan_for_module(path) or {}
        codebook_types = {c.name: c.data_type for c in module.codebook_table_configs()}
        for t in module.embedding_bag_configs():
            method = module.tables[t.name]
            per_rank = [0] * world_size
            codebook_total = 0
            for cb in method.codebooks:
                name = codebook_table_name(t.name, cb.suffix)
                elem = _dtype_bytes(codebook_types[name])  # codebooks may be float16
                codebook_total += cb.num_embeddings * cb.embedding_dim * elem
                ps = module_plan.get(name)
                if ps is None:
                    continue
                if ps.sharding_type == "data_parallel" or ps.sharding_spec is None:
                    for r in (ps.ranks or range(world_size)):
                        per_rank[r] += cb.num_embeddings * cb.embedding_dim * elem
                    continue
                for shard in ps.sharding_spec.shards:
                    rank = shard.placement.rank()
                    per_rank[rank] += shard.shard_sizes[0] * shard.shard_sizes[1] * elem
            for r, b in enumerate(assign.get(t.name, [0] * world_size)):
                per_rank[r] += b
            rows[t.name] = {
                "method": method.method_name,
                "full_bytes": t.num_embeddings * t.embedding_dim * _dtype_bytes(t.data_type),
                "compressed_bytes": codebook_total + method.logical_state_bytes(),
                "bytes_per_rank": per_rank,
            }
    return rows


def format_plan_memory(rows: Dict[str, Dict[str, object]]) -> str:
    """A printable table of :func:`plan_memory` (MiB)."""
    if not rows:
        return "(no CCE collections in the plan)"
    world = len(next(iter(rows.values()))["bytes_per_rank"])
    head = f"{'table':<16}{'method':<9}{'full MiB':>12}{'compressed MiB':>16}" + "".join(
        f"{'rank ' + str(r) + ' MiB':>13}" for r in range(world))
    lines = [head, "-" * len(head)]
    mib = 1 << 20
    for name, row in rows.items():
        lines.append(f"{name:<16}{row['method']:<9}{row['full_bytes'] / mib:>12.3f}"
                     f"{row['compressed_bytes'] / mib:>16.3f}"
                     + "".join(f"{b / mib:>13.3f}" for b in row["bytes_per_rank"]))
    return "\n".join(lines)


def sharded_memory_report(sharded: nn.Module) -> Dict[str, Dict[str, float]]:
    """``memory_report`` rows for a ``ShardedCCEEmbeddingBagCollection``: global figures from the
    sharded tensors' global shapes, plus ``local_*`` bytes this rank really holds."""
    state = sharded.codebooks.state_dict()
    report: Dict[str, Dict[str, float]] = {}
    for t in sharded.embedding_bag_configs():
        method = sharded.tables[t.name]
        codebook_bytes = local_codebook = params = 0
        for cb in method.codebooks:
            value = state[f"embedding_bags.{codebook_table_name(t.name, cb.suffix)}.weight"]
            is_sharded = isinstance(value, ShardedTensor)
            size = value.metadata().size if is_sharded else value.size()
            dtype = value.metadata().tensor_properties.dtype if is_sharded else value.dtype
            elem = torch.empty((), dtype=dtype).element_size()
            numel = int(torch.Size(size).numel())
            codebook_bytes += numel * elem
            params += numel
            if is_sharded:
                local_codebook += sum(s.tensor.numel() * elem for s in value.local_shards())
            else:
                local_codebook += numel * elem
        states = method.per_id_state()
        assignment = sum(s.total_bytes for s in states if not s.trainable)
        per_id = method.per_id_bytes()
        local_assignment = sum(stored_bytes(getattr(method, s.name)) for s in states
                               if not s.trainable)
        local_per_id = sum(stored_bytes(getattr(method, s.name)) for s in states if s.trainable)
        params += method.extra_parameters()
        full = t.num_embeddings * t.embedding_dim * _dtype_bytes(t.data_type)
        compressed = codebook_bytes + method.logical_state_bytes()
        report[t.name] = {
            "method": method.method_name,
            "full_bytes": full,
            "codebook_bytes": codebook_bytes,
            "assignment_bytes": assignment,
            "per_id_bytes": per_id,
            "compressed_bytes": compressed,
            "full_params": t.num_embeddings * t.embedding_dim,
            "params": params,
            "ratio": full / max(1, compressed),
            "local_codebook_bytes": local_codebook,
            "local_assignment_bytes": local_assignment,
            "local_per_id_bytes": local_per_id,
            # this rank's non-codebook training state (per-id part and replicated part)
            "local_training_bytes": method.state_bytes(),
        }
    return report
