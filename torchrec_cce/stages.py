"""The remap and compose stages around the codebook EBC, shared by the unsharded and the
sharded collection.

* :func:`remap_features`: logical KJT -> KJT of codebook row ids, keys ``<feature>__<stream>``
  (for each table: codebook by codebook, feature by feature, stream by stream); a stream with
  ``k`` rows per id (CCE's ``(p_i(x), rows + h_i(x))``) has ``k`` times the bag lengths. Two
  implementations with identical output: the fused C++ op (default where it builds) and the
  torch-ops reference.
* :func:`compose_pooled`: pooled codebook outputs -> ``KeyedTensor`` of the logical features;
  MEAN tables divide by the bag length here (codebook tables always pool with SUM).
"""

import itertools
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_cce.methods import CompressedTable, codebook_feature_name
from torchrec_cce import ops
from torchrec_cce.ops import SPEC_COLUMNS, PairCompose, fused_available, spec_row
from torchrec_cce.validation import check_kjt_layout


def embedding_names(tables: List[EmbeddingBagConfig]) -> List[List[str]]:
    """Output key of every (table, feature), TorchRec's rule: the feature name, or
    ``<feature>@<table>`` for a feature served by several tables. Codebook streams are keyed
    ``<embedding name>__<stream>``, so a shared feature's tables never collide."""
    return get_embedding_names_by_table(tables)


def table_features(tables: List[EmbeddingBagConfig]) -> List[List[Tuple[str, str]]]:
    """``(input feature, embedding name)`` of every feature, table by table."""
    return [list(zip(t.feature_names, names)) for t, names in zip(tables, embedding_names(tables))]


def check_features(feature_table: Mapping[str, object], served: List[str],
                   features: KeyedJaggedTensor) -> None:
    """``KeyError`` for served features the KJT lacks (keys no table serves are ignored, as
    by TorchRec's ``EmbeddingBagCollection``); ``ValueError`` for inconsistent
    lengths/values/weights (see :func:`torchrec_cce.validation.check_kjt_layout`)."""
    present = set(features.keys())
    missing = [f for f in served if f not in present]
    if missing:
        raise KeyError(
            f"KJT lacks features {missing}; every served feature must be present: {served} "
            f"(the KJT has {features.keys()})"
        )
    if features.variable_stride_per_key():
        raise ValueError(
            "variable-batch KJTs (stride per key) are not supported; pad features to one batch size"
        )
    check_kjt_layout(features)


def empty_pooled(tables: List[EmbeddingBagConfig], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> KeyedTensor:
    """The ``KeyedTensor`` of a batch with no examples: ``[0, sum of dims]``, logical keys."""
    keys = [e for names in embedding_names(tables) for e in names]
    dims = [t.embedding_dim for t in tables for _ in t.feature_names]
    return KeyedTensor(keys=keys, length_per_key=dims,
                       values=torch.zeros((0, sum(dims)), dtype=dtype, device=device))


def mean_lengths(tables: List[EmbeddingBagConfig], features: KeyedJaggedTensor
                 ) -> Dict[str, torch.Tensor]:
    """Bag lengths of the MEAN-pooled features (views into the KJT's lengths)."""
    mean = [f for t in tables if t.pooling == PoolingType.MEAN for f in t.feature_names]
    if not mean:
        return {}
    batch, lengths = features.stride(), features.lengths()
    index = {k: i for i, k in enumerate(features.keys())}
    return {f: lengths[index[f] * batch: (index[f] + 1) * batch] for f in mean}


def feature_ids(features: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """``{feature: its ids}`` as views into the KJT's values (no split of lengths/weights)."""
    ids, offsets = features.values(), features.offset_per_key()
    return {k: ids[offsets[i]: offsets[i + 1]] for i, k in enumerate(features.keys())}


def _uses(method: nn.Module, name: str) -> bool:
    """Whether ``method`` overrides the base class's ``name`` (observe, id_weights)."""
    return getattr(type(method), name) is not getattr(CompressedTable, name)


def remap_features(
    tables: List[EmbeddingBagConfig],
    methods: Mapping[str, nn.Module],
    features: KeyedJaggedTensor,
    is_weighted: bool,
    inner_weighted: bool,
    assignments: Optional[Dict[str, torch.Tensor]] = None,
    observe: bool = True,
    fused: bool = False,
    cache: Optional[Dict[Any, Any]] = None,
) -> KeyedJaggedTensor:
    """Remap every served feature of ``features`` to its codebook streams.

    ``assignments`` optionally gives CCE's ``p(x)`` per feature (``[n, chunks]``), looked up
    elsewhere (the sharded module fetches it from the rank owning each id). ``observe=False``
    leaves the id sample alone (the sharded module observes ids when the batch is computed).
    ``fused=True`` runs the one-pass C++ op (:mod:`torchrec_cce.ops`); ``cache`` (one dict per
    module, kept across batches) holds what does not change between batches: whether every
    table has a fused description and the op's per-key-order plans. Methods' stream specs are
    fixed at construction (re-clustering changes ``h_generation``, passed as a tensor, and the
    packed ``p`` words, read in place), so the cache needs no invalidation. The default
    torch-ops path is the reference the fused one must equal exactly.
    """
    if fused and not features.values().is_meta:  # meta tensors: shapes only, reference path
        cache = cache if cache is not None else {}
        static = cache.get(_STATIC)
        if static is None:
            static = cache[_STATIC] = _static_tables(tables, methods)
        # Tables without a fused description (MPE, serving tables) take the reference path.
        if static is not _NOT_FUSED:
            return fused_remap_features(tables, methods, features, is_weighted, inner_weighted,
                                        assignments, observe, cache, static)
    return reference_remap_features(tables, methods, features, is_weighted, inner_weighted,
                                    assignments, observe)


def reference_remap_features(
    tables: List[EmbeddingBagConfig],
    methods: Mapping[str, nn.Module],
    features: KeyedJaggedTensor,
    is_weighted: bool,
    inner_weighted: bool,
    assignments: Optional[Dict[str, torch.Tensor]] = None,
    observe: bool = True,
) -> KeyedJaggedTensor:
    """:func:`remap_features` in torch ops, feature by feature (the reference path)."""
    per_feature: Dict[str, JaggedTensor] = features.to_dict()
    keys: List[str] = []
    values: List[torch.Tensor] = []
    lengths: List[torch.Tensor] = []
    weights: List[torch.Tensor] = []
    for t, pairs in zip(tables, table_features(tables)):
        method: CompressedTable = methods[t.name]
        remapped = {}
        for f, e in pairs:
            jt = per_feature[f]
            ids = jt.values()
            if observe:
                method.observe(ids)
            w = jt.weights_or_none() if is_weighted else None
            if hasattr(method, "remap_bags"):  # tiered: each stream has its own bags
                remapped[e] = method.remap_bags(
                    ids, jt.lengths(), w,
                    assignments[e] if assignments is not None and e in assignments else None)
                continue
            if assignments is not None and e in assignments:
                streams = method.streams_from(assignments[e], method.bucket(ids))
            else:
                streams = method.remap(ids)
            id_weights = method.id_weights(ids)
            if id_weights is not None:
                w = id_weights if w is None else w * id_weights
            remapped[e] = [(rows, jt.lengths(), w) for rows in streams]
        first_stream = 0
        for cb in method.codebooks:
            for _, e in pairs:
                for j, s in enumerate(cb.streams):
                    rows, lens, w = remapped[e][first_stream + j]
                    if inner_weighted and w is None:
                        w = torch.ones(rows.shape[:1], dtype=torch.float32, device=rows.device)
                    k = rows.shape[1] if rows.dim() == 2 else 1
                    keys.append(codebook_feature_name(e, s))
                    values.append(rows.reshape(-1))
                    lengths.append(lens * k if k > 1 else lens)
                    if w is not None:
                        weights.append(w.repeat_interleave(k) if k > 1 else w)
            first_stream += len(cb.streams)
    if not keys:  # every table looks itself up (MPE): nothing for the codebook EBC
        empty = torch.empty(0, dtype=torch.int64, device=features.values().device)
        return KeyedJaggedTensor(keys=[], values=empty, lengths=empty,
                                 weights=empty.float() if inner_weighted else None)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if inner_weighted else None,
    )


_STATIC = "__static_tables__"
_NOT_FUSED = "not fused"


@dataclass
class _TableInfo:
    """What the fused path needs of one table on every batch, computed once per module."""

    name: str
    method: nn.Module
    features: List[Tuple[str, str]]  # (input feature, embedding name)
    observes: bool          # overrides CompressedTable.observe (CCE's id reservoir)
    id_weights: bool        # overrides CompressedTable.id_weights (MEmCom)
    cce: bool               # has a stored assignment p
    packed: bool            # the op reads p's packed words itself (p stored for all covered ids)


def _static_tables(tables: List[EmbeddingBagConfig], methods: Mapping[str, nn.Module]):
    """Per-table :class:`_TableInfo` list, or ``_NOT_FUSED`` if some table has no fused
    description (``stream_specs() is None``) or multiplies per-id weights into a feature
    another table also serves (the op has one weight per input id)."""
    infos = []
    counts: Dict[str, int] = {}
    for t in tables:
        for f in t.feature_names:
            counts[f] = counts.get(f, 0) + 1
    for t, pairs in zip(tables, table_features(tables)):
        method = methods[t.name]
        if getattr(method, "stream_specs", lambda: None)() is None:
            return _NOT_FUSED
        if _uses(method, "id_weights") and any(counts[f] > 1 for f in t.feature_names):
            return _NOT_FUSED
        cce = hasattr(method, "fused_assignment")
        infos.append(_TableInfo(t.name, method, pairs, _uses(method, "observe"),
                                _uses(method, "id_weights"), cce,
                                cce and method.fused_assignment() is not None))
    return infos


@dataclass
class FusedRemapPlan:
    """The fused op's spec for one input key order (built once, cached by the module)."""

    spec: torch.Tensor                 # [streams, 15] int64, CPU
    keys: List[str]                    # output keys (codebook features), stream order
    stream_feature: List[int]          # input feature index of each stream
    stream_k: List[int]                # rows per id of each stream
    stream_table: List[str]            # logical table of each stream (error messages)
    generation_tables: List[str]       # CCE tables whose h_generation is passed, in order
    assignment_tables: List[str]       # CCE tables whose packed assignment is passed, in order
    feature_index: Dict[str, int]      # input key -> its index in the KJT


def _build_plan(tables: List[EmbeddingBagConfig], methods: Mapping[str, nn.Module],
                keys: List[str], precomputed: Dict[str, int]) -> FusedRemapPlan:
    index = {k: i for i, k in enumerate(keys)}
    rows, out_keys, feats, ks, owners, gens, assigns = [], [], [], [], [], [], []
    for t, pairs in zip(tables, table_features(tables)):
        method: CompressedTable = methods[t.name]
        specs = method.stream_specs()
        gen = assign = -1
        packed = None
        if any(sp.kind == "cce_pair" for sp in specs):
            gen = len(gens)
            gens.append(t.name)
            if any(e not in precomputed for _, e in pairs):
                packed = method.fused_assignment()
                if packed is None:
                    raise ValueError(f"table '{t.name}': p is stored only for ids "
                                     f"[{method.stored_lo}, {method.stored_hi}); pass it "
                                     f"precomputed (assignments=...) for the other ids")
                assign = len(assigns)
                assigns.append(t.name)
        first = 0
        for cb in method.codebooks:
            for f, e in pairs:
                for j, s in enumerate(cb.streams):
                    sp = specs[first + j]
                    pair = sp.kind == "cce_pair"
                    read_packed = pair and e not in precomputed
                    rows.append(spec_row(
                        index[f], sp.kind, sp.rows, offset=sp.offset, key=sp.key, h_key=sp.h_key,
                        generation=gen if pair else -1,
                        assignment=assign if read_packed else -1,
                        assignment_lo=packed[1] if read_packed else 0,
                        assignment_count=packed[2] if read_packed else 0,
                        bits=method.assignment_bits if read_packed else 0,
                        chunks=method.chunks if read_packed else 1,
                        precomputed=precomputed.get(e, -1) if pair else -1,
                        column=sp.column, num_ids=sp.num_ids, qr_mul=sp.qr_mul,
                        qr_add=sp.qr_add, keep_remainder=sp.keep_remainder))
                    out_keys.append(codebook_feature_name(e, s))
                    feats.append(index[f])
                    ks.append(2 if pair else 1)
                    owners.append(t.name)
            first += len(cb.streams)
    spec = torch.tensor(rows, dtype=torch.int64).reshape(-1, SPEC_COLUMNS)
    return FusedRemapPlan(spec, out_keys, feats, ks, owners, gens, assigns, index)


_OUT_OF_RANGE = re.compile(r"id (-?\d+) is outside \[0, (\d+)\) in stream (\d+)")


def fused_remap_features(
    tables: List[EmbeddingBagConfig],
    methods: Mapping[str, nn.Module],
    features: KeyedJaggedTensor,
    is_weighted: bool,
    inner_weighted: bool,
    assignments: Optional[Dict[str, torch.Tensor]],
    observe: bool,
    cache: Dict[Any, Any],
    static: Optional[List[_TableInfo]] = None,
) -> KeyedJaggedTensor:
    """:func:`remap_features` through one call of ``torch.ops.torchrec_cce.remap``."""
    if static is None:
        static = _static_tables(tables, methods)
    keys = features.keys()
    # The op takes int64 (a KJT may carry int32 ids/lengths; casting is a no-op for int64).
    ids, lengths = features.values(), features.lengths()
    if ids.dtype != torch.int64:
        ids = ids.to(torch.int64)
    if lengths.dtype != torch.int64:
        lengths = lengths.to(torch.int64)
    batch = features.stride()
    offsets = None  # computed only if some table needs its features' ids in Python

    precomputed: Dict[str, int] = {}
    pre_tensors: List[torch.Tensor] = []
    id_weight_features: Dict[str, torch.Tensor] = {}
    for info in static:
        if not (info.observes and observe) and not info.id_weights and not (
                info.cce and (assignments or not info.packed)):
            continue  # nothing per feature in Python (the common case)
        if offsets is None:
            offsets = features.offset_per_key()
            index = {k: i for i, k in enumerate(keys)}
        method = info.method
        for f, e in info.features:
            i = index[f]
            f_ids = ids[offsets[i]: offsets[i + 1]]
            if observe and info.observes:
                method.observe(f_ids)
            if info.cce and ((assignments is not None and e in assignments) or not info.packed):
                p = (assignments[e] if assignments is not None and e in assignments
                     else method.lookup_assignment(f_ids))
                precomputed[e] = len(pre_tensors)
                pre_tensors.append(p)
            if info.id_weights:
                w = method.id_weights(f_ids)
                if w is not None:
                    id_weight_features[f] = w
    cache_key = (tuple(keys), tuple(sorted(precomputed)))
    plan = cache.get(cache_key)
    if plan is None:
        plan = cache[cache_key] = _build_plan(tables, methods, list(keys), precomputed)

    weights = None
    if inner_weighted:
        weights = features.weights_or_none() if is_weighted else None
        if id_weight_features:
            if offsets is None:
                offsets = features.offset_per_key()
            pieces = []
            for i, k in enumerate(keys):
                w = (weights[offsets[i]: offsets[i + 1]] if weights is not None
                     else torch.ones(offsets[i + 1] - offsets[i], device=ids.device))
                pieces.append(w * id_weight_features[k] if k in id_weight_features else w)
            weights = torch.cat(pieces) if pieces else ids.new_empty(0, dtype=torch.float32)
        elif weights is None:
            weights = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
    try:
        values, out_lengths, out_weights = ops.remap(
            ids, lengths, weights, batch, plan.spec,
            [methods[n].h_generation for n in plan.generation_tables],
            [methods[n].assignment for n in plan.assignment_tables], pre_tensors)
    except RuntimeError as e:
        m = _OUT_OF_RANGE.search(str(e))
        if m is None:
            raise
        table = plan.stream_table[int(m.group(3))]
        raise ValueError(
            f"table '{table}': id {m.group(1)} is outside [0, {m.group(2)}); take ids modulo "
            f"num_embeddings upstream or compress the table with a hashing-based method"
        ) from None
    per_key = features.length_per_key()
    length_per_key = [k * per_key[f] for f, k in zip(plan.stream_feature, plan.stream_k)]
    return KeyedJaggedTensor(
        keys=plan.keys, values=values, lengths=out_lengths, weights=out_weights,
        stride=batch, length_per_key=length_per_key,
        offset_per_key=[0] + list(itertools.accumulate(length_per_key)),
    )


def _compose_plan(tables: List[EmbeddingBagConfig], methods: Mapping[str, nn.Module],
                  pooled_keys: List[str], pooled_dims: List[int]) -> Dict[str, Any]:
    """Indices of every logical feature's streams among the pooled keys, and whether the
    whole compose is a no-op (every method concatenates, no MEAN, streams already in order)."""
    starts = dict(zip(pooled_keys, itertools.accumulate([0] + pooled_dims)))
    dims = dict(zip(pooled_keys, pooled_dims))
    part_index = {k: i for i, k in enumerate(pooled_keys)}
    features, columns = [], []
    simple = True
    for t, pairs in zip(tables, table_features(tables)):
        method: CompressedTable = methods[t.name]
        simple &= method.concat_compose and t.pooling == PoolingType.SUM
        for f, e in pairs:
            parts = []  # indices of the feature's streams among the pooled keys
            for s in method.streams():
                k = codebook_feature_name(e, s)
                parts.append(part_index[k])
                columns.extend(range(starts[k], starts[k] + dims[k]))
            features.append((t, method, f, e, parts))
    identity = simple and columns == list(range(sum(pooled_dims)))
    return {"features": features, "simple": simple, "identity": identity,
            "columns": torch.tensor(columns, dtype=torch.int64),
            "elementwise": None if simple else _elementwise_plan(tables, methods, starts, dims),
            "keys": [e for _, _, _, e, _ in features],
            "dims": [t.embedding_dim for t, _, _, _, _ in features]}


def _pair_compose_available() -> bool:
    return fused_available()


def _elementwise_plan(tables: List[EmbeddingBagConfig], methods: Mapping[str, nn.Module],
                      starts: Mapping[str, int], dims: Mapping[str, int]
                      ) -> Optional[Dict[str, Any]]:
    """Segments ``(out, a, b, c, n)`` for ``torch.ops.torchrec_cce.pair_compose``: ``out[:,
    out+k] = x[:, a+k] * x[:, b+k] + x[:, c+k]`` for k < n, b = -1 meaning 1 and c = -1 meaning
    0; one per stream of a concatenating table (a = the stream), one per feature of a QR-mult
    (a = Q, b = R) or QR-add (a = Q, c = R) table. None when a table needs the per-feature path
    (MEAN pooling, MPE)."""
    segments, out = [], 0
    for t, names in zip(tables, embedding_names(tables)):
        method = methods[t.name]
        op = getattr(method, "elementwise_compose", None)
        if t.pooling != PoolingType.SUM or not (method.concat_compose or op in ("mult", "add")):
            return None
        for e in names:
            keys = [codebook_feature_name(e, s) for s in method.streams()]
            if method.concat_compose:
                for k in keys:
                    segments.append((out, starts[k], -1, -1, dims[k]))
                    out += dims[k]
            else:
                q, r = keys
                segments.append((out, starts[q], starts[r] if op == "mult" else -1,
                                 starts[r] if op == "add" else -1, dims[q]))
                out += dims[q]
    used = [c for s in segments for first in s[1:4] if first >= 0
            for c in range(first, first + s[4])]
    assert len(used) == len(set(used)), "every pooled column feeds one output column"
    return {"segments": torch.tensor(segments, dtype=torch.int64).reshape(-1, 5),
            "out_cols": out, "every_column_used": len(used) == sum(dims.values())}


def compose_pooled(
    tables: List[EmbeddingBagConfig],
    methods: Mapping[str, nn.Module],
    lengths: Mapping[str, torch.Tensor],
    pooled: KeyedTensor,
    is_weighted: bool = True,
    cache: Optional[Dict[Any, Dict[str, Any]]] = None,
    local_pooled: Optional[Mapping[str, torch.Tensor]] = None,
) -> KeyedTensor:
    """Pooled codebook outputs -> ``KeyedTensor`` of the logical features (table order).

    ``lengths`` maps each feature with MEAN pooling to its bag lengths (a JaggedTensor or a
    lengths tensor), and each feature of a table that looks itself up (``local_lookup``, MPE)
    to its JaggedTensor (ids, lengths and, if ``is_weighted``, weights). When every table
    ``local_pooled`` (sharded MPE) gives such a feature's SUM-pooled output already computed;
    else the table looks it up here. When every table
    concatenates its streams (full, hashing, CE, CCE, MEmCom, QR-concat) with SUM pooling, compose
    is a column permutation of the pooled values (no-op when already in order); with QR-mult or
    QR-add tables among them, one C++ op on CPU (:func:`_elementwise_plan`, else a few ops per
    feature, with the same results); ``cache`` keeps the plan per pooled key order. The output is float32, like fbgemm's TBE output whatever the
    weight precision, so float16 codebooks give the same output dtype sharded and unsharded.
    """
    pooled_keys, pooled_dims = pooled.keys(), pooled.length_per_key()
    cache_key = (tuple(pooled_keys), tuple(pooled_dims))
    plan = cache.get(cache_key) if cache is not None else None
    if plan is None:
        plan = _compose_plan(tables, methods, pooled_keys, pooled_dims)
        if cache is not None:
            cache[cache_key] = plan
    values = pooled.values()
    if plan["identity"]:
        return KeyedTensor(keys=plan["keys"], length_per_key=plan["dims"],
                           values=values.to(torch.float32))
    if plan["simple"]:
        columns = plan["columns"].to(values.device)
        return KeyedTensor(keys=plan["keys"], length_per_key=plan["dims"],
                           values=values.index_select(1, columns).to(torch.float32))
    elementwise = plan["elementwise"]
    if (elementwise is not None and local_pooled is None and values.device.type == "cpu"
            and values.dtype == torch.float32 and _pair_compose_available()):
        out = PairCompose.apply(values, elementwise["segments"], elementwise["out_cols"],
                                elementwise["every_column_used"])
        return KeyedTensor(keys=plan["keys"], length_per_key=plan["dims"], values=out)
    out: List[torch.Tensor] = []
    # One split (its backward is one cat), not a slice per stream: every slice's backward
    # would materialise a zero gradient of the whole pooled output.
    parts = values.split(pooled_dims, dim=1) if pooled_dims else ()
    for t, method, f, e, indices in plan["features"]:
        if local_pooled is not None and e in local_pooled:  # after its codebook streams (tiered)
            streams = [parts[i] for i in indices] + [local_pooled[e]]
        elif getattr(method, "local_lookup", False):  # after its codebook streams (tiered)
            jt = lengths[f]
            streams = [parts[i] for i in indices] + [
                method.pooled_lookup(jt, jt.weights_or_none() if is_weighted else None)]
        else:
            streams = [parts[i] for i in indices]
        if t.pooling == PoolingType.MEAN:
            # Mean-pool every stream before composing: the same for linear compositions,
            # and mean(Q) * mean(R) for QR-mult (as in the DLRM reference).
            lens = lengths[f]
            lens = lens.lengths() if isinstance(lens, JaggedTensor) else lens
            divisor = lens.clamp(min=1).to(streams[0].dtype).unsqueeze(1)
            streams = [s / divisor for s in streams]
        out.append(method.compose(streams))
    return KeyedTensor(keys=plan["keys"], length_per_key=plan["dims"],
                       values=torch.cat(out, dim=1).to(torch.float32))
