"""A per-id bias (first-order term) added to a model's logit, for the hottest ids of each table.

    bias = IdBias(tables, hot_ids={"t_item": 1000, "t_user": 200})
    model = WithIdBias(dlrm, bias)            # logits = dlrm(dense, kjt) + bias(kjt)
    DLRMTrain(model)                          # before DMP; bias is dense (replicated)

A DLRM has no per-id scalar term: an item's own click rate reaches the logit only through its
embedding's dot products and the over-arch. Factorization machines and Wide & Deep keep one
(their linear/wide part). Under a tight byte budget the scalar is the cheapest per-id signal
there is: one float32 per id instead of ``dim`` (``benchmarks/memorisation_bound.py``: a
per-movie rate table alone comes within 0.008 log loss of MovieLens' full model).

Ids ``[0, hot_ids[t])`` of table ``t`` (with :mod:`torchrec_cce.data.preprocess`'s
frequency-ordered vocabularies: the most frequent ones) get one learned scalar each,
initialised to 0 (the model's output is unchanged at step 0); other ids, and features of tables
without an entry, add nothing. A bag adds the (weighted) sum of its ids' scalars, divided by
the bag's length for a MEAN-pooled table. :func:`hot_ids_for_bytes` sizes ``hot_ids`` for a
byte budget from the tables' training counts (4 bytes per scalar), and
:func:`torchrec_cce.memory_report` adds them to their tables' bytes.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

BIAS_BYTES = 4  # one float32 per biased id


def hot_ids_for_bytes(tables: Sequence[EmbeddingBagConfig], counts: Mapping[str, object],
                      byte_budget: int) -> Dict[str, int]:
    """Biased ids per table in at most ``byte_budget`` bytes: the most frequent ids over all
    tables together (``counts``: table -> per-id training counts, frequency-ordered ids), each
    table's share a prefix of its vocabulary. Tables with no biased id are left out."""
    missing = [t.name for t in tables if t.name not in counts]
    if missing:
        raise ValueError(f"hot_ids_for_bytes: no training counts for tables {missing}; the "
                         f"per-id bias picks the most frequent ids from them (preprocess the "
                         f"data with torchrec_cce.data.preprocess, which writes counts)")
    n = max(0, int(byte_budget) // BIAS_BYTES)
    names = [t.name for t in tables]
    per_table = [np.asarray(counts[t.name], dtype=np.float64)[:t.num_embeddings] for t in tables]
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(per_table)])
    top = np.argsort(-np.concatenate(per_table), kind="stable")[:n]
    taken = np.bincount(owner[top], minlength=len(names))
    return {name: int(k) for name, k in zip(names, taken) if k > 0}


def _pooled_bias(kjt: KeyedJaggedTensor, weight: torch.Tensor, keys: List[str],
                 offsets: torch.Tensor, hot: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``[B]``: per sample, the sum over ``kjt``'s features of their bags' pooled biases
    (a fx leaf: TorchRec's pipeline tracer does not look inside)."""
    batch = kjt.stride()
    if kjt.variable_stride_per_key():
        raise ValueError("IdBias: KeyedJaggedTensors with a variable batch size per feature are "
                         "not supported; pass one stride for every feature")
    device = weight.device
    position = {k: i for i, k in enumerate(keys)}  # other features: the last slot, no ids
    index = torch.tensor([position.get(k, len(keys)) for k in kjt.keys()], dtype=torch.long,
                         device=device)
    lengths = kjt.lengths().long()
    F = len(index)
    # the feature of each bag ([F * B]) and the bag of each id
    seg_feature = torch.arange(F, device=device).repeat_interleave(batch)
    seg_of_value = torch.arange(F * batch, device=device).repeat_interleave(
        lengths, output_size=kjt.values().numel())
    feat = index[seg_feature]  # this module's feature slot of each bag
    value_feat = feat[seg_of_value]
    ids = kjt.values().long()
    biased = (ids >= 0) & (ids < hot[value_feat])
    slot = torch.where(biased, offsets[value_feat] + ids, torch.zeros_like(ids))
    values = torch.where(biased, weight[slot], torch.zeros((), dtype=weight.dtype))
    if kjt.weights_or_none() is not None:
        values = values * kjt.weights()
    bags = torch.zeros(F * batch, dtype=weight.dtype, device=device).index_add(
        0, seg_of_value, values)
    bags = torch.where(mean[feat] & (lengths > 0), bags / lengths.clamp(min=1), bags)
    return bags.view(F, batch).sum(0)


torch.fx.wrap("_pooled_bias")


class IdBias(nn.Module):
    """One learned float32 scalar per id ``[0, hot_ids[t])`` of each table ``t``, summed over a
    sample's features (see the module docstring). ``hot_ids[t]`` must be in ``[0,
    num_embeddings]``; ``"all"`` as a value biases every id of the table."""

    def __init__(self, tables: Sequence[EmbeddingBagConfig],
                 hot_ids: Mapping[str, object]) -> None:
        super().__init__()
        by_name = {t.name: t for t in tables}
        unknown = sorted(set(hot_ids) - set(by_name))
        if unknown:
            raise ValueError(f"IdBias: unknown tables {unknown}; the tables are "
                             f"{sorted(by_name)}")
        sizes: Dict[str, int] = {}
        for name, k in hot_ids.items():
            V = by_name[name].num_embeddings
            k = V if k == "all" else k
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= V:
                raise ValueError(f"IdBias: table '{name}' has {V} ids; its number of biased "
                                 f"ids must be an int in [0, {V}] or 'all', got {k!r}")
            sizes[name] = int(k)
        self.hot_ids = sizes
        start, table_offset = 0, {}
        for name, k in sizes.items():
            table_offset[name] = start
            start += k
        self.weight = nn.Parameter(torch.zeros(start))
        keys: List[str] = []
        offsets, hot, mean = [], [], []
        for t in tables:
            if t.name not in sizes:
                continue
            for feature in t.feature_names:
                keys.append(feature)
                offsets.append(table_offset[t.name])
                hot.append(sizes[t.name])
                mean.append(t.pooling == PoolingType.MEAN)
        self.keys = keys
        offsets, hot, mean = offsets + [0], hot + [0], mean + [False]  # features of no table
        self.register_buffer("feature_offsets", torch.tensor(offsets, dtype=torch.long),
                             persistent=False)
        self.register_buffer("feature_hot_ids", torch.tensor(hot, dtype=torch.long),
                             persistent=False)
        self.register_buffer("feature_mean", torch.tensor(mean, dtype=torch.bool),
                             persistent=False)

    def table_bytes(self) -> Dict[str, int]:
        """Bytes of each biased table's scalars."""
        return {name: BIAS_BYTES * k for name, k in self.hot_ids.items()}

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return _pooled_bias(features, self.weight, self.keys, self.feature_offsets,
                            self.feature_hot_ids, self.feature_mean)


class WithIdBias(nn.Module):
    """``model(dense_features, sparse_features) + id_bias(sparse_features)`` as ``[B, 1]``
    logits (a TorchRec DLRM's output shape), for ``DLRMTrain`` and DMP. Other attributes
    (``sparse_arch``, ``over_arch``, ...) are the wrapped model's."""

    def __init__(self, model: nn.Module, id_bias: IdBias) -> None:
        super().__init__()
        self.model = model
        self.id_bias = id_bias

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the wrapped model's arches and attributes
            return getattr(super().__getattr__("model"), name)

    def forward(self, dense_features: torch.Tensor,
                sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        logits = self.model(dense_features, sparse_features)
        return logits + self.id_bias(sparse_features).unsqueeze(-1).to(logits.dtype)


def with_id_bias(model: nn.Module, tables: Sequence[EmbeddingBagConfig],
                 hot_ids: Optional[Mapping[str, object]]) -> nn.Module:
    """``model`` with a :class:`IdBias` of ``hot_ids`` (``model`` itself when ``hot_ids`` is
    empty or None)."""
    if not hot_ids:
        return model
    return WithIdBias(model, IdBias(tables, hot_ids))
