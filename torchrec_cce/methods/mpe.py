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
  tau)`` of the id's group ``g``, ``q_b`` the LSQ+ quantiser (:mod:`torchrec_cce.mpe.quantizer`;
  ``q_0 = 0``); the loss adds ``lam * sum_g sum_b p_g(b) * b / group_weight_g``
  (:meth:`penalty`, summed over groups as in the public code), so rare groups are pushed
  hardest;
* **selection** (the public code's ``get_bit``): each group keeps the *largest* bit width whose
  probability is ``>= 1 / (2 * number of candidates)`` (one always qualifies: the largest
  probability is ``>= 1/K``);
* **retrain** (``prepare_retrain``): the embedding weights restart from their initial values
  (regenerated from the seed, so no copy is kept), the widths are frozen, steps/offsets and
  the rest of the model continue from the search, and training continues.
* warm-up (only without counts): rows are used unquantised while the table counts the ids it
  sees; :meth:`build_groups` (collective under DMP) turns the counts into groups.

Why this shape (remap -> stock EBC -> compose)? fbgemm's fused TBE owns the weights of a stock
EBC and returns *pooled* sums of raw rows, so a row cannot be quantised inside its lookup, and
pooling does not commute with rounding. Per-bit-width sub-tables in a pooled EBC would need the
same per-row straight-through quantisation during retraining, so they cannot be trained through
a pooled EBC either (they are the *serving* layout, :mod:`torchrec_cce.mpe.export`). So the MPE
table contributes no codebook to the inner EBC and looks itself up (:meth:`pooled_lookup`):
the unique ids of the batch are gathered from the fp32 master weights (a regular parameter),
only those rows are quantised and mixed, and ``F.embedding_bag`` pools them with the bag's
offsets and per-sample weights, so multi-hot bags and weighted/SUM/MEAN pooling are exact
(quantise rows, then pool). Under ``DistributedModelParallel`` the table is data-parallel:
every rank holds the parameters and DMP's DDP all-reduces their gradients; the other tables'
codebooks are sharded as usual. A model-parallel alternative would be an unpooled
``EmbeddingCollection`` holding the master weights (quantise the returned rows, then pool);
it needs a second sharded inner module and is not done here.

Every parameter stays in the autograd graph in every stage (multiplied by 0 where unused), so
DMP's DDP (``static_graph=True``, ``find_unused_parameters=False``) sees a gradient for each.
"""

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_cce.configs import MPEConfig
from torchrec_cce.hashing import derive_seed
from torchrec_cce.methods.base import CompressedTable
from torchrec_cce.mpe.quantizer import (
    code_range,
    effective_step,
    grad_scale,
    lsq_plus,
    quantize_codes,
)

WARMUP, SEARCH, RETRAIN = 0, 1, 2
STAGE_NAMES = {WARMUP: "warmup", SEARCH: "search", RETRAIN: "retrain"}


def selection_threshold(num_candidates: int) -> float:
    """The public code's rule: a width is eligible if its probability >= 1 / (2K)."""
    return 1.0 / (2 * num_candidates)


def select_bits(probs: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """``[groups, K]`` probabilities -> per group the largest eligible width (int64 ``[groups]``)."""
    bits_t = torch.as_tensor(list(bits), dtype=torch.int64, device=probs.device)
    eligible = probs >= selection_threshold(len(bits))
    return torch.where(eligible, bits_t, torch.full_like(bits_t, -1)).max(dim=1).values


def frequency_ranks(counts: torch.Tensor) -> Optional[torch.Tensor]:
    """Rank of every id by descending count (stable: ties keep id order), or ``None`` when the
    ids are already frequency-ordered as the preprocessed data orders them (ids ``1..V-1`` by
    non-increasing count; the OOV id 0 stays first)."""
    counts = counts.to(torch.int64)
    if counts.numel() <= 2 or bool((counts[1:-1] >= counts[2:]).all()):
        return None
    order = torch.sort(-counts, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


class MPETable(CompressedTable):
    """One MPE table: fp32 master weights, group logits, LSQ+ steps and offsets (see module)."""

    method_name = "mpe"
    local_lookup = True

    def __init__(self, table: EmbeddingBagConfig, config: MPEConfig,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(table)
        V, d = table.num_embeddings, table.embedding_dim
        self.config = config
        self.bits: List[int] = [int(b) for b in config.bits]
        self.num_groups = config.groups
        self.group_size = -(-V // config.groups)
        self.tau = float(config.tau)
        self.lam = float(config.lam)
        self.init_range = (table.get_weight_init_min(), table.get_weight_init_max())
        self.init_seed = derive_seed(config.seed, table.name, 0, "mpe_init") & ((1 << 62) - 1)
        self.codebooks = []
        K = len(self.bits)
        self.weight = nn.Parameter(torch.empty(V, d, device=device))
        self.logits = nn.Parameter(torch.zeros(config.groups, K, device=device))
        self.alpha = nn.Parameter(torch.ones(K, device=device))
        self.beta = nn.Parameter(torch.zeros(d, device=device))
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
            counts = torch.as_tensor(np.asarray(config.counts), dtype=torch.int64)
            if bool((counts < 0).any()):
                raise ValueError(f"table '{table.name}': MPEConfig.counts must be >= 0")
            ranks = frequency_ranks(counts)
            if ranks is not None:
                self.register_buffer("group_of", torch.empty(V, dtype=self._group_dtype(),
                                                             device=device))
            if device is None or torch.device(device).type != "meta":
                self._set_groups(counts.to(self.weight.device), ranks)
        self.reset_parameters()

    # ---- construction helpers ----
    def _group_dtype(self) -> torch.dtype:
        return torch.int16 if self.num_groups <= 32767 else torch.int32

    def initial_weight(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The initial master weights (uniform in the table's init range, seeded), regenerated
        on demand; ``rows`` selects rows (default all)."""
        g = torch.Generator().manual_seed(self.init_seed)
        lo, hi = self.init_range
        w = torch.rand(self.num_embeddings, self.embedding_dim, generator=g) * (hi - lo) + lo
        w = w if rows is None else w[rows.cpu()]
        return w.to(self.weight.device)

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.copy_(self.initial_weight())
            for i, b in enumerate(self.bits):
                # The public code's init; b = 0 gets the same formula (its step is unused).
                self.alpha[i] = 2 * self.weight.abs().mean() / (2.0 ** (b - 1)) ** 0.5

    def _set_groups(self, counts: torch.Tensor, ranks: Optional[torch.Tensor]) -> None:
        if ranks is not None:
            self.group_of.copy_((ranks // self.group_size).to(self.group_of.dtype))
        group = self.group_ids(torch.arange(self.num_embeddings, device=counts.device))
        totals = torch.zeros(self.num_groups, dtype=torch.float64, device=counts.device)
        totals.index_add_(0, group, counts.to(torch.float64))
        totals = totals.clamp(min=1)
        self.group_weight.copy_((totals / totals.min()).to(self.group_weight.dtype))

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
        if self.training and int(self.stage) == WARMUP and ids.numel():
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
        from torchrec_cce.clustering.recluster import reset_optimizer_state

        if int(self.stage) == WARMUP:
            raise RuntimeError(
                f"table '{self.table_name}': MPE selection before its frequency groups exist; "
                f"end the warm-up first (MPESchedule(warmup_steps=...)) or pass MPEConfig(counts=...)")
        self.selected.copy_(select_bits(self.probabilities(), self.bits))
        self.weight.copy_(self.initial_weight())
        reset_optimizer_state([self.weight], optimizers)
        for opt in list(optimizers) + list(getattr(self.weight, "_in_backward_optimizers", [])):
            init = float(opt.param_groups[0].get("initial_accumulator_value", 0.0))
            for key, value in (opt.state.get(self.weight) or {}).items():  # row-wise ([V], [V, 1])
                if (isinstance(value, torch.Tensor) and value.dim() >= 1
                        and value.shape[0] == self.num_embeddings
                        and value.shape != self.weight.shape):
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
        if ids.numel() and not ids.is_meta:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise ValueError(
                    f"table '{self.table_name}': id {lo if lo < 0 else hi} is outside "
                    f"[0, {self.num_embeddings}); MPE tables need ids in range (map raw values "
                    f"to vocabulary ids upstream, e.g. torchrec_cce.data.preprocess)")

    def quantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` as the model sees them in the current stage, ``[n, dim]``."""
        w = F.embedding(ids, self.weight)
        stage = int(self.stage)
        alpha = effective_step(self.alpha)
        if stage == WARMUP:
            out = w
        elif stage == SEARCH:
            p = self.probabilities()[self.group_ids(ids)]
            out = torch.zeros_like(w)
            for i, b in enumerate(self.bits):
                if b == 0:
                    continue
                lo, hi = code_range(b)
                q = lsq_plus(w, alpha[i], self.beta, lo, hi, self.grad_scales[i])
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
        q = lsq_plus(w, alpha[index].unsqueeze(1), self.beta, lo, hi,
                     self.grad_scales[index].unsqueeze(1))
        return q * kept.to(w.dtype)

    def codes(self, ids: torch.Tensor, bits: int) -> torch.Tensor:
        """Integer codes of ``ids``'s rows at width ``bits`` (int64), as stored when serving."""
        i = self.bits.index(bits)
        lo, hi = code_range(bits)
        with torch.no_grad():
            c = quantize_codes(self.weight[ids], effective_step(self.alpha)[i], self.beta, lo, hi)
        return c.to(torch.int64)

    def pooled_lookup(self, jt: JaggedTensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """SUM-pooled quantised rows of every bag of ``jt`` (``[batch, dim]``): quantise the
        batch's unique rows, then pool them with ``F.embedding_bag``."""
        ids = jt.values()
        self._check_ids(ids)
        if ids.numel() == 0:
            return self.quantized_rows(ids).sum() * 0.0 + torch.zeros(
                jt.lengths().numel(), self.embedding_dim, device=self.weight.device)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = self.quantized_rows(uniq)
        return F.embedding_bag(inverse, rows, jt.offsets(), mode="sum",
                               per_sample_weights=weights, include_last_offset=True)

    # ---- CompressedTable interface (no codebook streams) ----
    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        return []

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return pooled[0]

    def state_bytes(self) -> int:
        """Training state: fp32 master weights, logits, steps, offsets and per-id group index."""
        n = sum(p.numel() * p.element_size() for p in (self.weight, self.logits, self.alpha,
                                                        self.beta))
        if hasattr(self, "group_of"):
            n += self.group_of.numel() * self.group_of.element_size()
        return n

    def extra_parameters(self) -> int:
        return sum(p.numel() for p in (self.weight, self.logits, self.alpha, self.beta))
