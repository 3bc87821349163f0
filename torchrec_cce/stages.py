"""The remap and compose stages around the codebook EBC, shared by the unsharded and the
sharded collection.

* :func:`remap_features`: logical KJT -> KJT of codebook row ids, keys ``<feature>__<stream>``
  (for each table: codebook by codebook, feature by feature, stream by stream).
* :func:`compose_pooled`: pooled codebook outputs -> ``KeyedTensor`` of the logical features;
  MEAN tables divide by the bag length here (codebook tables always pool with SUM).
"""

from typing import Dict, List, Mapping, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_cce.methods import CompressedTable, codebook_feature_name
from torchrec_cce.validation import check_kjt_layout


def check_features(feature_table: Mapping[str, str], served: List[str],
                   features: KeyedJaggedTensor) -> None:
    """``KeyError`` for KJT keys no table serves or served keys the KJT lacks; ``ValueError``
    for inconsistent lengths/values/weights (see :func:`torchrec_cce.validation.check_kjt_layout`)."""
    keys = features.keys()
    unknown = [k for k in keys if k not in feature_table]
    if unknown:
        raise KeyError(
            f"KJT features {unknown} are served by no table of this "
            f"CCEEmbeddingBagCollection; served features: {served}"
        )
    present = set(keys)
    missing = [f for f in served if f not in present]
    if missing:
        raise KeyError(
            f"KJT lacks features {missing}; every served feature must be present: {served}"
        )
    if features.variable_stride_per_key():
        raise ValueError(
            "variable-batch KJTs (stride per key) are not supported; pad features to one batch size"
        )
    check_kjt_layout(features)


def empty_pooled(tables: List[EmbeddingBagConfig], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> KeyedTensor:
    """The ``KeyedTensor`` of a batch with no examples: ``[0, sum of dims]``, logical keys."""
    keys = [f for t in tables for f in t.feature_names]
    dims = [t.embedding_dim for t in tables for _ in t.feature_names]
    return KeyedTensor(keys=keys, length_per_key=dims,
                       values=torch.zeros((0, sum(dims)), dtype=dtype, device=device))


def remap_features(
    tables: List[EmbeddingBagConfig],
    methods: Mapping[str, nn.Module],
    features: KeyedJaggedTensor,
    is_weighted: bool,
    inner_weighted: bool,
    assignments: Optional[Dict[str, torch.Tensor]] = None,
    observe: bool = True,
) -> KeyedJaggedTensor:
    """Remap every served feature of ``features`` to its codebook streams.

    ``assignments`` optionally gives CCE's ``p(x)`` per feature (``[n, chunks]``), looked up
    elsewhere (the sharded module fetches it from the rank owning each id). ``observe=False``
    leaves the id sample alone (the sharded module observes ids when the batch is computed).
    """
    per_feature: Dict[str, JaggedTensor] = features.to_dict()
    keys: List[str] = []
    values: List[torch.Tensor] = []
    lengths: List[torch.Tensor] = []
    weights: List[torch.Tensor] = []
    for t in tables:
        method: CompressedTable = methods[t.name]
        remapped = {}
        for f in t.feature_names:
            jt = per_feature[f]
            ids = jt.values()
            if observe:
                method.observe(ids)
            if assignments is not None and f in assignments:
                streams = method.streams_from(assignments[f], method.bucket(ids))
            else:
                streams = method.remap(ids)
            w = jt.weights_or_none() if is_weighted else None
            id_weights = method.id_weights(ids)
            if id_weights is not None:
                w = id_weights if w is None else w * id_weights
            if inner_weighted and w is None:
                w = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
            remapped[f] = (streams, w, jt.lengths())
        first_stream = 0
        for cb in method.codebooks:
            for f in t.feature_names:
                streams, w, lens = remapped[f]
                for j, s in enumerate(cb.streams):
                    keys.append(codebook_feature_name(f, s))
                    values.append(streams[first_stream + j])
                    lengths.append(lens)
                    if w is not None:
                        weights.append(w)
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


def compose_pooled(
    tables: List[EmbeddingBagConfig],
    methods: Mapping[str, nn.Module],
    lengths: Mapping[str, torch.Tensor],
    pooled: KeyedTensor,
    is_weighted: bool = True,
) -> KeyedTensor:
    """Pooled codebook outputs -> ``KeyedTensor`` of the logical features (table order).

    ``lengths`` maps each feature with MEAN pooling to its bag lengths (a JaggedTensor or a
    lengths tensor), and each feature of a table that looks itself up (``local_lookup``, MPE)
    to its JaggedTensor (ids, lengths and, if ``is_weighted``, weights).
    """
    parts = pooled.to_dict()
    out: List[torch.Tensor] = []
    keys: List[str] = []
    dims: List[int] = []
    for t in tables:
        method: CompressedTable = methods[t.name]
        for f in t.feature_names:
            if getattr(method, "local_lookup", False):
                jt = lengths[f]
                streams = [method.pooled_lookup(jt, jt.weights_or_none() if is_weighted
                                                else None)]
            else:
                streams = [parts[codebook_feature_name(f, s)] for s in method.streams()]
            if t.pooling == PoolingType.MEAN:
                # Mean-pool every stream before composing: the same for linear compositions,
                # and mean(Q) * mean(R) for QR-mult (as in the DLRM reference).
                lens = lengths[f]
                lens = lens.lengths() if isinstance(lens, JaggedTensor) else lens
                divisor = lens.clamp(min=1).to(streams[0].dtype).unsqueeze(1)
                streams = [s / divisor for s in streams]
            out.append(method.compose(streams))
            keys.append(f)
            dims.append(t.embedding_dim)
    # float32 out, like fbgemm's TBE (whose output dtype is FP32 whatever the weight precision),
    # so float16 codebooks give the same output dtype sharded and unsharded.
    return KeyedTensor(keys=keys, length_per_key=dims,
                       values=torch.cat(out, dim=1).to(torch.float32))
