"""Hot/cold tiers (:class:`~torchrec_cce.configs.TieredConfig`): ids ``[0, H)`` read exclusive
rows of an uncompressed ``H x dim`` codebook (``<table>__hot``, stream ``hot``), the other ids go
through any method (the *cold* table, a :class:`CompressedTable` of ``V - H`` ids that sees the
id ``x`` as ``x - H``).

A tiered table is not one remap of every id: :meth:`TieredTable.split` sends each bag's hot ids
to the hot stream and its cold ids to the cold method's streams, each with its own bag lengths
(and per-id weights), so the codebook EBC pools the two parts separately and
:meth:`TieredTable.compose` adds them. The cold method's codebooks keep their names
(``<table>__cce`` ...), so everything that walks a method's codebooks by name (re-clustering,
byte counts) sees the cold table as it would see the table alone. The fused remap op has no
description of the split (:meth:`stream_specs` is None): collections with a tiered table take
the torch-ops remap.
"""

import dataclasses
from typing import List, Optional, Tuple

import torch
from torchrec import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_cce.configs import TieredConfig, codebook_data_type
from torchrec_cce.methods.base import Codebook, CompressedTable, PerIdState, check_id_range

Bags = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # ids, lengths, weights


class TieredTable(CompressedTable):
    """A hot tier of ``hot_ids`` exclusive rows in front of the ``cold`` method."""

    method_name = "tiered"  # per instance: "<cold method>+hot"

    def __init__(self, table: EmbeddingBagConfig, config: TieredConfig,
                 cold: CompressedTable) -> None:
        super().__init__(table)
        self.hot_ids: int = config.hot_ids
        self.cold = cold
        self.method_name = f"{cold.method_name}+hot"  # e.g. "cce+hot" (memory_report, plans)
        self.codebooks = [Codebook("hot", self.hot_ids, table.embedding_dim, ["hot"])] + list(
            cold.codebooks)
        # Codebook suffix -> stored precision (read by modules.codebook_configs).
        cold_type = getattr(cold, "codebook_data_type", None) or table.data_type
        self.codebook_data_types = {cb.suffix: cold_type for cb in cold.codebooks}
        self.codebook_data_types["hot"] = codebook_data_type(table, config.hot_dtype)
        # MPE cold tables pool their own (quantised) rows at compose time.
        self.local_lookup: bool = bool(getattr(cold, "local_lookup", False))
        # MEmCom cold tables weight their lookups: the collection's codebook EBC is weighted.
        self.id_weighted: bool = (type(cold).id_weights is not CompressedTable.id_weights)

    @property
    def cold_method_name(self) -> str:
        return self.cold.method_name

    def check_ids(self, ids: torch.Tensor) -> None:
        check_id_range(self.table_name, ids, self.num_embeddings,
                       f"a tiered table (TieredConfig) reads ids [0, {self.hot_ids}) from its "
                       f"hot rows and needs vocabulary ids: map raw values to ids upstream "
                       f"(torchrec_cce.data.preprocess)")

    def split(self, ids: torch.Tensor, lengths: torch.Tensor,
              weights: Optional[torch.Tensor] = None) -> Tuple[Bags, Bags]:
        """Bags of ``ids`` -> (hot bags, cold bags): the same bags with only their hot ids /
        only their cold ids (shifted by ``-hot_ids``), order kept, weights carried."""
        self.check_ids(ids)
        if ids.is_meta:  # shapes only: every id counted cold
            return (ids[:0], torch.zeros_like(lengths), None if weights is None else weights[:0]
                    ), (ids, lengths, weights)
        hot = ids < self.hot_ids
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths,
                                      output_size=ids.numel())
        hot_lengths = torch.zeros_like(lengths).index_add_(0, bag, hot.to(lengths.dtype))
        cold = ~hot
        return ((ids[hot], hot_lengths, None if weights is None else weights[hot]),
                (ids[cold] - self.hot_ids, lengths - hot_lengths,
                 None if weights is None else weights[cold]))

    def cold_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The cold ids among ``ids``, as the cold method sees them (``x - hot_ids``), in order."""
        self.check_ids(ids)
        return ids[ids >= self.hot_ids] - self.hot_ids

    def remap_bags(self, ids: torch.Tensor, lengths: torch.Tensor,
                   weights: Optional[torch.Tensor] = None,
                   assignment: Optional[torch.Tensor] = None) -> List[Bags]:
        """One ``(rows, lengths, weights)`` per stream (hot first, then the cold method's);
        ``rows`` is ``[n]`` or ``[n, k]`` as from :meth:`CompressedTable.remap`, the cold
        method's per-id weights (MEmCom) multiplied into its streams' weights. ``assignment``:
        a CCE cold part's ``p`` of the cold ids (:meth:`cold_ids`), looked up elsewhere (the
        sharded module fetches it from the ranks owning those ids)."""
        (h_ids, h_len, h_w), (c_ids, c_len, c_w) = self.split(ids, lengths, weights)
        id_w = self.cold.id_weights(c_ids)
        if id_w is not None:
            c_w = id_w if c_w is None else c_w * id_w
        streams = (self.cold.remap(c_ids) if assignment is None
                   else self.cold.streams_from(assignment, self.cold.bucket(c_ids)))
        return [(h_ids, h_len, h_w)] + [(rows, c_len, c_w) for rows in streams]

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError(
            f"table '{self.table_name}': a tiered table remaps bags (remap_bags), not ids")

    def _check_ids(self, ids: torch.Tensor) -> None:
        """(The sharded module's check of self-looked-up tables' ids.)"""
        self.check_ids(ids)

    def per_id_state(self) -> List[PerIdState]:
        """The cold part's per-id state (over the ``V - hot_ids`` cold ids), named by its path
        from this module (``"cold.assignment"`` ...: see :meth:`__getattr__`)."""
        return [dataclasses.replace(s, name=f"cold.{s.name}") for s in self.cold.per_id_state()]

    def __getattr__(self, name: str):  # noqa: ANN204 - a tensor or a submodule
        """Dotted names reach into submodules (``"cold.id_weight"``), so code that reads a
        per-id state by its declared name (``getattr(method, state.name)``) finds the cold
        part's."""
        if "." in name:
            head, rest = name.split(".", 1)
            return getattr(super().__getattr__(head), rest)
        return super().__getattr__(name)

    def observe(self, ids: torch.Tensor) -> None:
        self.check_ids(ids)
        if not ids.is_meta:
            self.cold.observe(ids[ids >= self.hot_ids] - self.hot_ids)

    def pooled_lookup(self, jt: JaggedTensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """The cold part's own SUM-pooled lookup (an MPE cold table, ``local_lookup``)."""
        _, (c_ids, c_len, c_w) = self.split(jt.values(), jt.lengths(), weights)
        return self.cold.pooled_lookup(JaggedTensor(values=c_ids, lengths=c_len, weights=c_w),
                                       c_w)

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return pooled[0].to(torch.float32) + self.cold.compose(pooled[1:]).to(torch.float32)

    def reset_parameters(self) -> None:
        reset = getattr(self.cold, "reset_parameters", None)
        if reset is not None:
            reset()

    # state_bytes / logical_state_bytes / per_id_bytes: the base class derives them from
    # per_id_state() (the cold part's, reached by dotted name) and this:
    def replicated_state_bytes(self) -> int:
        return self.cold.replicated_state_bytes()

    def assignment_bytes(self) -> int:
        return self.cold.assignment_bytes()

    def sample_bytes(self, world_size: Optional[int] = None) -> int:
        return self.cold.sample_bytes(world_size)

    def share_sample(self, world_size: int) -> None:
        self.cold.share_sample(world_size)

    def extra_parameters(self) -> int:
        return self.cold.extra_parameters()
