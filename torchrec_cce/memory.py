"""Exact memory accounting of compressed tables, counted from the real tensors (per collection;
:func:`torchrec_cce.api.memory_report` walks a model)."""

from typing import Dict, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, data_type_to_dtype

from torchrec_cce.methods import CompressedTable, codebook_table_name
from torchrec_cce.methods.mpe.export import serving_bytes


def _dtype_bytes(data_type: DataType) -> int:
    """Bytes per element of a TorchRec ``DataType`` (FP32 4, FP16/BF16 2, INT8 1, ...)."""
    return torch.empty((), dtype=data_type_to_dtype(data_type)).element_size()


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds: ``numel * element_size``, or for TorchRec's packed INT4/INT2 views
    (``UInt4Tensor``/``UInt2Tensor``, whose shape counts unpacked elements) its packed bytes."""
    from torchrec.tensor_types import UIntXTensor

    if isinstance(t, UIntXTensor):
        return t.elem.numel() * t.elem.element_size()
    return t.numel() * t.element_size()


def _codebook_bytes(collection: nn.Module, table: str) -> int:
    """Bytes of one codebook table as stored: its weight at its dtype, or, once quantised for
    serving (:func:`torchrec_cce.serving.quantize_codebooks`), its fbgemm rows (codes plus
    scale/bias, whether kept in the weight or split into ``weight_qscale``/``weight_qbias``)."""
    prefix = f"embedding_bags.{table}."
    return sum(stored_bytes(t) for k, t in collection.codebooks.state_dict().items()
               if k.startswith(prefix))


def _add_training_and_serving(collection: nn.Module,
                              report: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """``training_bytes`` (what training stores) and ``serving_bytes`` (what serving stores)
    for every table. They differ only for MPE, which trains fp32 master weights (plus logits,
    steps, offsets, buffers, and a per-id group index when ids are not frequency-ordered; all
    ``V`` rows, wherever sharded: ``local_training_bytes`` is this rank's) and serves the
    packed table of :mod:`torchrec_cce.methods.mpe.export`; for MPE ``compressed_bytes`` and ``ratio``
    are the serving figures (its compression is for storage and serving)."""
    for name, row in report.items():
        method = collection.tables[name] if name in collection.tables else None
        row["sample_bytes"] = method.sample_bytes() if method is not None else 0
        mpe = getattr(method, "cold", method)  # a tiered table's MPE cold part: plus hot rows
        if getattr(mpe, "method_name", "") == "mpe":
            hot = row["codebook_bytes"] if mpe is not method else 0
            hot_params = row["params"] - method.extra_parameters() if mpe is not method else 0
            serving = serving_bytes(mpe) + hot
            row.update(training_bytes=mpe.logical_state_bytes() + hot, serving_bytes=serving,
                       compressed_bytes=serving, params=mpe.extra_parameters() + hot_params,
                       ratio=row["full_bytes"] / serving)
        else:
            row.setdefault("training_bytes", row["compressed_bytes"])
            row.setdefault("serving_bytes", row["compressed_bytes"])
    return report


def collection_report(collection: nn.Module,
                      sharded_report: Optional[Dict[str, Dict[str, float]]] = None
                      ) -> Dict[str, Dict[str, float]]:
    """Per-table report for one ``CCEEmbeddingBagCollection``; for a sharded one pass its
    per-table bytes (:func:`torchrec_cce.distributed.planning.sharded_memory_report`)."""
    base = _unsharded_report(collection) if sharded_report is None else sharded_report
    return _add_training_and_serving(collection, base)


def _unsharded_report(collection: nn.Module) -> Dict[str, Dict[str, float]]:
    report: Dict[str, Dict[str, float]] = {}
    for t in collection.embedding_bag_configs():
        method: CompressedTable = collection.tables[t.name]
        codebook_bytes = sum(_codebook_bytes(collection, codebook_table_name(t.name, cb.suffix))
                             for cb in method.codebooks)
        codebook_params = sum(cb.num_embeddings * cb.embedding_dim for cb in method.codebooks)
        full_bytes = t.num_embeddings * t.embedding_dim * _dtype_bytes(t.data_type)
        compressed = codebook_bytes + method.state_bytes()
        report[t.name] = {
            "method": method.method_name,
            "full_bytes": full_bytes,
            "codebook_bytes": codebook_bytes,
            "assignment_bytes": method.assignment_bytes(),
            "per_id_bytes": method.per_id_bytes(),
            "compressed_bytes": compressed,
            "full_params": t.num_embeddings * t.embedding_dim,
            "params": codebook_params + method.extra_parameters(),
            "ratio": full_bytes / compressed,
        }
    return report


def summarize(report: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Totals over a :func:`memory_report`: bytes, params and the paper's compression ratio."""
    full_params = sum(r["full_params"] for r in report.values())
    params = sum(r["params"] for r in report.values())
    full_bytes = sum(r["full_bytes"] for r in report.values())
    compressed = sum(r["compressed_bytes"] for r in report.values())
    return {
        "training_bytes": sum(r.get("training_bytes", r["compressed_bytes"])
                              for r in report.values()),
        "serving_bytes": sum(r.get("serving_bytes", r["compressed_bytes"])
                             for r in report.values()),
        "full_bytes": full_bytes,
        "compressed_bytes": compressed,
        "assignment_bytes": sum(r["assignment_bytes"] for r in report.values()),
        # held by every rank (CCE's id reservoirs), not in training_bytes
        "sample_bytes_per_rank": sum(r.get("sample_bytes", 0) for r in report.values()),
        "full_params": full_params,
        "params": params,
        "param_ratio": full_params / params if params else float("inf"),
        "byte_ratio": full_bytes / compressed if compressed else float("inf"),
    }
