"""Distributed re-clustering of a sharded CCE collection.

Every rank contributes the ids *it* saw (its reservoir); k-means sums/counts and the residual
sums are all-reduced (:func:`~torchrec_cce.clustering.recluster.recluster_table`). The codebooks
``A``/``B`` of a table are small by design, so each rank assembles them in full (local shards
placed at their offsets, then an all-reduce), computes the new ones identically, and writes
back only the shards it stores. Each rank re-assigns the ids of its shard of ``p`` (or, for a
replicated ``p``, a slice of it, then all ranks gather). The hash generation advances by one on
every rank. Fused (TBE) optimizer state of the rewritten tables is zeroed.
"""

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from torchrec_cce.distributed.assignment import lookup_sharded_assignments
from torchrec_cce.distributed.tensors import gather_full, local_pieces, scatter_full
from torchrec_cce.clustering.kmeans import Collective, default_collective
from torchrec_cce.clustering.recluster import (
    DEFAULT_ID_BATCH,
    LLOYD_ITERS,
    ReclusterState,
    check_finite_codebooks,
    recluster_table,
)
from torchrec_cce.methods import CCETable, codebook_table_name
from torchrec_cce.optim import reset_optimizer_state


def _reset_fused_state(sharded: Any, table_names: List[str]) -> int:
    """Zero the fused optimizer state (e.g. row-wise Adagrad sums) of the given codebook tables."""
    n = 0
    opt = sharded.codebooks.fused_optimizer
    for key, state in opt.state_dict()["state"].items():
        if not any(str(key).startswith(f"embedding_bags.{t}.") or str(key) == t
                   for t in table_names):
            continue
        for value in state.values():
            if isinstance(value, (ShardedTensor, DTensor)):
                for tensor, _ in local_pieces(value):
                    tensor.zero_()
                    n += 1
            elif torch.is_tensor(value) and value.dim() > 0:
                value.zero_()
                n += 1
    return n


def _sharded_states(sharded: Any, collective: Collective
                    ) -> Iterator[Tuple[str, List[str], List[Any], ReclusterState]]:
    """``(table, codebook names, their state_dict values, ReclusterState)`` per CCE table, with
    ``A``/``B`` gathered in full on every rank (collective)."""
    state = sharded.codebooks.state_dict()
    for t in sharded.embedding_bag_configs():
        method = sharded.tables[t.name]
        method = getattr(method, "cold", method)  # a tiered table's cold CCE (TieredTable)
        if not isinstance(method, CCETable):
            continue
        suffixes = [cb.suffix for cb in method.codebooks]
        names = [codebook_table_name(t.name, x) for x in suffixes]
        values = {x: state[f"embedding_bags.{n}.weight"] for x, n in zip(suffixes, names)}
        full = {x: gather_full(values[x], (cb.num_embeddings, cb.embedding_dim), collective)
                for x, cb in zip(suffixes, method.codebooks)}
        A, B = method.stack_ab(full.__getitem__)
        rng = sharded.id_range(t.name)
        if rng is not None:
            shard = sharded.assignment_shard(t.name)
            rstate = ReclusterState(
                method, A, B, shard, rng.lo, (rng.lo, rng.hi),
                sample_lookup=lambda ids, m=method, r=rng: lookup_sharded_assignments(
                    [(m, ids, r)], sharded._pg)[0])
        else:
            V, w, r = method.assigned_ids, collective.world_size, collective.rank
            per = -(-V // w)
            rstate = ReclusterState(method, A, B, method.assignment, 0,
                                    (min(V, r * per), min(V, (r + 1) * per)),
                                    gather_assignment=w > 1)
        yield t.name, names, values, rstate


@torch.no_grad()
def check_sharded_codebooks(sharded: Any, collective: Optional[Collective] = None) -> None:
    """Raise (on every rank) if any CCE codebook holds NaN/inf; see
    :func:`~torchrec_cce.clustering.recluster.check_finite_codebooks`."""
    collective = collective or default_collective()
    for _, _, _, rstate in _sharded_states(sharded, collective):
        check_finite_codebooks(rstate)


@torch.no_grad()
def recluster_sharded(sharded: Any, iters: int = LLOYD_ITERS, id_batch: int = DEFAULT_ID_BATCH,
                      collective: Optional[Collective] = None,
                      optimizers: Any = ()) -> Dict[str, Dict[str, float]]:
    """Re-cluster every CCE table of a ``ShardedCCEEmbeddingBagCollection`` (collective).

    Every table's codebooks are checked for NaN/inf first, so a refusal leaves all of them
    untouched."""
    collective = collective or default_collective()
    check_sharded_codebooks(sharded, collective)
    out: Dict[str, Dict[str, float]] = {}
    for name, names, values, rstate in _sharded_states(sharded, collective):
        new_a, new_b, stats = recluster_table(rstate, collective, iters, id_batch)
        for suffix, new in rstate.method.unstack_ab(new_a, new_b).items():
            scatter_full(values[suffix], new)
        n = _reset_fused_state(sharded, names)
        dense = [p for pname, p in sharded.codebooks.named_parameters()
                 if any(f".{x}." in f".{pname}." for x in names)]
        n += reset_optimizer_state(dense, optimizers)
        stats["optimizer_states_reset"] = n
        out[name] = stats
    if out:  # the same tables on every rank: batches remapped before are redone
        sharded.remap_changed()
    return out
