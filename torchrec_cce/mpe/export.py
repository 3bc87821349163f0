"""Serving export of MPE tables: every row stored at its group's selected width, packed.

Layout of one exported table (a dict of tensors, :func:`export_table`; saved with
``torch.save`` by :func:`save_mpe`):

* ``header``: int64 ``[V, dim, groups]``;
* ``candidates``: uint8 ``[K]`` candidate widths; ``alpha``: fp32 ``[K]`` effective LSQ+ steps
  (``|alpha| + 1e-10``, the values the model used); ``beta``: fp32 ``[dim]`` offsets;
* ``bits``: uint8 ``[groups]``, each group's width (0 = pruned);
* ``codes_<b>``: uint8 ``[n_b, ceil(dim * b / 8)]`` for every width ``b > 0`` in use: the
  ``n_b`` rows of that width, each row's ``dim`` codes ``c - lo`` (``lo = -2^(b-1)``) as a
  little-endian bit stream (code 0 in the lowest bits of byte 0). For b = 8/4/2 this is
  fbgemm's INT8/INT4/INT2 element packing; for 1, 3, 5, 6, 7 and 16 the same stream. Pruned
  groups store **zero bytes**.
* ``row_of``: int32 ``[V]`` (row of each id in the concatenation of the ``codes_*`` tables,
  -1 = pruned) **only** when ids are not frequency-ordered; with frequency-ordered ids the
  groups are contiguous id ranges and the loader derives every row from ``bits``.

Why not TorchRec's quantised EBC rows? fbgemm's INT8/INT4/INT2 rows carry a per-*row* scale and
bias (fp16 for INT4/INT2), while LSQ+ uses one step per width and a per-*dimension* offset: the
offset cannot be expressed as a row bias, and an fp16 scale would change the values. So the
codes are packed the same way but the step and offset are stored once per table, which is
also smaller (no 4-8 bytes of scale/bias per row).

The loader (:class:`MPEServingTable`) unpacks the batch's unique rows, dequantises them with the
same operations as training (``codes * alpha + beta``) and pools with ``F.embedding_bag``, so its
outputs equal the retrain-stage model's outputs exactly. Exported in the search stage, the
widths are those :meth:`~torchrec_cce.methods.mpe.MPETable.select` would pick now.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_cce.mpe.quantizer import code_range, dequantize

_CHUNK_ROWS = 1 << 16


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
def export_table(table: nn.Module) -> Dict[str, torch.Tensor]:
    """The packed serving form of one ``MPETable`` (see the module docstring)."""
    V, dim = table.num_embeddings, table.embedding_dim
    bits_per_group = table.current_selection().cpu()
    order = _rank_order(table)
    groups_by_rank = table.group_ids(order.to(table.weight.device)).cpu()
    rows_by_rank, _ = _global_rows(bits_per_group, groups_by_rank,
                                   torch.tensor(table.bits))
    alpha = (table.alpha.abs() + 1e-10).detach().cpu()
    out: Dict[str, torch.Tensor] = {
        "header": torch.tensor([V, dim, table.num_groups], dtype=torch.int64),
        "candidates": torch.tensor(table.bits, dtype=torch.uint8),
        "alpha": alpha.clone(),
        "beta": table.beta.detach().cpu().clone(),
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
        out[f"codes_{b}"] = pack_codes(codes - lo, b)
    if hasattr(table, "group_of"):
        row_of = torch.empty(V, dtype=torch.int32)
        row_of[order] = rows_by_rank.to(torch.int32)
        out["row_of"] = row_of
    return out


def serving_bytes(table: nn.Module) -> int:
    """Exact bytes of :func:`export_table`'s tensors, computed from the widths alone."""
    V, dim, K = table.num_embeddings, table.embedding_dim, len(table.bits)
    widths = table.current_selection().cpu()
    sizes = table.group_sizes().cpu()
    n = 3 * 8 + K + 4 * K + 4 * dim + table.num_groups
    for b in table.bits:
        if b > 0:
            n += int(sizes[widths == b].sum()) * row_bytes(dim, b)
    if hasattr(table, "group_of"):
        n += 4 * V
    return n


def packed_bytes(state: Dict[str, torch.Tensor]) -> int:
    """Bytes of an exported table as stored (sum over its tensors)."""
    return sum(t.numel() * t.element_size() for t in state.values())


class MPEServingTable(nn.Module):
    """A packed MPE table for serving: drop-in for an ``MPETable`` inside a
    ``CCEEmbeddingBagCollection`` (see :func:`install_serving_tables`); no trainable state."""

    method_name = "mpe_serving"
    local_lookup = True

    def __init__(self, state: Dict[str, torch.Tensor], table_name: str = "") -> None:
        super().__init__()
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
        self.widths = [b for b in candidates.tolist() if b > 0 and f"codes_{b}" in state]
        if "row_of" in state:
            self.row_of = state["row_of"].to(torch.int64)
        else:
            group = torch.div(torch.arange(V), self.group_size, rounding_mode="floor")
            self.row_of, _ = _global_rows(bits, group, candidates)
        self.starts = []
        base = 0
        for b in self.widths:
            self.starts.append(base)
            base += state[f"codes_{b}"].shape[0]
        self.starts_t = torch.tensor(self.starts + [base], dtype=torch.int64)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows of ``ids`` (``[n, dim]``, 0 for pruned ids)."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"table '{self.table_name}': ids must be in [0, "
                             f"{self.num_embeddings})")
        row = self.row_of[ids]
        out = torch.zeros(ids.numel(), self.embedding_dim)
        for j, b in enumerate(self.widths):
            sel = (row >= self.starts_t[j]) & (row < self.starts_t[j + 1])
            if not bool(sel.any()):
                continue
            codes = unpack_codes(self.state[f"codes_{b}"][row[sel] - self.starts[j]], b,
                                 self.embedding_dim)
            lo, _ = code_range(b)
            out[sel] = dequantize((codes + lo).to(torch.float32), self._alpha[b], self.beta)
        return out

    def pooled_lookup(self, jt: JaggedTensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        ids = jt.values()
        if ids.numel() == 0:
            return torch.zeros(jt.lengths().numel(), self.embedding_dim)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return F.embedding_bag(inverse, self.rows(uniq), jt.offsets(), mode="sum",
                               per_sample_weights=weights, include_last_offset=True)

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
    from torchrec_cce.methods.mpe import MPETable

    out = {}
    for m in model.modules():
        if isinstance(m, MPETable):
            if m.table_name in out:
                raise ValueError(f"two MPE tables named '{m.table_name}' in the model; export "
                                 f"each collection separately")
            out[m.table_name] = m
    return out


def export_mpe(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{table name: packed state}`` for every MPE table in ``model`` (unsharded or DMP:
    MPE tables are replicated, so every rank exports the same)."""
    return {name: export_table(t) for name, t in _mpe_tables(model).items()}


def save_mpe(model: nn.Module, path: str) -> Dict[str, int]:
    """Write :func:`export_mpe` to ``path`` (``torch.save``); returns bytes per table."""
    packed = export_mpe(model)
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
