"""Migration of the online hot tiers of a sharded collection (see
:mod:`torchrec_cce.hot_migration` for the unsharded one).

Every rank holds the table's sketch and hot map whole: the sketch's pending counts are summed
over ranks, so every rank computes the same new hot set and the same promoted ids and slots.
The cold codebooks are small by design: each rank assembles them in full (local shards placed
at their offsets, then an all-reduce), as re-clustering does; a CCE cold part's ``p`` and a
MEmCom cold part's per-id weights of the promoted ids come from the ranks owning them. Each rank
computes the promoted ids' cold vectors, writes the hot rows it stores, and zeroes those rows'
fused optimizer state. Batches remapped before (a pipeline's prefetched one) are remapped again.
"""

from typing import Any, Dict, Optional, Sequence

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from torchrec_cce.clustering.kmeans import Collective, default_collective
from torchrec_cce.distributed.assignment import lookup_sharded_assignments
from torchrec_cce.distributed.per_id_weights import fetch_per_id_weights
from torchrec_cce.distributed.tensors import gather_full, local_pieces
from torchrec_cce.hot_migration import online_tables
from torchrec_cce.methods import CCETable, MEmComTable, codebook_table_name
from torchrec_cce.optim import reset_optimizer_rows


def _write_rows(value: Any, rows: torch.Tensor, new: torch.Tensor) -> None:
    """Write rows ``rows`` (global row ids) of a state-dict value from ``new`` ``[n, dim]``,
    in the pieces this rank stores (row- or column-sharded, or replicated)."""
    for tensor, offsets in local_pieces(value):
        r0, c0 = offsets[0], offsets[1] if len(offsets) > 1 else 0
        mine = (rows >= r0) & (rows < r0 + tensor.shape[0])
        if mine.any():
            block = new[mine]
            if tensor.dim() > 1:
                block = block[:, c0: c0 + tensor.shape[1]]
            tensor[rows[mine] - r0] = block.to(tensor.dtype)


def _reset_fused_rows(sharded: Any, table: str, rows: torch.Tensor) -> int:
    """Zero rows ``rows`` of the fused optimizer state (e.g. row-wise Adagrad sums) of codebook
    table ``table``; returns the number of state tensors touched."""
    n = 0
    for key, state in sharded.codebooks.fused_optimizer.state_dict()["state"].items():
        if not (str(key).startswith(f"embedding_bags.{table}.") or str(key) == table):
            continue
        for value in state.values():
            if isinstance(value, (ShardedTensor, DTensor)) or (
                    torch.is_tensor(value) and value.dim() > 0):
                for tensor, offsets in local_pieces(value):
                    mine = rows[(rows >= offsets[0]) & (rows < offsets[0] + tensor.shape[0])]
                    tensor[mine - offsets[0]] = 0
                n += 1
    return n


@torch.no_grad()
def migrate_sharded(sharded: Any, optimizers: Sequence[torch.optim.Optimizer] = (),
                    collective: Optional[Collective] = None, step: Optional[int] = None
                    ) -> Dict[str, Dict[str, int]]:
    """Migrate the online tiers of a ``ShardedCCEEmbeddingBagCollection`` due at ``step``
    (None: all); ``{table: stats}`` as :func:`torchrec_cce.hot_migration.migrate_collection`.
    Collective: every rank calls it at the same step."""
    collective = collective or default_collective()
    out: Dict[str, Dict[str, int]] = {}
    tables = online_tables(sharded, step)
    if not tables:
        return out
    state = sharded.codebooks.state_dict()
    for name, method in tables.items():
        promoted, slots, stats = method.migrate_map(collective)
        values = {cb.suffix: state[f"embedding_bags.{codebook_table_name(name, cb.suffix)}"
                                   f".weight"] for cb in method.codebooks}
        cold = {cb.suffix: gather_full(values[cb.suffix], (cb.num_embeddings, cb.embedding_dim),
                                       collective) for cb in method.cold.codebooks}
        rng = sharded.id_range(name)
        assignment = id_weights = None
        if rng is not None and isinstance(method.cold, CCETable):
            assignment = lookup_sharded_assignments([(method.cold, promoted, rng)],
                                                    sharded._pg)[0]
        if isinstance(method.cold, MEmComTable) and rng is not None:
            fetched, _ = fetch_per_id_weights([(promoted, rng, method.cold.id_weight)],
                                              sharded._pg, sparse_grad=[False])
            id_weights = fetched[0].reshape(-1)
        if isinstance(method.cold, MEmComTable) and method.cold.sharded:
            # A sharded MEmCom part remaps to raw ids (hashed where looked up): hash here.
            vectors = method.cold_vectors(promoted, cold.__getitem__, id_weights=id_weights,
                                          streams=[method.cold.bucket(promoted)])
        else:
            vectors = method.cold_vectors(promoted, cold.__getitem__, assignment, id_weights)
        _write_rows(values["hot"], slots, vectors)
        hot_name = codebook_table_name(name, "hot")
        n = _reset_fused_rows(sharded, hot_name, slots)
        for pname, p in sharded.codebooks.named_parameters():  # data parallel: dense optimizers
            if f".{hot_name}." in f".{pname}.":
                n += reset_optimizer_rows(p, slots, optimizers)
        stats["optimizer_states_reset"] = n
        out[name] = stats
    sharded.remap_changed()  # the same tables on every rank: earlier remaps are redone
    return out
