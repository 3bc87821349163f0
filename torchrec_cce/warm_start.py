"""Warm start: a compressed collection initialised from a trained stock ``EmbeddingBagCollection``.

:func:`compress_trained` builds a :class:`~torchrec_cce.CCEEmbeddingBagCollection` with the
same tables as a trained full model and fills every table from its trained rows ``E``
(``[V, dim]``) by the method's natural post-training fit; fine-tuning then starts there instead
of from random codebooks. Per method, with ``c_x`` the weight of id ``x`` (``id_counts`` if
given, else 1: the fit minimises ``sum_x c_x ||e(x) - E[x]||^2`` over the method's parameters):

* **uncompressed** (no config, or ``FullConfig``): ``E`` copied exactly (cast to the table's
  stored dtype).
* **CCE** (the paper's post-training quantisation, "Clustering the Sketch" Sec. 3): the
  re-clustering steps of :func:`torchrec_cce.clustering.recluster.recluster_table` run on the
  trained rows instead of the table's own vectors: per chunk ``i``, ``A_i`` = k-means
  centroids of the chunk vectors ``E[x, chunk i]`` (k-means sample: re-clustering's capacity,
  ``min(256 rows, 2^21)`` ids, drawn by ``id_counts`` with replacement, or without counts a
  seeded uniform sample: every id when ``V`` fits), ``p_i(x)`` = nearest centroid of every
  covered id, ``h_i`` = a fresh hash (generation 1), ``B_i[j]`` = mean residual ``E[x, chunk
  i] - A_i[p_i(x)]`` of the ids in bucket ``j`` (0 if empty). Uncovered ids (``assigned_ids <
  V``) keep their hashed ``p``, as in re-clustering.
* **hashing trick / CE**: each (chunk of a) hashed row is the weighted mean of the trained
  rows (chunks) hashed to it: the exact least-squares fit for fixed hashes.
* **QR**: ``concat``: quotient and remainder halves are the group means (exact least squares);
  ``add`` / ``mult``: alternating least squares (``als_iters`` rounds; each round solves one
  factor exactly given the other, so the error never increases), started from ``Q`` = group
  means (``add``: ``R = 0``; ``mult``: ``R = 1``).
* **MEmCom** (``e(x) = w[x] H[h(x)]``): alternating least squares from ``H`` = bucket means,
  ``w = 1``: ``w[x] = <E[x], H[h(x)]> / |H[h(x)]|^2`` (1 where ``H[h(x)] = 0``), then
  ``H[j] = sum c_x w[x] E[x] / sum c_x w[x]^2`` over the bucket.
* **MPE**: the fp32 master weights are the trained rows and the quantiser steps start at the
  public code's ``2 mean|W| / sqrt(2^(b-1))`` measured on them (widths are searched from
  there). Its retrain stage (``MPETable.select``) restarts the masters from their seeded
  initial values, as in the paper, so the warm start shapes the search only.

Memory: CCE works in id batches (as re-clustering); the least-squares fits hold a few float64
``[V, dim]`` temporaries. A sharded trained model: save it with ``torch.distributed.checkpoint``
and load it into an unsharded one with :func:`torchrec_cce.load_unsharded` first.

Use it on the embedding collection of a trained model and put the result in the compressed
model (the dense part of the full model can be copied as it is)::

    full = model.sparse_arch.embedding_bag_collection            # trained stock EBC
    model.sparse_arch.embedding_bag_collection = compress_trained(
        full, {"t_item": CCEConfig(rows=256, chunks=4)})
    # ... then shard / fine-tune ``model`` as usual
"""

import copy
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec import EmbeddingBagConfig

from torchrec_cce.clustering.kmeans import LocalCollective
from torchrec_cce.clustering.recluster import DEFAULT_ID_BATCH, ReclusterState, recluster_table
from torchrec_cce.configs import CompressionConfig
from torchrec_cce.hashing import derive_seed
from torchrec_cce.methods import (
    CCETable,
    CETable,
    CompressedTable,
    FullTable,
    HashingTrickTable,
    MEmComTable,
    MPETable,
    QRTable,
    codebook_table_name,
)
from torchrec_cce.modules import CCEEmbeddingBagCollection

Source = Union[nn.Module, Mapping[str, torch.Tensor]]


def trained_rows(source: Source, tables: List[EmbeddingBagConfig]) -> Dict[str, torch.Tensor]:
    """``{table: [V, dim] float32 rows}`` of a trained stock ``EmbeddingBagCollection`` (the
    module, its state dict, or the state dict of a model containing it: keys ending in
    ``embedding_bags.<table>.weight``). Raises naming the table for a missing, ambiguous or
    mis-shaped weight."""
    if isinstance(source, nn.Module):
        source = source.state_dict()
    out = {}
    for t in tables:
        suffix = f"embedding_bags.{t.name}.weight"
        keys = [k for k in source if k == suffix or k.endswith("." + suffix)]
        if not keys:
            found = sorted({k.split("embedding_bags.")[-1].split(".")[0]
                            for k in source if "embedding_bags." in k})
            raise KeyError(f"warm start: no trained weight for table '{t.name}' (no key ending in "
                           f"'{suffix}'); the source has tables {found}. Pass the trained "
                           f"EmbeddingBagCollection (or its state dict) whose table names are "
                           f"those of `tables`")
        if len(keys) > 1:
            raise ValueError(f"warm start: table '{t.name}' matches several keys {keys}; pass "
                             f"the state dict of one EmbeddingBagCollection")
        w = source[keys[0]]
        if not isinstance(w, torch.Tensor) or isinstance(w, (ShardedTensor, DTensor)):
            raise TypeError(
                f"warm start: table '{t.name}': '{keys[0]}' is a {type(w).__name__}, not a "
                f"plain tensor (a sharded model's state dict); save it with "
                f"torch.distributed.checkpoint and load it into an unsharded model first "
                f"(torchrec_cce.export.load_unsharded)")
        if tuple(w.shape) != (t.num_embeddings, t.embedding_dim):
            raise ValueError(
                f"warm start: table '{t.name}': the trained weight '{keys[0]}' is "
                f"{tuple(w.shape)}, the table is [{t.num_embeddings}, {t.embedding_dim}] "
                f"(num_embeddings, embedding_dim); build the compressed collection with the "
                f"trained model's table sizes")
        w = w.detach().float().cpu()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"warm start: table '{t.name}': the trained weight holds NaN/inf")
        out[t.name] = w
    return out


def _bucket_means(rows: torch.Tensor, buckets: torch.Tensor, n: int,
                  weight: torch.Tensor) -> torch.Tensor:
    """``[n, d]``: the ``weight``-weighted mean of ``rows`` per bucket (0 for an empty one)."""
    sums = torch.zeros(n, rows.shape[1], dtype=torch.float64)
    sums.index_add_(0, buckets, rows.double() * weight.unsqueeze(1))
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, buckets, weight)
    return torch.where(total.unsqueeze(1) > 0, sums / total.clamp(min=1e-300).unsqueeze(1),
                       torch.zeros_like(sums))


def _weighted_ratio(num: torch.Tensor, den: torch.Tensor, buckets: torch.Tensor, n: int,
                    fallback: torch.Tensor) -> torch.Tensor:
    """``sum num / sum den`` per bucket (``fallback`` where ``sum den == 0``)."""
    s_num = torch.zeros(n, *num.shape[1:], dtype=torch.float64).index_add_(0, buckets, num)
    s_den = torch.zeros(n, *den.shape[1:], dtype=torch.float64).index_add_(0, buckets, den)
    return torch.where(s_den > 0, s_num / s_den.clamp(min=1e-300), fallback)


def _fit_codebooks(method: CompressedTable, E: torch.Tensor, c: torch.Tensor,
                   als_iters: int) -> Dict[str, torch.Tensor]:
    """Least-squares codebooks ``{suffix: [rows, cols]}`` of a hashing/CE/QR/MEmCom table for
    the trained rows ``E`` (see the module docstring); MEmCom's ``id_weight`` is set here."""
    V = E.shape[0]
    ids = torch.arange(V)
    if isinstance(method, HashingTrickTable):
        return {"hash": _bucket_means(E, method.remap(ids)[0], method.rows, c)}
    if isinstance(method, CETable):
        d = E.shape[1] // method.chunks
        parts = [_bucket_means(E[:, i * d:(i + 1) * d], s - i * method.rows, method.rows, c)
                 for i, s in enumerate(method.remap(ids))]
        return {"ce": torch.cat(parts)}
    if isinstance(method, QRTable):
        q_ids, r_ids = method.remap(ids)
        nq = method.codebooks[0].num_embeddings
        nr = method.collisions
        if method.operation == "concat":
            h = method.codebooks[0].embedding_dim
            return {"qr_q": _bucket_means(E[:, :h], q_ids, nq, c),
                    "qr_r": _bucket_means(E[:, h:], r_ids, nr, c)}
        Ed, cw = E.double(), c.unsqueeze(1)
        Q = _bucket_means(E, q_ids, nq, c)
        if method.operation == "add":
            R = torch.zeros(nr, E.shape[1], dtype=torch.float64)
            for _ in range(als_iters):
                R = _bucket_means(Ed - Q[q_ids], r_ids, nr, c)
                Q = _bucket_means(Ed - R[r_ids], q_ids, nq, c)
        else:  # mult, per coordinate: e = Q[q] * R[r]
            R = torch.ones(nr, E.shape[1], dtype=torch.float64)
            for _ in range(als_iters):
                Qx = Q[q_ids]
                R = _weighted_ratio(cw * Ed * Qx, cw * Qx * Qx, r_ids, nr, R)
                Rx = R[r_ids]
                Q = _weighted_ratio(cw * Ed * Rx, cw * Rx * Rx, q_ids, nq, Q)
        return {"qr_q": Q, "qr_r": R}
    if isinstance(method, MEmComTable):
        if method.sharded:
            raise ValueError(f"warm start: table '{method.table_name}': build an unsharded "
                             f"collection, then shard it")
        b = method.bucket(ids)
        Ed, cw = E.double(), c.unsqueeze(1)
        H = _bucket_means(E, b, method.rows, c)
        w = torch.ones(V, dtype=torch.float64)
        for _ in range(als_iters):
            Hx = H[b]
            norm = (Hx * Hx).sum(1)
            w = torch.where(norm > 0, (Ed * Hx).sum(1) / norm.clamp(min=1e-300),
                            torch.ones_like(norm))
            H = _weighted_ratio(cw * w.unsqueeze(1) * Ed, (c * w * w).unsqueeze(1).expand_as(Ed),
                                b, method.rows, H)
        with torch.no_grad():
            method.id_weight.copy_(w.to(method.id_weight.dtype).view(method.id_weight.shape))
        return {"memcom": H}
    raise TypeError(f"warm start: no fit for {type(method).__name__}")


def _sample_for_kmeans(method: CCETable, counts: Optional[torch.Tensor]) -> None:
    """Fill the table's reservoir (what re-clustering samples) with ids drawn by ``counts``;
    without counts it stays empty and re-clustering draws a seeded uniform sample."""
    method.reservoir.reset()
    if counts is None:
        return
    g = torch.Generator().manual_seed(derive_seed(method.config.seed, method.table_name, 0,
                                                  "warm_start"))
    n = method.reservoir.capacity
    method.reservoir.observe(torch.multinomial(counts.double(), n, replacement=True, generator=g))


def _warm_start_cce(collection: CCEEmbeddingBagCollection, method: CCETable, E: torch.Tensor,
                    counts: Optional[torch.Tensor], iters: int, id_batch: int
                    ) -> Dict[str, float]:
    weights = {cb.suffix: collection.codebooks.embedding_bags[
        codebook_table_name(method.table_name, cb.suffix)].weight for cb in method.codebooks}
    A, B = method.stack_ab(weights.__getitem__)
    chunked = E.view(E.shape[0], method.chunks, method.chunk_dim)
    state = ReclusterState(method, A, B, method.assignment, 0, (0, method.assigned_ids),
                           vectors=lambda ids: chunked[ids])
    _sample_for_kmeans(method, counts)
    new_a, new_b, stats = recluster_table(state, LocalCollective(), iters=iters,
                                          id_batch=id_batch)
    method.reservoir.reset()  # the sample was the warm start's, not training's
    with torch.no_grad():
        for suffix, new in method.unstack_ab(new_a, new_b).items():
            weights[suffix].copy_(new.to(weights[suffix].dtype))
    return stats


def _check_counts(tables: List[EmbeddingBagConfig], id_counts: Mapping[str, torch.Tensor]
                  ) -> Dict[str, torch.Tensor]:
    names = {t.name: t for t in tables}
    unknown = sorted(set(id_counts) - set(names))
    if unknown:
        raise ValueError(f"warm start: id_counts names unknown tables {unknown}; the tables are "
                         f"{sorted(names)}")
    out = {}
    for name, counts in id_counts.items():
        counts = torch.as_tensor(counts).double().flatten()
        V = names[name].num_embeddings
        if counts.numel() != V or bool((counts < 0).any()) or float(counts.sum()) <= 0:
            raise ValueError(f"warm start: id_counts['{name}'] must be {V} non-negative counts "
                             f"(one per id) with a positive sum, got {counts.numel()} values")
        out[name] = counts
    return out


@torch.no_grad()
def compress_trained(
    source: Source,
    compression: Mapping[str, CompressionConfig],
    tables: Optional[List[EmbeddingBagConfig]] = None,
    *,
    is_weighted: Optional[bool] = None,
    id_counts: Optional[Mapping[str, torch.Tensor]] = None,
    kmeans_iters: int = 20,
    als_iters: int = 10,
    id_batch: int = DEFAULT_ID_BATCH,
    **collection_kwargs,
) -> CCEEmbeddingBagCollection:
    """A ``CCEEmbeddingBagCollection`` compressed by ``compression`` and initialised from the
    trained rows of ``source`` (see the module docstring for each method's fit).

    Args:
        source: a trained stock ``torchrec.EmbeddingBagCollection``, its state dict, or the
            state dict of a model containing one.
        compression: ``{table name: config}``, as for ``CCEEmbeddingBagCollection``; tables
            not named are copied uncompressed.
        tables: the logical tables (default: ``source.embedding_bag_configs()``; required for
            a state dict). Deep-copied.
        is_weighted: default ``source.is_weighted()`` (False for a state dict).
        id_counts: optional ``{table: [V] training counts}``: the fits weigh each id by its
            count (k-means samples ids by it) instead of uniformly.
        kmeans_iters: Lloyd iterations per CCE chunk; als_iters: alternating least-squares
            rounds (QR add/mult, MEmCom).
        collection_kwargs: passed to ``CCEEmbeddingBagCollection`` (``allow_larger``,
            ``fused``). Built on CPU; move or shard it afterwards.

    Raises ``ValueError``/``KeyError`` naming the table when ``compression`` or ``id_counts``
    names an unknown table or a trained weight is missing or has another shape; ``TypeError``
    for a sharded source (load it with :func:`torchrec_cce.load_unsharded` first).
    """
    if isinstance(source, nn.Module) and not hasattr(source, "embedding_bag_configs"):
        raise TypeError(
            f"warm start: the source is a {type(source).__name__}, not an "
            f"EmbeddingBagCollection; pass the trained EBC or its state dict (a "
            f"DistributedModelParallel model: save it with torch.distributed.checkpoint and "
            f"load it into an unsharded model with torchrec_cce.load_unsharded first)")
    if tables is None:
        if not isinstance(source, nn.Module):
            raise ValueError("warm start: pass `tables` (the EmbeddingBagConfigs of the trained "
                             "collection) when the source is a state dict")
        tables = source.embedding_bag_configs()
    tables = copy.deepcopy(list(tables))
    if is_weighted is None:
        is_weighted = bool(source.is_weighted()) if isinstance(source, nn.Module) else False
    counts = _check_counts(tables, id_counts or {})
    collection = CCEEmbeddingBagCollection(tables, compression=dict(compression),
                                           is_weighted=is_weighted, device=torch.device("cpu"),
                                           **collection_kwargs)
    rows = trained_rows(source, tables)
    for t in tables:
        method, E = collection.tables[t.name], rows[t.name]
        c = counts.get(t.name, torch.ones(t.num_embeddings, dtype=torch.float64))
        if isinstance(method, MPETable):
            method.weight.copy_(E[method.id_lo:method.id_hi].to(method.weight.dtype))
            mean_abs = float(E.abs().mean())  # the public code's step init, on these rows
            for i, b in enumerate(method.bits):
                method.alpha[i] = 2 * mean_abs / (2.0 ** (b - 1)) ** 0.5
            continue
        if isinstance(method, CCETable):
            _warm_start_cce(collection, method, E, counts.get(t.name), kmeans_iters, id_batch)
            continue
        fitted = {"": E} if isinstance(method, FullTable) else _fit_codebooks(method, E, c,
                                                                              als_iters)
        for suffix, value in fitted.items():
            weight = collection.codebooks.embedding_bags[
                codebook_table_name(t.name, suffix)].weight
            weight.copy_(value.to(weight.dtype))
    return collection


__all__ = ["compress_trained", "trained_rows"]
