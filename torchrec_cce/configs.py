"""Compression configs: one small dataclass per method, with validation and parameter accounting.

A config says *how* one logical table (a ``torchrec.EmbeddingBagConfig``) is compressed. It
never holds weights: :class:`~torchrec_cce.modules.CCEEmbeddingBagCollection` builds the codebook
tables and the per-method remap/compose stages from it.

Parameter counts follow the papers: codebook rows x columns, plus per-id trainable weights
(MEmCom). The CCE assignment ``p`` is integer state, not a parameter; it is counted in bytes by
:func:`torchrec_cce.memory.memory_report`.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Union

from torchrec import EmbeddingBagConfig


def _require_positive(table: EmbeddingBagConfig, what: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"table '{table.name}': {what} must be a positive int, got {value!r}; "
            f"pass e.g. {what}=1024"
        )


def _require_divisible(table: EmbeddingBagConfig, chunks: int) -> None:
    _require_positive(table, "chunks", chunks)
    if table.embedding_dim % chunks != 0:
        divisors = [c for c in range(1, table.embedding_dim + 1) if table.embedding_dim % c == 0]
        raise ValueError(
            f"table '{table.name}': embedding_dim={table.embedding_dim} is not divisible by "
            f"chunks={chunks}; choose chunks in {divisors}"
        )


@dataclass(frozen=True)
class CCEConfig:
    """Clustered Compositional Embeddings (Tsang & Ahle, NeurIPS 2023).

    ``e(x) = concat_i(A_i[p_i(x)] + B_i[h_i(x)])`` over ``chunks`` chunks; ``A_i``, ``B_i`` have
    ``rows`` rows of ``dim / chunks`` columns. ``p`` starts as a hash and is replaced by k-means
    assignments by :func:`torchrec_cce.recluster`. Parameters: ``2 * rows * dim``.

    ``p`` is stored bit-packed, ``ceil(log2(rows))`` bits per chunk entry. ``assigned_ids``
    bounds it to the ids ``[0, assigned_ids)`` (with frequency-ordered vocabularies: the most
    frequent ones); the other ids keep the hashed ``p`` forever. ``None``: every id. Values above
    the table size mean every id.
    """

    rows: int
    chunks: int = 4
    seed: int = 0
    assigned_ids: Optional[int] = None

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "rows", self.rows)
        _require_divisible(table, self.chunks)
        if self.rows > 1 << 31:
            raise ValueError(f"table '{table.name}': CCE rows must be <= 2**31, got {self.rows}")
        if self.assigned_ids is not None and (
                not isinstance(self.assigned_ids, int) or self.assigned_ids < 0):
            raise ValueError(
                f"table '{table.name}': CCEConfig.assigned_ids must be None (every id) or an "
                f"int >= 0, got {self.assigned_ids!r}"
            )

    def num_assigned(self, table: EmbeddingBagConfig) -> int:
        """How many ids (the prefix ``[0, N)``) have a stored, learned ``p``."""
        if self.assigned_ids is None:
            return table.num_embeddings
        return min(self.assigned_ids, table.num_embeddings)

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return 2 * self.rows * table.embedding_dim


@dataclass(frozen=True)
class CEConfig:
    """Compositional embedding with concatenation: ``e(x) = concat_i(C_i[h_i(x)])``.

    One hashed codebook of ``rows`` rows and ``dim / chunks`` columns per chunk (the CCE
    paper's "CE concat" baseline). Parameters: ``rows * dim``.
    """

    rows: int
    chunks: int = 4
    seed: int = 0

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "rows", self.rows)
        _require_divisible(table, self.chunks)

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.rows * table.embedding_dim


@dataclass(frozen=True)
class HashingTrickConfig:
    """The hashing trick: ``e(x) = H[h(x)]`` with ``rows`` rows. Parameters: ``rows * dim``."""

    rows: int
    seed: int = 0

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "rows", self.rows)

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.rows * table.embedding_dim


QROperation = Literal["mult", "add", "concat"]


@dataclass(frozen=True)
class QRConfig:
    """Quotient-remainder compositional embedding (Shi et al., KDD 2020).

    Remainder table ``R`` has ``collisions`` rows (``x mod m``), quotient table ``Q`` has
    ``ceil(V / m)`` rows (``x // m``). ``operation``:

    * ``"mult"``: ``Q[q] * R[r]`` elementwise. This is not linear, so under pooling the module
      returns ``(sum Q[q]) * (sum R[r])`` (mean for MEAN pooling), exactly as the DLRM reference
      implementation pools each table before combining. For single-id bags it is exact.
    * ``"add"``: ``Q[q] + R[r]`` (pooling commutes).
    * ``"concat"``: ``[Q[q], R[r]]`` with ``dim // 2`` and ``dim - dim // 2`` columns.

    Ids outside ``[0, V)`` are first reduced ``mod V``.
    """

    collisions: int
    operation: QROperation = "mult"

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "collisions", self.collisions)
        if self.operation not in ("mult", "add", "concat"):
            raise ValueError(
                f"table '{table.name}': QRConfig.operation must be 'mult', 'add' or 'concat', "
                f"got {self.operation!r}"
            )
        if self.operation == "concat" and table.embedding_dim < 2:
            raise ValueError(
                f"table '{table.name}': QR 'concat' needs embedding_dim >= 2; use 'mult' or 'add'"
            )

    def quotient_rows(self, table: EmbeddingBagConfig) -> int:
        return math.ceil(table.num_embeddings / self.collisions)

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        q_rows, r_rows = self.quotient_rows(table), self.collisions
        if self.operation == "concat":
            half = table.embedding_dim // 2
            return q_rows * half + r_rows * (table.embedding_dim - half)
        return (q_rows + r_rows) * table.embedding_dim


@dataclass(frozen=True)
class MEmComConfig:
    """MEmCom (Pansare et al., MLSys 2022): ``e(x) = w[x] * H[h(x)]``.

    ``H`` is a hashed table of ``rows`` rows shared by colliding ids; ``w`` holds one trainable
    scalar per id (initialised to 1) that lets the model tell colliding ids apart. The paper
    describes exactly these two tables ("one trainable weight per entity"), so no per-id bias
    is added. Ids outside ``[0, V)`` use ``w[x mod V]``. Parameters: ``rows * dim + V``.
    """

    rows: int
    seed: int = 0

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "rows", self.rows)

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.rows * table.embedding_dim + table.num_embeddings


CompressionConfig = Union[CCEConfig, CEConfig, HashingTrickConfig, QRConfig, MEmComConfig]
CONFIG_TYPES = (CCEConfig, CEConfig, HashingTrickConfig, QRConfig, MEmComConfig)

METHOD_NAMES = ("full", "hashing", "ce", "qr", "cce", "memcom")


def _qr_collisions_for_budget(table: EmbeddingBagConfig, budget_rows: int) -> int:
    """Smallest m with ceil(V/m) + m <= budget_rows (the largest quotient table)."""
    num_embeddings = table.num_embeddings
    disc = budget_rows * budget_rows - 4 * num_embeddings
    if disc < 0:
        need = 2 * math.isqrt(num_embeddings) * table.embedding_dim
        raise ValueError(
            f"table '{table.name}': QR needs at least ~2*sqrt(V)*dim = {need} parameters "
            f"(V={num_embeddings}); raise max_params_per_table or use another method"
        )
    m = max(1, math.ceil((budget_rows - math.sqrt(disc)) / 2))
    while math.ceil(num_embeddings / m) + m > budget_rows and m < num_embeddings:
        m += 1
    return m


def compression_for_budget(
    tables: List[EmbeddingBagConfig],
    method: str,
    max_params_per_table: int,
    chunks: int = 4,
    seed: int = 0,
    qr_operation: QROperation = "mult",
) -> Dict[str, CompressionConfig]:
    """The paper's protocol: every table with ``num_embeddings * dim > max_params_per_table``
    is compressed with ``method`` to at most that many parameters; smaller tables stay full.

    ``method`` is one of :data:`METHOD_NAMES`. CCE gets ``rows = P // (2 * dim)`` (two
    codebooks), CE and hashing ``P // dim``, QR the collision count that fits both tables in
    the budget, MEmCom ``(P - V) // dim`` rows (its per-id weights count against the budget).
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose one of {METHOD_NAMES}")
    if max_params_per_table <= 0:
        raise ValueError(f"max_params_per_table must be positive, got {max_params_per_table}")
    out: Dict[str, CompressionConfig] = {}
    if method == "full":
        return out
    for t in tables:
        if t.num_embeddings * t.embedding_dim <= max_params_per_table:
            continue
        budget_rows = max_params_per_table // t.embedding_dim
        if method == "cce":
            out[t.name] = CCEConfig(rows=max(1, budget_rows // 2), chunks=chunks, seed=seed)
        elif method == "ce":
            out[t.name] = CEConfig(rows=max(1, budget_rows), chunks=chunks, seed=seed)
        elif method == "hashing":
            out[t.name] = HashingTrickConfig(rows=max(1, budget_rows), seed=seed)
        elif method == "qr":
            m = _qr_collisions_for_budget(t, budget_rows)
            out[t.name] = QRConfig(collisions=m, operation=qr_operation)
        elif method == "memcom":
            rows = (max_params_per_table - t.num_embeddings) // t.embedding_dim
            if rows <= 0:
                raise ValueError(
                    f"table '{t.name}': MEmCom needs one weight per id ({t.num_embeddings}), "
                    f"more than max_params_per_table={max_params_per_table}; raise the budget"
                )
            out[t.name] = MEmComConfig(rows=rows, seed=seed)
    return out


def total_compression(
    tables: List[EmbeddingBagConfig], compression: Optional[Dict[str, CompressionConfig]]
) -> float:
    """Total full parameters / total compressed parameters (the paper's compression ratio)."""
    compression = compression or {}
    full = sum(t.num_embeddings * t.embedding_dim for t in tables)
    compressed = sum(
        compression[t.name].num_parameters(t) if t.name in compression
        else t.num_embeddings * t.embedding_dim
        for t in tables
    )
    return full / compressed
