"""``CCEEmbeddingBagCollection`` under ``torch.fx`` / ``torchrec.fx.symbolic_trace`` and then
``torch.jit.script`` (TorchRec's inference flow).

While fx traces, the collection's forward (:func:`traced_forward`) records four calls, each a
``torch.fx.wrap``'d function of KJTs, tensors and constants only, so TorchScript compiles the
traced graph:

* :func:`served_features`: the KJT's served features in the collection's order (other keys
  dropped, as TorchRec's EBC ignores them; a missing one raises ``KeyError``);
* :func:`fused_remap`: one ``torch.ops.torchrec_cce.remap`` call with the spec built at trace
  time (a constant), CCE's ``h_generation``/packed ``p`` and MEmCom's per-id weights read from
  the module's buffers/parameters, so later re-clusterings and training are seen;
* the stock codebook ``EmbeddingBagCollection`` (traced through, as TorchRec traces it);
* :func:`compose`: column slices, products/sums (QR), MEAN division, in the eager order of
  operations, so outputs equal eager bit for bit.

Tables without a fused description (MPE), a feature served by a MEmCom table and another table
(the op takes one weight per input id), or a process where the op cannot be loaded: one
wrapped Python call of the eager stages (:func:`eager_stages`); fx works, TorchScript refuses
it (it takes modules). The traced graph does not observe ids (CCE's re-clustering sample) and
checks no more than missing features: trace for inference, train eagerly.
"""

import itertools
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType

from torchrec_cce.methods import codebook_feature_name
from torchrec_cce.ops import fused_available
from torchrec_cce.stages import (
    _NOT_FUSED,
    _build_plan,
    _static_tables,
    compose_pooled,
    mean_lengths,
    remap_features,
    table_features,
)

_COMPOSE_OPS = {"concat": 0, "mult": 1, "add": 2}


def is_fx_tracing() -> bool:
    """Whether ``torch.fx`` symbolic tracing (also TorchRec's tracer) is running."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


@torch.fx.wrap
def served_features(features: KeyedJaggedTensor, served: List[str]) -> KeyedJaggedTensor:
    """``features`` restricted to and ordered as ``served``."""
    keys = features.keys()
    if keys == served:
        return features
    index: Dict[str, int] = {}
    for i, k in enumerate(keys):
        index[k] = i
    order: List[int] = []
    for f in served:
        if f not in index:
            raise KeyError("KJT lacks feature '" + f + "' served by the CCEEmbeddingBagCollection")
        order.append(index[f])
    return features.permute(order)


@torch.fx.wrap
def fused_remap(features: KeyedJaggedTensor, spec: torch.Tensor,
                generations: List[torch.Tensor], assignments: List[torch.Tensor],
                out_keys: List[str], stream_feature: List[int], stream_k: List[int],
                is_weighted: bool, inner_weighted: bool, id_weight_features: List[int],
                id_weights: List[torch.Tensor], id_weight_rows: List[int]) -> KeyedJaggedTensor:
    """The codebook KJT of ``features`` (in served order) through the fused op, with the same
    weights as :func:`torchrec_cce.stages.fused_remap_features`."""
    ids = features.values()
    lengths = features.lengths()
    if ids.dtype != torch.int64:
        ids = ids.to(torch.int64)
    if lengths.dtype != torch.int64:
        lengths = lengths.to(torch.int64)
    batch = features.stride()
    weights: Optional[torch.Tensor] = None
    if inner_weighted:
        if is_weighted:
            weights = features.weights()
        if len(id_weights) > 0:
            offsets = features.offset_per_key()
            pieces: List[torch.Tensor] = []
            for i in range(len(features.keys())):
                lo, hi = offsets[i], offsets[i + 1]
                given = weights
                if given is not None:
                    w = given[lo:hi]
                else:
                    w = torch.ones(hi - lo, device=ids.device)
                for j in range(len(id_weight_features)):
                    if id_weight_features[j] == i:
                        rows = torch.remainder(ids[lo:hi], id_weight_rows[j])
                        w = w * id_weights[j][rows]
                pieces.append(w)
            weights = torch.cat(pieces)
        elif weights is None:
            weights = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
    values, out_lengths, out_weights = torch.ops.torchrec_cce.remap(
        ids, lengths, weights, batch, spec, generations, assignments, [])
    per_key = features.length_per_key()
    length_per_key: List[int] = []
    offset_per_key: List[int] = [0]
    for s in range(len(out_keys)):
        n = stream_k[s] * per_key[stream_feature[s]]
        length_per_key.append(n)
        offset_per_key.append(offset_per_key[-1] + n)
    return KeyedJaggedTensor(
        keys=out_keys, values=values, lengths=out_lengths,
        weights=out_weights if weights is not None else None, stride=batch,
        length_per_key=length_per_key, offset_per_key=offset_per_key)


@torch.fx.wrap
def compose(features: KeyedJaggedTensor, pooled: KeyedTensor, parts: List[List[int]],
            keys: List[str], dims: List[int]) -> KeyedTensor:
    """Logical outputs from the pooled codebook outputs. ``parts``: per output key
    ``[op, mean feature index or -1, start_0, width_0, start_1, width_1, ...]`` (op 0 concat,
    1 product, 2 sum of the streams; MEAN divides every stream by the bag length first)."""
    values = pooled.values()
    lengths = features.lengths()
    batch = features.stride()
    outs: List[torch.Tensor] = []
    for p in parts:
        streams: List[torch.Tensor] = []
        for j in range(2, len(p), 2):
            streams.append(values[:, p[j]: p[j] + p[j + 1]])
        if p[1] >= 0:
            lens = lengths[p[1] * batch: (p[1] + 1) * batch]
            divisor = lens.clamp(min=1).to(streams[0].dtype).unsqueeze(1)
            streams = [s / divisor for s in streams]
        if p[0] == 1:
            outs.append(streams[0] * streams[1])
        elif p[0] == 2:
            outs.append(streams[0] + streams[1])
        elif len(streams) == 1:
            outs.append(streams[0])
        else:
            outs.append(torch.cat(streams, dim=1))
    return KeyedTensor(keys=keys, length_per_key=dims,
                       values=torch.cat(outs, dim=1).to(torch.float32))


@torch.fx.wrap
def eager_stages(methods: nn.ModuleDict, codebooks: EmbeddingBagCollection,
                 features: KeyedJaggedTensor, layout: List[Tuple[str, int, int, List[str], str]],
                 is_weighted: bool, inner_weighted: bool) -> KeyedTensor:
    """The eager remap -> codebooks -> compose (torch-ops path) as one call, for collections
    :func:`traced_forward` cannot express in scriptable calls (MPE tables). ``layout``: per
    table ``(name, num_embeddings, embedding_dim, feature names, pooling name)``."""
    tables = [EmbeddingBagConfig(name=n, num_embeddings=v, embedding_dim=d, feature_names=list(fs),
                                 pooling=PoolingType[pooling]) for n, v, d, fs, pooling in layout]
    remapped = remap_features(tables, methods, features, is_weighted, inner_weighted,
                              observe=False)
    if codebooks.embedding_bag_configs():
        pooled = codebooks(remapped)
    else:
        pooled = KeyedTensor(keys=[], length_per_key=[],
                             values=torch.empty(features.stride(), 0,
                                                device=features.values().device))
    lengths: Dict[str, object] = dict(mean_lengths(tables, features))
    per_feature = features.to_dict()
    for t in tables:
        if getattr(methods[t.name], "local_lookup", False):
            lengths.update({f: per_feature[f] for f in t.feature_names})
    return compose_pooled(tables, methods, lengths, pooled, is_weighted)


def _trace_plan(module: nn.Module) -> Optional[Dict[str, object]]:
    """What :func:`traced_forward` passes to the wrapped calls, or None when some table has no
    fused description or the op is unavailable (then :func:`eager_stages`)."""
    tables: List[EmbeddingBagConfig] = module.embedding_bag_configs()
    methods = module.tables
    static = _static_tables(tables, methods)
    if static is _NOT_FUSED or not all(i.packed for i in static if i.cce) or not fused_available():
        return None
    served = list(dict.fromkeys(f for t in tables for f in t.feature_names))
    plan = _build_plan(tables, methods, served, {})
    id_weight_features, id_weight_tables = [], []
    for info in static:
        if info.id_weights:
            for f, _ in info.features:
                id_weight_features.append(served.index(f))
                id_weight_tables.append(info.name)
    # The codebook EBC's output layout (TorchRec's EBC, or its quantised form for serving).
    codebooks = module.codebooks
    pooled_keys = list(codebooks._embedding_names)
    pooled_dims = list(getattr(codebooks, "_lengths_per_embedding", None)
                       or getattr(codebooks, "_length_per_key"))
    starts = dict(zip(pooled_keys, itertools.accumulate([0] + pooled_dims)))
    widths = dict(zip(pooled_keys, pooled_dims))
    parts = []
    for t, pairs in zip(tables, table_features(tables)):
        method = methods[t.name]
        op = "concat" if method.concat_compose else method.elementwise_compose
        for f, e in pairs:
            part = [_COMPOSE_OPS[op], served.index(f) if t.pooling == PoolingType.MEAN else -1]
            for s in method.streams():
                k = codebook_feature_name(e, s)
                part += [starts[k], widths[k]]
            parts.append(part)
    return {"served": served, "plan": plan, "id_weight_features": id_weight_features,
            "id_weight_tables": id_weight_tables, "parts": parts,
            "keys": list(module._embedding_names), "dims": list(module._lengths_per_embedding)}


def traced_forward(module: nn.Module, features: KeyedJaggedTensor) -> KeyedTensor:
    """The collection's forward while fx traces (see the module docstring)."""
    cache = module._trace_cache
    if "plan" not in cache:
        cache["plan"] = _trace_plan(module)
    p = cache["plan"]
    methods = module.tables
    if p is None:
        layout = [(t.name, t.num_embeddings, t.embedding_dim, list(t.feature_names),
                   t.pooling.name) for t in module.embedding_bag_configs()]
        return eager_stages(methods, module.codebooks, features, layout, module._is_weighted,
                            module._inner_weighted)
    plan = p["plan"]
    served = served_features(features, p["served"])
    remapped = fused_remap(
        served, plan.spec, [methods[n].h_generation for n in plan.generation_tables],
        [methods[n].assignment for n in plan.assignment_tables], plan.keys,
        plan.stream_feature, plan.stream_k, module._is_weighted, module._inner_weighted,
        p["id_weight_features"], [methods[n].id_weight.view(-1) for n in p["id_weight_tables"]],
        [methods[n].num_embeddings for n in p["id_weight_tables"]])
    pooled = module.codebooks(remapped)
    return compose(served, pooled, p["parts"], p["keys"], p["dims"])
