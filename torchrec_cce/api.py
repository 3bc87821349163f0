"""Model-level entry points: walk any model (plain, DMP-wrapped, nested) for compressed
collections, unsharded or sharded, and call each one's own code.

* :func:`recluster`: re-cluster every CCE table (collective under ``torch.distributed``);
* :func:`migrate_hot`: move the online hot tiers to their sketches' hot sets (collective);
* :func:`memory_report`: bytes of every table, counted from the stored tensors;
* :func:`mpe_tables`, :func:`mpe_penalty`, :func:`mpe_summary`: MPE's per-model views.
"""

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from torchrec_cce.clustering.kmeans import Collective, default_collective
from torchrec_cce.clustering.recluster import (
    DEFAULT_ID_BATCH,
    LLOYD_ITERS,
    check_collection_codebooks,
    recluster_collection,
)
from torchrec_cce.distributed.hot_migration import migrate_sharded
from torchrec_cce.distributed.planning import sharded_memory_report
from torchrec_cce.distributed.recluster import check_sharded_codebooks, recluster_sharded
from torchrec_cce.distributed.sharder import ShardedCCEEmbeddingBagCollection
from torchrec_cce.hot_migration import migrate_collection
from torchrec_cce.id_bias import IdBias
from torchrec_cce.memory import collection_report
from torchrec_cce.methods.mpe import MPETable
from torchrec_cce.modules import CCEEmbeddingBagCollection

COLLECTION_TYPES = (CCEEmbeddingBagCollection, ShardedCCEEmbeddingBagCollection)


def iter_collections(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(path, collection)`` for every unsharded or sharded ``CCEEmbeddingBagCollection``."""
    for name, module in model.named_modules():
        if isinstance(module, COLLECTION_TYPES):
            yield name, module


@torch.no_grad()
def recluster(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = (),
              iters: int = LLOYD_ITERS, id_batch: int = DEFAULT_ID_BATCH,
              collective: Optional[Collective] = None) -> Dict[str, Dict[str, float]]:
    """Re-cluster every CCE table in ``model`` (nested anywhere, sharded or not).

    Args:
        model: any module containing ``CCEEmbeddingBagCollection``s (or their sharded form).
        optimizers: dense optimizers whose state for the codebooks must be reset; TorchRec
            in-backward (fused) optimizers are found automatically.
        iters: Lloyd iterations per chunk.
        id_batch: ids re-assigned per batch (bounds memory: never ``V x k`` at once).
        collective: cross-rank hook; default: the process group if initialised, else local.

    Raises ``ValueError`` naming the table and chunk if any CCE codebook holds NaN/inf, before
    any state is written. A collective call under ``torch.distributed``: every rank must call
    it. Returns ``{table: stats}`` (k-means inertia at start/end, empty clusters re-seeded,
    seconds, ...).
    """
    collective = collective or default_collective()
    collections = [m for _, m in iter_collections(model)]
    # Refuse before writing anything if any CCE codebook anywhere holds NaN/inf.
    for module in collections:
        if isinstance(module, ShardedCCEEmbeddingBagCollection):
            check_sharded_codebooks(module, collective)
        else:
            check_collection_codebooks(module, collective)
    out: Dict[str, Dict[str, float]] = {}
    for module in collections:
        if isinstance(module, ShardedCCEEmbeddingBagCollection):
            out.update(recluster_sharded(module, iters=iters, id_batch=id_batch,
                                         collective=collective, optimizers=optimizers))
        else:
            out.update(recluster_collection(module, optimizers, iters, id_batch, collective))
    return out


@torch.no_grad()
def migrate_hot(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = (),
                step: Optional[int] = None, collective: Optional[Collective] = None
                ) -> Dict[str, Dict[str, int]]:
    """Migrate every online hot tier (``OnlineTieredConfig``) in ``model`` due at ``step``
    (a multiple of its ``migrate_every``; None: every one): the sketch summed over ranks, its
    top ``hot_ids`` made the hot set, each newly hot id's row set to its current cold vector
    and that row's optimizer state (in ``optimizers`` and in-backward optimizers) reset.
    Collective under ``torch.distributed``: every rank calls it at the same step. Returns
    ``{table: {"hot", "promoted", "demoted", "sketch_total", "optimizer_states_reset"}}``."""
    collective = collective or default_collective()
    out: Dict[str, Dict[str, int]] = {}
    for _, module in iter_collections(model):
        if isinstance(module, ShardedCCEEmbeddingBagCollection):
            out.update(migrate_sharded(module, optimizers, collective, step))
        else:
            out.update(migrate_collection(module, optimizers, collective, step))
    return out


def memory_report(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """``{table: {"full_bytes", "compressed_bytes", "assignment_bytes", "params", "ratio", ...}}``
    for every (sharded or unsharded) ``CCEEmbeddingBagCollection`` inside ``model``.

    * ``full_bytes``: the uncompressed table (``V * dim * element size``);
    * ``codebook_bytes``: every codebook table of the compressed table (at its dtype; fbgemm
      INT8/INT4 rows with their scale/bias once quantised for serving);
    * ``assignment_bytes``: CCE's learned ``p`` (bit-packed ``N x chunks``, ``ceil(log2(rows))``
      bits per entry, in whole int32 words), 0 otherwise;
    * ``per_id_bytes``: MEmCom's per-id weights (``4 * V``), 0 otherwise;
    * ``compressed_bytes``: every stored tensor of the table: codebooks + assignment + per-id
      weights (MEmCom) + CCE's 8-byte hash generation; it equals the sum of
      ``numel * element_size`` over the table's state-dict tensors;
    * ``params``: trainable parameters (codebook entries + per-id weights);
    * ``ratio``: ``full_bytes / compressed_bytes``;
    * ``training_bytes`` / ``serving_bytes``: bytes stored while training / when served. Equal
      to ``compressed_bytes`` except for MPE, which trains fp32 master weights and serves a
      packed table (its ``compressed_bytes`` is the serving figure);
    * ``sample_bytes``: training-only samples every rank keeps besides its share of the above
      (CCE's id reservoir: ``min(256 rows, 2^21)`` int64 slots over all ranks together, each of
      W ranks holding ``1/W`` of them once sharded); 0 for other methods.

    * ``id_bias_bytes``: the table's per-id scalars in an :class:`~torchrec_cce.id_bias.IdBias`
      of ``model`` (4 bytes each; 0 without one), included in ``compressed_bytes``,
      ``training_bytes``, ``serving_bytes``, ``params`` and ``ratio``.

    Full (uncompressed) tables appear with ratio 1. Table names must be unique across
    collections; a repeated name is reported as ``<module path>.<table>``.
    """
    out: Dict[str, Dict[str, float]] = {}
    for path, collection in iter_collections(model):
        sharded = (sharded_memory_report(collection)
                   if isinstance(collection, ShardedCCEEmbeddingBagCollection) else None)
        for table, row in collection_report(collection, sharded).items():
            out[f"{path}.{table}" if table in out else table] = row
    for row in out.values():
        row.setdefault("id_bias_bytes", 0)
    for bias in (m for m in model.modules() if isinstance(m, IdBias)):
        for table, nbytes in bias.table_bytes().items():
            if table not in out:
                raise ValueError(f"memory_report: the IdBias has table '{table}', which no "
                                 f"compressed collection of the model has")
            row = out[table]
            row["id_bias_bytes"] += nbytes
            for key in ("compressed_bytes", "training_bytes", "serving_bytes"):
                row[key] += nbytes
            row["params"] += bias.hot_ids[table]
            row["ratio"] = row["full_bytes"] / row["compressed_bytes"]
    return out


def mpe_tables(model: nn.Module) -> List[MPETable]:
    """Every ``MPETable`` inside ``model`` (unsharded collections, sharded ones, DMP/DDP)."""
    return [m for m in model.modules() if isinstance(m, MPETable)]


def mpe_penalty(model: nn.Module) -> torch.Tensor:
    """The memory penalty ``sum over MPE tables of lam * sum_g sum_b p_g(b) * b / group_weight_g``
    for the tables in the search stage (0 otherwise): add it to the training loss."""
    terms = [t.penalty() for t in mpe_tables(model)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def mpe_summary(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """Per MPE table: stage, mean selected width over ids (what selection would pick now in
    the search stage) and the fraction of pruned ids."""
    out = {}
    for t in mpe_tables(model):
        widths = t.current_selection().to(torch.float64)
        sizes = t.group_sizes().to(torch.float64)
        out[t.table_name] = {
            "stage": t.stage_name,
            "mean_bits": float((widths * sizes).sum() / sizes.sum()),
            "pruned_fraction": float(sizes[widths == 0].sum() / sizes.sum()),
        }
    return out
