"""MPE: Mixed-Precision Embeddings (Li et al., arXiv 2409.20305) as a table of the collection.

Follows the authors' public code (github.com/Leopold1423/mpe: ``model/embedding.py``
``OptFP_Embedding`` / ``optfp_get_groups``, ``train/train_optfp.py``):

* ids are ranked by training frequency and cut into ``groups`` groups of ``ceil(V / groups)``
  ids (the last one smaller); group 0 holds the most frequent ids (the public code numbers
  them from the rarest: only the labels differ). With frequency-ordered ids (the preprocessed
  data's ids ``0..V-1``, see ``INTERFACE_DATA.md``: ids ``1..V-1`` by descending count, the
  OOV id 0 first) the groups are contiguous id ranges and no per-id state is stored;
  otherwise (counts not descending, or a warm-up count) a per-id group index is kept.
* ``group_weight = group count / smallest group count`` (counts clamped to >= 1 so that an
  empty or unseen group does not divide by zero, where the public code would give inf);
* **search**: each row's value is ``sum_b p_g(b) * q_b(row)``, ``p_g = softmax(logits_g /
  tau)`` of the id's group ``g``, ``q_b`` the LSQ+ quantiser (:mod:`torchrec_cce.methods.mpe.quantizer`;
  ``q_0 = 0``); the loss adds ``lam * sum_g sum_b p_g(b) * b / group_weight_g``
  (:meth:`penalty`, summed over groups as in the public code), so rare groups are pushed
  hardest;
* **selection** (the public code's ``get_bit``): each group keeps the *largest* bit width whose
  probability is ``>= 1 / (2 * number of candidates)`` (one always qualifies: the largest
  probability is ``>= 1/K``);
* **retrain** (:meth:`MPETable.select`): the embedding weights restart from their initial
  values (regenerated from the seed, so no copy is kept), the widths are frozen, steps/offsets
  and the rest of the model continue from the search, and training continues.
* initial values: uniform in the table's init range, generated in blocks of
  :data:`INIT_BLOCK_ROWS` ids, block ``k`` from its own seed (``derive_seed(seed, table, k,
  "mpe_init")``), so any id range is generated without the rest of the table (a table of at
  most one block is ``torch.rand(V, dim)`` from block 0's seed). The steps start at the
  public code's ``2 * mean|W| / sqrt(2^(b-1))`` with ``mean|W|`` the init distribution's
  expectation (the public code measures it on the table; the two differ by
  ``O(1/sqrt(V * dim))``, and the expectation is the same on every rank of a sharded table).
* warm-up (only without counts): rows are used unquantised while the table counts the ids it
  sees; :meth:`build_groups` (collective under DMP) turns the counts into groups.

Why this shape (remap -> stock EBC -> compose)? fbgemm's fused TBE owns the weights of a stock
EBC and returns *pooled* sums of raw rows, so a row cannot be quantised inside its lookup, and
pooling does not commute with rounding. Per-bit-width sub-tables in a pooled EBC would need the
same per-row straight-through quantisation during retraining, so they cannot be trained through
a pooled EBC either (they are the *serving* layout, :mod:`torchrec_cce.methods.mpe.export`). So the MPE
table contributes no codebook to the inner EBC and looks itself up (:meth:`pooled_lookup`):
the unique ids of the batch are gathered from the fp32 master weights (a regular parameter),
only those rows are quantised and mixed, and ``F.embedding_bag`` pools them with the bag's
offsets and per-sample weights, so multi-hot bags and weighted/SUM/MEAN pooling are exact
(quantise rows, then pool). Under ``DistributedModelParallel`` the master weights are
model-parallel: the sharder builds each rank's table with ``id_range=(lo, hi)`` (it stores
rows ``[lo, hi)`` only, ``ceil(V / world)`` ids per rank), fetches the batch's unique rows from
their owners through a differentiable all-to-all
(:mod:`torchrec_cce.distributed.per_id_weights`), quantises them here with :meth:`quantize`
and pools them with :meth:`pool`; the gradients return to the owners, whose in-backward sparse
optimizer steps them. The small logits, steps and offsets (and the per-id group index, when
kept) stay replicated and DMP's DDP averages their gradients.

The steps and offsets are stored as columns (``alpha`` ``[K, 1]``, ``beta`` ``[dim, 1]``) so
that no parameter of the collection is 1-D: ``apply_optimizer_in_backward(RowWiseAdagrad,
<all sparse parameters>)`` can build its optimizer on each (row-wise Adagrad on one-element
rows is Adagrad). Under DMP the sharded table's logits, steps and offsets are replicated and
trained by the dense optimizer (DDP averages their gradients), whatever in-backward optimizer
they had before sharding; only the master weights keep theirs. 1-D steps/offsets of an older
checkpoint load into the columns.

Every parameter stays in the autograd graph in every stage (multiplied by 0 where unused), so
DMP's DDP (``static_graph=True``, ``find_unused_parameters=False``) sees a gradient for each.
"""

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_cce.configs import MPEConfig
from torchrec_cce.hashing import derive_seed
from torchrec_cce.optim import reset_optimizer_state
from torchrec_cce.methods.base import CompressedTable, PerIdState, check_id_range
from torchrec_cce.methods.mpe.quantizer import (
    code_range,
    effective_step,
    grad_scale,
    lsq_plus,
    quantize_codes,
)

WARMUP, SEARCH, RETRAIN = 0, 1, 2
INIT_BLOCK_ROWS = 1 << 16  # ids per independently seeded block of initial values
STAGE_NAMES = {WARMUP: "warmup", SEARCH: "search", RETRAIN: "retrain"}


def selection_threshold(num_candidates: int) -> float:
    """The public code's rule: a width is eligible if its probability >= 1 / (2K)."""
    return 1.0 / (2 * num_candidates)


def select_bits(probs: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """``[groups, K]`` probabilities -> per group the largest eligible width (int64 ``[groups]``)."""
    bits_t = torch.as_tensor(list(bits), dtype=torch.int64, device=probs.device)
    eligible = probs >= selection_threshold(len(bits))
    return torch.where(eligible, bits_t, torch.full_like(bits_t, -1)).max(dim=1).values


def uniform_abs_mean(lo: float, hi: float) -> float:
    """``E|w|`` for ``w ~ U(lo, hi)``."""
    if lo >= 0 or hi <= 0:
        return abs(lo + hi) / 2
    return (lo * lo + hi * hi) / (2 * (hi - lo))


def frequency_ordered(counts: Any) -> bool:
    """Whether the ids are frequency-ordered as the preprocessed data orders them (ids
    ``1..V-1`` by non-increasing integer count; the OOV id 0 stays first). ``counts``: a
    tensor, array or sequence; checked in numpy without a copy where the dtype allows."""
    c = counts.numpy(force=True) if isinstance(counts, torch.Tensor) else np.asarray(counts)
    c = c.astype(np.int64, copy=False)
    return c.size <= 2 or bool((c[1:-1] >= c[2:]).all())


def frequency_ranks(counts: torch.Tensor) -> Optional[torch.Tensor]:
    """Rank of every id by descending count (stable: ties keep id order), or ``None`` when the
    ids are already frequency-ordered (:func:`frequency_ordered`)."""
    counts = counts.to(torch.int64)
    if frequency_ordered(counts):
        return None
    order = torch.sort(-counts, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


class MPETable(CompressedTable):
    """One MPE table: fp32 master weights, group logits, LSQ+ steps and offsets (see module).

    ``id_range=(lo, hi)`` (built by the sharder) stores master-weight rows ``[lo, hi)`` only;
    the sharded module fetches rows from their owners and calls :meth:`quantize` and
    :meth:`pool` itself."""

    method_name = "mpe"
    local_lookup = True

    def __init__(self, table: EmbeddingBagConfig, config: MPEConfig,
                 device: Optional[torch.device] = None,
                 id_range: Optional[Tuple[int, int]] = None) -> None:
        super().__init__(table)
        V, d = table.num_embeddings, table.embedding_dim
        self.config = config
        self.bits: List[int] = [int(b) for b in config.bits]
        self.num_groups = config.groups
        self.group_size = -(-V // config.groups)
        self.tau = float(config.tau)
        self.lam = float(config.lam)
        self.init_range = (table.get_weight_init_min(), table.get_weight_init_max())
        self.seed = config.seed
        self.sharded = id_range is not None
        self.id_lo, self.id_hi = id_range if self.sharded else (0, V)
        if not 0 <= self.id_lo <= self.id_hi <= V:
            raise ValueError(f"table '{table.name}': id_range {id_range} is not inside [0, {V}]")
        self.codebooks = []
        K = len(self.bits)
        # Master weights of ids [id_lo, id_hi) (all ids unless sharded by id range).
        self.weight = nn.Parameter(torch.empty(self.id_hi - self.id_lo, d, device=device))
        self.logits = nn.Parameter(torch.zeros(config.groups, K, device=device))
        # One step per width and one offset per dimension, stored as [K, 1] / [dim, 1]
        # columns (see the module docstring); read them as vectors (steps(), offsets()).
        self.alpha = nn.Parameter(torch.ones(K, 1, device=device))
        self.beta = nn.Parameter(torch.zeros(d, 1, device=device))
        self._register_load_state_dict_pre_hook(_columns_from_vectors)
        self.register_buffer("grad_scales", torch.tensor(
            [grad_scale(b, V * d) if b > 0 else 0.0 for b in self.bits], device=device))
        self.register_buffer("stage", torch.tensor(SEARCH, dtype=torch.int64, device=device))
        self.register_buffer("selected", torch.full((config.groups,), -1, dtype=torch.int64,
                                                    device=device))
        self.register_buffer("group_weight", torch.ones(config.groups, device=device))
        ranks = None
        if config.counts is None:
            self.stage.fill_(WARMUP)
            self.register_buffer("seen_counts", torch.zeros(V, dtype=torch.int64, device=device))
            self.register_buffer("group_of", torch.zeros(V, dtype=self._group_dtype(),
                                                         device=device))
        else:
            counts = torch.as_tensor(np.asarray(config.counts), dtype=torch.int64, device="cpu")
            if bool((counts < 0).any()):
                raise ValueError(f"table '{table.name}': MPEConfig.counts must be >= 0")
            ranks = frequency_ranks(counts)
            if ranks is not None:
                self.register_buffer("group_of", torch.empty(V, dtype=self._group_dtype(),
                                                             device=device))
            if not self.weight.is_meta:
                self._set_groups(counts.to(self.weight.device), ranks)
        self.reset_parameters()

    # ---- construction helpers ----
    def _group_dtype(self) -> torch.dtype:
        return torch.int16 if self.num_groups <= 32767 else torch.int32

    def _init_block(self, k: int) -> torch.Tensor:
        """Initial values of ids ``[k * B, min(V, (k + 1) * B))`` (``B = INIT_BLOCK_ROWS``)."""
        seed = derive_seed(self.seed, self.table_name, k, "mpe_init") & ((1 << 62) - 1)
        g = torch.Generator().manual_seed(seed)
        n = min(INIT_BLOCK_ROWS, self.num_embeddings - k * INIT_BLOCK_ROWS)
        lo, hi = self.init_range
        return torch.rand(n, self.embedding_dim, generator=g) * (hi - lo) + lo

    def initial_rows(self, lo: int, hi: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The initial master weights of ids ``[lo, hi)`` (regenerated from the seed), written
        block by block into ``out`` if given (no second copy of the rows)."""
        out = torch.empty(max(0, hi - lo), self.embedding_dim) if out is None else out
        for k in range(lo // INIT_BLOCK_ROWS, -(-hi // INIT_BLOCK_ROWS)):
            a, b = max(lo, k * INIT_BLOCK_ROWS), min(hi, (k + 1) * INIT_BLOCK_ROWS)
            block = self._init_block(k)[a - k * INIT_BLOCK_ROWS: b - k * INIT_BLOCK_ROWS]
            out[a - lo: b - lo] = block.to(out.device)
        return out

    def initial_weight(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The initial master weights of the ids ``rows`` (default: the stored ones,
        ``[id_lo, id_hi)``), regenerated from the seed."""
        if rows is None:
            w = self.initial_rows(self.id_lo, self.id_hi)
        else:
            rows = rows.to(torch.int64).cpu()
            w = torch.empty(rows.numel(), self.embedding_dim)
            block = torch.div(rows, INIT_BLOCK_ROWS, rounding_mode="floor")
            for k in torch.unique(block).tolist():
                sel = block == k
                w[sel] = self._init_block(k)[rows[sel] - k * INIT_BLOCK_ROWS]
        return w.to(self.weight.device)

    def reset_parameters(self) -> None:
        """Master weights to their seeded initial values, steps to the public code's init,
        logits and offsets to 0 (the stage, groups and selection are kept)."""
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.logits.zero_()
            self.beta.zero_()
            self.initial_rows(self.id_lo, self.id_hi, out=self.weight)
            mean_abs = uniform_abs_mean(*self.init_range)
            for i, b in enumerate(self.bits):
                # The public code's init; b = 0 gets the same formula (its step is unused).
                self.alpha[i] = 2 * mean_abs / (2.0 ** (b - 1)) ** 0.5

    def _set_groups(self, counts: torch.Tensor, ranks: Optional[torch.Tensor]) -> None:
        if ranks is not None:
            self.group_of.copy_((ranks // self.group_size).to(self.group_of.dtype))
        group = self.group_ids(torch.arange(self.num_embeddings, device=counts.device))
        totals = torch.zeros(self.num_groups, dtype=torch.float64, device=counts.device)
        totals.index_add_(0, group, counts.to(torch.float64))
        totals = totals.clamp(min=1)
        self.group_weight.copy_((totals / totals.min()).to(self.group_weight.dtype))

    def steps(self) -> torch.Tensor:
        """The LSQ+ steps ``alpha`` as a ``[K]`` vector (a view of the parameter)."""
        return self.alpha.view(-1)

    def offsets(self) -> torch.Tensor:
        """The LSQ+ offsets ``beta`` as a ``[dim]`` vector (a view of the parameter)."""
        return self.beta.view(-1)

    # ---- groups, stages ----
    @property
    def stage_name(self) -> str:
        return STAGE_NAMES[int(self.stage)]

    def group_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Frequency group of each id (int64)."""
        if hasattr(self, "group_of"):
            return self.group_of[ids].to(torch.int64)
        return torch.div(ids, self.group_size, rounding_mode="floor")

    def group_sizes(self) -> torch.Tensor:
        """Number of ids in every group (int64 ``[groups]``)."""
        group = self.group_ids(torch.arange(self.num_embeddings, device=self.selected.device))
        return torch.bincount(group, minlength=self.num_groups)

    def observe(self, ids: torch.Tensor) -> None:
        if self.training and not ids.is_meta and int(self.stage) == WARMUP and ids.numel():
            self._check_ids(ids)
            self.seen_counts += torch.bincount(ids, minlength=self.num_embeddings)

    @torch.no_grad()
    def build_groups(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        """End of warm-up: groups from the ids counted so far (summed over ranks when a
        process group is initialised), then the search stage starts."""
        if int(self.stage) != WARMUP:
            return
        counts = self.seen_counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, group=process_group)
        ranks = torch.empty_like(counts)
        ranks[torch.sort(-counts, stable=True).indices] = torch.arange(
            counts.numel(), device=counts.device)
        self._set_groups(counts, ranks)
        self.stage.fill_(SEARCH)

    def probabilities(self) -> torch.Tensor:
        """``softmax(logits / tau)`` per group, ``[groups, K]``."""
        return F.softmax(self.logits / self.tau, dim=-1)

    def current_selection(self) -> torch.Tensor:
        """Frozen widths in retraining, else what :meth:`select` would pick now (``[groups]``)."""
        if int(self.stage) == RETRAIN:
            return self.selected.clone()
        return select_bits(self.probabilities().detach(), self.bits)

    @torch.no_grad()
    def select(self, optimizers: Sequence[torch.optim.Optimizer] = ()) -> torch.Tensor:
        """Selection + retrain restart: freeze each group's width (the public code's rule,
        :func:`select_bits`), restart the master weights from their initial values and zero
        their optimizer state. Returns the selected widths."""

        if int(self.stage) == WARMUP:
            raise RuntimeError(
                f"table '{self.table_name}': MPE selection before its frequency groups exist; "
                f"end the warm-up first (MPESchedule(warmup_steps=...)) or pass MPEConfig(counts=...)")
        self.selected.copy_(select_bits(self.probabilities(), self.bits))
        self.initial_rows(self.id_lo, self.id_hi, out=self.weight)
        reset_optimizer_state([self.weight], optimizers)
        rows = self.weight.shape[0]
        for opt in list(optimizers) + list(getattr(self.weight, "_in_backward_optimizers", [])):
            init = float(opt.param_groups[0].get("initial_accumulator_value", 0.0))
            for key, value in (opt.state.get(self.weight) or {}).items():  # row-wise ([n], [n, 1])
                if (isinstance(value, torch.Tensor) and value.dim() >= 1
                        and value.shape[0] == rows and value.shape != self.weight.shape):
                    value.fill_(init if key == "sum" else 0.0)
        self.stage.fill_(RETRAIN)
        return self.selected.clone()

    def penalty(self) -> torch.Tensor:
        """``lam * sum_g sum_b p_g(b) * b / group_weight_g`` in the search stage, else 0."""
        if int(self.stage) != SEARCH or self.lam == 0:
            return self.logits.sum() * 0.0
        bits = torch.tensor(self.bits, dtype=self.logits.dtype, device=self.logits.device)
        per_group = (self.probabilities() * bits).sum(dim=1) / self.group_weight
        return self.lam * per_group.sum()

    # ---- lookup ----
    def _check_ids(self, ids: torch.Tensor) -> None:
        check_id_range(self.table_name, ids, self.num_embeddings,
                       "MPE tables need ids in range (map raw values to vocabulary ids "
                       "upstream, e.g. torchrec_cce.data.preprocess)")

    def _local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            raise RuntimeError(
                f"table '{self.table_name}': this MPE table stores only the master weights of "
                f"ids [{self.id_lo}, {self.id_hi}) (sharded by id range); its lookups go "
                f"through ShardedCCEEmbeddingBagCollection, and a serving export needs the "
                f"unsharded model (load the DCP checkpoint into a CCEEmbeddingBagCollection)")
        return F.embedding(ids, self.weight)

    def quantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` as the model sees them in the current stage, ``[n, dim]``."""
        return self.quantize(self._local_rows(ids), ids)

    def quantize(self, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Master-weight rows ``w`` of ``ids`` (``[n, dim]``, however fetched) as the model
        sees them in the current stage."""
        stage = int(self.stage)
        alpha = effective_step(self.steps())
        if stage == WARMUP:
            out = w
        elif stage == SEARCH:
            p = self.probabilities()[self.group_ids(ids)]
            out = torch.zeros_like(w)
            for i, b in enumerate(self.bits):
                if b == 0:
                    continue
                lo, hi = code_range(b)
                q = lsq_plus(w, alpha[i], self.offsets(), lo, hi, self.grad_scales[i])
                out = out + p[:, i:i + 1] * q
        else:
            out = self._retrain_rows(w, ids, alpha)
        if self.training and torch.is_grad_enabled():
            # Keep every parameter in the graph (zero gradient) for DDP, see the module docstring.
            out = out + 0.0 * (self.logits.sum() + self.alpha.sum() + self.beta.sum())
        return out

    def _retrain_rows(self, w: torch.Tensor, ids: torch.Tensor,
                      alpha: torch.Tensor) -> torch.Tensor:
        bits_t = torch.tensor(self.bits, dtype=torch.int64, device=w.device)
        width = self.selected[self.group_ids(ids)]
        index = (width.unsqueeze(1) == bits_t).to(torch.int64).argmax(dim=1)
        kept = (width > 0).unsqueeze(1)
        safe = torch.where(width > 0, width, torch.ones_like(width)).to(w.dtype).unsqueeze(1)
        lo, hi = -(2 ** (safe - 1)), 2 ** (safe - 1) - 1
        q = lsq_plus(w, alpha[index].unsqueeze(1), self.offsets(), lo, hi,
                     self.grad_scales[index].unsqueeze(1))
        return q * kept.to(w.dtype)

    def codes(self, ids: torch.Tensor, bits: int) -> torch.Tensor:
        """Integer codes of ``ids``'s rows at width ``bits`` (int64), as stored when serving."""
        i = self.bits.index(bits)
        lo, hi = code_range(bits)
        with torch.no_grad():
            c = quantize_codes(self._local_rows(ids), effective_step(self.steps())[i],
                               self.offsets(), lo, hi)
        return c.to(torch.int64)

    def pooled_lookup(self, jt: JaggedTensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """SUM-pooled quantised rows of every bag of ``jt`` (``[batch, dim]``): quantise the
        batch's unique rows, then pool them with ``F.embedding_bag``."""
        ids = jt.values()
        if ids.is_meta or self.weight.is_meta:  # shapes only (meta-device model)
            return torch.empty(jt.lengths().numel(), self.embedding_dim, device="meta")
        self._check_ids(ids)
        if ids.numel() == 0:
            return self.quantized_rows(ids).sum() * 0.0 + torch.zeros(
                jt.lengths().numel(), self.embedding_dim, device=self.weight.device)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = self.quantized_rows(uniq)
        return F.embedding_bag(inverse, rows, jt.offsets(), mode="sum",
                               per_sample_weights=weights, include_last_offset=True)

    def pool(self, jt: JaggedTensor, weights: Optional[torch.Tensor], uniq: torch.Tensor,
             rows: torch.Tensor) -> torch.Tensor:
        """SUM-pooled bags of ``jt`` (``[batch, dim]``) from the quantised ``rows`` of the
        sorted unique ids ``uniq`` (which hold every id of ``jt``): the sharded lookup."""
        ids = jt.values()
        if ids.numel() == 0:
            return rows.sum() * 0.0 + torch.zeros(jt.lengths().numel(), self.embedding_dim,
                                                  device=rows.device)
        return F.embedding_bag(torch.searchsorted(uniq, ids), rows, jt.offsets(), mode="sum",
                               per_sample_weights=weights, include_last_offset=True)

    # ---- CompressedTable interface (no codebook streams) ----
    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        return []

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return pooled[0]

    def replicated_state_bytes(self) -> int:
        """Bytes of the state every rank keeps whole: logits, steps, offsets and the buffers
        (stage, selected widths, group weights, LSQ gradient scales, and when kept the per-id
        group index and the warm-up counts)."""
        return sum(t.numel() * t.element_size() for k, t in self.state_dict().items()
                   if k != "weight")

    def master_row_bytes(self) -> int:
        """Bytes of one master-weight row (fp32)."""
        return self.embedding_dim * self.weight.element_size()

    def per_id_state(self) -> List[PerIdState]:
        """The fp32 master rows, trained where ids are looked up. (Its training state: with
        :meth:`replicated_state_bytes`, ``state_bytes`` / ``logical_state_bytes``.)"""
        return [PerIdState("weight", self.num_embeddings, self.master_row_bytes())]

    def extra_parameters(self) -> int:
        return self.num_embeddings * self.embedding_dim + sum(
            p.numel() for p in (self.logits, self.alpha, self.beta))


def _columns_from_vectors(state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
    """Load 1-D ``alpha``/``beta`` (checkpoints written before they became columns)."""
    for name in ("alpha", "beta"):
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            state_dict[prefix + name] = value.unsqueeze(1)
