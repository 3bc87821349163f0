"""Migration of the online hot tiers (:class:`~torchrec_cce.methods.online_tiered.OnlineTieredTable`)
of an unsharded ``CCEEmbeddingBagCollection``: new hot set from each table's sketch, newly hot
rows written from their cold vectors, their optimizer state reset. The sharded form is
:mod:`torchrec_cce.distributed.hot_migration`; :func:`torchrec_cce.api.migrate_hot` walks a
model and the training hooks call it every ``migrate_every`` steps."""

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from torchrec_cce.methods import OnlineTieredTable, codebook_table_name
from torchrec_cce.optim import reset_optimizer_rows


def online_tables(collection: nn.Module, step: Optional[int] = None
                  ) -> Dict[str, OnlineTieredTable]:
    """``{table: method}`` of the online tiered tables of ``collection`` due at ``step``
    (``step`` a multiple of the table's ``migrate_every``; None: all)."""
    return {name: m for name, m in collection.tables.items()
            if isinstance(m, OnlineTieredTable)
            and (step is None or step % m.migrate_every == 0)}


@torch.no_grad()
def sync_sketches(model: nn.Module, collective: Any = None) -> int:
    """Sum every online tier's pending sketch counts over ranks into its counts (collective;
    None: this process only), so that every rank's sketch state is the same: a checkpoint then
    saves (and a resume on any world size loads) the counts of all ranks' batches. The hot set
    is recomputed only at a migration, from counts + pending, so an earlier sum changes
    nothing. Returns the number of sketches synced."""
    sketches = [m.sketch for m in model.modules() if isinstance(m, OnlineTieredTable)]
    for sketch in sketches:
        sketch.sync(collective)
    return len(sketches)


@torch.no_grad()
def migrate_collection(collection: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = (),
                       collective: Any = None, step: Optional[int] = None
                       ) -> Dict[str, Dict[str, int]]:
    """Migrate the online tiers of an unsharded collection due at ``step`` (None: all);
    ``{table: stats}`` (hot, promoted, demoted, sketch_total, optimizer_states_reset).
    Collective (``collective.all_reduce_sum`` of the sketches; None: this process only)."""
    out: Dict[str, Dict[str, int]] = {}
    for name, method in online_tables(collection, step).items():
        weights = {cb.suffix: collection.codebooks.embedding_bags[
            codebook_table_name(name, cb.suffix)].weight for cb in method.codebooks}
        promoted, slots, stats = method.migrate_map(collective)
        hot = weights["hot"]
        if promoted.numel():
            hot[slots] = method.cold_vectors(promoted, weights.__getitem__).to(hot.dtype)
        stats["optimizer_states_reset"] = reset_optimizer_rows(hot, slots, optimizers)
        out[name] = stats
    return out
