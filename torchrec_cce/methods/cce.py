"""Clustered Compositional Embeddings (Tsang & Ahle, NeurIPS 2023).

``e(x) = concat_i(A_i[p_i(x)] + B_i[h_i(x)])``. Layout: one codebook table ``<table>__cce`` of
``2 * chunks * rows`` rows and ``dim / chunks`` columns; chunk ``i`` owns rows
``[2i * rows, 2(i+1) * rows)``, ``A_i`` first, then ``B_i``. Each id puts the two rows
``2i*rows + p_i(x)`` and ``2i*rows + rows + h_i(x)`` into the bag of its chunk's stream
(feature ``<feature>__cce_c<i>``), so the codebook EBC's SUM pooling computes ``A_i + B_i`` and
the concatenation of the per-chunk outputs is the vector (compose is a column slice). This is
the fastest layout measured (``benchmarks/speed.py --sections layout``): fbgemm's CPU backward
costs 3.6x more with one table per chunk and 1.3x more with one-id bags into stacked ``A`` /
``B`` tables. Code that reads or writes ``A``/``B`` uses :meth:`CCETable.ab_rows`,
:meth:`CCETable.stack_ab` and :meth:`CCETable.unstack_ab`, not the layout.

State besides the codebooks:

* ``assignment`` (``V x chunks``, int16 when ``rows <= 32768`` else int32): ``p_i(x)`` for
  ids in ``[0, V)``. It starts as a hash (independent of ``h_i``) and is overwritten with
  k-means assignments by :func:`torchrec_cce.recluster`. Ids outside ``[0, V)`` keep using that
  initial hash, so they never read out of bounds (after clustering they land on a hashed
  centroid).
* ``h_generation`` (0-d int64): which member of the hash family ``h_i`` is; re-clustering
  increments it to draw fresh hashes.
* a reservoir of training ids (not saved) that re-clustering samples from.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.clustering.sampling import IdReservoir
from torchrec_cce.configs import CCEConfig
from torchrec_cce.hashing import combine_keys, derive_seed, hash_ids, smallest_int_dtype
from torchrec_cce.methods.base import Codebook, CompressedTable, StreamSpec

MAX_RESERVOIR = 1 << 21


class CCETable(CompressedTable):
    method_name = "cce"
    concat_compose = True

    def __init__(self, table: EmbeddingBagConfig, config: CCEConfig,
                 device: Optional[torch.device] = None, store_assignment: bool = True) -> None:
        super().__init__(table)
        self.config = config
        self.rows, self.chunks = config.rows, config.chunks
        self.chunk_dim = table.embedding_dim // config.chunks
        self.p_keys = [derive_seed(config.seed, table.name, i, "p") for i in range(self.chunks)]
        self.h_base_keys = [derive_seed(config.seed, table.name, i, "h") for i in range(self.chunks)]
        self.codebooks = [Codebook("cce", 2 * self.chunks * self.rows, self.chunk_dim,
                                   [f"cce_c{i}" for i in range(self.chunks)])]
        self.assignment_dtype = smallest_int_dtype(self.rows)
        self.register_buffer("h_generation", torch.zeros((), dtype=torch.int64, device=device))
        # The sharded module stores the assignment itself (split by id range), not here.
        if store_assignment:
            self.register_buffer("assignment", torch.empty(
                (table.num_embeddings, self.chunks), dtype=self.assignment_dtype, device=device))
        else:
            self.assignment = None
        self.reservoir = IdReservoir(min(256 * self.rows, MAX_RESERVOIR), seed=config.seed,
                                     device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``p`` to its initial hash (no-op on the meta device)."""
        if self.assignment is not None and not self.assignment.is_meta:
            ids = torch.arange(self.num_embeddings, device=self.assignment.device)
            self.assignment.copy_(self.hash_assignment(ids).to(self.assignment_dtype))

    def hash_assignment(self, ids: torch.Tensor) -> torch.Tensor:
        """The initial ``p`` (a hash): ``[n, chunks]`` int64 codebook rows (chunk-local)."""
        return torch.stack([hash_ids(ids, k, self.rows) for k in self.p_keys], dim=1)

    def h_keys(self, generation: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        gen = self.h_generation if generation is None else generation
        return [combine_keys(k, gen) for k in self.h_base_keys]

    def bucket(self, ids: torch.Tensor, generation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``h(x)``: ``[n, chunks]`` int64 chunk-local rows of ``B`` (current generation by
        default)."""
        return torch.stack([hash_ids(ids, k, self.rows) for k in self.h_keys(generation)], dim=1)

    def lookup_assignment(self, ids: torch.Tensor, assignment: Optional[torch.Tensor] = None,
                          offset: int = 0) -> torch.Tensor:
        """``p(x)``: ``[n, chunks]`` int64 chunk-local rows of ``A``.

        ``assignment`` holds rows ``[offset, offset + len)`` of ``p`` (the whole of ``p`` by
        default); ids outside it fall back to the initial hash.
        """
        table = self.assignment if assignment is None else assignment
        local = ids - offset
        inside = (local >= 0) & (local < table.shape[0])
        stored = table[torch.where(inside, local, torch.zeros_like(local))].to(torch.int64)
        return torch.where(inside.unsqueeze(1), stored, self.hash_assignment(ids))

    def observe(self, ids: torch.Tensor) -> None:
        if self.training:
            self.reservoir.observe(ids)

    def streams_from(self, p: torch.Tensor, h: torch.Tensor) -> List[torch.Tensor]:
        """Chunk-local ``p``/``h`` ``[n, chunks]`` -> per chunk ``[n, 2]`` rows of the codebook
        table: ``(2i*rows + p_i(x), 2i*rows + rows + h_i(x))``."""
        r = self.rows
        return [torch.stack([p[:, i] + 2 * i * r, h[:, i] + (2 * i + 1) * r], dim=1)
                for i in range(self.chunks)]

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        return self.streams_from(self.lookup_assignment(ids), self.bucket(ids))

    def stream_specs(self) -> List[StreamSpec]:
        return [StreamSpec("cce_pair", self.rows, offset=2 * i * self.rows, key=self.p_keys[i],
                           h_key=self.h_base_keys[i], column=i, num_ids=self.num_embeddings)
                for i in range(self.chunks)]

    def dense_assignment(self) -> Optional[torch.Tensor]:
        """``p`` as a dense ``[V, chunks]`` int16/int32 tensor the fused op reads directly, or
        None (not stored here, or stored in another form: ``p`` is then looked up with
        :meth:`lookup_assignment` and handed to the op precomputed)."""
        a = self.assignment
        if (isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[1] == self.chunks
                and a.dtype in (torch.int16, torch.int32)):
            return a
        return None

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(pooled, dim=1)

    # ---- where A_i and B_i live (re-clustering and tests use these, not the layout) ----
    def ab_rows(self, chunk: int) -> Tuple[str, slice, slice]:
        """``(codebook suffix, rows of A_chunk, rows of B_chunk)`` in that codebook table."""
        first = 2 * chunk * self.rows
        return "cce", slice(first, first + self.rows), slice(first + self.rows, first + 2 * self.rows)

    def stack_ab(self, weight: Callable[[str], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``, each ``[chunks * rows, chunk_dim]`` with chunk ``i`` in rows
        ``[i * rows, (i + 1) * rows)``, from ``weight(suffix)`` (a codebook table's weight)."""
        a, b = [], []
        for i in range(self.chunks):
            suffix, ra, rb = self.ab_rows(i)
            w = weight(suffix)
            a.append(w[ra])
            b.append(w[rb])
        return torch.cat(a), torch.cat(b)

    def unstack_ab(self, A: torch.Tensor, B: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Inverse of :meth:`stack_ab`: ``{codebook suffix: full codebook table}``."""
        parts: Dict[str, List[torch.Tensor]] = {}
        for i in range(self.chunks):
            suffix, _, _ = self.ab_rows(i)
            rows = slice(i * self.rows, (i + 1) * self.rows)
            parts.setdefault(suffix, []).extend([A[rows], B[rows]])
        return {suffix: torch.cat(p) for suffix, p in parts.items()}

    def assignment_bytes(self) -> int:
        if self.assignment is None:
            return 0
        return self.assignment.numel() * self.assignment.element_size()

    def row_bytes(self) -> int:
        """Bytes of ``p`` per id (``chunks`` entries of the assignment dtype)."""
        return self.chunks * torch.empty((), dtype=self.assignment_dtype).element_size()

    def logical_assignment_bytes(self) -> int:
        """Bytes of the whole ``p`` (``V x chunks``), wherever and however it is stored."""
        return self.num_embeddings * self.row_bytes()

    def state_bytes(self) -> int:
        return self.assignment_bytes()
