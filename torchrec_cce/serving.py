"""Serving a trained ``CCEEmbeddingBagCollection`` with INT8 (or INT4) codebooks.

A collection is remap -> ``self.codebooks`` (a stock TorchRec ``EmbeddingBagCollection``) ->
compose, so its serving form swaps ``self.codebooks`` for TorchRec's quantised EBC
(``torchrec.quant.embedding_modules.EmbeddingBagCollection``: fbgemm's
``IntNBitTableBatchedEmbeddingBagsCodegen``) and keeps remap and compose unchanged
(:func:`quantize_codebooks`). It works for every codebook method (CCE, CE, QR, hashing,
MEmCom, and the full tables of the collection); MPE tables are served at their learned widths
by :mod:`torchrec_cce.mpe` (export them first). From a trained (sharded) model to a TorchScript
or ``torch.export`` file: :mod:`torchrec_cce.export`.

Row format (fbgemm, row alignment 1 as on CPU): ``dim * bits / 8`` code bytes, then an fp16
scale and an fp16 bias (4 bytes). fbgemm keeps the scale 2-byte aligned, so a codebook's code
bytes must be even: INT8 needs an even number of columns, INT4 a multiple of 4 (else a clear
error). ``memory_report`` counts exactly these rows for every
codebook, plus the table's other state at its stored size (CCE's packed assignment and hash
generation, MEmCom's fp32 per-id weights); :func:`serving_bytes` gives the same figure for a
float module before quantising it. (In memory, fbgemm pads each TBE's one weight buffer to a
cache line and keeps a few offset tensors: < 200 bytes per TBE, not counted.)

Quantisation (fbgemm's ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``): per row of minimum
``m`` and maximum ``M``, ``bias b = fp16(m)``, ``scale s = fp16((M - b) / (2^bits - 1))``, code
``clamp(round((x - b) / s), 0, 2^bits - 1)``; served value ``code * s + b``.

Error bound (:func:`row_error_bound`, tested): every served entry differs from the float one
by at most ``e_row = s / 2 + |m - b| + 2^-24``: half a step inside the grid; an entry below
``b`` (``b`` rounded up from ``m``) is served as ``b``, off by at most ``|m - b| <= 2^-11 |m|``;
an entry above the top of the grid (``s`` rounded down) is off by at most ``(2^bits - 1) * s *
2^-11 < s / 2``; ``2^-24`` covers fp32 rounding of the code arithmetic. A pooled output
element sums rows, so it is off by at most ``sum_j |w_j| * e_{row_j}`` over the rows ``j``
pooled into it (``w_j``: per-sample weights, MEmCom's per-id weight, 1 otherwise; divided by
the bag length for MEAN pooling), plus fp32 summation slack ``n * 2^-23 * sum_j |w_j x_j|``
for ``n`` rows. QR-mult composes ``Q * R`` of two pooled sums: ``|Q'R' - QR| <= eQ |R| + |Q|
eR + eQ eR``.
"""

import copy
from contextlib import contextmanager
from typing import Dict, Iterator

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType

from torchrec_cce.api import iter_collections
from torchrec_cce.distributed.tensors import local_pieces
from torchrec_cce.methods import codebook_table_name
from torchrec_cce.methods.mpe import MPETable
from torchrec_cce.modules import CCEEmbeddingBagCollection

# torch dtype of the serving format -> fbgemm/TorchRec row type
SERVING_DTYPES = {torch.int8: DataType.INT8, torch.qint8: DataType.INT8,
                  torch.quint4x2: DataType.INT4}
_BITS = {DataType.INT8: 8, DataType.INT4: 4}
QPARAM_BYTES = 4  # fbgemm's fp16 scale + fp16 bias after every INT-N row


def serving_data_type(dtype: torch.dtype) -> DataType:
    """The fbgemm row type of ``dtype`` (``torch.int8`` -> INT8, ``torch.quint4x2`` -> INT4)."""
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"serving codebook dtype must be torch.int8 or torch.quint4x2 (INT4), "
                         f"got {dtype!r}")
    return SERVING_DTYPES[dtype]


def quantized_row_bytes(dim: int, dtype: torch.dtype = torch.int8) -> int:
    """Bytes of one served row: ``dim * bits / 8`` codes + 4 bytes of fp16 scale/bias."""
    return -(-dim * _BITS[serving_data_type(dtype)] // 8) + QPARAM_BYTES


def _check_servable(module: nn.Module, dtype: torch.dtype) -> None:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection as FloatEBC

    if not isinstance(module, CCEEmbeddingBagCollection):
        raise TypeError(
            f"quantize_codebooks serves an unsharded CCEEmbeddingBagCollection, got "
            f"{type(module).__name__}; for a DistributedModelParallel model, load its DCP "
            f"checkpoint into an unsharded model first (torchrec_cce.load_unsharded), and "
            f"quantise a whole model with torchrec_cce.export.quantize_model")
    data_type = serving_data_type(dtype)
    for name, method in module.tables.items():
        if isinstance(method, MPETable):
            raise ValueError(
                f"table '{name}' is an MPE table (no codebook; it serves at its learned widths): "
                f"export it with torchrec_cce.mpe.save_mpe/load_mpe and "
                f"install_serving_tables before quantising the codebooks")
    if not isinstance(module.codebooks, FloatEBC):
        raise ValueError("the collection's codebooks are already quantised")
    configs = module.codebook_table_configs()
    if not configs:
        raise ValueError("the collection has no codebook table to quantise")
    for c in configs:
        bits = _BITS[data_type]
        if (c.embedding_dim * bits) % 16:
            fix = ("serve it with torch.int8" if bits < 8 and c.embedding_dim % 2 == 0 else
                   "no fbgemm row type fits: keep it float, or choose an embedding_dim / "
                   "chunks giving codebooks of an even number of columns")
            raise ValueError(
                f"codebook table '{c.name}' has {c.embedding_dim} columns: at {bits} bits its "
                f"rows are not a whole number of 2-byte units, which fbgemm needs to align "
                f"the fp16 scale/bias; {fix}")


def quantize_codebooks(module: nn.Module, dtype: torch.dtype = torch.int8,
                       inplace: bool = False) -> nn.Module:
    """The serving form of a trained ``CCEEmbeddingBagCollection``: every codebook table an
    fbgemm INT8 (``torch.int8``) or INT4 (``torch.quint4x2``) table of TorchRec's quantised
    EBC, remap and compose unchanged (see the module docstring for the format and the error
    bound). Returns a copy in eval mode (``inplace=True``: the module itself). Raises for a
    sharded module, MPE tables, and INT4 codebooks of an odd number of columns."""
    from torch.ao.quantization import PlaceholderObserver
    from torchrec.modules.embedding_configs import QuantConfig
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from torchrec.quant.embedding_modules import MODULE_ATTR_ROW_ALIGNMENT_INT

    _check_servable(module, dtype)
    weight_dtype = torch.qint8 if serving_data_type(dtype) == DataType.INT8 else torch.quint4x2
    out = module if inplace else copy.deepcopy(module)
    codebooks = out.codebooks
    codebooks.qconfig = QuantConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=weight_dtype))
    setattr(codebooks, MODULE_ATTR_ROW_ALIGNMENT_INT, 1)  # rows as stored, no padding
    with torch.no_grad():
        out.codebooks = QuantEBC.from_float(codebooks)
    return out.eval()


def quantize_rows(weight: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """fbgemm's rows of ``weight`` (``[rows, dim]`` float): uint8 ``[rows, bytes + 4]``."""
    bits = _BITS[serving_data_type(dtype)]
    return torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
        weight.detach().float().contiguous(), bits)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """The float values fbgemm serves for its rows (``code * scale + bias``)."""
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(
        rows, _BITS[serving_data_type(dtype)])


def row_error_bound(weight: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """``[rows]``: the most any served entry of a row differs from ``weight``'s,
    ``s / 2 + |m - b| + 2^-24`` from the row's stored fp16 scale ``s``, bias ``b`` and float
    minimum ``m`` (see the module docstring)."""
    rows = quantize_rows(weight, dtype)
    scale_bias = rows[:, -QPARAM_BYTES:].contiguous().view(torch.float16).float()
    m = weight.detach().float().min(dim=1).values
    return scale_bias[:, 0] / 2 + (m - scale_bias[:, 1]).abs() + 2.0 ** -24


def serving_bytes(module: nn.Module, dtype: torch.dtype = torch.int8) -> Dict[str, int]:
    """``{table: bytes}`` that :func:`quantize_codebooks` (``dtype``) would store for each
    table of a float ``CCEEmbeddingBagCollection``: its codebook rows as fbgemm INT-N rows plus
    its other state at its stored size; equal to ``memory_report``'s ``compressed_bytes`` of
    the quantised module."""
    _check_servable(module, dtype)
    dims = {c.name: (c.num_embeddings, c.embedding_dim) for c in module.codebook_table_configs()}
    out = {}
    for t in module.embedding_bag_configs():
        method = module.tables[t.name]
        rows = [dims[codebook_table_name(t.name, cb.suffix)] for cb in method.codebooks]
        out[t.name] = (sum(n * quantized_row_bytes(d, dtype) for n, d in rows)
                       + method.state_bytes())
    return out


@contextmanager
def served_codebooks(module: nn.Module, dtype: torch.dtype = torch.int8) -> Iterator[None]:
    """Within the block, every codebook entry of ``module`` (an unsharded or sharded
    collection, or a model containing them) holds the value its ``dtype`` serving row serves
    (quantised and dequantised by fbgemm's own ops), so evaluating the model gives the
    quantised module's outputs up to fp32 summation order; restored on exit. A sharded
    codebook must hold whole rows on each rank (table-wise, row-wise, data-parallel):
    column-wise shards raise, since serving quantises whole rows."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    serving_data_type(dtype)
    saved = []
    try:
        with torch.no_grad():
            for _, collection in iter_collections(module):
                for key, value in collection.codebooks.state_dict().items():
                    if not key.endswith(".weight"):
                        continue
                    full_cols = (value.metadata().size[1] if isinstance(value, ShardedTensor)
                                 else value.shape[1])  # global columns
                    for piece, offsets in local_pieces(value):
                        if piece.numel() == 0:
                            continue
                        if offsets[1] != 0 or piece.shape[1] != full_cols:
                            raise ValueError(
                                f"codebook {key} is split by columns on this rank; serving "
                                f"quantises whole rows: place it table-wise or data-parallel "
                                f"to evaluate its {dtype} serving form")
                        saved.append((piece, piece.detach().clone()))
                        piece.copy_(dequantize_rows(quantize_rows(piece, dtype), dtype)
                                    .to(piece.dtype))
        yield
    finally:
        with torch.no_grad():
            for piece, original in saved:
                piece.copy_(original)


__all__ = ["SERVING_DTYPES", "dequantize_rows", "quantize_codebooks", "quantize_rows",
           "quantized_row_bytes", "row_error_bound", "served_codebooks", "serving_bytes",
           "serving_data_type"]
