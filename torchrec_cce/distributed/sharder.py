"""Sharding ``CCEEmbeddingBagCollection`` with TorchRec's planner and DistributedModelParallel.

The codebooks are one stock ``EmbeddingBagCollection``, sharded by TorchRec's own
``EmbeddingBagCollectionSharder`` (every sharding type and fused kernel/optimizer TorchRec
offers). This sharder wraps it the way ``FeatureProcessedEmbeddingBagCollectionSharder`` does:

* ``input_dist``: check features, remap logical ids to codebook ids (CCE's ``p`` comes from the
  rank that owns each id, see :mod:`torchrec_cce.distributed.assignment`), then the codebook
  EBC's input dist;
* ``compute``: the codebook EBC's lookups (a batch remapped before the last re-clustering,
  e.g. the one ``TrainPipelineSparseDist`` distributed a step early, has its input dist redone
  first, so the pipeline needs no extra call);
* ``output_dist``: the codebook EBC's output dist, plus a callback composing the logical
  features' vectors.

Codebook table names, for ``ParameterConstraints``: ``<table>__cce`` (CCE: every chunk's
``A_i`` and ``B_i`` in one table), ``<table>__ce``, ``<table>__hash``, ``<table>__qr_q`` /
``<table>__qr_r``; full tables keep their name.

O(V) state that is not a codebook is what each method declares by ``per_id_state()``
(:class:`~torchrec_cce.methods.PerIdState`); it is split by id range (``ceil(V / world)`` ids per
rank, placed by :mod:`torchrec_cce.distributed.per_id_state`) and reached through all-to-alls:
CCE's assignment (read in ``input_dist``; kept whole on every rank when small), MEmCom's per-id
weights and MPE's fp32 master weights (fetched differentiably in ``compute``, stepped in
backward by their owner's in-backward optimizer, whose state is in ``dmp.fused_optimizer``).

State-dict keys equal the unsharded module's (``codebooks.embedding_bags.<t>.weight``,
``tables.<t>.assignment``, ``tables.<t>.h_generation``, ``tables.<t>.id_weight``,
``tables.<t>.weight``), with ``ShardedTensor`` values for sharded state, so
``torch.distributed.checkpoint`` reshards between world sizes. A CCE assignment is stored as its
bit-packed int32 words (1-D); id-range shards start on word boundaries, so each rank's words are
one piece of the same packed array at any world size.
"""

import inspect
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torchrec.distributed.embedding_sharding import (
    FusedKJTListSplitsAwaitable,
    KJTListSplitsAwaitable,
)
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
    ShardingType,
)
from torchrec.distributed.utils import append_prefix
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_cce.distributed.assignment import (
    DEFAULT_REPLICATE_ASSIGNMENT_BELOW,
    IdRange,
    lookup_sharded_assignments,
)
from torchrec_cce.distributed.cpu_tbe import check_bfloat16_trainable, use_codebook_kernel
from torchrec_cce.distributed.per_id_state import load_state, sharded_state, stored_id_range
from torchrec_cce.distributed.per_id_weights import (
    ScaleGrad,
    fetch_per_id_rows,
    fetch_per_id_weights,
    per_id_fused_optimizer,
)
from torchrec_cce.methods import (
    CCETable,
    CompressedTable,
    MEmComTable,
    PerIdState,
    build_table,
    codebook_feature_name,
)
from torchrec_cce.methods.mpe import MPETable
from torchrec_cce.modules import CCEEmbeddingBagCollection
from torchrec_cce.ops import fused_default
from torchrec_cce.optim import RowWiseAdagrad as SparseRowWiseAdagrad
from torchrec_cce.stages import (
    check_features,
    compose_pooled,
    feature_ids,
    mean_lengths,
    remap_features,
    table_features,
)

DATA_PARALLEL = ShardingType.DATA_PARALLEL.value
# The plan entry of a collection with no codebook (see the sharder's shardable_parameters).
MPE_PLAN_SUFFIX = "__mpe"


@dataclass
class CCEEmbeddingBagCollectionContext(EmbeddingBagCollectionContext):
    """The codebook EBC's context plus the bag lengths of MEAN-pooled logical features."""

    mean_lengths: Dict[str, torch.Tensor] = field(default_factory=dict)
    # (table, ids) to add to the re-clustering sample when this batch is computed, so that a
    # pipeline's early input dist of the next batch does not leak it into the sample.
    observed_ids: List[Tuple[str, torch.Tensor]] = field(default_factory=list)
    # A batch of no examples runs as one example of empty bags (so this rank still takes part
    # in every collective); its output row is dropped again when composing.
    empty_batch: bool = False
    # Pooled outputs of the MPE features, computed in ``compute`` from the fetched rows.
    local_pooled: Dict[str, torch.Tensor] = field(default_factory=dict)
    batch_size: int = 0
    # The batch as given to ``input_dist`` and the module's remap version then: a batch whose
    # remap predates a re-clustering (a pipeline's prefetched one) is remapped again.
    features: Optional[KeyedJaggedTensor] = None
    remap_version: int = 0


class _Ready(LazyAwaitable[KeyedTensor]):
    """An already computed output (a collection with no codebook has no output dist)."""

    def __init__(self, value: KeyedTensor) -> None:
        super().__init__()
        self._value = value

    def _wait_impl(self) -> KeyedTensor:
        return self._value


def _compose_callback(kt: KeyedTensor, module: "ShardedCCEEmbeddingBagCollection",
                      lengths: Dict[str, torch.Tensor], empty_batch: bool = False,
                      local_pooled: Optional[Dict[str, torch.Tensor]] = None) -> KeyedTensor:
    out = compose_pooled(module._embedding_bag_configs, module.tables, lengths, kt,
                         module._is_weighted, cache=module._compose_cache,
                         local_pooled=local_pooled)
    if empty_batch:
        return KeyedTensor(keys=out.keys(), length_per_key=out.length_per_key(),
                           values=out.values()[:0])
    return out


def _as_int64(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """Ids and lengths as int64, so ranks fed int32 and int64 KJTs send the same dtypes through
    the id and codebook all-to-alls (mixed dtypes would abort gloo/NCCL)."""
    values, lengths = features.values(), features.lengths()
    if values.dtype == torch.int64 and lengths.dtype == torch.int64:
        return features
    return KeyedJaggedTensor(keys=features.keys(), values=values.to(torch.int64),
                             lengths=lengths.to(torch.int64), weights=features.weights_or_none())


def _one_example_of_empty_bags(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A batch of no examples as one example whose bags are all empty."""
    lengths = torch.zeros(len(features.keys()), dtype=features.lengths().dtype,
                          device=features.lengths().device)
    weights = features.weights_or_none()
    return KeyedJaggedTensor(keys=features.keys(), values=features.values()[:0], lengths=lengths,
                             weights=None if weights is None else weights[:0])


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
        self._table_features = {t.name: list(t.feature_names) for t in self._embedding_bag_configs}
        self._table_pairs = dict(zip([t.name for t in self._embedding_bag_configs],
                                     table_features(self._embedding_bag_configs)))
        self._served = module.feature_names()
        self._fused = module._fused  # None: resolved on first use (see CCEEmbeddingBagCollection)
        self._fused_resolved: Optional[bool] = None
        self._remap_cache: Dict[Any, Any] = {}
        # Bumped by every re-clustering (new p and h): contexts remapped before are stale.
        self._remap_version = 0
        self._compose_cache: Dict[Any, Any] = {}
        compression = module.compression
        # Snapshot the in-backward optimizers of the trainable per-id state first: sharding the
        # codebooks consumes keys of the kwargs dict apply_optimizer_in_backward shares.
        per_id_optimizers = {(n, s.name): _in_backward_optimizers(getattr(m, s.name))
                             for n, m in module.tables.items()
                             for s in m.per_id_state() if s.trainable}
        self._has_codebooks = bool(module.codebooks.embedding_bag_configs())
        self.codebooks: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module.codebooks, table_name_to_parameter_sharding, env=env, device=device,
            module_fqn=append_prefix(module_fqn or "", "codebooks") if module_fqn else None,
        )
        if not self._has_codebooks:  # never called: nothing of it to set up (pipelines check)
            self.codebooks._has_uninitialized_input_dist = False
        # CPU codebook TBEs train with torchrec_cce's kernel (same state, same maths as fbgemm's;
        # see torchrec_cce/distributed/cpu_tbe.py).
        self.codebook_kernels = use_codebook_kernel(self.codebooks)
        check_bfloat16_trainable(self.codebooks)
        self.tables = nn.ModuleDict()
        # The id range of the per-id state this rank stores, for every table whose state is
        # split (methods.base.PerIdState; the placement rule: distributed/per_id_state.py).
        self._id_ranges: Dict[str, IdRange] = {}
        for t in self._embedding_bag_configs:
            src = module.tables[t.name]
            rng = stored_id_range(src, env.rank, env.world_size, replicate_assignment_below)
            method = build_table(t, compression.get(t.name), device=device,
                                 id_range=None if rng is None else (rng.lo, rng.hi))
            method.share_sample(env.world_size)  # CCE: each rank keeps its share of the sample
            _copy_table_state(src, method, rng)
            for state in method.per_id_state():
                if state.trainable:
                    _apply_in_backward_optimizers(per_id_optimizers[(t.name, state.name)],
                                                  getattr(method, state.name))
            if rng is not None:
                self._id_ranges[t.name] = rng
            self.tables[t.name] = method
        # Stream key of a MEmCom table's raw ids in the codebook input -> its table.
        self._memcom_keys: Dict[str, str] = {
            codebook_feature_name(e, "memcom"): t for t in self._tables_of(MEmComTable)
            for _, e in self._table_pairs[t]}
        # The split per-id state (read where ids are remapped, or trained where they are looked
        # up) is saved and loaded as ShardedTensors, and its in-backward optimizers are
        # checkpointed with the codebooks' ones: DistributedModelParallel collects this one
        # (with the codebooks') into dmp.fused_optimizer.
        self._register_state_dict_hook(ShardedCCEEmbeddingBagCollection._save_per_id_shards)
        self._register_load_state_dict_pre_hook(
            ShardedCCEEmbeddingBagCollection._load_per_id_shards, with_module=True)
        per_id_optimizer = per_id_fused_optimizer(
            [(key, local, rng) for key, local, state, rng in self._split_state()
             if state.trainable], self._pg)
        if per_id_optimizer is not None:
            self.per_id_optimizer = _FusedOptimizerHolder(per_id_optimizer)

    def _tables_of(self, kind: type) -> List[str]:
        """Tables of method class ``kind`` whose per-id state is split by id range (their
        lookups go through the owners: CCE's ``p`` in input_dist, MEmCom's weights and MPE's
        master rows in compute)."""
        return [t for t in self._id_ranges if isinstance(self._method(t), kind)]

    def _method(self, table: str) -> nn.Module:
        """The method holding ``table``'s per-id state: the table's, or a tiered table's cold
        part (methods/tiered.py; its ids are the cold ids ``x - hot_ids``)."""
        return getattr(self.tables[table], "cold", self.tables[table])

    def _lookup_mpe(self, ctx: CCEEmbeddingBagCollectionContext) -> Optional[torch.Tensor]:
        """Pooled outputs of the MPE features into ``ctx.local_pooled``: each table's unique
        ids of this rank's batch, their master rows fetched from the owners (one all-to-all
        for every MPE table), quantised and pooled here. Returns the fetch's anchor. Collective."""
        tables = self._tables_of(MPETable)
        if not tables:
            return None
        requests, uniqs, sparse = [], [], []
        for table in tables:
            rng = self._id_ranges[table]
            features = self._table_features[table]
            ids = [self._local_bags(table, f, ctx)[0].values() for f in features]
            uniq = torch.unique(torch.cat(ids)) if ids else torch.empty(0, dtype=torch.int64)
            requests.append((uniq, rng, self._method(table).weight))
            uniqs.append(uniq)
            sparse.append(_accepts_sparse_grad(self._method(table).weight))
        fetched, anchor = fetch_per_id_rows(requests, self._pg, sparse_grad=sparse)
        world = self._env.world_size
        for table, uniq, rows in zip(tables, uniqs, fetched):
            m = self._method(table)
            # The ranks' gradients arrive summed: take their mean, as DDP and TorchRec do.
            quantized = m.quantize(ScaleGrad.apply(rows, 1.0 / world), uniq)
            for f, e in self._table_pairs[table]:
                jt, weights = self._local_bags(table, f, ctx)
                ctx.local_pooled[e] = m.pool(jt, weights, uniq, quantized)
        return anchor

    def _local_bags(self, table: str, feature: str, ctx: CCEEmbeddingBagCollectionContext
                    ) -> Tuple[JaggedTensor, Optional[torch.Tensor]]:
        """The bags (and weights) of ``feature`` that ``table``'s own lookup pools: all of them,
        or a tiered table's cold ids only."""
        jt = ctx.mean_lengths[feature]
        weights = jt.weights_or_none() if self._is_weighted else None
        split = getattr(self.tables[table], "split", None)
        if split is None:
            return jt, weights
        _, (ids, lengths, weights) = split(jt.values(), jt.lengths(), weights)
        return JaggedTensor(values=ids, lengths=lengths, weights=weights), weights

    def _split_state(self) -> Iterator[Tuple[str, torch.Tensor, PerIdState, IdRange]]:
        """``(state-dict key, local tensor, declaration, id range)`` of every per-id state split
        by id range on this rank."""
        for table, rng in self._id_ranges.items():
            method = self.tables[table]
            for state in method.per_id_state():
                yield f"tables.{table}.{state.name}", getattr(method, state.name), state, rng

    def _resolve_memcom(self, dist_input: KJTList) -> Tuple[KJTList, Optional[torch.Tensor]]:
        """Raw MEmCom ids in the distributed codebook input -> hashed rows, with their per-id
        weights (fetched from the owning ranks) as per-sample weights. Collective."""
        tables = self._tables_of(MEmComTable)
        if not tables:
            return dist_input, None
        places: Dict[str, List[Tuple[int, int, torch.Tensor]]] = {t: [] for t in tables}
        for g, kjt in enumerate(dist_input):
            bounds = kjt.offset_per_key()
            for i, key in enumerate(kjt.keys()):
                table = self._memcom_keys.get(key)
                if table is not None:
                    ids = kjt.values()[bounds[i]: bounds[i + 1]]
                    places[table].append((g, i, ids))
        # One request per table, in the same table order on every rank (even with no ids here).
        requests, sparse = [], []
        for table in tables:
            rng, m = self._id_ranges[table], self._method(table)
            ids = [x for _, _, x in places[table]]
            ids = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64, device=self._device)
            requests.append((torch.remainder(ids, m.num_embeddings), rng, m.id_weight))
            sparse.append(_accepts_sparse_grad(m.id_weight))
        fetched_per_table, anchor = fetch_per_id_weights(requests, self._pg, sparse_grad=sparse)
        by_group: Dict[int, Dict[int, Tuple[str, torch.Tensor]]] = {}
        for table, fetched in zip(tables, fetched_per_table):
            sizes = [x.numel() for _, _, x in places[table]]
            for (g, i, _), w in zip(places[table], fetched.split(sizes)):
                by_group.setdefault(g, {})[i] = (table, w)
        world = self._env.world_size
        out = list(dist_input)
        for g, segments in by_group.items():
            kjt = dist_input[g]
            bounds = kjt.offset_per_key()
            values = list(kjt.values().split(kjt.length_per_key()))
            weights = list(kjt.weights().split(kjt.length_per_key()))
            for i, (table, w) in segments.items():
                # The ranks' gradients arrive summed (every sharding type): take their mean,
                # as TorchRec and DDP do for the codebooks.
                w = ScaleGrad.apply(w, 1.0 / world)
                values[i] = self._method(table).bucket(values[i])
                weights[i] = weights[i] * w.to(weights[i].dtype)
            out[g] = KeyedJaggedTensor(
                keys=kjt.keys(), values=torch.cat(values), weights=torch.cat(weights),
                lengths=kjt.lengths(), stride=kjt.stride(),
                length_per_key=kjt.length_per_key(), offset_per_key=bounds)
        return KJTList(out), anchor

    @staticmethod
    def _save_per_id_shards(module: "ShardedCCEEmbeddingBagCollection",
                            destination: Dict[str, Any], prefix: str, _local_metadata: Any) -> None:
        for key, local, state, rng in module._split_state():
            destination[prefix + key] = sharded_state(local.detach(), state, rng, module._pg)

    def _load_per_id_shards(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        for key, target, state, rng in self._split_state():
            key = prefix + key
            if key in state_dict:
                load_state(target, state_dict[key], state, rng, key)
                state_dict[key] = target  # loaded above; the default loader copies it onto itself

    @property
    def fused(self) -> bool:
        """Whether the remap runs the fused C++ op (as the unsharded module it was built from)."""
        if self._fused_resolved is None:
            self._fused_resolved = fused_default(self._fused)
        return self._fused_resolved

    # ---- per-id state placement ----
    def id_range(self, table: str) -> Optional[IdRange]:
        """The id range of ``table``'s per-id state (CCE's ``p``, MEmCom's weights, MPE's master
        rows) this rank stores (None: whole on every rank, or none)."""
        return self._id_ranges.get(table)

    def assignment_shard(self, table: str) -> torch.Tensor:
        """The packed words of ``p`` this rank stores for ``table`` (its id range, or all)."""
        return self._method(table).assignment

    # ---- ShardedModule ----
    def create_context(self) -> CCEEmbeddingBagCollectionContext:
        return CCEEmbeddingBagCollectionContext()

    def _remote_assignments(self, features: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
        cce = self._tables_of(CCETable)
        if not cce:
            return {}
        per_feature = feature_ids(features)
        requests, names = [], []
        for t, pairs in zip(self._embedding_bag_configs,
                            table_features(self._embedding_bag_configs)):
            if t.name not in cce:
                continue
            m = self._method(t.name)
            cold_ids = getattr(self.tables[t.name], "cold_ids", None)  # tiered: cold ids' p
            for f, e in pairs:  # keyed by embedding name (a shared feature's tables differ)
                ids = per_feature[f] if cold_ids is None else cold_ids(per_feature[f])
                requests.append((m, ids, self._id_ranges[t.name]))
                names.append(e)
        return dict(zip(names, lookup_sharded_assignments(requests, self._pg)))

    def input_dist(self, ctx: CCEEmbeddingBagCollectionContext,
                   features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        check_features(self._feature_table, self._served, features)
        ctx.features, ctx.remap_version = features, self._remap_version
        features = _as_int64(features)
        if features.stride() == 0:
            ctx.empty_batch = True
            features = _one_example_of_empty_bags(features)
        ctx.mean_lengths = mean_lengths(self._embedding_bag_configs, features)
        # Tables that look themselves up (MPE) need the local ids of the batch; bad ids are
        # refused here, before any collective.
        local = [(t.name, f) for t in self._embedding_bag_configs
                 if getattr(self.tables[t.name], "local_lookup", False) for f in t.feature_names]
        if local:
            per_feature = features.to_dict()
            ctx.mean_lengths.update({f: per_feature[f] for _, f in local})
            for table, f in local:  # (a feature may be served by several tables)
                self.tables[table]._check_ids(per_feature[f].values())
        if self.training:
            per_feature = feature_ids(features)
            ctx.observed_ids = [(t.name, per_feature[f]) for t in self._embedding_bag_configs
                                for f in t.feature_names]
        remapped = remap_features(self._embedding_bag_configs, self.tables, features,
                                  self._is_weighted, self._inner_weighted,
                                  assignments=self._remote_assignments(features), observe=False,
                                  fused=self.fused, cache=self._remap_cache)
        if not self._has_codebooks:  # only MPE tables: nothing to distribute
            ctx.batch_size = features.stride()
            # (the form TorchRec's input dists return, which TrainPipelineSparseDist expects)
            return KJTListSplitsAwaitable([], ctx)
        return self.codebooks.input_dist(ctx, remapped)

    def _current_input(self, ctx: CCEEmbeddingBagCollectionContext,
                       dist_input: KJTList) -> KJTList:
        """``dist_input``, or, if the batch was remapped before the last re-clustering (e.g.
        ``TrainPipelineSparseDist`` ran its input dist one step early), its input dist redone
        with the current ``p`` and ``h``; ``ctx`` then holds the new dist's state. Collective
        like any input dist: every rank re-clusters at the same step, so every rank redoes it
        for the same batch."""
        if ctx.remap_version == self._remap_version or ctx.features is None:
            return dist_input
        fresh = self.create_context()
        request = self.input_dist(fresh, ctx.features)
        if isinstance(request, KJTListSplitsAwaitable):
            # Under TrainPipelineSparseDist the codebook input dists defer their splits
            # all-to-all to the pipeline (which fuses them across modules): run it here.
            request = FusedKJTListSplitsAwaitable([request], [fresh], self._pg).wait()[0]
        else:
            request = request.wait()
        dist_input = request.wait()
        for f in fields(fresh):
            setattr(ctx, f.name, getattr(fresh, f.name))
        return dist_input

    def _observe(self, ctx: CCEEmbeddingBagCollectionContext) -> None:
        for table, ids in ctx.observed_ids:
            self.tables[table].observe(ids)
        ctx.observed_ids = []

    def compute(self, ctx: CCEEmbeddingBagCollectionContext,
                dist_input: KJTList) -> List[torch.Tensor]:
        dist_input = self._current_input(ctx, dist_input)
        self._observe(ctx)
        dist_input, anchor = self._resolve_memcom(dist_input)
        mpe_anchor = self._lookup_mpe(ctx)
        if not self._has_codebooks:
            return []
        output = self.codebooks.compute(ctx, dist_input)
        for a in (anchor, mpe_anchor):
            if a is not None:  # every rank joins the per-id backward after every output a2a
                output = [o + a.to(o.dtype) for o in output]
        return output

    def output_dist(self, ctx: CCEEmbeddingBagCollectionContext,
                    output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        if self._has_codebooks:
            awaitable = self.codebooks.output_dist(ctx, output)
        else:
            awaitable = _Ready(KeyedTensor(keys=[], length_per_key=[],
                                           values=torch.empty(ctx.batch_size, 0,
                                                              device=self._device)))
        awaitable.callbacks.append(partial(_compose_callback, module=self,
                                           lengths=ctx.mean_lengths, empty_batch=ctx.empty_batch,
                                           local_pooled=ctx.local_pooled))
        return awaitable

    def compute_and_output_dist(self, ctx: CCEEmbeddingBagCollectionContext,
                                input: KJTList) -> LazyAwaitable[KeyedTensor]:
        input = self._current_input(ctx, input)
        if self._tables_of(MEmComTable) or self._tables_of(MPETable) or not self._has_codebooks:
            return self.output_dist(ctx, self.compute(ctx, input))
        self._observe(ctx)
        awaitable = self.codebooks.compute_and_output_dist(ctx, input)
        awaitable.callbacks.append(partial(_compose_callback, module=self,
                                           lengths=ctx.mean_lengths, empty_batch=ctx.empty_batch))
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
        for key, _, state, _ in self._split_state():  # split by id range: DDP must not
            if state.trainable:                           # all-reduce them
                yield append_prefix(prefix, key)

    @property
    def unsharded_module_type(self) -> Type[CCEEmbeddingBagCollection]:
        return CCEEmbeddingBagCollection

    def remap_changed(self) -> None:
        """Note that ``p`` or ``h`` changed (a re-clustering): batches whose input dist ran
        before (a pipeline's prefetched one) have it redone before they are computed. Call it
        on every rank at the same step (the redo is collective)."""
        self._remap_version += 1


class _FusedOptimizerHolder(nn.Module, FusedOptimizerModule):
    """A stateless child module exposing a ``FusedOptimizer`` to DistributedModelParallel."""

    def __init__(self, optimizer: Any) -> None:
        super().__init__()
        self._optimizer = optimizer

    @property
    def fused_optimizer(self):  # noqa: ANN201 - KeyedOptimizer
        return self._optimizer


@torch.no_grad()
def _copy_table_state(src: CompressedTable, dst: CompressedTable, rng: Optional[IdRange]) -> None:
    """Load the unsharded table's state into the rank's table: every tensor whole, the per-id
    state's entries of ``rng`` only (nothing when ``src`` was built on the meta device)."""
    state = dict(src.state_dict())
    if any(v.is_meta for v in state.values()):
        return
    if rng is not None:
        for s in dst.per_id_state():
            first = s.entries(rng.lo)
            state[s.name] = state[s.name][first: first + getattr(dst, s.name).shape[0]]
    dst.load_state_dict(state)


def _in_backward_optimizers(param: nn.Parameter) -> List[Tuple[type, Dict[str, Any]]]:
    """(class, kwargs copy) of each optimizer ``apply_optimizer_in_backward`` gave ``param``."""
    return [(cls, dict(kw)) for cls, kw in zip(getattr(param, "_optimizer_classes", []),
                                                getattr(param, "_optimizer_kwargs", []))]


def _apply_in_backward_optimizers(optimizers: List[Tuple[type, Dict[str, Any]]],
                                  dst: nn.Parameter) -> None:
    """Give ``dst`` the in-backward optimizers of :func:`_in_backward_optimizers` (if any).

    ``torchrec.optim.optimizers.SGD/Adam/Adagrad`` only name fbgemm's fused optimizers (their
    ``step`` raises), so the per-id state gets the ``torch.optim`` class of the same name.
    ``RowWiseAdagrad`` (fbgemm's ``EXACT_ROWWISE_ADAGRAD``) becomes
    :class:`torchrec_cce.optim.RowWiseAdagrad` (same rule and state, sparse gradients): one
    accumulator per row of MPE's master weights, and per id for MEmCom's ``[V, 1]`` weights
    (rows of one element, where it is exactly ``torch.optim.Adagrad``); a 1-D parameter gets
    ``torch.optim.Adagrad``.

    MPE's logits, steps and offsets get none: the sharded table's are replicated and trained
    by the dense optimizer (DDP averages their gradients), like every replicated parameter.
    """
    if not optimizers:
        return
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim import optimizers as fused_names
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    torch_equivalent = {fused_names.SGD: torch.optim.SGD, fused_names.Adam: torch.optim.Adam,
                        fused_names.Adagrad: torch.optim.Adagrad,
                        RowWiseAdagrad: (SparseRowWiseAdagrad if dst.dim() == 2
                                         else torch.optim.Adagrad)}
    for cls, kwargs in optimizers:
        cls = torch_equivalent.get(cls, cls)
        accepted = inspect.signature(cls.__init__).parameters  # drop fbgemm-only keys
        apply_optimizer_in_backward(cls, [dst], {k: v for k, v in kwargs.items() if k in accepted})


def _accepts_sparse_grad(param: nn.Parameter) -> bool:
    """Whether ``param`` is stepped in backward only by optimizers that take sparse gradients
    the same as dense ones (row-wise Adagrad; torch Adagrad and plain SGD without weight decay
    or momentum). Otherwise (e.g. a dense optimizer steps it) its lookups give dense gradients."""
    opts = getattr(param, "_in_backward_optimizers", [])

    def ok(opt: torch.optim.Optimizer) -> bool:
        group = opt.param_groups[0]
        if isinstance(opt, SparseRowWiseAdagrad):
            return True
        if type(opt) is torch.optim.Adagrad:
            return group.get("weight_decay", 0) == 0
        if type(opt) is torch.optim.SGD:
            return group.get("weight_decay", 0) == 0 and group.get("momentum", 0) == 0
        return False

    return bool(opts) and all(ok(o) for o in opts)


def _without_bounds_check(sharder: EmbeddingBagCollectionSharder) -> EmbeddingBagCollectionSharder:
    """TorchRec's EBC sharder with fbgemm's per-step bounds check of the codebook ids off.

    The remap stage produces every codebook id itself and guarantees its range (a full table
    rejects ids outside ``[0, V)`` with a clear error; hashed, QR and CCE rows are reduced mod
    their rows; a packed CCE ``p`` of ``ceil(log2 rows)`` bits stays below ``2 * rows``, inside
    its chunk's A/B rows), so the check fbgemm runs on every batch (``bounds_check_indices``,
    measured 1.6-4.6 ms of a ~40 ms CCE embedding step on CPU) can never fire. A sharder of
    another class, or one whose ``fused_params`` set ``bounds_check_mode``, is used as given.
    """
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    params = dict(sharder.fused_params or {})
    if type(sharder) is not EmbeddingBagCollectionSharder or "bounds_check_mode" in params:
        return sharder
    params["bounds_check_mode"] = BoundsCheckMode.NONE
    return EmbeddingBagCollectionSharder(fused_params=params,
                                         qcomm_codecs_registry=sharder.qcomm_codecs_registry)


class CCEEmbeddingBagCollectionSharder(BaseEmbeddingSharder[CCEEmbeddingBagCollection]):
    """Shards :class:`~torchrec_cce.CCEEmbeddingBagCollection`: pass it to
    ``DistributedModelParallel(sharders=[...])`` and to the planner.

    Placement policy: every codebook table (and every uncompressed table of the collection) is
    model-parallel. :meth:`sharding_types` offers the codebook sharder's types *without*
    ``data_parallel``, so TorchRec's ``EmbeddingShardingPlanner`` (and the one DMP runs when no
    plan is passed) never replicates a codebook. A data-parallel table would be trained by the
    torch optimizer DDP steps instead of the fused sparse one (another rule and learning rate
    than the other tables), and float16 codebooks turn NaN under torch's Adagrad (its float16
    state rounds ``eps`` to 0). ``allow_data_parallel=True`` offers it again.

    Args:
        ebc_sharder: the sharder for the codebook EBC (default: TorchRec's, e.g. built with
            ``fused_params`` to pick the fused optimizer).
        replicate_assignment_below: CCE assignments of fewer bytes are replicated on every rank;
            larger ones are split by id range (``ceil(V / world)`` ids per rank).
        allow_data_parallel: let the planner replicate codebook tables (see above).
        excluded_sharding_types: further sharding types the planner may not choose, e.g.
            ``("column_wise", "table_column_wise")`` to keep every codebook row whole on one
            rank (evaluating INT-N served rows needs that).
    """

    def __init__(
        self,
        ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
        replicate_assignment_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        allow_data_parallel: bool = False,
        excluded_sharding_types: Sequence[str] = (),
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._ebc_sharder = _without_bounds_check(ebc_sharder or EmbeddingBagCollectionSharder(
            qcomm_codecs_registry=self.qcomm_codecs_registry))
        self.replicate_assignment_below = replicate_assignment_below
        self.allow_data_parallel = allow_data_parallel
        self.excluded_sharding_types = tuple(excluded_sharding_types)

    def _check_placements(self, module: CCEEmbeddingBagCollection,
                          params: Dict[str, ParameterSharding], device: torch.device) -> None:
        """A plan built without this sharder's :meth:`sharding_types` (by hand, or by a planner
        given other sharders) must still respect them: refuse it, naming table and fix."""
        allowed = self.sharding_types(device.type)
        for table, ps in params.items():
            if ps.sharding_type not in allowed:
                hint = ("pass CCEEmbeddingBagCollectionSharder(allow_data_parallel=True) to "
                        "replicate codebooks" if ps.sharding_type == DATA_PARALLEL else
                        "drop it from excluded_sharding_types")
                raise ValueError(
                    f"codebook table '{table}' of {type(module).__name__} is placed "
                    f"{ps.sharding_type}, which this CCEEmbeddingBagCollectionSharder does not "
                    f"offer ({allowed}); plan with this sharder (EmbeddingShardingPlanner or "
                    f"DistributedModelParallel without a plan), or {hint}")

    def shard(self, module: CCEEmbeddingBagCollection, params: Dict[str, ParameterSharding],
              env: ShardingEnv, device: Optional[torch.device] = None,
              module_fqn: Optional[str] = None) -> ShardedCCEEmbeddingBagCollection:
        device = device or torch.device("cuda")
        params = {t: p for t, p in params.items() if not t.endswith(MPE_PLAN_SUFFIX)}
        self._check_placements(module, params, device)
        return ShardedCCEEmbeddingBagCollection(
            module, params, ebc_sharder=self._ebc_sharder, env=env,
            device=device, module_fqn=module_fqn,
            replicate_assignment_below=self.replicate_assignment_below)

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        return self._ebc_sharder.fused_params

    def shardable_parameters(self, module: CCEEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        """The codebook tables' weights. A collection with no codebook (every table MPE) offers
        its first MPE table's logits instead (as ``<table>__mpe``, a small ``[groups, K]``
        tensor), so that the planner gives it a plan entry and DistributedModelParallel shards
        it (splitting the master weights by id range); that entry's placement is not used."""
        params = self._ebc_sharder.shardable_parameters(module.codebooks)
        if not params:
            mpe = [(n, m) for n, m in module.tables.items() if isinstance(m, MPETable)]
            if mpe:
                params = {mpe[0][0] + MPE_PLAN_SUFFIX: mpe[0][1].logits}
        return params

    @property
    def module_type(self) -> Type[CCEEmbeddingBagCollection]:
        return CCEEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> Type[ShardedCCEEmbeddingBagCollection]:
        return ShardedCCEEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        """The codebook sharder's types, without ``data_parallel`` (unless allowed) and the
        excluded ones (see the class docstring)."""
        return [t for t in self._ebc_sharder.sharding_types(compute_device_type)
                if (self.allow_data_parallel or t != DATA_PARALLEL)
                and t not in self.excluded_sharding_types]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)


def shard_unplanned(model: nn.Module, plan: Any, sharder: CCEEmbeddingBagCollectionSharder,
                    env: ShardingEnv, device: torch.device) -> nn.Module:
    """Shard every ``CCEEmbeddingBagCollection`` of ``model`` that ``plan`` gives no codebook
    placement (a collection whose tables are all MPE has no codebook for the planner, and
    DistributedModelParallel skips modules with an empty plan), so that its MPE master weights
    are split by id range too; DistributedModelParallel then takes the sharded module as it
    is. Replaces the submodules in place; returns ``model`` (or the sharded module, if
    ``model`` itself is the collection)."""
    for path, module in list(model.named_modules()):
        if not isinstance(module, CCEEmbeddingBagCollection) or plan.get_plan_for_module(path):
            continue
        sharded = sharder.shard(module, {}, env=env, device=device, module_fqn=path)
        if not path:
            return sharded
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, sharded)
    return model


__all__ = [
    "CCEEmbeddingBagCollectionSharder",
    "ShardedCCEEmbeddingBagCollection",
    "CCEEmbeddingBagCollectionContext",
    "shard_unplanned",
]
