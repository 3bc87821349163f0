"""Online hot/cold tiers (:class:`~torchrec_cce.configs.OnlineTieredConfig`): the hot set is
learned during training by a heavy-hitter sketch, for ids that are not frequency-ordered
(CAFE's hot features with migration, Zhang et al., SIGMOD 2024).

The table holds

* ``sketch``: a :class:`~torchrec_cce.hot_sketch.HotSketch` counting every id of every
  training batch (:meth:`OnlineTieredTable.observe`; not in eval);
* the hot map: ``hot_sorted`` (the hot ids in ascending order, ``[H]`` int64, unused entries
  ``V + slot`` so the tensor stays sorted and never matches an id) and ``hot_slot`` (the row of
  the hot codebook each holds). An id is hot when ``searchsorted`` finds it;
* ``cold``: the cold method over all ``V`` ids (an id keeps its cold rows while hot, and reads
  them again once demoted).

Remap: each bag's hot ids read their row of the ``H x dim`` codebook ``<table>__hot`` (stream
``hot``), its other ids go through the cold method's streams with their own bag lengths, as in
:class:`~torchrec_cce.methods.tiered.TieredTable`; compose adds the two parts.

Migration (:meth:`OnlineTieredTable.migrate_map`, called every ``migrate_every`` training
steps by the training hooks): the sketch's pending counts are summed over ranks, the new hot set
is its top ``H`` (ties by id: the same on every rank); ids still hot keep their slot (row and
optimizer state), newly hot ids take the freed slots in id order, and the caller writes each new
row from the id's current cold vector (:meth:`cold_vectors`) and resets its optimizer state.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.configs import OnlineTieredConfig
from torchrec_cce.hot_sketch import HotSketch
from torchrec_cce.methods.base import CompressedTable, check_id_range
from torchrec_cce.methods.tiered import Bags, TieredTable


class OnlineTieredTable(TieredTable):
    """``hot_ids`` exclusive rows for the ids a sketch finds hot, ``cold`` for the rest.

    What it shares with the prefix tier (:class:`TieredTable`: the hot codebook, remap of bags
    into hot and cold streams, compose, the cold part's state and bytes) is inherited; the hot
    set (:meth:`split`, :meth:`cold_ids`), counting, migration and the sketch's bytes are its
    own."""

    method_name = "online_tiered"  # per instance: "<cold method>+online_hot"

    def __init__(self, table: EmbeddingBagConfig, config: OnlineTieredConfig,
                 cold: CompressedTable, device: Optional[torch.device] = None) -> None:
        super().__init__(table, config, cold)
        self.migrate_every: int = config.migrate_every
        self.method_name = f"{cold.method_name}+online_hot"
        self.sketch = HotSketch(table.num_embeddings, width=config.sketch_width,
                                depth=config.sketch_depth, seed=config.seed, table=table.name,
                                device=device)
        slots = torch.arange(self.hot_ids, dtype=torch.int64, device=device)
        self.register_buffer("hot_sorted", slots + table.num_embeddings)  # no id hot yet
        self.register_buffer("hot_slot", slots.clone())

    # ---- the hot map ----
    def check_ids(self, ids: torch.Tensor) -> None:
        check_id_range(self.table_name, ids, self.num_embeddings,
                       "an online tiered table (OnlineTieredConfig) counts and looks up "
                       "vocabulary ids: map raw values to ids upstream (torchrec_cce.data."
                       "preprocess) or hash them into [0, num_embeddings)")

    def hot_lookup(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(is_hot, slot)`` per id (``slot`` meaningful where ``is_hot``)."""
        pos = torch.searchsorted(self.hot_sorted, ids).clamp_(max=self.hot_ids - 1)
        return self.hot_sorted[pos] == ids, self.hot_slot[pos]

    def hot_set(self) -> torch.Tensor:
        """The hot ids, ascending."""
        return self.hot_sorted[self.hot_sorted < self.num_embeddings]

    def split(self, ids: torch.Tensor, lengths: torch.Tensor,
              weights: Optional[torch.Tensor] = None) -> Tuple[Bags, Bags]:
        """Bags of ``ids`` -> (hot bags of hot-codebook rows, cold bags of ids): the same bags
        with only their hot ids (as slots) / only their cold ids, order kept, weights carried."""
        self.check_ids(ids)
        if ids.is_meta:  # shapes only: every id counted cold
            return (ids[:0], torch.zeros_like(lengths), None if weights is None else weights[:0]
                    ), (ids, lengths, weights)
        hot, slot = self.hot_lookup(ids)
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths,
                                      output_size=ids.numel())
        hot_lengths = torch.zeros_like(lengths).index_add_(0, bag, hot.to(lengths.dtype))
        cold = ~hot
        return ((slot[hot], hot_lengths, None if weights is None else weights[hot]),
                (ids[cold], lengths - hot_lengths, None if weights is None else weights[cold]))

    def cold_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids among ``ids`` that are not hot, in order (the cold method's ids)."""
        self.check_ids(ids)
        if ids.is_meta:
            return ids
        return ids[~self.hot_lookup(ids)[0]]

    def observe(self, ids: torch.Tensor) -> None:
        """Training batches only: count ``ids`` in the sketch, pass the cold ones on (CCE's
        re-clustering sample)."""
        self.check_ids(ids)
        if ids.is_meta or not self.training or torch.compiler.is_exporting():
            return
        self.sketch.observe(ids)
        if type(self.cold).observe is not CompressedTable.observe:  # (CCE's sample)
            self.cold.observe(self.cold_ids(ids))

    # ---- migration ----
    @torch.no_grad()
    def migrate_map(self, collective: object = None) -> Tuple[torch.Tensor, torch.Tensor,
                                                              Dict[str, int]]:
        """Sum the sketch over ranks (``collective``, None: this process), make its top
        ``hot_ids`` the hot set and return ``(promoted ids, their slots, stats)``: the newly
        hot ids (ascending) and the hot-codebook rows they now read, which the caller fills
        with :meth:`cold_vectors`. Ids still hot keep their slots. Collective."""
        self.sketch.sync(collective)
        self.sketch.halve_if_large()  # (the same counters on every rank)
        new, _ = self.sketch.top_k(self.hot_ids)
        old = self.hot_set()
        old_slots = self.hot_lookup(old)[1]
        stay = torch.isin(old, new)
        promoted = new[~torch.isin(new, old)].sort().values
        used = torch.zeros(self.hot_ids, dtype=torch.bool, device=new.device)
        used[old_slots[stay]] = True
        free = torch.nonzero(~used).flatten()
        slots = free[: promoted.numel()]
        unused = free[promoted.numel():]
        ids = torch.cat([old[stay], promoted, unused + self.num_embeddings])
        order = torch.argsort(ids)
        self.hot_sorted.copy_(ids[order])
        self.hot_slot.copy_(torch.cat([old_slots[stay], slots, unused])[order])
        stats = {"hot": int(new.numel()), "promoted": int(promoted.numel()),
                 "demoted": int((~stay).sum()), "sketch_total": self.sketch.total}
        return promoted, slots, stats

    def cold_vectors(self, ids: torch.Tensor, weight_of: Callable[[str], torch.Tensor],
                     assignment: Optional[torch.Tensor] = None,
                     id_weights: Optional[torch.Tensor] = None,
                     streams: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """``[n, dim]`` float32: what the cold method gives each of ``ids`` alone (a bag of one),
        from ``weight_of(suffix)``, the whole codebook table of each cold codebook.
        ``assignment`` (a CCE cold part's ``p``), ``id_weights`` (MEmCom's) of ``ids`` or their
        codebook rows ``streams``: given by the sharded module, else computed here."""
        if streams is None:
            streams = (self.cold.remap(ids) if assignment is None
                       else self.cold.streams_from(assignment, self.cold.bucket(ids)))
        id_w = self.cold.id_weights(ids) if id_weights is None else id_weights
        pooled, i = [], 0
        for cb in self.cold.codebooks:
            weight = weight_of(cb.suffix)
            for _ in cb.streams:
                rows = streams[i]
                v = weight[rows].to(torch.float32)
                v = v.sum(dim=1) if rows.dim() == 2 else v
                pooled.append(v if id_w is None else v * id_w.to(torch.float32)[:, None])
                i += 1
        return self.cold.compose(pooled).to(torch.float32)

    # ---- state ----
    def hot_map_bytes(self) -> int:
        """Bytes of ``hot_sorted`` and ``hot_slot`` (int64 each)."""
        return 2 * 8 * self.hot_ids

    def replicated_state_bytes(self) -> int:
        """The cold part's, plus the sketch and the hot map (the same on every rank)."""
        return super().replicated_state_bytes() + self.sketch.stored_bytes() + self.hot_map_bytes()

    def reset_parameters(self) -> None:
        """The cold part's own reset, an empty hot set and a zero sketch (as constructed)."""
        super().reset_parameters()
        slots = torch.arange(self.hot_ids, dtype=torch.int64, device=self.hot_slot.device)
        self.hot_sorted.copy_(slots + self.num_embeddings)
        self.hot_slot.copy_(slots)
        self.sketch.counts.zero_()
        self.sketch.pending.zero_()
        self.sketch._since_sync = 0
