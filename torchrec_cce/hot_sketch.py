"""A bounded-memory heavy-hitter sketch over the ids ``[0, V)`` of one table: which ids are hot.

:class:`HotSketch` is a *dyadic Count-Min sketch*: level ``l`` counts the prefixes
``x >> (l * branch_bits)`` of the ids seen (level 0: the ids themselves). A level with at most
``depth * width`` prefixes stores their counts exactly; a larger one stores a Count-Min sketch
(``depth`` rows of ``width`` counters, one seeded hash per row from :mod:`torchrec_cce.hashing`,
an estimate is the minimum over rows). :meth:`HotSketch.top_k` walks the levels top-down: it
keeps the ``beam`` prefixes of highest estimate, expands each to its ``2**branch_bits``
children, and at level 0 returns the ``k`` ids of highest estimate, ties broken by the smaller
id. Everything it reads is the counters, so the hot set is a pure function of them.

**Linear, so deterministic across ranks.** A sketch's counters are a sum over the ids seen.
Each rank adds its batches' ids to ``pending`` (:meth:`observe`); :meth:`sync` all-reduces
``pending`` with SUM into ``counts``. After a sync every rank holds the same ``counts``, equal
to one process's that saw the union of the ranks' ids (in any order, split any way), so every
rank computes the same hot set. ``counts`` and ``pending`` are buffers of the state dict
(resume mid-stream = uninterrupted).

**Memory.** ``2 * 4 * sum_l min(n_l, depth * width)`` bytes (``counts`` and ``pending``, int32),
``n_l = ceil(V / 2**(l * branch_bits))`` prefixes at level ``l``: :meth:`HotSketch.stored_bytes`.
Counters stay in int32 by :meth:`HotSketch.halve_if_large` (every counter halved, rounding
down, once one reaches ``2**30``; the online tier calls it at every migration, on counters
identical on every rank, so ranks stay identical; it also ages old counts, as CAFE's decay
does). Between two syncs fewer than ``2**30`` ids may be counted (per rank, and summed over
ranks), else :meth:`observe` / :meth:`sync` raise.

**Error.** Estimates never undercount. On a sketched level, with probability at least
``1 - exp(-depth)`` an estimate exceeds the true count by at most ``e / width * N`` (``N``: ids
counted so far; Cormode & Muthukrishnan 2005); exact levels have no error. So every id whose
true count exceeds the ``(k+1)``-th largest by more than ``e / width * N`` is in
``top_k(k)`` (with that probability per id), provided the beam keeps its prefixes: it does when
fewer than ``beam`` prefixes of each sketched level have a true count above
``c - e / width * N`` (``c``: that id's count), and always when the level above 0 is exact and
holds at most ``beam`` prefixes.
"""

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from torchrec_cce.hashing import derive_seed, hash_ids

LIMIT = 2 ** 30  # counters are int32: halved at this size, and no more ids between syncs


class HotSketch(nn.Module):
    """Heavy hitters of the ids ``[0, num_ids)`` of table ``table`` (see the module docstring).

    Args:
        num_ids: the table's vocabulary size ``V``.
        width: counters per Count-Min row.
        depth: Count-Min rows (independent hashes) per sketched level.
        branch_bits: a prefix at level ``l + 1`` covers ``2**branch_bits`` prefixes of level ``l``.
        seed, table: name the hash functions (same on every rank and restart).
    """

    def __init__(self, num_ids: int, width: int = 16384, depth: int = 4, branch_bits: int = 4,
                 seed: int = 0, table: str = "", device: Optional[torch.device] = None) -> None:
        super().__init__()
        for name, value in (("num_ids", num_ids), ("width", width), ("depth", depth),
                            ("branch_bits", branch_bits)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"table '{table}': HotSketch {name} must be a positive int, "
                                 f"got {value!r}")
        self.table_name = table
        self.num_ids, self.width, self.depth, self.branch_bits = num_ids, width, depth, branch_bits
        # Level l holds prefixes x >> (l * branch_bits), up to the first level with <= 2**bits.
        self.level_sizes: List[int] = [num_ids]
        while self.level_sizes[-1] > 2 ** branch_bits:
            self.level_sizes.append(math.ceil(self.level_sizes[-1] / 2 ** branch_bits))
        self.exact: List[bool] = [n <= depth * width for n in self.level_sizes]
        sizes = [n if ex else depth * width for n, ex in zip(self.level_sizes, self.exact)]
        self.level_offsets: List[int] = [sum(sizes[:i]) for i in range(len(sizes))]
        self.size: int = sum(sizes)
        self.keys: List[List[int]] = [
            [derive_seed(seed, table, level * depth + r, "hot_sketch") for r in range(depth)]
            for level in range(len(self.level_sizes))]
        self.register_buffer("counts", torch.zeros(self.size, dtype=torch.int32, device=device))
        self.register_buffer("pending", torch.zeros(self.size, dtype=torch.int32, device=device))
        self._since_sync = 0  # ids counted into pending (bounds every pending counter)

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    def stored_bytes(self) -> int:
        """Bytes of ``counts`` and ``pending`` (int32 each)."""
        return 2 * 4 * self.size

    def _slots(self, prefixes: torch.Tensor, level: int) -> torch.Tensor:
        """Counter positions of ``prefixes`` at ``level``: ``[n]`` (exact) or ``[depth, n]``."""
        off = self.level_offsets[level]
        if self.exact[level]:
            return prefixes + off
        return torch.stack([hash_ids(prefixes, key, self.width) + (off + r * self.width)
                            for r, key in enumerate(self.keys[level])])

    def _check(self, ids: torch.Tensor) -> None:
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_ids:
                raise ValueError(
                    f"table '{self.table_name}': id {lo if lo < 0 else hi} is outside "
                    f"[0, {self.num_ids}); the hot-id sketch counts vocabulary ids: map raw "
                    f"values to ids upstream (torchrec_cce.data.preprocess) or hash them into "
                    f"[0, num_embeddings)")

    @torch.no_grad()
    def observe(self, ids: torch.Tensor) -> None:
        """Count every occurrence of ``ids`` (int64, in ``[0, V)``) into ``pending``."""
        self._check(ids)
        if ids.numel() == 0:
            return
        if self._since_sync + ids.numel() >= LIMIT:
            raise ValueError(
                f"table '{self.table_name}': {self._since_sync + ids.numel()} ids counted since "
                f"the hot-id sketch was last summed over ranks (at most {LIMIT - 1}); migrate "
                f"more often (OnlineTieredConfig.migrate_every)")
        self._since_sync += ids.numel()
        ids = ids.to(torch.int64)
        slots = [self._slots(ids >> (level * self.branch_bits), level).reshape(-1)
                 for level in range(self.levels)]
        index = torch.cat(slots)
        self.pending.index_add_(0, index, torch.ones_like(index, dtype=self.pending.dtype))

    @torch.no_grad()
    def sync(self, collective: Any = None) -> None:
        """Fold every rank's ``pending`` into ``counts`` (``collective.all_reduce_sum``; None:
        this process only). Collective: every rank calls it at the same step."""
        pending = self.pending.to(torch.int64)  # summed over ranks without overflow
        delta = pending if collective is None else collective.all_reduce_sum(pending)
        total = self.counts.to(torch.int64) + delta
        if self.size and int(total.max()) >= 2 ** 31:
            raise ValueError(
                f"table '{self.table_name}': a hot-id sketch counter would exceed int32 (more "
                f"than {LIMIT} ids counted by all ranks since the last migration); migrate "
                f"more often (OnlineTieredConfig.migrate_every)")
        self.counts.copy_(total)
        self.pending.zero_()
        self._since_sync = 0

    @torch.no_grad()
    def halve_if_large(self) -> bool:
        """Halve every counter of ``counts`` (rounding down) if one has reached ``2**30``;
        returns whether it did. Call it where ``counts`` is the same on every rank (after
        :meth:`sync`, at a migration)."""
        if self.size == 0 or int(self.counts.max()) < LIMIT:
            return False
        self.counts.div_(2, rounding_mode="floor")
        return True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A loaded pending counter bounds the ids counted since its last sync.
        self._since_sync = int(self.pending.max()) if self.size else 0

    @property
    def total(self) -> int:
        """Ids counted into ``counts`` (level 0's exact total, or any sketch row's sum)."""
        if self.exact[0]:
            return int(self.counts[: self.level_sizes[0]].sum())
        return int(self.counts[: self.width].sum())

    def estimate(self, prefixes: torch.Tensor, level: int = 0) -> torch.Tensor:
        """Estimated counts (of ``counts``, never below the true ones) of ``prefixes`` of
        ``level`` (level 0: ids)."""
        slots = self._slots(prefixes.to(torch.int64), level)
        est = self.counts[slots]
        return est if self.exact[level] else est.min(dim=0).values

    def top_k(self, k: int, beam: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` ids of highest estimated count (fewer if fewer were seen), ordered by
        count descending then id ascending, and their estimates. ``beam`` (default
        ``max(4 * k, 1024)``): prefixes kept per level."""
        beam = max(4 * k, 1024) if beam is None else beam
        fan = 2 ** self.branch_bits
        top = self.levels - 1
        cand = torch.arange(self.level_sizes[top], device=self.counts.device)
        for level in range(top, -1, -1):
            if level < top:
                cand = (cand[:, None] * fan + torch.arange(fan, device=cand.device)).reshape(-1)
                cand = cand[cand < self.level_sizes[level]]
            est = self.estimate(cand, level)
            keep = est > 0
            cand, est = _order(cand[keep], est[keep])
            limit = k if level == 0 else beam
            cand, est = cand[:limit], est[:limit]
        return cand, est


def _order(ids: torch.Tensor, est: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ids`` by estimate descending, ties by id ascending."""
    by_id = torch.argsort(ids, stable=True)
    ids, est = ids[by_id], est[by_id]
    by_est = torch.argsort(est, descending=True, stable=True)
    return ids[by_est], est[by_est]
