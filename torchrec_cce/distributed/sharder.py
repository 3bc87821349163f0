"""Sharding ``CCEEmbeddingBagCollection`` with TorchRec's planner and DistributedModelParallel.

The codebooks are one stock ``EmbeddingBagCollection``, sharded by TorchRec's own
``EmbeddingBagCollectionSharder`` (every sharding type and fused kernel/optimizer TorchRec
offers). This sharder wraps it the way ``FeatureProcessedEmbeddingBagCollectionSharder`` does:

* ``input_dist``: check features, remap logical ids to codebook ids (CCE's ``p`` comes from the
  rank that owns each id, see :mod:`torchrec_cce.distributed.assignment`), then the codebook
  EBC's input dist;
* ``compute``: the codebook EBC's lookups;
* ``output_dist``: the codebook EBC's output dist, plus a callback composing the logical
  features' vectors.

Codebook table names, for ``ParameterConstraints``: ``<table>__cce`` (CCE: every chunk's
``A_i`` and ``B_i`` in one table), ``<table>__ce``, ``<table>__hash``, ``<table>__qr_q`` /
``<table>__qr_r``; full tables keep their name.

State-dict keys equal the unsharded module's (``codebooks.embedding_bags.<t>.weight``,
``tables.<t>.assignment``, ``tables.<t>.h_generation``), with ``ShardedTensor`` values for
sharded state, so ``torch.distributed.checkpoint`` reshards between world sizes.
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cce.distributed.assignment import IdRange, lookup_sharded_assignments
from torchrec_cce.methods import CCETable, build_table
from torchrec_cce.modules import CCEEmbeddingBagCollection
from torchrec_cce.stages import (
    check_features,
    compose_pooled,
    feature_ids,
    mean_lengths,
    remap_features,
)

# Assignments smaller than this (bytes) are replicated on every rank instead of split by id.
DEFAULT_REPLICATE_ASSIGNMENT_BELOW = 1 << 20


@dataclass
class CCEEmbeddingBagCollectionContext(EmbeddingBagCollectionContext):
    """The codebook EBC's context plus the bag lengths of MEAN-pooled logical features."""

    mean_lengths: Dict[str, torch.Tensor] = field(default_factory=dict)
    # (table, ids) to add to the re-clustering sample when this batch is computed, so that a
    # pipeline's early input dist of the next batch does not leak it into the sample.
    observed_ids: List[Tuple[str, torch.Tensor]] = field(default_factory=list)


def _compose_callback(kt: KeyedTensor, module: "ShardedCCEEmbeddingBagCollection",
                      lengths: Dict[str, torch.Tensor]) -> KeyedTensor:
    return compose_pooled(module._embedding_bag_configs, module.tables, lengths, kt,
                          cache=module._compose_cache)


class ShardedCCEEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor,
                           CCEEmbeddingBagCollectionContext]
):
    """Sharded form of :class:`~torchrec_cce.CCEEmbeddingBagCollection` (built by the sharder)."""

    def __init__(
        self,
        module: CCEEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: torch.device,
        module_fqn: Optional[str] = None,
        replicate_assignment_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW,
    ) -> None:
        super().__init__()
        self._env = env
        self._device = device
        self._pg = env.process_group
        self._embedding_bag_configs = module.embedding_bag_configs()
        self._is_weighted = module.is_weighted()
        self._inner_weighted = module._inner_weighted
        self._feature_table = dict(module._feature_table)
        self._served = module.feature_names()
        self._fused = module._fused  # None: resolved on first use (see CCEEmbeddingBagCollection)
        self._fused_resolved: Optional[bool] = None
        self._remap_cache: Dict[Any, Any] = {}
        self._compose_cache: Dict[Any, Any] = {}
        compression = module.compression
        memcom = [n for n, m in module.tables.items() if m.method_name == "memcom"]
        if memcom:
            raise ValueError(
                f"tables {memcom}: MEmCom's per-id weights cannot be sharded yet (their gradient "
                f"would have to cross the input all-to-all); train MEmCom unsharded or pick "
                f"another method for these tables"
            )
        self.codebooks: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module.codebooks, table_name_to_parameter_sharding, env=env, device=device,
            module_fqn=append_prefix(module_fqn or "", "codebooks") if module_fqn else None,
        )
        rank, world = env.rank, env.world_size
        self.tables = nn.ModuleDict()
        self._id_ranges: Dict[str, IdRange] = {}
        for t in self._embedding_bag_configs:
            src = module.tables[t.name]
            if not isinstance(src, CCETable):
                self.tables[t.name] = build_table(t, compression.get(t.name), device=device)
                continue
            replicate = (world == 1 or
                         src.logical_assignment_bytes() < replicate_assignment_below)
            method = build_table(t, compression[t.name], device=device,
                                 store_assignment=replicate)
            if not replicate:
                rng = IdRange(t.num_embeddings, rank, world)
                shard = method.hash_assignment(torch.arange(rng.lo, rng.hi, device=device))
                method.register_buffer("assignment_shard", shard.to(method.assignment_dtype),
                                       persistent=False)
                self._id_ranges[t.name] = rng
            if not src.h_generation.is_meta:
                method.h_generation.copy_(src.h_generation)
            if replicate and src.assignment is not None and not src.assignment.is_meta:
                method.assignment.copy_(src.assignment)
            elif not replicate and src.assignment is not None and not src.assignment.is_meta:
                rng = self._id_ranges[t.name]
                method.assignment_shard.copy_(src.assignment[rng.lo: rng.hi])
            self.tables[t.name] = method
        self._register_state_dict_hook(ShardedCCEEmbeddingBagCollection._save_assignment_shards)
        self._register_load_state_dict_pre_hook(
            ShardedCCEEmbeddingBagCollection._load_assignment_shards, with_module=True)

    @property
    def fused(self) -> bool:
        """Whether the remap runs the fused C++ op (as the unsharded module it was built from)."""
        if self._fused_resolved is None:
            from torchrec_cce.ops import fused_default

            self._fused_resolved = fused_default(self._fused)
        return self._fused_resolved

    # ---- assignment storage ----
    def id_range(self, table: str) -> Optional[IdRange]:
        """The id range of ``p`` this rank stores for ``table`` (None: replicated)."""
        return self._id_ranges.get(table)

    def assignment_shard(self, table: str) -> torch.Tensor:
        m = self.tables[table]
        return m.assignment if table not in self._id_ranges else m.assignment_shard

    def _sharded_assignment(self, table: str) -> ShardedTensor:
        rng, m = self._id_ranges[table], self.tables[table]
        shards = []
        if rng.hi > rng.lo:
            meta = ShardMetadata(shard_offsets=[rng.lo, 0], shard_sizes=[rng.hi - rng.lo, m.chunks],
                                 placement=f"rank:{rng.rank}/{m.assignment_shard.device}")
            shards.append(Shard(tensor=m.assignment_shard, metadata=meta))
        return ShardedTensor._init_from_local_shards(
            shards, (rng.num_ids, m.chunks), process_group=self._pg)

    @staticmethod
    def _save_assignment_shards(module: "ShardedCCEEmbeddingBagCollection",
                                destination: Dict[str, Any], prefix: str, _local_metadata: Any
                                ) -> None:
        for table in module._id_ranges:
            destination[f"{prefix}tables.{table}.assignment"] = module._sharded_assignment(table)

    def _load_assignment_shards(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        for table, rng in self._id_ranges.items():
            key = f"{prefix}tables.{table}.assignment"
            if key not in state_dict:
                continue
            value = state_dict.pop(key)
            target = self.tables[table].assignment_shard
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    lo = shard.metadata.shard_offsets[0]
                    n = shard.metadata.shard_sizes[0]
                    target[lo - rng.lo: lo - rng.lo + n].copy_(shard.tensor)
            else:  # a full (unsharded) assignment
                target.copy_(value[rng.lo: rng.hi])

    # ---- ShardedModule ----
    def create_context(self) -> CCEEmbeddingBagCollectionContext:
        return CCEEmbeddingBagCollectionContext()

    def _remote_assignments(self, features: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
        if not self._id_ranges:
            return {}
        per_feature = feature_ids(features)
        requests, names = [], []
        for t in self._embedding_bag_configs:
            if t.name not in self._id_ranges:
                continue
            m = self.tables[t.name]
            for f in t.feature_names:
                requests.append((m, per_feature[f], m.assignment_shard,
                                 self._id_ranges[t.name]))
                names.append(f)
        return dict(zip(names, lookup_sharded_assignments(requests, self._pg)))

    def input_dist(self, ctx: CCEEmbeddingBagCollectionContext,
                   features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        check_features(self._feature_table, self._served, features)
        ctx.mean_lengths = mean_lengths(self._embedding_bag_configs, features)
        if self.training:
            per_feature = feature_ids(features)
            ctx.observed_ids = [(t.name, per_feature[f]) for t in self._embedding_bag_configs
                                for f in t.feature_names]
        remapped = remap_features(self._embedding_bag_configs, self.tables, features,
                                  self._is_weighted, self._inner_weighted,
                                  assignments=self._remote_assignments(features), observe=False,
                                  fused=self.fused, cache=self._remap_cache)
        return self.codebooks.input_dist(ctx, remapped)

    def _observe(self, ctx: CCEEmbeddingBagCollectionContext) -> None:
        for table, ids in ctx.observed_ids:
            self.tables[table].observe(ids)
        ctx.observed_ids = []

    def compute(self, ctx: CCEEmbeddingBagCollectionContext,
                dist_input: KJTList) -> List[torch.Tensor]:
        self._observe(ctx)
        return self.codebooks.compute(ctx, dist_input)

    def output_dist(self, ctx: CCEEmbeddingBagCollectionContext,
                    output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitable = self.codebooks.output_dist(ctx, output)
        awaitable.callbacks.append(partial(_compose_callback, module=self,
                                           lengths=ctx.mean_lengths))
        return awaitable

    def compute_and_output_dist(self, ctx: CCEEmbeddingBagCollectionContext,
                                input: KJTList) -> LazyAwaitable[KeyedTensor]:
        self._observe(ctx)
        awaitable = self.codebooks.compute_and_output_dist(ctx, input)
        awaitable.callbacks.append(partial(_compose_callback, module=self,
                                           lengths=ctx.mean_lengths))
        return awaitable

    # ---- module API shared with the unsharded collection ----
    def embedding_bag_configs(self) -> List[Any]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def fused_optimizer(self):  # noqa: ANN201 - KeyedOptimizer
        return self.codebooks.fused_optimizer

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for fqn, _ in self.codebooks.named_parameters():
            yield append_prefix(prefix, f"codebooks.{fqn}")

    @property
    def unsharded_module_type(self) -> Type[CCEEmbeddingBagCollection]:
        return CCEEmbeddingBagCollection

    def cce_recluster(self, **kwargs: Any) -> Dict[str, Dict[str, float]]:
        from torchrec_cce.distributed.recluster import recluster_sharded

        return recluster_sharded(self, **kwargs)

    def cce_memory_report(self) -> Dict[str, Dict[str, float]]:
        from torchrec_cce.distributed.planning import sharded_memory_report

        return sharded_memory_report(self)


class CCEEmbeddingBagCollectionSharder(BaseEmbeddingSharder[CCEEmbeddingBagCollection]):
    """Shards :class:`~torchrec_cce.CCEEmbeddingBagCollection`: pass it to
    ``DistributedModelParallel(sharders=[...])`` and to the planner.

    Args:
        ebc_sharder: the sharder for the codebook EBC (default: TorchRec's, e.g. built with
            ``fused_params`` to pick the fused optimizer).
        replicate_assignment_below: CCE assignments of fewer bytes are replicated on every rank;
            larger ones are split by id range (``ceil(V / world)`` ids per rank).
    """

    def __init__(
        self,
        ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
        replicate_assignment_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._ebc_sharder = ebc_sharder or EmbeddingBagCollectionSharder(
            qcomm_codecs_registry=self.qcomm_codecs_registry)
        self.replicate_assignment_below = replicate_assignment_below

    def shard(self, module: CCEEmbeddingBagCollection, params: Dict[str, ParameterSharding],
              env: ShardingEnv, device: Optional[torch.device] = None,
              module_fqn: Optional[str] = None) -> ShardedCCEEmbeddingBagCollection:
        return ShardedCCEEmbeddingBagCollection(
            module, params, ebc_sharder=self._ebc_sharder, env=env,
            device=device or torch.device("cuda"), module_fqn=module_fqn,
            replicate_assignment_below=self.replicate_assignment_below)

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        return self._ebc_sharder.fused_params

    def shardable_parameters(self, module: CCEEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        return self._ebc_sharder.shardable_parameters(module.codebooks)

    @property
    def module_type(self) -> Type[CCEEmbeddingBagCollection]:
        return CCEEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> Type[ShardedCCEEmbeddingBagCollection]:
        return ShardedCCEEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return self._ebc_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)


__all__ = [
    "CCEEmbeddingBagCollectionSharder",
    "ShardedCCEEmbeddingBagCollection",
    "CCEEmbeddingBagCollectionContext",
]
