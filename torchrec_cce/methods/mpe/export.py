"""Serving export of MPE tables: every row stored at its group's selected width.

Two layouts (``layout=`` of :func:`export_table` / :func:`export_mpe` / :func:`save_mpe` and
:func:`serving_bytes`):

* ``"torchrec"``: rows of width 2, 4 and 8 bits are **fbgemm INT2/INT4/INT8 rows**
  served by TorchRec's quantised ``EmbeddingBagCollection`` (``torchrec.quant``, fbgemm's
  ``IntNBitTableBatchedEmbeddingBagsCodegen``): one quantised table per width class of the
  logical table. Every other width (1, 3, 5, 6, 7, 16) stays in the packed format below.
* ``"packed"`` (the default: the smallest form, the one ``memory_report``'s ``serving_bytes``
  and the budget planner's MPE bound count): every width in the packed format.

Why both, and why 3 bits does not ride as INT4: an fbgemm row is ``ceil(dim * b / 8)`` code bytes
plus 4 bytes of fp16 scale and bias; the packed row is the code bytes alone (the step and offset
are stored once per table). At dim 16: 2-bit rows 8 B (fbgemm) vs 4 B (packed), 4-bit 12 vs 8,
8-bit 20 vs 16; a 3-bit row would be 12 B as INT4 vs 6 B packed and 5/6-bit 20 B as INT8 vs 10/12,
i.e. riding a wider fbgemm type costs up to 2x, so those widths stay packed. The fbgemm layout is
the one TorchRec's inference stack (and its GPU kernels) serves; the packed one is the smallest.

How LSQ+ maps onto fbgemm rows. LSQ+ values are ``c * alpha_b + beta`` (integer code ``c``, one
step per width, one offset per *dimension*), fbgemm's are ``u * scale + bias`` per *row*. A
per-dimension offset is not a row bias, and an fp16 ``scale = alpha`` would round the step. So
each fbgemm row stores ``u = c + 2^(b-1)`` with ``scale = 1`` and ``bias = -2^(b-1)`` (both exact
in fp16), the quantised EBC returns the exact pooled codes ``sum_j w_j c_j``, and the loader
multiplies them by ``alpha_b`` and adds ``beta * sum_j w_j`` over the bag's non-pruned ids
(pooling is linear). The outputs equal the in-training quantised outputs up to fp32 summation
order only (no fp16 rounding anywhere): ``|served - trained| <= (n + 3) * 2^-23 * sum_j |w_j| *
(|c_j alpha| + |beta|)`` for a bag of ``n`` ids (fp32 rounding of each product and partial sum),
tested in ``tests/test_mpe.py`` (observed: 0 difference on the test batches). The packed layout
dequantises rows with the training's own operations and is bit-exact.

Layout of one exported table (a dict of tensors; saved with ``torch.save`` by :func:`save_mpe`):

* ``header``: int64 ``[V, dim, groups]``;
* ``candidates``: uint8 ``[K]`` candidate widths; ``alpha``: fp32 ``[K]`` effective LSQ+ steps
  (``|alpha| + 1e-10``, the values the model used); ``beta``: fp32 ``[dim]`` offsets;
* ``bits``: uint8 ``[groups]``, each group's width (0 = pruned);
* ``rows_int<b>`` (torchrec layout, b in 2/4/8): uint8 ``[n_b, 4 + dim * b / 8]``, the ``n_b``
  rows of that width exactly as fbgemm's TBE holds them (row alignment 1, as on CPU): fp16
  scale 1.0 and bias ``-2^(b-1)``, then the unsigned codes, element 0 in the lowest bits;
* ``codes_<b>``: uint8 ``[n_b, ceil(dim * b / 8)]`` for the other widths in use: each row's
  ``dim`` codes ``c - lo`` (``lo = -2^(b-1)``) as a little-endian bit stream (code 0 in the lowest
  bits of byte 0; fbgemm's element order). Pruned groups store **zero bytes**.
* ``row_of``: int32 ``[V]`` (row of each id in the concatenation of the width classes in
  candidate order, -1 = pruned) **only** when ids are not frequency-ordered; with
  frequency-ordered ids the groups are contiguous id ranges and the loader derives every row
  from ``bits``.

``serving_bytes`` is the exact byte count of these tensors (what is stored and loaded). In memory
fbgemm's TBE pads its one weight buffer to a 64/128-byte cache line (< 128 B per quantised
table) and keeps a few offset tensors (tens of bytes); those are not counted. On GPU fbgemm
would align rows to 16 bytes, which this CPU export does not model.

The loader (:class:`MPEServingTable`) is a drop-in for an ``MPETable`` inside a
``CCEEmbeddingBagCollection`` (:func:`install_serving_tables`). Exported in the search stage,
the widths are those :meth:`~torchrec_cce.methods.mpe.MPETable.select` would pick now.
"""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_cce.methods.base import CompressedTable
from torchrec_cce.methods.mpe.quantizer import code_range, dequantize
from torchrec_cce.methods.mpe.table import MPETable

_CHUNK_ROWS = 1 << 16
LAYOUTS = ("torchrec", "packed")
DEFAULT_LAYOUT = "packed"  # the smallest form; the planner's serving bound counts it
FBGEMM_BITS = (2, 4, 8)  # widths with an fbgemm row type (INT2 / INT4 / INT8)
QPARAM_BYTES = 4  # fbgemm's fp16 scale + fp16 bias in front of every INT-N row


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"MPE serving layout must be one of {LAYOUTS}, got {layout!r}")


def served_by_fbgemm(bits: int, layout: str = DEFAULT_LAYOUT) -> bool:
    """Whether rows of this width are fbgemm INT-N rows (TorchRec's quantised EBC)."""
    _check_layout(layout)
    return layout == "torchrec" and bits in FBGEMM_BITS


def stored_row_bytes(dim: int, bits: int, layout: str = DEFAULT_LAYOUT) -> int:
    """Bytes of one stored row of this width: packed code bytes, plus fbgemm's 4 bytes of
    scale/bias for fbgemm-served widths."""
    return row_bytes(dim, bits) + (QPARAM_BYTES if served_by_fbgemm(bits, layout) else 0)


def fbgemm_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[n, dim]`` -> fbgemm INT-``bits`` rows ``[n, 4 + dim * bits / 8]`` (uint8):
    fp16 scale 1.0 and bias ``-2^(b-1)`` (exact), then the unsigned codes ``c + 2^(b-1)``."""
    lo, _ = code_range(bits)
    qparams = torch.tensor([1.0, float(lo)], dtype=torch.float16).view(torch.uint8)
    return torch.cat([qparams.expand(codes.shape[0], QPARAM_BYTES),
                      pack_codes(codes - lo, bits)], dim=1)


def row_bytes(dim: int, bits: int) -> int:
    """Bytes of one packed row: ``ceil(dim * bits / 8)``."""
    return -(-dim * bits // 8)


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[n, dim]`` (< 2^bits) -> uint8 ``[n, ceil(dim * bits / 8)]``."""
    n, dim = u.shape
    out = torch.empty(n, row_bytes(dim, bits), dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = torch.arange(8, dtype=torch.int64)
    for s in range(0, n, _CHUNK_ROWS):
        part = u[s:s + _CHUNK_ROWS].to(torch.int64).cpu()
        stream = ((part.unsqueeze(-1) >> shifts) & 1).reshape(part.shape[0], dim * bits)
        stream = F.pad(stream, (0, out.shape[1] * 8 - dim * bits))
        out[s:s + _CHUNK_ROWS] = (stream.reshape(part.shape[0], -1, 8) << weights).sum(-1).to(
            torch.uint8)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[n, row_bytes]`` -> int64 ``[n, dim]``."""
    n = packed.shape[0]
    stream = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(n, -1)[:, :dim * bits].reshape(n, dim, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


def _global_rows(bits_per_group: torch.Tensor, group_of_id: torch.Tensor,
                 candidates: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """Row of every id in the concatenated ``codes_*`` tables (-1 pruned) and each used width's
    first row, for ids visited in rank order (``group_of_id`` listed by rank)."""
    width = bits_per_group[group_of_id]
    rows = torch.full_like(group_of_id, -1)
    starts = {}
    base = 0
    for b in candidates.tolist():
        if b == 0:
            continue
        sel = width == b
        n = int(sel.sum())
        if n:
            starts[b] = base
            rows[sel] = base + torch.arange(n, device=rows.device)
            base += n
    return rows, starts


def _rank_order(table: nn.Module) -> torch.Tensor:
    """Ids listed by rank (group-major): identity for frequency-ordered ids."""
    V = table.num_embeddings
    if not hasattr(table, "group_of"):
        return torch.arange(V)
    return torch.sort(table.group_of.to(torch.int64).cpu(), stable=True).indices


@torch.no_grad()
def export_table(table: nn.Module, layout: str = DEFAULT_LAYOUT) -> Dict[str, torch.Tensor]:
    """The serving form of one ``MPETable`` in ``layout`` (see the module docstring)."""
    _check_layout(layout)
    if getattr(table, "sharded", False):
        table.codes(torch.zeros(0, dtype=torch.int64), table.bits[-1])  # raises: names the fix
    V, dim = table.num_embeddings, table.embedding_dim
    bits_per_group = table.current_selection().cpu()
    order = _rank_order(table)
    groups_by_rank = table.group_ids(order.to(table.weight.device)).cpu()
    rows_by_rank, _ = _global_rows(bits_per_group, groups_by_rank,
                                   torch.tensor(table.bits))
    alpha = (table.steps().abs() + 1e-10).detach().cpu()
    out: Dict[str, torch.Tensor] = {
        "header": torch.tensor([V, dim, table.num_groups], dtype=torch.int64),
        "candidates": torch.tensor(table.bits, dtype=torch.uint8),
        "alpha": alpha.clone(),
        "beta": table.offsets().detach().cpu().clone(),
        "bits": bits_per_group.to(torch.uint8),
    }
    width_by_rank = bits_per_group[groups_by_rank]
    for b in table.bits:
        if b == 0:
            continue
        ids = order[width_by_rank == b]  # in row order
        if ids.numel() == 0:
            continue
        lo, _ = code_range(b)
        codes = torch.cat([table.codes(ids[s:s + _CHUNK_ROWS].to(table.weight.device), b).cpu()
                           for s in range(0, ids.numel(), _CHUNK_ROWS)])
        if served_by_fbgemm(b, layout):
            out[f"rows_int{b}"] = fbgemm_rows(codes, b)
        else:
            out[f"codes_{b}"] = pack_codes(codes - lo, b)
    if hasattr(table, "group_of"):
        row_of = torch.empty(V, dtype=torch.int32)
        row_of[order] = rows_by_rank.to(torch.int32)
        out["row_of"] = row_of
    return out


def serving_bytes(table: nn.Module, layout: str = DEFAULT_LAYOUT) -> int:
    """Exact bytes of :func:`export_table`'s tensors in ``layout``, from the widths alone."""
    V, dim, K = table.num_embeddings, table.embedding_dim, len(table.bits)
    widths = table.current_selection().cpu()
    sizes = table.group_sizes().cpu()
    n = 3 * 8 + K + 4 * K + 4 * dim + table.num_groups
    for b in table.bits:
        if b > 0:
            n += int(sizes[widths == b].sum()) * stored_row_bytes(dim, b, layout)
    if hasattr(table, "group_of"):
        n += 4 * V
    return n


def packed_bytes(state: Dict[str, torch.Tensor]) -> int:
    """Bytes of an exported table as stored (sum over its tensors)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _fbgemm_data_type(bits: int):  # noqa: ANN202
    from torchrec.modules.embedding_configs import DataType

    return {8: DataType.INT8, 4: DataType.INT4, 2: DataType.INT2}[bits]


class MPEServingTable(CompressedTable):
    """An exported MPE table for serving: drop-in for an ``MPETable`` inside a
    ``CCEEmbeddingBagCollection`` (see :func:`install_serving_tables`); no trainable state.

    fbgemm-served widths (``rows_int<b>``) are looked up by one TorchRec quantised
    ``EmbeddingBagCollection`` (:attr:`quantized`, one INT-N table per width class); packed
    widths are unpacked and dequantised here."""

    method_name = "mpe_serving"
    local_lookup = True

    def __init__(self, state: Dict[str, torch.Tensor], table_name: str = "") -> None:
        nn.Module.__init__(self)  # CompressedTable's defaults, built from the export, not a config
        V, dim, groups = (int(x) for x in state["header"])
        self.table_name = table_name
        self.num_embeddings, self.embedding_dim, self.num_groups = V, dim, groups
        self.codebooks = []
        self.group_size = -(-V // groups)
        self.state = {k: v.clone() for k, v in state.items()}
        candidates = state["candidates"].to(torch.int64)
        self._alpha = {int(b): state["alpha"][i] for i, b in enumerate(candidates.tolist())}
        self.beta = state["beta"]
        bits = state["bits"].to(torch.int64)
        self.fbgemm_widths = [b for b in candidates.tolist() if f"rows_int{b}" in state]
        self.packed_widths = [b for b in candidates.tolist() if f"codes_{b}" in state]
        stored = self.fbgemm_widths + self.packed_widths
        self.widths = [b for b in candidates.tolist() if b in stored]
        if "row_of" in state:
            self.row_of = state["row_of"].to(torch.int64)
        else:
            group = torch.div(torch.arange(V), self.group_size, rounding_mode="floor")
            self.row_of, _ = _global_rows(bits, group, candidates)
        self.starts = []
        base = 0
        for b in self.widths:
            self.starts.append(base)
            base += self._stored(b).shape[0]
        self.starts_t = torch.tensor(self.starts + [base], dtype=torch.int64)
        # In a list, not registered: the quantised EBC is read-only serving state, kept out of
        # the collection's parameters and state dict (its bytes are :meth:`serving_bytes`).
        self._quantized = [self._quantized_ebc()] if self.fbgemm_widths else []

    @property
    def quantized(self) -> Optional[nn.Module]:
        """TorchRec's quantised EBC serving the fbgemm widths (None when every width is packed)."""
        return self._quantized[0] if self._quantized else None

    def _stored(self, b: int) -> torch.Tensor:
        return self.state[f"rows_int{b}" if b in self.fbgemm_widths else f"codes_{b}"]

    def _quantized_ebc(self) -> nn.Module:
        """TorchRec's quantised EBC holding the fbgemm rows (row alignment 1, fp32 output)."""
        from torchrec import EmbeddingBagConfig
        from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

        tables = [EmbeddingBagConfig(name=f"{self.table_name}__int{b}",
                                     embedding_dim=self.embedding_dim,
                                     num_embeddings=self._stored(b).shape[0],
                                     feature_names=[f"int{b}"], data_type=_fbgemm_data_type(b))
                  for b in self.fbgemm_widths]
        qebc = QuantEBC(tables, is_weighted=True, device=torch.device("cpu"),
                        output_dtype=torch.float32, row_alignment=1)
        views = [w for module in qebc._emb_modules
                 for w, _ in module.split_embedding_weights(split_scale_shifts=False)]
        for b, view in zip(self.fbgemm_widths, views):
            rows = self.state[f"rows_int{b}"]
            if tuple(view.shape) != tuple(rows.shape):
                raise ValueError(f"table '{self.table_name}': fbgemm INT{b} rows have shape "
                                 f"{tuple(view.shape)}, the export {tuple(rows.shape)}; "
                                 f"re-export with this fbgemm version")
            view.copy_(rows)
        return qebc

    def _width_of_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Index into :attr:`widths` of every global row (-1 for pruned ids)."""
        index = torch.bucketize(row, self.starts_t[1:], right=True)
        return torch.where(row >= 0, index, torch.full_like(index, -1))

    def _codes(self, b: int, local: torch.Tensor) -> torch.Tensor:
        stored = self._stored(b)[local]
        if b in self.fbgemm_widths:
            stored = stored[:, QPARAM_BYTES:]
        lo, _ = code_range(b)
        return unpack_codes(stored, b, self.embedding_dim) + lo

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows of ``ids`` (``[n, dim]``, 0 for pruned ids), decoded from the stored
        bytes of every width (fbgemm rows included) with the training's operations."""
        self._check_ids(ids)
        return self._rows(ids, self.widths, with_beta=True)

    def _rows(self, ids: torch.Tensor, widths: List[int], with_beta: bool) -> torch.Tensor:
        row = self.row_of[ids]
        which = self._width_of_rows(row)
        out = torch.zeros(ids.numel(), self.embedding_dim)
        for j, b in enumerate(self.widths):
            sel = which == j
            if b not in widths or not bool(sel.any()):
                continue
            codes = self._codes(b, row[sel] - self.starts[j]).to(torch.float32)
            out[sel] = (dequantize(codes, self._alpha[b], self.beta) if with_beta
                        else codes * self._alpha[b])
        return out

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise ValueError(
                    f"table '{self.table_name}': id {lo if lo < 0 else hi} is outside "
                    f"[0, {self.num_embeddings}); MPE tables need ids in range (map raw values "
                    f"to vocabulary ids upstream, e.g. torchrec_cce.data.preprocess)")

    def pooled_lookup(self, jt: JaggedTensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """SUM-pooled rows of every bag of ``jt`` (``[batch, dim]``)."""
        ids = jt.values().to(torch.int64)
        batch = jt.lengths().numel()
        if ids.numel() == 0:
            return torch.zeros(batch, self.embedding_dim)
        self._check_ids(ids)
        offsets = jt.offsets().to(torch.int64)
        if self.quantized is None:  # packed only: the training's exact operations
            uniq, inverse = torch.unique(ids, return_inverse=True)
            return F.embedding_bag(inverse, self.rows(uniq), offsets, mode="sum",
                                   per_sample_weights=weights, include_last_offset=True)
        w = torch.ones(ids.numel()) if weights is None else weights.to(torch.float32)
        row = self.row_of[ids]
        which = self._width_of_rows(row)
        # beta once per non-pruned id (pooling is linear), then the codes times each step
        kept = (row >= 0).to(torch.float32).unsqueeze(1)
        out = F.embedding_bag(torch.zeros_like(ids), kept.new_ones(1, 1), offsets, mode="sum",
                              per_sample_weights=w * kept.squeeze(1),
                              include_last_offset=True) * self.beta
        if self.packed_widths:
            uniq, inverse = torch.unique(ids, return_inverse=True)
            out = out + F.embedding_bag(inverse, self._rows(uniq, self.packed_widths, False),
                                        offsets, mode="sum", per_sample_weights=w,
                                        include_last_offset=True)
        bag = torch.repeat_interleave(torch.arange(batch), jt.lengths().to(torch.int64))
        values, lengths, kjt_weights = [], [], []
        for b in self.fbgemm_widths:
            j = self.widths.index(b)
            sel = which == j
            values.append(row[sel] - self.starts[j])
            lengths.append(torch.bincount(bag[sel], minlength=batch))
            kjt_weights.append(w[sel])
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        kjt = KeyedJaggedTensor(keys=[f"int{b}" for b in self.fbgemm_widths],
                                values=torch.cat(values), lengths=torch.cat(lengths),
                                weights=torch.cat(kjt_weights))
        pooled = self.quantized(kjt).to_dict()
        for b in self.fbgemm_widths:
            out = out + pooled[f"int{b}"] * self._alpha[b]
        return out

    # The CompressedTable hooks the collection's stages call.
    def observe(self, ids: torch.Tensor) -> None:
        pass

    def remap(self, ids: torch.Tensor):  # noqa: ANN201
        return []

    def id_weights(self, ids: torch.Tensor) -> None:
        return None

    def streams(self):  # noqa: ANN201
        return []

    def compose(self, pooled):  # noqa: ANN001, ANN201
        return pooled[0]

    def serving_bytes(self) -> int:
        return packed_bytes(self.state)

    def state_bytes(self) -> int:
        return packed_bytes(self.state)

    def assignment_bytes(self) -> int:
        return 0

    def extra_parameters(self) -> int:
        return 0


def _mpe_tables(model: nn.Module) -> Dict[str, nn.Module]:

    out = {}
    for m in model.modules():
        if isinstance(m, MPETable):
            if m.table_name in out:
                raise ValueError(f"two MPE tables named '{m.table_name}' in the model; export "
                                 f"each collection separately")
            out[m.table_name] = m
    return out


def export_mpe(model: nn.Module,
               layout: str = DEFAULT_LAYOUT) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{table name: exported state}`` for every MPE table in ``model`` (unsharded: under DMP
    the master weights are split by id range, so load the DCP checkpoint into an unsharded
    ``CCEEmbeddingBagCollection`` first; a sharded table raises saying so)."""
    return {name: export_table(t, layout) for name, t in _mpe_tables(model).items()}


def save_mpe(model: nn.Module, path: str, layout: str = DEFAULT_LAYOUT) -> Dict[str, int]:
    """Write :func:`export_mpe` to ``path`` (``torch.save``); returns bytes per table."""
    packed = export_mpe(model, layout)
    torch.save(packed, path)
    return {name: packed_bytes(state) for name, state in packed.items()}


def load_mpe(path: str) -> Dict[str, MPEServingTable]:
    """Load :func:`save_mpe`'s file as ``{table name: MPEServingTable}``."""
    packed = torch.load(path, weights_only=True)
    return {name: MPEServingTable(state, name) for name, state in packed.items()}


def install_serving_tables(collection: nn.Module, tables: Dict[str, MPEServingTable]) -> None:
    """Replace the MPE tables of an (unsharded) ``CCEEmbeddingBagCollection`` by packed ones."""
    for name, serving in tables.items():
        if name not in collection.tables:
            raise KeyError(f"no table '{name}' in the collection; its tables are "
                           f"{list(collection.tables)}")
        collection.tables[name] = serving
