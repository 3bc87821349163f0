"""Clustered Compositional Embeddings (Tsang & Ahle, NeurIPS 2023).

``e(x) = concat_i(A_i[p_i(x)] + B_i[h_i(x)])``. Layout: one codebook table ``<table>__cce`` of
``2 * chunks * rows`` rows and ``dim / chunks`` columns; chunk ``i`` owns rows
``[2i * rows, 2(i+1) * rows)``, ``A_i`` first, then ``B_i``. Each id puts the two rows
``2i*rows + p_i(x)`` and ``2i*rows + rows + h_i(x)`` into the bag of its chunk's stream
(feature ``<feature>__cce_c<i>``), so the codebook EBC's SUM pooling computes ``A_i + B_i`` and
the concatenation of the per-chunk outputs is the vector (compose is a column slice). This is
the fastest layout measured (``benchmarks/speed.py --sections layout``): fbgemm's CPU backward
costs 3.6x more with one table per chunk and 1.3x more with one-id bags into stacked ``A`` /
``B`` tables; stacking every CCE table's codebook into one table measured the same within the
machine's noise (0.77x vs 0.74x of the full table's step, ids precomputed), so each table keeps
its own. Code that reads or writes ``A``/``B`` uses :meth:`CCETable.ab_rows`,
:meth:`CCETable.stack_ab` and :meth:`CCETable.unstack_ab`, not the layout.

State besides the codebooks:

* ``assignment``: ``p_i(x)`` for the *covered* ids ``[0, N)`` (``N = config.assigned_ids``,
  default every id), bit-packed at ``ceil(log2(rows))`` bits per chunk entry in int32 words
  (:mod:`torchrec_cce.methods.packed`; the words are the stored form). It starts as a hash
  (independent of ``h_i``) and is overwritten with k-means assignments by
  :func:`torchrec_cce.recluster`. Uncovered ids (``[N, V)``) and ids outside ``[0, V)`` always
  use that initial hash (so they never read out of bounds; after clustering they land on a
  hashed centroid). A sharded module's table stores only the packed words of its id range
  ``[stored_lo, stored_hi)``. Read and write ``p`` only through :meth:`CCETable.read_assignment`,
  :meth:`CCETable.write_assignment` and :meth:`CCETable.lookup_assignment`.
* ``h_generation`` (0-d int64): which member of the hash family ``h_i`` is; re-clustering
  increments it to draw fresh hashes.

``CCEConfig(init="qr")`` replaces the initial hashes by the quotient/remainder of a per-chunk
affine bijection of the id (:meth:`CCETable.qr_pair`): unique ``(p_i, h_i)`` per chunk when
``rows**2 >= V``; the fused remap op computes it too (spec columns ``kQRMul``/``kQRAdd``/
``kKeepRemainder``).
* a reservoir of training ids (not saved) that re-clustering samples from.
"""

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.clustering.sampling import IdReservoir
from torchrec_cce.configs import CCEConfig, codebook_data_type
from torchrec_cce.hashing import combine_keys, derive_seed, hash_ids
from torchrec_cce.methods import packed
from torchrec_cce.methods.base import Codebook, CompressedTable, PerIdState, StreamSpec

MAX_RESERVOIR = 1 << 21


def _coprime_affine(V: int, seed: int, table: str, chunk: int) -> Tuple[int, int]:
    """Seeded ``(a, b)`` with ``1 <= a < V``, ``gcd(a, V) = 1``, ``0 <= b < V`` (so
    ``x -> (a x + b) mod V`` permutes ``[0, V)``); ``a < 2**31`` keeps ``a x`` inside int64."""
    if V <= 2:
        return 1, 0
    span = min(V, 1 << 31) - 1
    a = 1 + derive_seed(seed, table, chunk, "qr_a") % span
    while math.gcd(a, V) != 1:
        a = a % span + 1
    return a, derive_seed(seed, table, chunk, "qr_b") % V


class CCETable(CompressedTable):
    method_name = "cce"
    concat_compose = True

    def __init__(self, table: EmbeddingBagConfig, config: CCEConfig,
                 device: Optional[torch.device] = None, store_assignment: bool = True,
                 id_range: Optional[Tuple[int, int]] = None) -> None:
        """``id_range``: the covered ids ``[lo, hi)`` whose ``p`` this module stores
        (default all of ``[0, N)``; the sharder passes a rank's id range).
        ``store_assignment=False`` stores none."""
        super().__init__(table)
        self.config = config
        # TorchRec data type of the A/B codebook tables (read by modules.codebook_configs).
        self.codebook_data_type = codebook_data_type(table, config.codebook_dtype)
        self.rows, self.chunks = config.rows, config.chunks
        self.chunk_dim = table.embedding_dim // config.chunks
        self.p_keys = [derive_seed(config.seed, table.name, i, "p") for i in range(self.chunks)]
        self.h_base_keys = [derive_seed(config.seed, table.name, i, "h") for i in range(self.chunks)]
        self.init = getattr(config, "init", "hash")
        self.keep_remainder = bool(getattr(config, "keep_remainder", False))
        # init="qr": x' = (a_i x + b_i) mod V per chunk, gcd(a_i, V) = 1 (a bijection of [0, V))
        self.qr_affine = [_coprime_affine(table.num_embeddings, config.seed, table.name, i)
                          for i in range(self.chunks)] if self.init == "qr" else []
        self.codebooks = [Codebook("cce", 2 * self.chunks * self.rows, self.chunk_dim,
                                   [f"cce_c{i}" for i in range(self.chunks)])]
        self.assignment_bits = packed.bits_for(self.rows)
        self.assigned_ids = config.num_assigned(table)
        lo, hi = id_range if id_range is not None else (0, self.assigned_ids)
        if not store_assignment:
            lo = hi = 0
        if not 0 <= lo <= hi <= self.assigned_ids:
            raise ValueError(f"table '{table.name}': id_range {(lo, hi)} is not inside "
                             f"the covered ids [0, {self.assigned_ids})")
        if lo % self.id_alignment():
            raise ValueError(f"table '{table.name}': id_range must start at a multiple "
                             f"of {self.id_alignment()} ids (a packed word boundary), got {lo}")
        self.stored_lo, self.stored_hi = lo, hi
        self.register_buffer("h_generation", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("assignment", torch.zeros(
            packed.num_words(hi - lo, self.chunks, self.assignment_bits),
            dtype=packed.WORD_DTYPE, device=device))
        # Ids re-clustering samples, over all ranks together: each of W ranks keeps
        # ceil(sample_capacity / W) of them once sharded (share_sample).
        self.sample_capacity = min(256 * self.rows, MAX_RESERVOIR)
        self.reservoir = IdReservoir(self.sample_capacity, seed=config.seed, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the hash generation to 0 and the stored ``p`` to its initial hash (no-op on the
        meta device)."""
        if self.assignment.is_meta:
            return
        self.h_generation.zero_()
        step = self.id_alignment() * max(1, (1 << 18) // self.id_alignment())
        device = self.assignment.device
        for b_lo in range(self.stored_lo, self.stored_hi, step):
            ids = torch.arange(b_lo, min(self.stored_hi, b_lo + step), device=device)
            words = packed.pack(self.hash_assignment(ids), self.assignment_bits)
            first = packed.num_words(b_lo - self.stored_lo, self.chunks, self.assignment_bits)
            self.assignment[first: first + words.numel()] = words

    def hash_assignment(self, ids: torch.Tensor) -> torch.Tensor:
        """The initial ``p`` (a hash; with ``init="qr"`` the quotient of :meth:`qr_pair`):
        ``[n, chunks]`` int64 codebook rows (chunk-local). Uncovered ids always use it."""
        if self.init == "qr":
            return self.qr_pair(ids)[0]
        return torch.stack([hash_ids(ids, k, self.rows) for k in self.p_keys], dim=1)

    def qr_pair(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``init="qr"``: ``(p, h)``, each ``[n, chunks]`` int64: for chunk ``i``,
        ``x' = (a_i (x mod V) + b_i) mod V``, ``p_i = (x' // rows) mod rows``,
        ``h_i = x' mod rows``. A bijection of ``[0, V)`` followed by quotient/remainder: every
        id has its own pair in every chunk whenever ``rows**2 >= V``."""
        V, r = self.num_embeddings, self.rows
        x = torch.remainder(ids.to(torch.int64), V)
        xs = torch.stack([torch.remainder(a * x + b, V) for a, b in self.qr_affine], dim=1)
        return torch.remainder(torch.div(xs, r, rounding_mode="floor"), r), torch.remainder(xs, r)

    # ---- the stored assignment (every read and write of p goes through these) ----
    def id_alignment(self) -> int:
        """Id blocks that are multiples of this start on a packed word boundary."""
        return packed.id_alignment(self.chunks, self.assignment_bits)

    def _check_stored(self, ids: torch.Tensor, what: str) -> None:
        outside = (ids < self.stored_lo) | (ids >= self.stored_hi)
        if bool(outside.any()):
            bad = ids[outside][:5].tolist()
            raise ValueError(
                f"table '{self.table_name}': {what} ids {bad}... are not stored here (this "
                f"module stores p for ids [{self.stored_lo}, {self.stored_hi}) of the covered "
                f"[0, {self.assigned_ids}))")

    def read_assignment(self, ids: torch.Tensor) -> torch.Tensor:
        """The stored ``p`` of ``ids`` (each in ``[stored_lo, stored_hi)``): ``[n, chunks]``
        int64."""
        self._check_stored(ids, "read_assignment")
        return packed.unpack(self.assignment, ids - self.stored_lo, self.chunks,
                             self.assignment_bits)

    def write_assignment(self, ids: torch.Tensor, p: torch.Tensor) -> None:
        """Set ``p`` of ``ids`` (unique, in ``[0, V)``) to ``p`` (``[n, chunks]`` in
        ``[0, rows)``). Uncovered ids (``>= assigned_ids``) are skipped: they keep the hash.
        Covered ids must be stored by this module."""
        ids = ids.to(torch.int64)
        if p.shape != (ids.numel(), self.chunks):
            raise ValueError(f"table '{self.table_name}': write_assignment needs p of shape "
                             f"[{ids.numel()}, {self.chunks}], got {tuple(p.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"table '{self.table_name}': write_assignment ids must be in "
                             f"[0, {self.num_embeddings})")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= self.rows):
            raise ValueError(f"table '{self.table_name}': p values must be in [0, {self.rows})")
        keep = ids < self.assigned_ids
        ids, p = ids[keep], p[keep]
        self._check_stored(ids, "write_assignment")
        local = ids - self.stored_lo
        n, align = local.numel(), self.id_alignment()
        if n and int(local[0]) % align == 0 and torch.equal(
                local, torch.arange(int(local[0]), int(local[0]) + n, device=local.device)):
            # A contiguous block from a word boundary (re-clustering, resets): pack it whole,
            # up to its last full word; the rest goes through the general write.
            whole = n if int(local[-1]) + 1 == self.stored_hi - self.stored_lo else n // align * align
            first = packed.num_words(int(local[0]), self.chunks, self.assignment_bits)
            words = packed.pack(p[:whole], self.assignment_bits)
            self.assignment[first: first + words.numel()] = words
            local, p = local[whole:], p[whole:]
        packed.write(self.assignment, local, p, self.assignment_bits)

    def dense_assignment(self) -> torch.Tensor:
        """The stored ``p`` unpacked: ``[stored_hi - stored_lo, chunks]`` int64 (for tests and
        inspection; ``O(V)`` memory)."""
        return self.read_assignment(torch.arange(self.stored_lo, self.stored_hi,
                                                 device=self.assignment.device))

    def lookup_assignment(self, ids: torch.Tensor) -> torch.Tensor:
        """``p(x)`` for any int64 ids: ``[n, chunks]`` int64 chunk-local rows of ``A``.

        Stored ids read the packed ``p``; uncovered ids (``[N, V)``) and ids outside
        ``[0, V)`` use the initial hash. A covered id stored on another rank is an error
        (the sharded module fetches those from their owners).
        """
        inside = (ids >= self.stored_lo) & (ids < self.stored_hi)
        if self.stored_lo > 0 or self.stored_hi < self.assigned_ids:
            covered = (ids >= 0) & (ids < self.assigned_ids)
            if bool((covered & ~inside).any()):
                raise ValueError(
                    f"table '{self.table_name}': ids stored on another rank; this module holds "
                    f"p for [{self.stored_lo}, {self.stored_hi}) only")
        local = torch.where(inside, ids - self.stored_lo, torch.zeros_like(ids))
        if self.stored_hi == self.stored_lo:
            return self.hash_assignment(ids)
        stored = packed.unpack(self.assignment, local, self.chunks, self.assignment_bits)
        return torch.where(inside.unsqueeze(1), stored, self.hash_assignment(ids))

    def h_keys(self, generation: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        gen = self.h_generation if generation is None else generation
        return [combine_keys(k, gen) for k in self.h_base_keys]

    def bucket(self, ids: torch.Tensor, generation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``h(x)``: ``[n, chunks]`` int64 chunk-local rows of ``B`` (current generation by
        default). ``init="qr"``: the remainder of :meth:`qr_pair` before the first clustering
        (generation 0), and always with ``keep_remainder``."""
        if self.init == "qr":
            gen = self.h_generation if generation is None else generation
            if self.keep_remainder or int(gen) == 0:
                return self.qr_pair(ids)[1]
        return torch.stack([hash_ids(ids, k, self.rows) for k in self.h_keys(generation)], dim=1)

    def observe(self, ids: torch.Tensor) -> None:
        if self.training and not torch.compiler.is_exporting():  # (an export serves, no sample)
            self.reservoir.observe(ids)

    def streams_from(self, p: torch.Tensor, h: torch.Tensor) -> List[torch.Tensor]:
        """Chunk-local ``p``/``h`` ``[n, chunks]`` -> per chunk ``[n, 2]`` rows of the codebook
        table: ``(2i*rows + p_i(x), 2i*rows + rows + h_i(x))``."""
        r = self.rows
        return [torch.stack([p[:, i] + 2 * i * r, h[:, i] + (2 * i + 1) * r], dim=1)
                for i in range(self.chunks)]

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        return self.streams_from(self.lookup_assignment(ids), self.bucket(ids))

    def stream_specs(self) -> Optional[List[StreamSpec]]:
        qr = self.qr_affine or [(0, 0)] * self.chunks  # a = 0: the hashed init
        return [StreamSpec("cce_pair", self.rows, offset=2 * i * self.rows, key=self.p_keys[i],
                           h_key=self.h_base_keys[i], column=i, num_ids=self.num_embeddings,
                           qr_mul=qr[i][0], qr_add=qr[i][1], keep_remainder=self.keep_remainder)
                for i in range(self.chunks)]

    def fused_assignment(self) -> Optional[Tuple[torch.Tensor, int, int]]:
        """``(packed words, first id, id count)`` for the fused op to read ``p`` from directly
        (:mod:`torchrec_cce.ops`; ids outside ``[first, first + count)`` use the hash fallback,
        as in :meth:`lookup_assignment`), or None when this module stores ``p`` for only part
        of the covered ids (a sharded id range: ``p`` of the others is fetched from their
        owners and passed to the op precomputed)."""
        if self.stored_lo != 0 or self.stored_hi != self.assigned_ids:
            return None
        return self.assignment, self.stored_lo, self.stored_hi - self.stored_lo

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
        """Bytes of the packed ``p`` this module stores."""
        return self.assignment.numel() * self.assignment.element_size()

    def packed_assignment_bytes(self, num_ids: int) -> int:
        """Bytes of the packed ``p`` of ``num_ids`` ids (whole int32 words)."""
        return packed.packed_bytes(num_ids, self.chunks, self.assignment_bits)

    def logical_assignment_bytes(self) -> int:
        """Bytes of the whole packed ``p`` (covered ids), wherever it is stored."""
        return self.packed_assignment_bytes(self.assigned_ids)

    def _assignment_words(self, num_ids: int) -> int:
        return packed.num_words(num_ids, self.chunks, self.assignment_bits)

    def per_id_state(self) -> List[PerIdState]:
        """The packed ``p`` of the covered ids: whole int32 words, read where ids are remapped."""
        return [PerIdState("assignment", self.assigned_ids, self.assignment.element_size(),
                           entries=self._assignment_words, align=self.id_alignment(),
                           trainable=False)]

    def sample_share(self, world_size: int) -> int:
        """Ids of the sample each of ``world_size`` ranks keeps: ``ceil(sample_capacity / W)``."""
        return -(-self.sample_capacity // max(1, int(world_size)))

    def share_sample(self, world_size: int) -> None:
        """Keep ``ceil(sample_capacity / world_size)`` ids in this rank's reservoir (emptied), so
        that the sample re-clustering gathers from every rank stays ``sample_capacity`` ids
        whatever the world size (it would grow with it: 2^21 ids per rank are 69 GB gathered
        at 4,096 ranks)."""
        capacity = self.sample_share(world_size)
        if capacity != self.reservoir.capacity:
            self.reservoir = IdReservoir(capacity, seed=self.reservoir.seed,
                                         device=self.reservoir.ids.device)

    def sample_bytes(self, world_size: Optional[int] = None) -> int:
        """The id reservoir's int64 slots on each rank: as held now, or (``world_size``) once
        shared by that many ranks (:meth:`share_sample`)."""
        capacity = (self.reservoir.capacity if world_size is None
                    else self.sample_share(world_size))
        return capacity * self.reservoir.ids.element_size()

    def replicated_state_bytes(self) -> int:
        """The hash generation (one int64)."""
        return self.h_generation.numel() * self.h_generation.element_size()
