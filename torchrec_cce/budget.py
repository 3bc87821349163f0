"""Plan per-table compression that fits a byte budget: :func:`plan_compression`.

Bytes are counted exactly as :func:`torchrec_cce.memory_report` counts them (every stored
tensor: codebooks at the table's dtype, CCE's bit-packed assignment and hash generation,
MEmCom's fp32 per-id weights), so ``plan.total_bytes`` is what the built model reports.

The rule (no trained model needed; per-table statistics only: vocabulary size, dim and, when
given, per-id training counts):

1. **Split between tables** (``allocation``, default ``"perplexity"``). Every table gets a
   share of the budget in proportion to ``mass_t * PP_t * dim_t * element size``: ``mass_t`` is
   the table's share of the training occurrences and ``PP_t = exp(entropy)`` of its id
   distribution, its effective number of ids (``<= V``; from ``counts``, else a Zipf(1) prior
   over ``V`` ids with equal mass per table). Water-filling: a table whose share is below its
   smallest config (QR's unique-pair minimum, one row, ...) or above its full table is pinned
   there and the others split the rest in the same proportions. Each table then takes its
   largest config within its share, sized exactly (rows, collisions, covered ids). So a table
   with more training occurrences, or a flatter id distribution, gets more bytes.
   ``"proportional"``: shares in proportion to the full tables' bytes (``V * dim``).
   ``"value"``: marginal frequency mass per byte (a table given ``b`` bytes is valued at the
   training mass of its ``b / row_bytes`` most frequent ids; bytes go greedily to the best
   value per byte on each table's concave hull). Measured on Frappe at 1/16 of the bytes (test
   log loss, one seed): CE 0.4021 (value) -> 0.2934 (proportional) -> 0.3066 / 0.2850 fp16
   (perplexity), QR-mult 0.2941 -> 0.2845; the value split starves the large, flat item table
   (8 CCE rows for 4,083 items), ``quality_frappe_ablations.csv``.
2. **Method.** ``methods=[M]``: every table uses ``M`` sized to its share (tables whose share
   holds the full table stay full), so methods can be compared at equal bytes.
   ``methods=None``, the measured rule (from the equal-byte benchmark,
   ``benchmarks/results/quality_*``, not modelled): every table stored at :data:`AUTO_DTYPE`
   (float16: twice the rows per byte, trained by the same fused optimizer; it beat float32 at
   equal bytes for every method), the shares of step 1 (the smallest config of the last
   :data:`AUTO_LADDER` method as the floor, raised for the smallest tables - see below), then
   per table, by its share ``s`` of its float16
   full bytes ``F``: the full table if ``s >= F`` (at its own precision when the budget still
   has the bytes), else the first method of :data:`AUTO_LADDER` whose ratio ``s / F`` it reaches
   and whose smallest config fits: CCE from 0.177, else QR's unique-pair form where it fits, else CE
   (the benchmark's best single method at 1/4-1/8, 1/16 and 1/64-1/256 of the float32 bytes);
   bytes a table's config leaves unused go back to the other compressed tables. Small tables
   first: the smallest tables stay full, smallest first, while the bytes this adds stay within
   :data:`DISTINCT_FLOOR_SHARE` (a tenth) of the budget (also with ``methods=[M]``). Without
   it the split gives an 8-id table one CE row (every id one vector): on Frappe at 1/16 the
   planner then lost to QR-mult fp16 by 0.017 log loss (0.2917 vs 0.2747, seed 0), with the
   same bytes. Several methods (``methods=[M1, M2, ...]``):
   each table uses the first that can represent it. Full tables are always candidates
   (``allow_full=False`` forbids them).
   Choosing on validation data instead: :func:`plan_candidates` (the distinct plans of
   :data:`CANDIDATE_LADDERS`, the rule's first, and of :data:`CANDIDATE_METHODS`) for
   ``train.py --plan-select validation``.
3. **Sizing a method to bytes.** hashing/CE: the most rows that fit; QR: the most collisions
   ``m >= ceil(sqrt(V))`` that fit (every id keeps its own (quotient, remainder) pair); MEmCom:
   rows after the ``4 V`` bytes of weights; CCE: the ``chunks`` given, ``assignment_share`` of
   the bytes for the bit-packed ``p`` of the ``N`` most frequent ids (the id prefix ``[0, N)``
   of frequency-ordered data; ``N = V`` if it fits) and the rest for ``rows`` (and any bytes
   ``p`` does not need go to rows); full at ``codebook_dtype``: :class:`FullConfig`; MPE: the
   widest candidate set ``0..b`` (``b >= 1``) whose serving bound (every group at ``b`` bits,
   :func:`mpe_serving_bound`) fits: the budget bounds MPE's *serving* bytes (it trains fp32
   master weights); below 1 bit per value MPE is infeasible.
"""

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType

from torchrec_cce.configs import (
    MPE_ALLOWED_BITS,
    CCEConfig,
    CEConfig,
    CompressionConfig,
    FullConfig,
    HashingTrickConfig,
    MEmComConfig,
    MPEConfig,
    OnlineTieredConfig,
    QRConfig,
    TieredConfig,
    cold_table,
)
from torchrec_cce.data.criteo import CRITEO_KAGGLE_CARDINALITIES
from torchrec_cce.hot_sketch import HotSketch
from torchrec_cce.methods import build_table, packed
from torchrec_cce.methods.mpe import frequency_ordered
from torchrec_cce.methods.mpe.export import row_bytes
from torchrec_cce.serving import quantized_row_bytes

PLAN_METHODS = ("cce", "qr", "ce", "hashing", "memcom", "mpe")
ALLOCATIONS = ("perplexity", "proportional", "value")
_MPE_MAX_GROUPS = 128
_GRID_STEPS_PER_DOUBLING = 8
_H_GENERATION_BYTES = 8
_MEMCOM_WEIGHT_BYTES = 4


def _elem(table: EmbeddingBagConfig) -> int:
    return 4 if table.data_type == DataType.FP32 else 2


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _table_chunks(table: EmbeddingBagConfig, chunks: int) -> int:
    """``chunks``, or the largest divisor of the table's dim below it."""
    dim = table.embedding_dim
    return max(d for d in range(1, min(chunks, dim) + 1) if dim % d == 0)


def _check_names(tables: Sequence[EmbeddingBagConfig]) -> List[str]:
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate table names in {names}")
    return names


def _split_weights(tables: Sequence[EmbeddingBagConfig], curves: Mapping[str, "_Curve"],
                   total_mass: float, allocation: str) -> Dict[str, float]:
    """Each table's weight in the budget split (module doc, step 1)."""
    if allocation == "proportional":
        return {t.name: float(config_bytes(t, None)) for t in tables}
    # training mass x effective ids x bytes per row
    return {t.name: curves[t.name].mass / total_mass * curves[t.name].perplexity
            * t.embedding_dim * _elem(t) for t in tables}


def _dtype(table: EmbeddingBagConfig) -> torch.dtype:
    return {DataType.FP32: torch.float32, DataType.BF16: torch.bfloat16}.get(
        table.data_type, torch.float16)


def _precision(table: EmbeddingBagConfig) -> str:
    return str(getattr(table.data_type, "value", table.data_type)).lower()


_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def serving_config_bytes(table: EmbeddingBagConfig, config: Optional[CompressionConfig],
                         serving_dtype: torch.dtype) -> int:
    """Bytes of ``table`` compressed by ``config`` (None: full) once its codebooks are served
    as fbgemm INT-N rows (:func:`torchrec_cce.serving.quantize_codebooks` with
    ``serving_dtype``): every codebook row ``dim * bits / 8 + 4`` bytes, the other state at its
    stored size (CCE's packed ``p`` and hash generation, MEmCom's per-id weights), exactly as
    ``memory_report``'s ``compressed_bytes`` of the quantised module. MPE serves itself (its
    serving bound)."""
    if isinstance(config, MPEConfig):
        return mpe_serving_bound(table, config)
    if isinstance(config, TieredConfig):
        return (config.hot_ids * quantized_row_bytes(table.embedding_dim, serving_dtype)
                + serving_config_bytes(cold_table(table, config.hot_ids),
                                       config.cold_config(table), serving_dtype))
    if isinstance(config, OnlineTieredConfig):
        return (config.hot_ids * quantized_row_bytes(table.embedding_dim, serving_dtype)
                + online_state_bytes(table, config)
                + serving_config_bytes(table, config.cold, serving_dtype))
    method = build_table(table, config, device=torch.device("meta"))
    return (sum(cb.num_embeddings * quantized_row_bytes(cb.embedding_dim, serving_dtype)
                for cb in method.codebooks) + method.logical_state_bytes())


def online_state_bytes(table: EmbeddingBagConfig, config: OnlineTieredConfig) -> int:
    """Bytes an online hot tier adds besides its hot rows: the sketch and the hot map
    (``HotSketch.stored_bytes`` + 16 bytes per hot id)."""
    sketch = HotSketch(table.num_embeddings, width=config.sketch_width,
                       depth=config.sketch_depth, device=torch.device("meta"))
    return sketch.stored_bytes() + 2 * 8 * config.hot_ids


def config_bytes(table: EmbeddingBagConfig, config: Optional[CompressionConfig],
                 serving_dtype: Optional[torch.dtype] = None) -> int:
    """Stored bytes of ``table`` compressed by ``config`` (None: full), exactly as
    ``memory_report``'s ``compressed_bytes``; with ``serving_dtype`` (``torch.int8`` /
    ``torch.quint4x2``) its serving bytes with INT-N codebooks (:func:`serving_config_bytes`)."""
    if serving_dtype is not None:
        return serving_config_bytes(table, config, serving_dtype)
    if isinstance(config, MPEConfig):
        return mpe_serving_bound(table, config)
    elem = _elem(table)
    if isinstance(config, TieredConfig):  # hot rows + the cold method on V - H ids
        hot = _dtype_bytes(config.hot_dtype) if config.hot_dtype is not None else elem
        return (config.hot_ids * table.embedding_dim * hot
                + config_bytes(cold_table(table, config.hot_ids), config.cold_config(table)))
    if isinstance(config, OnlineTieredConfig):  # hot rows, sketch and hot map + cold on V ids
        hot = _dtype_bytes(config.hot_dtype) if config.hot_dtype is not None else elem
        return (config.hot_ids * table.embedding_dim * hot + online_state_bytes(table, config)
                + config_bytes(table, config.cold))
    dtype = getattr(config, "codebook_dtype", None)  # low-precision codebooks, if set
    if dtype is not None:
        elem = _dtype_bytes(dtype)
    # The codebooks, plus the state the method declares (methods.base.PerIdState and its
    # replicated state), counted from the module itself on the meta device (no memory).
    method = build_table(table, config, device=torch.device("meta"))
    return (sum(cb.num_embeddings * cb.embedding_dim for cb in method.codebooks) * elem
            + method.logical_state_bytes())


def mpe_serving_bound(table: EmbeddingBagConfig, config: MPEConfig) -> int:
    """The most serving bytes an MPE table can take: every group at its widest candidate
    (``torchrec_cce.methods.mpe.export.serving_bytes`` with all widths = ``max(bits)``). The learned
    widths can only be narrower, so the served table never exceeds it. MPE *trains* fp32 master
    weights (``V * dim * 4`` bytes and more): the budget bounds what is served."""
    V, dim, K = table.num_embeddings, table.embedding_dim, len(config.bits)
    n = 3 * 8 + K + 4 * K + 4 * dim + config.groups + V * row_bytes(dim, max(config.bits))
    if config.counts is None or not frequency_ordered(config.counts):
        n += 4 * V  # row_of: ids not frequency-ordered
    return n


def _mpe_bits(max_bits: int) -> Tuple[int, ...]:
    """Candidate widths up to ``max_bits``: ``0..max_bits`` (the paper's 0..6 shape), with 16
    only as the widest."""
    return tuple(b for b in MPE_ALLOWED_BITS if b <= max_bits and (b <= 8 or b == max_bits))


@dataclass(frozen=True)
class TablePlan:
    """What the planner chose for one table."""

    table: str
    method: str                      # "full" or a method of PLAN_METHODS
    bytes: int                       # stored bytes (== memory_report compressed_bytes; with
                                     # serving_dtype: of the served, quantised module)
    full_bytes: int
    rows: Optional[int] = None       # codebook rows (QR: collisions)
    chunks: Optional[int] = None
    assigned_ids: Optional[int] = None  # CCE: ids [0, N) with a learned p
    precision: str = "fp32"
    mass_share: float = 0.0          # the table's share of all tables' training mass
    covered_mass: float = 0.0        # CCE: mass share of [0, N) within the table; full: 1
    config: Optional[CompressionConfig] = field(default=None, compare=False)
    hot_ids: Optional[int] = None    # tiered (TieredConfig): ids [0, H) in exclusive rows;
                                     # method, rows, ... then describe the cold part
    hot_mass: float = 0.0            # tiered: mass share of [0, H) within the table


@dataclass
class CompressionPlan:
    """Per-table choices of :func:`plan_compression`; ``compression`` feeds
    ``CCEEmbeddingBagCollection(tables, compression=plan.compression)``."""

    byte_budget: int
    tables: Dict[str, TablePlan]

    @property
    def compression(self) -> Dict[str, CompressionConfig]:
        return {n: p.config for n, p in self.tables.items() if p.config is not None}

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.tables.values())

    @property
    def full_bytes(self) -> int:
        return sum(p.full_bytes for p in self.tables.values())

    def to_dict(self) -> Dict[str, object]:
        rows = {}
        for n, p in self.tables.items():
            d = asdict(p)
            d.pop("config")
            d["config"] = repr(p.config) if p.config is not None else None
            rows[n] = d
        return {"byte_budget": self.byte_budget, "total_bytes": self.total_bytes,
                "full_bytes": self.full_bytes, "tables": rows}

    def format(self) -> str:
        """A printable table (MiB)."""
        mib = 1 << 20
        width = max([8] + [len(p.method) + 1 for p in self.tables.values()])  # "<cold>+hot"
        head = (f"{'table':<14}{'method':<{width}}{'prec.':<6}{'hot ids':>9}{'rows':>10}{'chunks':>7}"
                f"{'assigned':>11}{'cov.mass':>9}{'MiB':>10}{'full MiB':>10}")
        lines = [head, "-" * len(head)]
        for n, p in self.tables.items():
            lines.append(
                f"{n:<14}{p.method:<{width}}{p.precision[:5]:<6}"
                f"{p.hot_ids if p.hot_ids is not None else '':>9}"
                f"{p.rows if p.rows is not None else '':>10}"
                f"{p.chunks if p.chunks is not None else '':>7}"
                f"{p.assigned_ids if p.assigned_ids is not None else '':>11}"
                f"{p.covered_mass:>9.3f}{p.bytes / mib:>10.3f}{p.full_bytes / mib:>10.3f}")
        lines.append(f"total {self.total_bytes / mib:.3f} MiB of budget "
                     f"{self.byte_budget / mib:.3f} MiB (full {self.full_bytes / mib:.3f} MiB)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


# ---------------------------------------------------------------- frequency curves
def _float_counts(counts: object) -> np.ndarray:
    """A table's per-id counts (tensor, array or sequence) as a new float64 numpy array."""
    c = counts.detach().cpu().numpy() if torch.is_tensor(counts) else np.asarray(counts)
    return c.astype(np.float64)


class _Curve:
    """``F(k)``: mass fraction of a table's ``k`` most frequent ids; ``prefix(n)``: of ids
    ``[0, n)``."""

    def __init__(self, table: EmbeddingBagConfig, counts: Optional[object]) -> None:
        V = table.num_embeddings
        self.V = V
        self._perplexity: Optional[float] = None
        if counts is None or np.ndim(counts) == 0:
            self.mass = 1.0 if counts is None else float(counts)
            self.sorted_cum = None
            self.prefix_cum = None
        else:
            c = _float_counts(counts).ravel()
            if c.size > V:
                raise ValueError(f"table '{table.name}': counts has {c.size} entries, more than "
                                 f"num_embeddings={V}")
            if (c < 0).any():
                raise ValueError(f"table '{table.name}': counts must be >= 0")
            self.mass = float(c.sum())
            total = self.mass if self.mass > 0 else 1.0
            self.prefix_cum = np.concatenate([[0.0], np.cumsum(c) / total])
            if c.size < 2 or bool((c[1:] <= c[:-1]).all()):  # already frequency-ordered
                self.sorted_cum = self.prefix_cum
            else:
                self.sorted_cum = np.concatenate([[0.0], np.cumsum(np.sort(c)[::-1]) / total])
            if self.mass == 0:
                self.sorted_cum = self.prefix_cum = None
            else:
                q = c[c > 0] / self.mass
                self._perplexity = float(np.exp(-(q * np.log(q)).sum()))

    @property
    def perplexity(self) -> float:
        """``exp(entropy)`` of the table's id distribution: the effective number of ids
        (``<= V``; ``V`` for uniform ids). From ``counts``, else the Zipf(1) prior over ``V``
        ids: ``H = ln H_V + (sum_k ln k / k) / H_V``."""
        if self._perplexity is None:
            V = self.V
            if V <= 1 << 20:
                k = np.arange(1, V + 1, dtype=np.float64)
                h_v, s = float((1 / k).sum()), float((np.log(k) / k).sum())
            else:  # asymptotics: H_V ~ ln V + gamma + 1/(2V); sum ~ (ln V)^2 / 2 - gamma_1
                h_v = math.log(V) + 0.5772156649 + 1 / (2 * V)
                s = math.log(V) ** 2 / 2 + 0.0728158455
            self._perplexity = math.exp(math.log(h_v) + s / h_v)
        return self._perplexity

    def top(self, k: float) -> float:
        k = min(max(k, 0.0), float(self.V))
        if self.sorted_cum is None:  # Zipf(1) prior: H_k / H_V ~ ln(1 + k) / ln(1 + V)
            return math.log1p(k) / math.log1p(self.V)
        i = int(math.floor(k))
        n = len(self.sorted_cum) - 1
        if i >= n:
            return float(self.sorted_cum[-1])
        return float(self.sorted_cum[i] + (k - i) * (self.sorted_cum[i + 1] - self.sorted_cum[i]))

    def prefix(self, n: int) -> float:
        if self.prefix_cum is None:  # the Zipf(1) prior, ids frequency-ordered
            return math.log1p(min(n, self.V)) / math.log1p(self.V)
        return float(self.prefix_cum[min(n, len(self.prefix_cum) - 1)])


# ---------------------------------------------------------------- sizing one method
def _fit_cce(table: EmbeddingBagConfig, level: int, chunks: int, share: float,
             codebook_dtype: Optional[torch.dtype] = None,
             serving_dtype: Optional[torch.dtype] = None) -> Optional[CCEConfig]:
    """``share`` of the bytes for p (the ``N`` first ids), the rest for rows; if p covers
    every id, all remaining bytes go to rows. ``serving_dtype``: rows cost their INT-N serving
    bytes (``A_i`` and ``B_i`` rows of ``dim / chunks`` columns)."""
    V, dim, elem = table.num_embeddings, table.embedding_dim, _elem(table)
    if codebook_dtype is not None:
        elem = _dtype_bytes(codebook_dtype)
    extra = {} if codebook_dtype is None else {"codebook_dtype": codebook_dtype}
    row_cost = 2 * dim * elem
    if serving_dtype is not None:
        row_cost = 2 * chunks * quantized_row_bytes(dim // chunks, serving_dtype)
    max_rows = max(1, V // 2)  # more parameters than the full table is never useful
    spare = level - _H_GENERATION_BYTES
    if spare < row_cost:
        return None
    rows = max(1, min(max_rows, int((1 - share) * spare) // row_cost))
    bits = packed.bits_for(rows)
    words = (spare - rows * row_cost) // (packed.WORD_BITS // 8)
    n = V if bits == 0 else min(V, words * packed.WORD_BITS // (chunks * bits))
    if n >= V:  # p covers every id: the most rows that fit next to the full p
        for b in range(bits, packed.WORD_BITS):
            r = min(max_rows, 1 << b,
                    (spare - packed.packed_bytes(V, chunks, b)) // row_cost)
            if r >= 1 and packed.bits_for(r) == b:
                rows = max(rows, r)
            if r < (1 << b):
                break
        return CCEConfig(rows=rows, chunks=chunks, **extra)
    return CCEConfig(rows=rows, chunks=chunks, assigned_ids=n, **extra)


def _fit(method: str, table: EmbeddingBagConfig, level: int, chunks: int, share: float,
         qr_operation: str, codebook_dtype: Optional[torch.dtype] = None,
         counts: Optional[object] = None,
         serving_dtype: Optional[torch.dtype] = None) -> Optional[CompressionConfig]:
    """The largest config of ``method`` with at most ``level`` bytes (None if none fits or it
    would have as many parameters as the full table). With ``serving_dtype`` CCE is sized by
    its serving bytes; the other methods by their float bytes (an upper bound of their
    serving bytes)."""
    V, dim, elem = table.num_embeddings, table.embedding_dim, _elem(table)
    if method == "cce":
        return _fit_cce(table, level, chunks, share, codebook_dtype, serving_dtype)
    extra = {}
    if codebook_dtype is not None and method in ("hashing", "ce", "qr"):
        elem = _dtype_bytes(codebook_dtype)
        extra = {"codebook_dtype": codebook_dtype}
    row = dim * elem
    if method == "mpe":  # the widest candidate set whose every-group-at-max bound fits
        groups = min(_MPE_MAX_GROUPS, V)
        if counts is not None and np.ndim(counts) == 0:
            counts = None
        best = None
        for b in sorted({b for b in MPE_ALLOWED_BITS if 0 < b < 8 * elem}):
            cfg = MPEConfig(groups=groups, bits=_mpe_bits(b), counts=counts)
            if config_bytes(table, cfg) > level:
                break
            best = cfg
        # No all-pruned (bits=(0,)) form: a table whose rows are all zero has unused weights,
        # which DDP's static graph refuses (measured on Frappe at 1/16), and learns nothing.
        return best
    if method in ("hashing", "ce"):
        rows = min(level // row, V - 1)
        if rows < 1:
            return None
        return (HashingTrickConfig(rows=rows, **extra) if method == "hashing"
                else CEConfig(rows=rows, chunks=chunks, **extra))
    if method == "memcom":
        rows = min((level - V * _MEMCOM_WEIGHT_BYTES) // row, (V * dim - V) // dim)
        return MEmComConfig(rows=rows) if rows >= 1 else None
    if method == "qr":
        lo = max(2, math.isqrt(V - 1) + 1)
        best = None
        if config_bytes(table, QRConfig(lo, qr_operation, **extra)) > level:
            return None
        hi = V - 1
        while lo <= hi:  # bytes grow with m for m >= sqrt(V)
            mid = (lo + hi) // 2
            cfg = QRConfig(collisions=mid, operation=qr_operation, **extra)
            if config_bytes(table, cfg) <= level and cfg.num_parameters(table) < V * dim:
                best, lo = cfg, mid + 1
            else:
                hi = mid - 1
        return best
    raise ValueError(f"unknown method {method!r}; choose from {PLAN_METHODS}")


def _auto_plan(tables: Sequence[EmbeddingBagConfig], budget: int,
               counts: Optional[Mapping[str, object]], chunks: int, assignment_share: float,
               allow_full: bool, qr_operation: str, codebook_dtype: Optional[torch.dtype],
               allocation: str, serving_dtype: Optional[torch.dtype] = None,
               ladder: Sequence[Tuple[str, float]] = ()) -> CompressionPlan:
    """``plan_compression(methods=None)``: every table at :data:`AUTO_DTYPE` (unless
    ``codebook_dtype`` is given), the tables' shares of the budget by ``allocation``
    (water-filling between each table's smallest config and its full table at that
    precision), then per table: the full table if its share holds it, else the first method of
    ``ladder`` (default :data:`AUTO_LADDER`) whose smallest config fits the share, sized to the
    share. Bytes a table's config leaves unused go back to the other compressed tables (one
    more pass)."""
    ladder = tuple(ladder) or AUTO_LADDER
    bad = [m for m, _ in ladder if m not in PLAN_METHODS]
    if bad or ladder[-1][0] in ("cce", "mpe"):
        raise ValueError(f"ladder {ladder}: methods must be among {PLAN_METHODS} and the last "
                         "one a floor every table can take (qr, ce, hashing or memcom)")
    last = ladder[-1][0]
    dtype = AUTO_DTYPE if codebook_dtype is None else codebook_dtype
    names = _check_names(tables)
    by_name = {t.name: t for t in tables}
    per_counts = {t.name: _table_counts(counts, t) for t in tables}
    curves = {t.name: _Curve(t, per_counts[t.name]) for t in tables}
    total_mass = sum(c.mass for c in curves.values()) or 1.0

    def single(t: EmbeddingBagConfig, share: int, method: str) -> Optional[TablePlan]:
        try:
            p = plan_compression([t], share, counts=None if per_counts[t.name] is None
                                 else {t.name: per_counts[t.name]}, methods=[method],
                                 chunks=chunks, assignment_share=assignment_share,
                                 allow_full=allow_full and method == "full",
                                 qr_operation=qr_operation, codebook_dtype=dtype,
                                 allocation="perplexity", serving_dtype=serving_dtype)
        except BudgetTooSmallError:
            return None
        return p.tables[t.name]

    full = {n: config_bytes(t, FullConfig(codebook_dtype=dtype), serving_dtype)
            for n, t in by_name.items()}
    floor = {}
    for n, t in by_name.items():  # the smallest config of the ladder's last method
        pts = _candidates(t, last, curves[n], 1.0, False, _table_chunks(t, chunks),
                          assignment_share, qr_operation, dtype, per_counts[n], serving_dtype)
        floor[n] = min(pts[0][0], full[n])
    _check_minimum(floor, budget, f"{last} at {_PRECISION.get(dtype, dtype)}",
                   "Raise the budget")
    distinct = _distinct_floors(full, floor, budget)  # the smallest tables stay full
    floor.update(distinct)
    if allocation not in ("perplexity", "proportional"):
        raise ValueError(f"methods=None splits bytes by 'perplexity' or 'proportional', got "
                         f"allocation={allocation!r}")
    weight = _split_weights(tables, curves, total_mass, allocation)
    # a table's own precision when its share holds the whole table at it
    native = {n: config_bytes(t, None, serving_dtype) for n, t in by_name.items()}
    maximum = {n: (full[n] if allow_full else full[n] - 1) for n in names}
    shares = _shares(tables, weight, floor, maximum, budget)
    chosen: Dict[str, TablePlan] = {}

    def full_plan(t: EmbeddingBagConfig, share: int) -> Optional[TablePlan]:
        if not allow_full:
            return None
        if share >= native[t.name]:  # the table as it is
            return plan_compression([t], native[t.name], methods=["full"],
                                    serving_dtype=serving_dtype).tables[t.name]
        return single(t, share, "full") if share >= full[t.name] else None

    for _ in range(2):  # the second pass hands the first pass's unused bytes back
        chosen = {}
        for n in names:
            t, share = by_name[n], int(shares[n] + 1e-6)  # (float sums of exact shares)
            plan = full_plan(t, share)
            for m, ratio in ladder:
                if plan is None and share >= ratio * full[n]:
                    plan = single(t, share, m)
            if plan is None:  # below every ladder method's smallest form: its floor
                plan = single(t, floor[n], last) or single(t, floor[n], "full")
            chosen[n] = plan
        left = budget - sum(p.bytes for p in chosen.values())
        grow = [n for n in names if chosen[n].bytes < native[n]]
        total = sum(weight[n] for n in grow)
        if left <= 0 or not total:
            break
        shares = {n: chosen[n].bytes + (left * weight[n] / total if n in grow else 0)
                  for n in names}
    left = budget - sum(p.bytes for p in chosen.values())
    for n in sorted(names, key=lambda n: -weight[n]):  # bytes to spare: tables at their own
        if chosen[n].method == "full" and chosen[n].bytes < native[n] <= chosen[n].bytes + left:
            left -= native[n] - chosen[n].bytes     # precision, heaviest first
            chosen[n] = full_plan(by_name[n], native[n])
    out = {n: dataclasses.replace(p, mass_share=curves[n].mass / total_mass)
           for n, p in chosen.items()}
    plan = CompressionPlan(byte_budget=budget, tables=out)
    assert plan.total_bytes <= budget, (plan.total_bytes, budget)
    return plan


# The smallest tables (by their full bytes at the plan's precision) stay full while the bytes
# this adds over their smallest configs total at most this share of the budget (methods=None,
# and methods=[M] with the perplexity or proportional split). Without it the split gives a
# table of 8 ids a few bytes, and its smallest config (CE, hashing or CCE with one row) maps all
# its ids to one vector, dropping the feature (Frappe: daytime, weekday, isweekend, homework,
# cost, weather; MovieLens: weekday, genres, hour) - for every method but QR, whose smallest
# form keeps ids apart, which biased the equal-byte comparison towards QR. Full rather than
# QR's cheaper unique pairs: on Frappe at 1/4 (3 seeds) the planner with QR-mult for the 8-226-id
# tables lost to the same CCE tables beside full ones, 0.2453 vs 0.2348 test log loss.
DISTINCT_FLOOR_SHARE = 0.1


class BudgetTooSmallError(ValueError):
    """The byte budget cannot hold even the smallest configs of the tables."""


def _check_minimum(minimum: Mapping[str, int], budget: int, what: str, fix: str) -> None:
    """Raise :class:`BudgetTooSmallError` when the tables' smallest configs ``minimum`` exceed
    ``budget`` (naming the largest tables and the total needed)."""
    need = sum(minimum.values())
    if need <= budget:
        return
    worst = sorted(minimum.items(), key=lambda kv: -kv[1])
    listing = ", ".join(f"'{n}': {b} bytes" for n, b in worst[:10])
    raise BudgetTooSmallError(
        f"byte budget {budget} bytes ({budget / 2**20:.3f} MiB) cannot hold even the smallest "
        f"configs ({what}) of the tables; they need at least {need} bytes "
        f"({need / 2**20:.3f} MiB): {listing}{' ...' if len(worst) > 10 else ''}. {fix}")


def _distinct_floors(cost: Mapping[str, int], floor: Mapping[str, int], budget: int
                     ) -> Dict[str, int]:
    """Raised floors {table: bytes}: ``cost`` is the table's full bytes (every id its own
    row), taken smallest first while the bytes they add to the floors stay within
    ``DISTINCT_FLOOR_SHARE`` of the budget."""
    spent, raised, total = 0, {}, sum(floor.values())
    for n in sorted(cost, key=lambda n: (cost[n], n)):
        extra = cost[n] - floor[n]
        if extra <= 0:
            continue
        if spent + extra > DISTINCT_FLOOR_SHARE * budget or total + spent + extra > budget:
            break
        raised[n], spent = cost[n], spent + extra
    return raised


# The rule without ``methods`` (plan_compression(methods=None); module doc, step 3), taken from
# the measured equal-byte benchmark on the shared datasets (benchmarks/results/quality_*.csv):
# every table at AUTO_DTYPE; per table, the full table if its share of the budget holds it,
# else the first method of AUTO_LADDER whose smallest config fits its share.
AUTO_DTYPE = torch.float16
# (method, least share of the table's full bytes at AUTO_DTYPE): a table takes the first
# method whose ratio its share reaches and whose smallest config fits its share. CCE from 0.177:
# Frappe (one seed per cell, test log loss, best single row by fraction of the float32 bytes):
# 1/4 CCE 0.2441 (next 0.2494), 1/8 CCE 0.2703 (QR-mult 0.2736), 1/16 QR-mult fp16 0.2747 (CCE
# 0.2865); the biggest tables' shares are about 2x those fractions of their float16 bytes
# (perplexity split), so 0.177 is the geometric midpoint between 1/4 and 1/8 of the float16
# bytes. QR wherever its unique-pair form fits, CE only where it does not: on Yelp2018 at 1/64
# (tables of 31,669 and 37,662 ids, seed 0) QR-mult fp16 0.6025, CE fp16 0.6409, and the
# planner with QR only from 0.0625 of the float16 bytes (CE there) 0.6457; on Frappe at 1/64
# and 1/256 QR's smallest form does not fit the large tables (CE fp16 best, 0.3120 / 0.3428).
AUTO_LADDER: Tuple[Tuple[str, float], ...] = (("cce", 0.177), ("qr", 0.0), ("ce", 0.0))
AUTO_METHODS = tuple(m for m, _ in AUTO_LADDER)
# The plans plan_candidates offers for a choice on validation data (train.py --plan-select
# validation): the rule's ladder, QR first, CCE wherever its smallest form fits. No single
# per-table statistic picked the winner on every dataset: at 1/4 of the float32 bytes Frappe's
# item table (4,083 ids, ~17 training occurrences per id) is best with CCE (test log loss 0.2348
# vs QR-mult fp16 0.2750, 3 seeds) and Yelp2018's (37,662 ids, ~20 per id) with QR-mult fp16
# (0.5332 vs CCE 0.6087, one seed), at the same shares of their bytes. CE alone: on the
# synthetic Criteo-shaped set at 1/4 of the float32 bytes CE fp16 had the lowest validation log
# loss of every row and CE (0.4922) the best test log loss, ahead of the three plans above
# (chosen: 0.4950, 3 seeds; with the CE-only candidate 0.4923).
CANDIDATE_LADDERS: Tuple[Tuple[Tuple[str, float], ...], ...] = (
    AUTO_LADDER,
    (("qr", 0.0), ("ce", 0.0)),
    (("cce", 0.0), ("qr", 0.0), ("ce", 0.0)),
    (("ce", 0.0),),
)
# Single-method plans also offered (``plan_compression(methods=[M])`` at :data:`AUTO_DTYPE`,
# where M's smallest configs fit): CCE on every table, small ones included, where the ladders
# put CE on the tables CCE's smallest form does not suit. On MovieLens at 1/64 of the float32
# bytes all-CCE rows were best (test log loss 0.6665 without re-clustering, 0.6731 with) while
# the four plans above gave 0.6714; the all-CCE plan had the lowest validation loss on 2 of 3
# seeds.
CANDIDATE_METHODS: Tuple[str, ...] = ("cce",)
# Plans also offered with a hot tier on every compressed table (tier_plan: AUTO_HOT_SHARE of
# each table's bytes for exclusive rows of its most frequent ids, the ladder's method re-sized
# to the rest): the rule's ladder, QR's and CCE's. CCE's: on MovieLens at 1/16 of the float32
# bytes CCE with a hot tier (train.py --method cce --hot-ids auto) was the best row (test log
# loss 0.6561 +- 0.0052, 3 seeds; CCE alone 0.6790, QR-mult fp16 0.6609), while the two other
# tiered ladders both give QR(+CE) tiers there and the planner's choice was 0.6623
# (benchmarks/results/tiers_grid); clustering spends its rows on the cold tail, where sharing is
# forced, and the hot ids keep rows of their own.
CANDIDATE_TIERED_LADDERS: Tuple[Tuple[Tuple[str, float], ...], ...] = (
    AUTO_LADDER,
    (("qr", 0.0), ("ce", 0.0)),
    (("cce", 0.0), ("qr", 0.0), ("ce", 0.0)),
)
AUTO_HOT_SHARE = 0.5


def plan_candidates(tables: Sequence[EmbeddingBagConfig], byte_budget: Union[int, float],
                    counts: Optional[Mapping[str, object]] = None,
                    ladders: Sequence[Sequence[Tuple[str, float]]] = CANDIDATE_LADDERS,
                    single_methods: Sequence[str] = CANDIDATE_METHODS,
                    tiered_ladders: Sequence[Sequence[Tuple[str, float]]] = CANDIDATE_TIERED_LADDERS,
                    hot_share: float = AUTO_HOT_SHARE,
                    **kwargs) -> List[CompressionPlan]:
    """The distinct plans of ``plan_compression(methods=None, ladder=L)`` for every ladder
    ``L`` in ``ladders`` (default :data:`CANDIDATE_LADDERS`: the rule's plan first), then of
    ``plan_compression(methods=[M])`` for every ``M`` in ``single_methods`` (default
    :data:`CANDIDATE_METHODS`; at ``codebook_dtype`` or :data:`AUTO_DTYPE`; left out where M
    cannot fit the budget), then the plans of every ladder of ``tiered_ladders`` (default
    :data:`CANDIDATE_TIERED_LADDERS`) with a hot tier (:func:`tier_plan` at ``hot_share``),
    each fitting ``byte_budget``: the choices to train and compare on validation data when the
    per-table rule alone is not trusted. ``kwargs`` go to :func:`plan_compression`."""
    if kwargs.get("methods") is not None:
        raise ValueError("plan_candidates chooses the methods itself; leave methods out")
    kwargs.pop("methods", None)
    plans: List[CompressionPlan] = []
    seen = set()

    def offer(plan: CompressionPlan) -> None:
        key = tuple(plan.tables.values())  # method, rows, chunks, bytes... of every table
        if key not in seen:
            seen.add(key)
            plans.append(plan)

    for ladder in ladders:
        offer(plan_compression(tables, byte_budget, counts=counts, ladder=ladder, **kwargs))
    alone = dict(kwargs, codebook_dtype=kwargs.get("codebook_dtype") or AUTO_DTYPE)
    for method in single_methods:
        try:
            plan = plan_compression(tables, byte_budget, counts=counts, methods=[method], **alone)
        except BudgetTooSmallError:  # the budget cannot hold method's smallest configs
            continue
        offer(plan)
    tier_kwargs = {k: kwargs[k] for k in ("chunks", "assignment_share", "qr_operation",
                                          "serving_dtype") if k in kwargs}
    for ladder in tiered_ladders:
        plan = plan_compression(tables, byte_budget, counts=counts, ladder=ladder, **kwargs)
        offer(tier_plan(plan, tables, counts=counts, hot_share=hot_share, **tier_kwargs))
    return plans


def _hot_fit(t: EmbeddingBagConfig, config: CompressionConfig, level: int, hot_ids: int,
             counts: Optional[object], chunks: int, assignment_share: float,
             serving_dtype: Optional[torch.dtype],
             hot_dtype: Optional[torch.dtype] = None) -> Optional[TieredConfig]:
    """``TieredConfig(hot_ids, cold)`` of at most ``level`` bytes, ``cold`` the method of
    ``config`` (its chunks, dtype, QR operation) sized to the bytes the hot rows leave, or
    None if that method has no config in them. Hot rows at ``hot_dtype``, else at the
    method's codebook precision (float32 for MEmCom/MPE)."""
    method = _METHOD_OF[type(config)]
    dtype = getattr(config, "codebook_dtype", None)
    hot_dtype = _hot_row_dtype(config, hot_dtype)
    hot_row = _hot_row_bytes(t, config, hot_dtype, serving_dtype)
    cold_t = cold_table(t, hot_ids)
    cold_counts = None
    if counts is not None and np.ndim(counts) > 0:
        cold_counts = _float_counts(counts)[hot_ids:]
    cold = _fit(method, cold_t, level - hot_ids * hot_row,
                getattr(config, "chunks", _table_chunks(t, chunks)), assignment_share,
                getattr(config, "operation", "mult"), dtype,
                cold_counts if method == "mpe" else None, serving_dtype)
    if cold is None:
        return None
    tiered = TieredConfig(hot_ids=hot_ids, cold=cold, hot_dtype=hot_dtype)
    return tiered if config_bytes(t, tiered, serving_dtype) <= level else None


SKETCH_DEPTH = 4
MAX_SKETCH_WIDTH = 16384


def sketch_width_for(table: EmbeddingBagConfig, byte_budget: int,
                     depth: int = SKETCH_DEPTH) -> int:
    """The largest power-of-two ``width`` (at most :data:`MAX_SKETCH_WIDTH`) whose
    ``HotSketch(V, width, depth)`` stores at most ``byte_budget`` bytes; 0 if none does."""
    width, best = 1, 0
    while width <= MAX_SKETCH_WIDTH:
        sketch = HotSketch(table.num_embeddings, width=width, depth=depth,
                           device=torch.device("meta"))
        if sketch.stored_bytes() > byte_budget:
            break
        best, width = width, 2 * width
    return best


def _online_fit(t: EmbeddingBagConfig, config: CompressionConfig, level: int, hot_ids: int,
                chunks: int, assignment_share: float, serving_dtype: Optional[torch.dtype],
                migrate_every: int, sketch_share: float,
                hot_dtype: Optional[torch.dtype] = None) -> Optional[OnlineTieredConfig]:
    """``OnlineTieredConfig(hot_ids, cold)`` of at most ``level`` bytes: a sketch in
    ``sketch_share`` of them (at least ``hot_ids`` counters wide, else None), the hot rows and
    map, and ``config``'s method over all ``V`` ids sized to the bytes left (None if it has no
    config in them)."""
    method = _METHOD_OF[type(config)]
    width = sketch_width_for(t, int(sketch_share * level))
    if width < hot_ids or method == "mpe":
        return None
    dtype = getattr(config, "codebook_dtype", None)
    hot_dtype = _hot_row_dtype(config, hot_dtype)
    hot_row = _hot_row_bytes(t, config, hot_dtype, serving_dtype)
    probe = OnlineTieredConfig(hot_ids=hot_ids, cold=config, migrate_every=migrate_every,
                               sketch_width=width, sketch_depth=SKETCH_DEPTH)
    cold = _fit(method, t, level - hot_ids * hot_row - online_state_bytes(t, probe),
                getattr(config, "chunks", _table_chunks(t, chunks)), assignment_share,
                getattr(config, "operation", "mult"), dtype, None, serving_dtype)
    if cold is None:
        return None
    online = dataclasses.replace(probe, cold=cold, hot_dtype=hot_dtype)
    return online if config_bytes(t, online, serving_dtype) <= level else None


def tier_compression(tables: Sequence[EmbeddingBagConfig],
                     compression: Mapping[str, CompressionConfig],
                     counts: Optional[Mapping[str, object]] = None,
                     hot_ids: Union[int, str] = "auto", **kwargs) -> Dict[str, CompressionConfig]:
    """``compression`` with a hot tier on every compressed table at no more stored bytes
    (:func:`tier_plan` of the configs as they are; ``kwargs`` go to it)."""
    rows = {}
    for t in tables:
        c = compression.get(t.name)
        method = "full" if c is None else _METHOD_OF[type(c)]
        rows[t.name] = TablePlan(table=t.name, method=method, bytes=config_bytes(t, c),
                                 full_bytes=config_bytes(t, None), precision=_precision(t),
                                 config=c)
    plan = CompressionPlan(byte_budget=sum(p.bytes for p in rows.values()), tables=rows)
    return tier_plan(plan, tables, counts=counts, hot_ids=hot_ids, **kwargs).compression


def tier_plan(plan: CompressionPlan, tables: Sequence[EmbeddingBagConfig],
              counts: Optional[Mapping[str, object]] = None,
              hot_ids: Union[int, str] = "auto",
              hot_share: Union[float, str] = AUTO_HOT_SHARE,
              chunks: int = 4, assignment_share: float = 0.5, qr_operation: str = "mult",
              serving_dtype: Optional[torch.dtype] = None, hot_set: str = "prefix",
              migrate_every: int = 1000, sketch_share: float = 0.25,
              hot_dtype: Optional[torch.dtype] = None,
              hot_tables: Optional[Sequence[str]] = None) -> CompressionPlan:
    """``plan`` with a hot tier on every compressed table (or on those named in
    ``hot_tables``), at no more bytes per table.

    ``hot_set="online"``: ``OnlineTieredConfig`` instead (ids not frequency-ordered; the hot
    set learned by a sketch, migrated every ``migrate_every`` steps): the sketch takes
    ``sketch_share`` of the table's bytes (its width, a power of two, at least ``H``), the hot
    rows ``H`` rows as below, the method covers all ``V`` ids in the bytes left; MPE tables
    keep their plan.

    A compressed table of ``b`` bytes becomes ``TieredConfig(H, cold)``: the ids ``[0, H)``
    (the most frequent ones in a frequency-ordered vocabulary) get exclusive rows at the
    method's codebook precision (float32 for MEmCom/MPE), and the same method, re-sized by the
    planner's rules, takes the cold ids in the bytes left. ``hot_ids="auto"``: ``H`` is the
    number of rows in ``hot_share`` of ``b``; an int: at most that many (and at most ``V -
    1``). ``hot_share="mass"``: per table, the share of ``b`` the hot ids carry of the table's
    occurrences (:func:`mass_hot_ids`: the most ids whose rows take at most their mass share
    of the bytes; none for ids without a frequency head). ``H`` is halved until the cold
    method fits its bytes (a table where none fits keeps its plan). Full tables stay as they
    are. ``hot_dtype``: the hot rows' precision (default: the cold method's codebook
    precision; MEmCom's are always float32). ``qr_operation`` is unused (each cold QR keeps
    its table's operation); the other arguments are :func:`plan_compression`'s."""
    if hot_ids != "auto" and (not isinstance(hot_ids, int) or hot_ids < 1):
        raise ValueError(f"hot_ids must be 'auto' or an int >= 1, got {hot_ids!r}")
    if hot_share != "mass" and not (isinstance(hot_share, (int, float))
                                    and 0 < hot_share < 1):
        raise ValueError(f"hot_share must be in (0, 1) or 'mass', got {hot_share!r}")
    if hot_set not in ("prefix", "online"):
        raise ValueError(f"hot_set must be 'prefix' or 'online', got {hot_set!r}")
    if hot_set == "online" and hot_share != "mass" and not 0 < hot_share + sketch_share < 1:
        raise ValueError(f"hot_share + sketch_share must be in (0, 1), got {hot_share} + "
                         f"{sketch_share}")
    if hot_tables is not None:
        unknown = sorted(set(hot_tables) - {t.name for t in tables})
        if unknown:
            raise ValueError(f"hot_tables: no table named {', '.join(unknown)} (tables: "
                             f"{', '.join(t.name for t in tables)})")
    curves = {t.name: _Curve(t, _table_counts(counts, t)) for t in tables}
    out = dict(plan.tables)
    for t in tables:
        if hot_tables is not None and t.name not in hot_tables:
            continue
        p = plan.tables[t.name]
        cfg = p.config
        if cfg is None or isinstance(cfg, (FullConfig, TieredConfig, OnlineTieredConfig)) or \
                t.num_embeddings < 2:
            continue
        if hot_ids != "auto":
            H = hot_ids
        elif hot_share == "mass":
            H = mass_hot_ids(curves[t.name], p.bytes, _hot_row_bytes(t, cfg, hot_dtype))
        else:
            H = int(hot_share * p.bytes) // _hot_row_bytes(t, cfg, hot_dtype)
        H = min(H, t.num_embeddings - 1)
        tiered = None
        while H >= 1 and tiered is None:
            if hot_set == "online":
                tiered = _online_fit(t, cfg, p.bytes, H, chunks, assignment_share,
                                     serving_dtype, migrate_every, sketch_share, hot_dtype)
            else:
                tiered = _hot_fit(t, cfg, p.bytes, H, _table_counts(counts, t), chunks,
                                  assignment_share, serving_dtype, hot_dtype)
            H = H if tiered is not None else H // 2
        if tiered is None:
            continue
        if isinstance(tiered, OnlineTieredConfig):
            out[t.name] = dataclasses.replace(
                p, method=_METHOD_OF[type(tiered.cold)] + "+online_hot",
                bytes=config_bytes(t, tiered, serving_dtype), config=tiered, hot_ids=H,
                **{"rows": None, "chunks": None, "assigned_ids": None, "precision": p.precision,
                   **_config_fields(tiered.cold, t)})
            continue
        cold_t = cold_table(t, H)
        curve = curves[t.name]
        covered = 0.0
        if isinstance(tiered.cold, CCEConfig):
            covered = curve.prefix(H + tiered.cold.num_assigned(cold_t)) - curve.prefix(H)
        fields = {"rows": None, "chunks": None, "assigned_ids": None, "precision": p.precision,
                  **_config_fields(tiered.cold, cold_t)}
        out[t.name] = dataclasses.replace(
            p, method=_METHOD_OF[type(tiered.cold)] + "+hot",
            bytes=config_bytes(t, tiered, serving_dtype),
            covered_mass=covered, config=tiered, hot_ids=H, hot_mass=curve.prefix(H), **fields)
    tiered_plan = CompressionPlan(byte_budget=plan.byte_budget, tables=out)
    assert tiered_plan.total_bytes <= plan.total_bytes, (tiered_plan.total_bytes,
                                                         plan.total_bytes)
    return tiered_plan


def _hot_row_dtype(config: CompressionConfig,
                   hot_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The stored precision of the hot rows in front of ``config`` (None: the table's):
    MEmCom's always the table's (it weights float32 rows), else ``hot_dtype`` when given,
    else the method's codebook precision (MPE: the table's)."""
    if isinstance(config, MEmComConfig):
        return None
    if hot_dtype is not None:
        return hot_dtype
    return None if isinstance(config, MPEConfig) else getattr(config, "codebook_dtype", None)


def _hot_row_bytes(t: EmbeddingBagConfig, config: CompressionConfig,
                   hot_dtype: Optional[torch.dtype],
                   serving_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of one hot row of ``t`` in front of ``config`` (:func:`_hot_row_dtype`), or of
    its served form at ``serving_dtype``."""
    if serving_dtype is not None:
        return quantized_row_bytes(t.embedding_dim, serving_dtype)
    dtype = _hot_row_dtype(config, hot_dtype)
    return t.embedding_dim * (_dtype_bytes(dtype) if dtype is not None else _elem(t))


def mass_hot_ids(curve: "_Curve", table_bytes: int, row_bytes: int) -> int:
    """``hot_share="mass"``: the most hot ids ``H`` (an id prefix) whose rows take no larger
    a share of ``table_bytes`` than the share of the table's occurrences they carry,
    ``H * row_bytes / table_bytes <= prefix(H)``: a skewed table gets a large hot tier,
    uniform ids (``prefix(H) = H / V``, below the byte share whenever the table is
    compressed) none."""
    most = min(curve.V - 1, table_bytes // row_bytes)
    if most < 1:
        return 0
    hs = np.arange(1, most + 1, dtype=np.float64)
    if curve.prefix_cum is None:  # the Zipf(1) prior
        mass = np.log1p(hs) / math.log1p(curve.V)
    else:
        mass = curve.prefix_cum[np.minimum(hs.astype(np.int64), len(curve.prefix_cum) - 1)]
    ok = np.nonzero(hs * row_bytes <= mass * table_bytes)[0]
    return int(hs[ok[-1]]) if ok.size else 0


_METHOD_OF = {CCEConfig: "cce", CEConfig: "ce", HashingTrickConfig: "hashing", QRConfig: "qr",
              MEmComConfig: "memcom", MPEConfig: "mpe", FullConfig: "full",
              TieredConfig: "tiered", OnlineTieredConfig: "online_tiered"}


def _config_fields(config: Optional[CompressionConfig], table: EmbeddingBagConfig
                   ) -> Dict[str, Optional[int]]:
    if config is None:
        return {}
    if isinstance(config, MPEConfig):
        return {"precision": f"mpe<={max(config.bits)}bit"}
    out: Dict[str, Optional[int]] = {}
    if isinstance(config, QRConfig):
        out["rows"] = config.collisions
    elif not isinstance(config, FullConfig):
        out["rows"] = config.rows
    if isinstance(config, (CCEConfig, CEConfig)):
        out["chunks"] = config.chunks
    if isinstance(config, CCEConfig):
        out["assigned_ids"] = config.num_assigned(table)
    if getattr(config, "codebook_dtype", None) is not None:
        out["precision"] = _PRECISION[config.codebook_dtype]
    return out


# ---------------------------------------------------------------- the planner
def _table_counts(counts: Optional[Mapping[str, object]], t: EmbeddingBagConfig
                  ) -> Optional[object]:
    if counts is None:
        return None
    if t.name in counts:
        return counts[t.name]
    feats = [f for f in (t.feature_names or []) if f in counts]
    if not feats:
        raise ValueError(f"counts has no entry for table '{t.name}' or its features "
                         f"{t.feature_names}; pass counts for every table (or none)")
    arrays = [counts[f] for f in feats]
    if all(np.ndim(a) == 0 for a in arrays):
        return float(sum(float(a) for a in arrays))
    n = max(np.size(a) for a in arrays)
    total = np.zeros(n, dtype=np.float64)
    for a in arrays:
        a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a, dtype=np.float64)
        total[: a.size] += a
    return total


def _candidates(t: EmbeddingBagConfig, method: Optional[str], curve: _Curve, mass: float,
                allow_full: bool, chunks: int, share: float, qr_operation: str,
                codebook_dtype: Optional[torch.dtype] = None, counts: Optional[object] = None,
                serving_dtype: Optional[torch.dtype] = None
                ) -> List[Tuple[int, float, Optional[CompressionConfig]]]:
    """(bytes, value, config) candidates of ``t``, sorted by bytes; the full table (at
    ``codebook_dtype``: ``FullConfig``) is the last. Value: ``mass * F(b / row)``, ``row`` the
    bytes of one row at the stored precision."""
    low = codebook_dtype is not None and codebook_dtype != _dtype(t)
    full_cfg = FullConfig(codebook_dtype=codebook_dtype) if low else None
    full = config_bytes(t, full_cfg, serving_dtype)  # the full table as stored
    elem = _dtype_bytes(codebook_dtype) if low else _elem(t)
    row = t.embedding_dim * elem
    out: Dict[int, Tuple[int, float, Optional[CompressionConfig]]] = {}

    def fit(level: int) -> Optional[CompressionConfig]:
        return _fit(method, t, level, chunks, share, qr_operation, codebook_dtype, counts,
                    serving_dtype)

    if method is not None:
        level = float(row)
        if method == "mpe":  # MPE's smallest form (0 or 1 bit per group) may be below one row
            level = float(min(row, config_bytes(t, MPEConfig(groups=min(_MPE_MAX_GROUPS,
                                                                         t.num_embeddings),
                                                              bits=(0, 1), counts=counts))))
        seen = set()
        while level < full:
            cfg = fit(int(level))
            if cfg is not None and cfg not in seen:
                seen.add(cfg)
                b = config_bytes(t, cfg, serving_dtype)
                if b < full:
                    out[b] = (b, mass * curve.top(b / row), cfg)
            level *= 2 ** (1 / _GRID_STEPS_PER_DOUBLING)
        cfg = fit(full - 1)
        if cfg is not None:
            b = config_bytes(t, cfg, serving_dtype)
            if b < full:
                out.setdefault(b, (b, mass * curve.top(b / row), cfg))
    if allow_full or not out:
        out[full] = (full, mass, full_cfg)
    return sorted(out.values(), key=lambda c: c[0])


def _shares(tables: Sequence[EmbeddingBagConfig], weight: Dict[str, float],
            minimum: Dict[str, int], maximum: Dict[str, int], budget: int) -> Dict[str, float]:
    """Split ``budget`` between tables in proportion to ``weight`` (water-filling): a table
    whose share is below its smallest candidate (``minimum``) or above its full table
    (``maximum``) is pinned there and the other tables share the rest, again in proportion."""
    pinned: Dict[str, float] = {}
    names = [t.name for t in tables]
    while True:
        free = budget - sum(pinned.values())
        pool = [n for n in names if n not in pinned]
        total = sum(weight[n] for n in pool) or 1.0
        share = {n: free * weight[n] / total for n in pool}
        low = {n: float(minimum[n]) for n in pool if minimum[n] > share[n]}
        if low:  # minimums first: they take bytes from everyone else
            pinned.update(low)
            continue
        high = {n: float(maximum[n]) for n in pool if share[n] > maximum[n]}
        if not high:
            return {**share, **pinned}
        pinned.update(high)


def _hull(points: List[Tuple[int, float, object]]) -> List[int]:
    """Indices of the upper concave hull of (bytes, value) points, from the first point."""
    hull: List[int] = [0]
    for i in range(1, len(points)):
        if points[i][1] <= points[hull[-1]][1]:
            continue
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = points[hull[-2]], points[hull[-1]]
            x2, y2 = points[i][0], points[i][1]
            if (y1 - y0) * (x2 - x0) <= (y2 - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def plan_compression(
    tables: Sequence[EmbeddingBagConfig],
    byte_budget: Union[int, float],
    counts: Optional[Mapping[str, object]] = None,
    methods: Optional[Sequence[str]] = None,
    chunks: int = 4,
    assignment_share: float = 0.5,
    allow_full: bool = True,
    qr_operation: str = "mult",
    codebook_dtype: Optional[torch.dtype] = None,
    allocation: str = "perplexity",
    serving_dtype: Optional[torch.dtype] = None,
    ladder: Sequence[Tuple[str, float]] = (),
) -> CompressionPlan:
    """Per-table configs whose total stored bytes fit ``byte_budget`` (see the module doc).

    Args:
        tables: the logical tables.
        byte_budget: bytes for all embedding tables together (everything they store).
        counts: ``{table or feature name: per-id training counts [V]}`` (a feature's counts
            are summed into its table), or scalar total counts (Zipf(1) ids). Ids are assumed
            frequency-ordered for CCE's covered prefix ``[0, N)``. None: Zipf(1), equal mass.
        methods: restrict compressed tables to these methods (one: size that method; several:
            the first of them that can represent each table, in the given order). None: the
            measured per-table rule (module doc, step 2: :data:`AUTO_DTYPE`, full where the
            share holds the table, else the first of :data:`AUTO_LADDER` that fits). ``"mpe"``
            is sized by its serving-bytes bound (:func:`mpe_serving_bound`).
        chunks: CCE/CE chunks (1, 2, 4, 8; must divide every compressed table's dim, else
            the largest divisor of dim below it is used).
        assignment_share: fraction of a CCE table's bytes for its packed assignment.
        allow_full: whether uncompressed tables are candidates.
        qr_operation: QR's operation.
        codebook_dtype: the precision every table of the plan is stored at (codebooks of
            every method but MEmCom/MPE, and tables kept full as :class:`FullConfig`;
            ``torch.float16`` halves the bytes per row). None: the tables' own precision, or
            :data:`AUTO_DTYPE` with ``methods=None``.
        allocation: how the budget is split between tables (module doc, step 1):
            ``"perplexity"`` (default), ``"proportional"`` or ``"value"``.
        serving_dtype: count every table's bytes as served with INT-N codebooks
            (``torch.int8`` / ``torch.quint4x2``, :func:`serving_config_bytes`): the budget
            bounds the serving size; training keeps float codebooks.
        ladder: with ``methods=None``, ``(method, least share of the table's full bytes)``
            pairs tried in order per compressed table (default :data:`AUTO_LADDER`; the last
            method is every table's floor); :data:`CANDIDATE_LADDERS` are the alternatives
            :func:`plan_candidates` offers.

    Raises:
        BudgetTooSmallError: (a ``ValueError``) if even the smallest config of every table
            exceeds the budget (naming the tables and the minimum bytes).
        ValueError: for unknown methods / bad counts.
    """
    budget = int(byte_budget)
    if methods is None:  # the measured per-table rule (module doc, step 3)
        return _auto_plan(tables, budget, counts, chunks, assignment_share, allow_full,
                          qr_operation, codebook_dtype, allocation,
                          serving_dtype, ladder)
    if ladder:
        raise ValueError(f"ladder={tuple(ladder)} is the rule of methods=None; with "
                         f"methods={list(methods)} leave it out")
    order = list(methods)
    unknown = [m for m in order if m not in PLAN_METHODS + ("full",)]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {('full',) + PLAN_METHODS}")
    allow_full = allow_full or order == ["full"]
    order = [m for m in order if m != "full"]
    if not 0 < assignment_share < 1:
        raise ValueError(f"assignment_share must be in (0, 1), got {assignment_share}")
    names = _check_names(tables)
    curves = {t.name: _Curve(t, _table_counts(counts, t)) for t in tables}
    total_mass = sum(c.mass for c in curves.values()) or 1.0
    cands: Dict[str, List[Tuple[int, float, Optional[CompressionConfig]]]] = {}
    chosen_method: Dict[str, Optional[str]] = {}
    for t in tables:
        c = _table_chunks(t, chunks)
        mass = curves[t.name].mass / total_mass
        best = None
        for m in order:
            pts = _candidates(t, m, curves[t.name], mass, allow_full, c, assignment_share,
                              qr_operation, codebook_dtype, _table_counts(counts, t),
                              serving_dtype)
            if any(cfg is not None for _, _, cfg in pts) or m == order[-1]:
                best = (m, pts)
                break
        if best is None:  # only "full"
            best = (None, _candidates(t, None, curves[t.name], mass, True, c,
                                      assignment_share, qr_operation, codebook_dtype,
                                      serving_dtype=serving_dtype))
        chosen_method[t.name], cands[t.name] = best
    minimum = {n: pts[0][0] for n, pts in cands.items()}
    _check_minimum(minimum, budget, "/".join(order) or "full",
                   "Raise the budget or allow other methods")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allow_full and allocation in ("perplexity", "proportional"):
        # the smallest tables stay full (ids apart) while that adds <= DISTINCT_FLOOR_SHARE
        minimum.update(_distinct_floors({n: pts[-1][0] for n, pts in cands.items()
                                         if pts[-1][2] is None
                                         or isinstance(pts[-1][2], FullConfig)},
                                        minimum, budget))
    # Greedy marginal-value allocation over each table's upper concave hull.
    current = {n: 0 for n in cands}   # index into cands[n]
    remaining = budget - sum(minimum.values())
    steps = []
    if allocation in ("perplexity", "proportional"):
        weight = _split_weights(tables, curves, total_mass, allocation)
        shares = _shares(tables, weight, minimum,
                         {n: pts[-1][0] for n, pts in cands.items()}, budget)
        for t in tables:  # its largest config within its share (exactly sized, not the grid)
            m = chosen_method[t.name]
            if m is not None:
                cfg = _fit(m, t, int(shares[t.name]), _table_chunks(t, chunks),
                           assignment_share, qr_operation,
                           codebook_dtype, _table_counts(counts, t), serving_dtype)
                b = config_bytes(t, cfg, serving_dtype) if cfg is not None else None
                if b is not None and b < cands[t.name][-1][0] and all(
                        b != x for x, _, _ in cands[t.name]):
                    curve = curves[t.name]
                    row = t.embedding_dim * (_dtype_bytes(codebook_dtype)
                                             if codebook_dtype is not None else _elem(t))
                    cands[t.name] = sorted(cands[t.name] + [
                        (b, curve.mass / total_mass * curve.top(b / row), cfg)],
                        key=lambda x: x[0])
            fits = [i for i, (b, _, _) in enumerate(cands[t.name]) if b <= shares[t.name]]
            current[t.name] = max(fits) if fits else 0
        cands_order = []
    else:
        cands_order = list(cands.items())
    for n, pts in cands_order:
        hull = _hull(pts)
        for a, b in zip(hull, hull[1:]):
            slope = (pts[b][1] - pts[a][1]) / (pts[b][0] - pts[a][0])
            steps.append((-slope, names.index(n), a, b, n))
    steps.sort()
    frozen = set()
    for _, _, a, b, n in steps:
        if n in frozen or current[n] != a:
            continue
        pts = cands[n]
        cost = pts[b][0] - pts[a][0]
        if cost <= remaining:
            current[n] = b
            remaining -= cost
            continue
        # Partial step: the most valuable candidate between a and b that still fits.
        fits = [i for i in range(a + 1, b) if pts[i][0] - pts[a][0] <= remaining
                and pts[i][1] > pts[a][1]]
        if fits:
            i = max(fits, key=lambda j: pts[j][1])
            remaining -= pts[i][0] - pts[a][0]
            current[n] = i
        frozen.add(n)
    out: Dict[str, TablePlan] = {}
    for t in tables:
        b, _, cfg = cands[t.name][current[t.name]]
        curve = curves[t.name]
        if cfg is None or isinstance(cfg, FullConfig):
            covered = 1.0
        elif isinstance(cfg, CCEConfig):
            covered = curve.prefix(cfg.num_assigned(t))
        else:
            covered = 0.0
        out[t.name] = TablePlan(
            table=t.name, method="full" if cfg is None else _METHOD_OF[type(cfg)], bytes=b,
            full_bytes=config_bytes(t, None),
            **{"precision": _precision(t), **_config_fields(cfg, t)},
            mass_share=curve.mass / total_mass, covered_mass=covered, config=cfg)
    plan = CompressionPlan(byte_budget=budget, tables=out)
    assert plan.total_bytes <= budget, (plan.total_bytes, budget)
    return plan


def _main() -> None:
    """``python -m torchrec_cce.budget``: the plan for Criteo-Kaggle-shaped tables."""
    import argparse

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--fraction", type=float, default=16, help="budget = full bytes / this")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--zipf", type=float, default=None,
                   help="per-table counts ~ rank^-zipf (default: no counts, the Zipf(1) prior)")
    p.add_argument("--methods", default=None, help="comma-separated, e.g. cce or qr")
    p.add_argument("--chunks", type=int, default=4)
    a = p.parse_args()
    tables = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=a.dim, num_embeddings=v,
                                 feature_names=[f"cat_{i}"])
              for i, v in enumerate(CRITEO_KAGGLE_CARDINALITIES)]
    counts = None
    if a.zipf is not None:
        counts = {t.name: np.arange(1, t.num_embeddings + 1, dtype=np.float64) ** -a.zipf
                  for t in tables}
    full = sum(config_bytes(t, None) for t in tables)
    plan = plan_compression(tables, full / a.fraction, counts=counts,
                            methods=a.methods.split(",") if a.methods else None, chunks=a.chunks)
    print(plan.format())


if __name__ == "__main__":
    _main()
