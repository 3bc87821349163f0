"""Compression configs: one small dataclass per method, with validation and parameter accounting.

A config says *how* one logical table (a ``torchrec.EmbeddingBagConfig``) is compressed. It
never holds weights: :class:`~torchrec_cce.modules.CCEEmbeddingBagCollection` builds the codebook
tables and the per-method remap/compose stages from it.

Parameter counts follow the papers: codebook rows x columns, plus per-id trainable weights
(MEmCom). The CCE assignment ``p`` is integer state, not a parameter; it is counted in bytes by
:func:`torchrec_cce.memory.memory_report`.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType


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


# Codebook weight precisions a table can train with, as TorchRec data types. bfloat16 trains on
# CPU only through torchrec_cce's TBE kernel (fbgemm-gpu-cpu has no bfloat16 kernels; the
# sharder raises a clear error where that kernel is off), and the unsharded module stores it as
# bfloat16 itself (TorchRec's unsharded EBC would store a BF16 table as float16).
CODEBOOK_DTYPES = {torch.float32: DataType.FP32, torch.float16: DataType.FP16,
                   torch.bfloat16: DataType.BF16}


def codebook_data_type(table: EmbeddingBagConfig, dtype: Optional[torch.dtype]) -> DataType:
    """The TorchRec ``DataType`` for codebooks stored as ``dtype``; ``ValueError`` otherwise.

    ``None``: the logical table's ``data_type`` (FP32 unless the table says otherwise).

    * ``torch.float32`` (default) and ``torch.float16`` train everywhere: fbgemm's TBE (and
      torchrec_cce's CPU kernel) train FP16 weights with the fused optimizers, the unsharded
      module trains float16 ``nn.EmbeddingBag`` weights with any torch optimizer.
    * ``torch.bfloat16`` trains on CUDA with fbgemm and on CPU with torchrec_cce's TBE kernel
      (:mod:`torchrec_cce.distributed.cpu_tbe`; fbgemm-gpu-cpu 1.8's own CPU TBE has no BF16
      forward: ``"split_embedding_cpu_forward_2" not implemented for 'BFloat16'``), model-parallel
      (table-wise, column-wise ...), not data-parallel.
    * ``torch.int8``: refused for training. INT8 is a serving format (fbgemm's INT8 TBE has no
      backward): train in float32/float16 and serve with
      :func:`torchrec_cce.serving.quantize_codebooks`.
    """
    if dtype is None:
        return table.data_type
    if dtype in CODEBOOK_DTYPES:
        return CODEBOOK_DTYPES[dtype]
    if dtype in (torch.int8, torch.uint8):
        raise ValueError(
            f"table '{table.name}': codebook_dtype={dtype} cannot be trained (fbgemm's INT8 "
            f"embeddings are a serving format without a backward pass); train with "
            f"torch.float32 or torch.float16, then serve the trained collection with INT8 "
            f"codebooks: torchrec_cce.serving.quantize_codebooks(module, torch.int8)"
        )
    raise ValueError(
        f"table '{table.name}': codebook_dtype must be torch.float32, torch.float16 or "
        f"torch.bfloat16, got {dtype!r}"
    )


@dataclass(frozen=True)
class CCEConfig:
    """Clustered Compositional Embeddings (Tsang & Ahle, NeurIPS 2023).

    ``e(x) = concat_i(A_i[p_i(x)] + B_i[h_i(x)])`` over ``chunks`` chunks; ``A_i``, ``B_i`` have
    ``rows`` rows of ``dim / chunks`` columns. ``p`` starts as a hash and is replaced by k-means
    assignments by :func:`torchrec_cce.recluster`. Parameters: ``2 * rows * dim``.

    ``codebook_dtype``: the precision ``A`` and ``B`` are stored and trained in
    (``torch.float32``, ``torch.float16`` or ``torch.bfloat16``; default None: the logical
    table's ``data_type``, i.e. float32 for a default ``EmbeddingBagConfig``; see
    :func:`codebook_data_type` for where each trains and why int8 is refused). Float16 and
    bfloat16 halve the codebook bytes; outputs are float32.

    ``p`` is stored bit-packed, ``ceil(log2(rows))`` bits per chunk entry. ``assigned_ids``
    bounds it to the ids ``[0, assigned_ids)`` (with frequency-ordered vocabularies: the most
    frequent ones); the other ids keep the hashed ``p`` forever. ``None``: every id. Values above
    the table size mean every id.

    ``init``: how ``p`` and ``h`` start (and what uncovered ids use for ``p``).

    * ``"hash"`` (default, the paper): ``p_i`` and ``h_i`` are independent hashes.
    * ``"qr"``: a quotient-remainder pair of a per-chunk bijection of the id,
      ``x' = (a_i x + b_i) mod V`` (``gcd(a_i, V) = 1``), ``p_i = (x' // rows) mod rows``,
      ``h_i = x' mod rows``: when ``rows**2 >= V`` every id has a unique ``(p_i, h_i)`` pair
      in every chunk, exactly like QR-add. Ids outside ``[0, V)`` are reduced ``mod V`` first.
      After a re-clustering ``p`` is the k-means assignment and ``h`` is a fresh hash
      (``keep_remainder=False``, the paper's rule) or stays the deterministic remainder
      (``keep_remainder=True``, so uncovered ids keep their unique pair).

    Initialisation: ``EmbeddingBagConfig.init_fn`` (default: uniform in the table's
    ``weight_init_min/max``) initialises every row of ``A`` and of ``B`` (one call on the
    stacked codebook table), so an id's initial chunk ``A_i[p_i(x)] + B_i[h_i(x)]`` is the sum
    of two independent draws: twice the variance of one full-table row (e.g. ``normal_(std=s)``
    gives vectors of std ``s * sqrt(2)``). Scale ``init_fn`` by ``1/sqrt(2)`` for rows of the
    full table's spread. ``reset_parameters()`` re-draws ``A``/``B`` and resets ``p`` and the
    hash generation to their initial values.
    """

    rows: int
    chunks: int = 4
    seed: int = 0
    codebook_dtype: Optional[torch.dtype] = None
    assigned_ids: Optional[int] = None
    init: str = "hash"
    keep_remainder: bool = False

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "rows", self.rows)
        _require_divisible(table, self.chunks)
        codebook_data_type(table, self.codebook_dtype)
        if self.rows > 1 << 31:
            raise ValueError(f"table '{table.name}': CCE rows must be <= 2**31, got {self.rows}")
        if self.assigned_ids is not None and (
                not isinstance(self.assigned_ids, int) or self.assigned_ids < 0):
            raise ValueError(
                f"table '{table.name}': CCEConfig.assigned_ids must be None (every id) or an "
                f"int >= 0, got {self.assigned_ids!r}"
            )
        if self.init not in ("hash", "qr"):
            raise ValueError(f"table '{table.name}': CCEConfig.init must be 'hash' or 'qr', got "
                             f"{self.init!r}")
        if self.keep_remainder and self.init != "qr":
            raise ValueError(f"table '{table.name}': CCEConfig.keep_remainder=True needs "
                             f"init='qr' (there is no remainder to keep with hashed h)")

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
    paper's "CE concat" baseline). Parameters: ``rows * dim``. ``codebook_dtype``: the
    codebook's stored precision, as for :class:`CCEConfig` (``torch.float16`` halves its bytes).
    """

    rows: int
    chunks: int = 4
    seed: int = 0
    codebook_dtype: Optional[torch.dtype] = None

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "rows", self.rows)
        _require_divisible(table, self.chunks)
        codebook_data_type(table, self.codebook_dtype)

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.rows * table.embedding_dim


@dataclass(frozen=True)
class HashingTrickConfig:
    """The hashing trick: ``e(x) = H[h(x)]`` with ``rows`` rows. Parameters: ``rows * dim``.
    ``codebook_dtype``: ``H``'s stored precision, as for :class:`CCEConfig`."""

    rows: int
    seed: int = 0
    codebook_dtype: Optional[torch.dtype] = None

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "rows", self.rows)
        codebook_data_type(table, self.codebook_dtype)

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

    Ids outside ``[0, V)`` are first reduced ``mod V``. ``codebook_dtype``: the stored precision
    of ``Q`` and ``R``, as for :class:`CCEConfig` (``torch.float16`` halves their bytes).
    """

    collisions: int
    operation: QROperation = "mult"
    codebook_dtype: Optional[torch.dtype] = None

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "collisions", self.collisions)
        codebook_data_type(table, self.codebook_dtype)
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
    """MEmCom (Pansare et al., "Learning Compressed Embeddings for On-Device Inference",
    MLSys 2022, arXiv 2203.10135): ``e(x) = w[x] * H[h(x)]``.

    ``H`` is a hashed table of ``rows`` rows shared by colliding ids; ``w`` holds one trainable
    scalar per id (initialised to 1) that lets the model tell colliding ids apart. No per-id
    bias: the paper's abstract specifies exactly two tables, "The first table employs hashing
    to force multiple entities to share an embedding. The second table contains one trainable
    weight per entity" -- a bias would be a second per-entity weight. Ids outside ``[0, V)``
    use ``w[x mod V]``. Parameters: ``rows * dim + V``; bytes: ``H`` plus ``4 * V`` for ``w``
    (sharded by id range under DistributedModelParallel: ``4 * ceil(V / world)`` per rank).
    MEmCom has no float16 form: its fp32 per-id weights weight the codebook bag, and torch's
    ``EmbeddingBag`` (the unsharded module) needs weights and table of one dtype.
    """

    rows: int
    seed: int = 0

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "rows", self.rows)

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.rows * table.embedding_dim + table.num_embeddings


MPE_ALLOWED_BITS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 16)


@dataclass(frozen=True)
class MPEConfig:
    """Mixed-Precision Embeddings (Li et al., arXiv 2409.20305; public code
    github.com/Leopold1423/mpe, ``model/embedding.py: OptFP_Embedding``).

    Ids are ranked by training frequency and split into ``groups`` groups of
    ``ceil(V / groups)`` ids; each group learns a distribution over the candidate ``bits``
    (0 = the row is pruned to zero) while every row is LSQ+-quantised
    (:mod:`torchrec_cce.methods.mpe.quantizer`). Search -> select -> retrain is driven by
    :class:`torchrec_cce.mpe.MPESchedule`; the memory penalty ``lam * sum(p * bits) /
    group_weight`` is :func:`torchrec_cce.mpe.mpe_penalty`.

    Args:
        groups: number of frequency groups (paper: 128).
        bits: candidate bit widths, from ``(0, 1, ..., 8, 16)`` (paper: 0..6).
        tau: softmax temperature of the group logits (paper: 3e-3).
        lam: the memory penalty weight lambda (the public code's ``l2_gamma``; paper's
            Criteo setting 3e-4).
        seed: seeds the initial weights (regenerated when retraining restarts them).
        counts: optional per-id training counts (``[V]``, e.g. the preprocessed data's
            ``counts/<feature>.npy``). Without them the table counts the ids it sees during
            a warm-up (``MPESchedule(warmup_steps=...)``).

    Parameters (the paper's count): ``V * dim`` fp32 master weights are trained; the
    compression is in the served (packed) table, see ``memory_report``'s ``serving_bytes``.
    """

    groups: int = 128
    bits: Tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    tau: float = 3e-3
    lam: float = 3e-4
    seed: int = 0
    counts: Optional[Any] = field(default=None, compare=False, repr=False)

    def validate(self, table: EmbeddingBagConfig) -> None:
        _require_positive(table, "groups", self.groups)
        if self.groups > table.num_embeddings:
            raise ValueError(
                f"table '{table.name}': MPEConfig.groups={self.groups} exceeds the table's "
                f"{table.num_embeddings} ids; use groups <= num_embeddings"
            )
        bits = tuple(self.bits)
        if not bits or len(set(bits)) != len(bits) or any(b not in MPE_ALLOWED_BITS for b in bits):
            raise ValueError(
                f"table '{table.name}': MPEConfig.bits must be distinct values from "
                f"{MPE_ALLOWED_BITS}, got {self.bits!r}"
            )
        if not self.tau > 0:
            raise ValueError(f"table '{table.name}': MPEConfig.tau must be > 0, got {self.tau}")
        if not self.lam >= 0:
            raise ValueError(f"table '{table.name}': MPEConfig.lam must be >= 0, got {self.lam}")
        if self.counts is not None and len(self.counts) != table.num_embeddings:
            raise ValueError(
                f"table '{table.name}': MPEConfig.counts has {len(self.counts)} entries, the "
                f"table has {table.num_embeddings} ids; pass one count per id"
            )

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        """The trained fp32 master table, ``V * dim`` (the group logits, steps and offsets,
        ``groups * len(bits) + len(bits) + dim``, are counted by ``memory_report``)."""
        return table.num_embeddings * table.embedding_dim


@dataclass(frozen=True)
class FullConfig:
    """An uncompressed table (one row per id) stored and trained at ``codebook_dtype``.

    ``FullConfig(codebook_dtype=torch.float16)`` is the full table at half its bytes (fbgemm's
    TBE trains FP16 weights with its fused optimizers, stochastic rounding on); the logical
    table (and so ``memory_report``'s ``full_bytes``, the reference every ratio is taken
    against) stays at its own ``data_type``. ``None`` (or a table not named in ``compression``)
    is the plain full table. Parameters: ``V * dim``.
    """

    codebook_dtype: Optional[torch.dtype] = None

    def validate(self, table: EmbeddingBagConfig) -> None:
        codebook_data_type(table, self.codebook_dtype)

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return table.num_embeddings * table.embedding_dim


def cold_table(table: EmbeddingBagConfig, hot_ids: int) -> EmbeddingBagConfig:
    """The cold part of ``table`` when its ids ``[0, hot_ids)`` are hot: the ids
    ``[hot_ids, V)`` renumbered from 0 (same name, dim, pooling, dtype and init)."""
    return dataclasses.replace(table, num_embeddings=table.num_embeddings - hot_ids)


@dataclass(frozen=True)
class TieredConfig:
    """A hot tier of exclusive rows in front of any method (CAFE's hot/cold split, Zhang et
    al., SIGMOD 2024, with the hot set taken from a frequency-ordered vocabulary).

    Ids ``[0, hot_ids)`` (with :mod:`torchrec_cce.data.preprocess`'s vocabularies: the most
    frequent ones) read one row each of an uncompressed ``hot_ids x dim`` table stored at
    ``hot_dtype`` (None: the logical table's ``data_type``); the ids ``[hot_ids, V)`` go through
    ``cold`` (any other config) as the ids ``[0, V - hot_ids)`` of a table of ``V - hot_ids``
    ids: CCE's assignment, MEmCom's weights and MPE's master rows cover cold ids only. A bag's
    vector is the sum of its hot and cold parts; with MEAN pooling every part is divided by the
    whole bag's length (for a QR-mult cold part, the product of the divided pools). Ids outside
    ``[0, V)`` raise. Parameters: ``hot_ids * dim`` plus ``cold``'s on ``V - hot_ids`` ids.

    An ``MPEConfig`` cold part with ``counts`` of all ``V`` ids uses the cold ids' counts.
    """

    hot_ids: int
    cold: Any
    hot_dtype: Optional[torch.dtype] = None

    def validate(self, table: EmbeddingBagConfig) -> None:
        if not isinstance(self.hot_ids, int) or isinstance(self.hot_ids, bool) or \
                not 0 < self.hot_ids < table.num_embeddings:
            raise ValueError(
                f"table '{table.name}': TieredConfig.hot_ids must be an int in [1, "
                f"{table.num_embeddings - 1}] (the table has {table.num_embeddings} ids), got "
                f"{self.hot_ids!r}; for every id hot use FullConfig, for none the cold config "
                f"alone"
            )
        if isinstance(self.cold, (TieredConfig, OnlineTieredConfig)) or \
                not isinstance(self.cold, CONFIG_TYPES):
            raise ValueError(
                f"table '{table.name}': TieredConfig.cold must be one of "
                f"{[c.__name__ for c in CONFIG_TYPES if c not in _TIERED]}, got "
                f"{self.cold!r}"
            )
        codebook_data_type(table, self.hot_dtype)
        if isinstance(self.cold, MEmComConfig) and self.hot_dtype not in (None, torch.float32):
            raise ValueError(
                f"table '{table.name}': a MEmCom cold tier weights every lookup by fp32 per-id "
                f"weights, so the hot rows must be float32 too; pass hot_dtype=None"
            )
        self.cold_config(table).validate(cold_table(table, self.hot_ids))

    def cold_config(self, table: EmbeddingBagConfig) -> Any:
        """``cold`` as it applies to the cold table (MPE counts restricted to cold ids)."""
        counts = getattr(self.cold, "counts", None)
        if counts is not None and len(counts) == table.num_embeddings:
            return dataclasses.replace(self.cold, counts=counts[self.hot_ids:])
        return self.cold

    def hot_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.hot_ids * table.embedding_dim

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.hot_parameters(table) + self.cold.num_parameters(
            cold_table(table, self.hot_ids))


@dataclass(frozen=True)
class OnlineTieredConfig:
    """A hot tier whose hot set is learned during training (CAFE, Zhang et al., SIGMOD 2024):
    for raw streams whose ids are not frequency-ordered (no preprocessing counts).

    A heavy-hitter sketch (:class:`~torchrec_cce.hot_sketch.HotSketch`, ``sketch_width`` x
    ``sketch_depth`` counters per sketched level) counts every id of every training batch.
    After every ``migrate_every`` training steps (the migration hook of
    :func:`torchrec_cce.train.training_hooks`) the hot set becomes the sketch's top ``hot_ids``
    ids: those read one exclusive row each of an ``hot_ids x dim`` table stored at
    ``hot_dtype`` (None: the table's ``data_type``); a newly hot id's row starts as its current
    cold vector (its optimizer state reset), an id no longer hot reads the cold method again.
    Every other id goes through ``cold`` (hashing, CE, QR, CCE or MEmCom) over all ``V`` ids.
    Before the first migration no id is hot. Ids outside ``[0, V)`` raise.

    Parameters: ``hot_ids * dim`` plus ``cold``'s on ``V`` ids. Stored bytes add the sketch
    (``HotSketch.stored_bytes``) and the hot map (sorted hot ids and their slots, int64).
    """

    hot_ids: int
    cold: Any
    hot_dtype: Optional[torch.dtype] = None
    migrate_every: int = 1000
    sketch_width: int = 16384
    sketch_depth: int = 4
    seed: int = 0

    def validate(self, table: EmbeddingBagConfig) -> None:
        if not isinstance(self.hot_ids, int) or isinstance(self.hot_ids, bool) or \
                not 0 < self.hot_ids < table.num_embeddings:
            raise ValueError(
                f"table '{table.name}': OnlineTieredConfig.hot_ids must be an int in [1, "
                f"{table.num_embeddings - 1}] (the table has {table.num_embeddings} ids), got "
                f"{self.hot_ids!r}")
        allowed = (CCEConfig, CEConfig, HashingTrickConfig, QRConfig, MEmComConfig)
        if not isinstance(self.cold, allowed):
            raise ValueError(
                f"table '{table.name}': OnlineTieredConfig.cold must be one of "
                f"{[c.__name__ for c in allowed]}, got {self.cold!r} (MPE already spends its "
                f"bytes by frequency; a full table has no cold ids)")
        for what in ("migrate_every", "sketch_width", "sketch_depth"):
            _require_positive(table, f"OnlineTieredConfig.{what}", getattr(self, what))
        codebook_data_type(table, self.hot_dtype)
        if isinstance(self.cold, MEmComConfig) and self.hot_dtype not in (None, torch.float32):
            raise ValueError(
                f"table '{table.name}': a MEmCom cold tier weights every lookup by fp32 per-id "
                f"weights, so the hot rows must be float32 too; pass hot_dtype=None")
        self.cold.validate(table)

    def hot_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.hot_ids * table.embedding_dim

    def num_parameters(self, table: EmbeddingBagConfig) -> int:
        return self.hot_parameters(table) + self.cold.num_parameters(table)


CompressionConfig = Union[CCEConfig, CEConfig, HashingTrickConfig, QRConfig, MEmComConfig,
                          MPEConfig, FullConfig, TieredConfig,
                          OnlineTieredConfig]
CONFIG_TYPES = (CCEConfig, CEConfig, HashingTrickConfig, QRConfig, MEmComConfig, MPEConfig,
                FullConfig, TieredConfig, OnlineTieredConfig)

_TIERED = (TieredConfig, OnlineTieredConfig)

METHOD_NAMES = ("full", "hashing", "ce", "qr", "cce", "memcom", "mpe")


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
    mpe: Optional[MPEConfig] = None,
) -> Dict[str, CompressionConfig]:
    """The paper's protocol: every table with ``num_embeddings * dim > max_params_per_table``
    is compressed with ``method`` to at most that many parameters; smaller tables stay full.

    ``method`` is one of :data:`METHOD_NAMES`. CCE gets ``rows = P // (2 * dim)`` (two
    codebooks), CE and hashing ``P // dim``, QR the collision count that fits both tables in
    the budget, MEmCom ``(P - V) // dim`` rows (its per-id weights count against the budget).

    MPE has no parameter budget (it trains the full fp32 table; its widths, hence its served
    bytes, are learned under the memory penalty): every table above the cap gets ``mpe`` (an
    ``MPEConfig``, default ``MPEConfig(seed=seed)``, groups capped at the table's ids).
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
        elif method == "mpe":
            base = mpe or MPEConfig(seed=seed)
            out[t.name] = dataclasses.replace(base, groups=min(base.groups, t.num_embeddings))
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
