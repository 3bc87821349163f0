"""Diagnostic: does a learned per-dimension gain on the pooled embeddings explain QR-mult's
lead on Yelp2018? (quality_notes.md, "Why CCE loses on Yelp2018".) Not part of the grid.

    .venv/bin/python benchmarks/gain_probe.py dense <train.py arguments>
    .venv/bin/python benchmarks/gain_probe.py qr1 <train.py arguments, --method qr>

``dense``: DLRM whose pooled embeddings ``[B, F, D]`` are multiplied by a learned ``[F, D]``
gain (initialised to 1, trained by the dense optimizer), for any ``--method``.
``qr1``: every table is QR-mult with ``collisions = V`` (the full table ``R`` times a one-row
quotient table ``Q``, a gain trained by the sparse optimizer; 1 row more than the full table).
``qr_balanced``: every table is QR-mult (float16) with ``collisions = ceil(sqrt(V))``: two
id-dependent factors of equal size, no gain-like quotient table (what a multiplicative CCE with
``init="qr"``, one chunk, would be before its first re-clustering).
``hash_mult``: every table ``A[h1(x)] * B[h2(x)]`` (float16, two independently hashed
full-width codebooks of ``PROBE_ROWS`` rows each, e.g. ``PROBE_ROWS=t_user=7249,t_item=10084``):
a multiplicative CCE before any re-clustering (hashed ``p``), at the bytes the rows give.
"""

import functools
import math
import os
import sys

import torch
from torch import nn
from torchrec.models.dlrm import DLRM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                                "dlrm"))
import train  # noqa: E402

from torchrec_cce import modules  # noqa: E402
from torchrec_cce.configs import HashingTrickConfig, QRConfig, codebook_data_type  # noqa: E402
from torchrec_cce.distributed import sharder  # noqa: E402
from torchrec_cce.hashing import derive_seed, hash_ids  # noqa: E402
from torchrec_cce.methods.base import Codebook, CompressedTable, StreamSpec  # noqa: E402


class HashMultConfig(HashingTrickConfig):
    """Marks a table for :class:`HashMultTable` (``rows`` rows in each of A and B)."""


class HashMultTable(CompressedTable):
    """``e(x) = A[h1(x)] * B[h2(x)]`` (product of the pooled A and B bags, like QR-mult)."""

    method_name = "hash_mult"
    elementwise_compose = "mult"

    def __init__(self, table, config) -> None:
        super().__init__(table)
        self.rows = config.rows
        self.keys = [derive_seed(config.seed, table.name, i, "hash_mult") for i in range(2)]
        self.codebooks = [Codebook("hm_a", self.rows, table.embedding_dim, ["hm_a"]),
                          Codebook("hm_b", self.rows, table.embedding_dim, ["hm_b"])]

    def remap(self, ids):
        return [hash_ids(ids, k, self.rows) for k in self.keys]

    def stream_specs(self):
        return [StreamSpec("hash", self.rows, key=k) for k in self.keys]

    def compose(self, pooled):
        return pooled[0] * pooled[1]


def _with_hash_mult(build):
    def build_table(table, config, **kwargs):
        if isinstance(config, HashMultConfig):
            method = HashMultTable(table, config)
            method.codebook_data_type = codebook_data_type(table, config.codebook_dtype)
            return method
        return build(table, config, **kwargs)
    return build_table


def hash_mult_compression(rows, tables, args, counts):  # noqa: ANN001
    """``train.make_compression`` for ``hash_mult``: every table float16 ``A * B`` of
    ``rows[table]`` rows each."""
    missing = [t.name for t in tables if t.name not in rows]
    if missing:
        raise SystemExit(f"PROBE_ROWS has no rows for tables {missing}")
    return {t.name: HashMultConfig(rows=int(rows[t.name]), seed=args.seed,
                                   codebook_dtype=torch.float16) for t in tables}, None


class GainDLRM(DLRM):
    """DLRM with a learned per-feature, per-dimension gain on the pooled embeddings."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sparse_gain = nn.Parameter(torch.ones(self.sparse_arch.F, self.sparse_arch.D))

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        dense = self.dense_arch(dense_features)
        sparse = self.sparse_arch(sparse_features) * self.sparse_gain
        return self.over_arch(self.inter_arch(dense_features=dense, sparse_features=sparse))


def main() -> None:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "dense":
        train.DLRM = GainDLRM
    elif mode == "qr1":
        train.make_compression = lambda tables, args, counts: (
            {t.name: QRConfig(collisions=t.num_embeddings, operation="mult") for t in tables},
            None)
        # one row more than the full table
        train.CCEEmbeddingBagCollection = functools.partial(
            train.CCEEmbeddingBagCollection, allow_larger=True)
    elif mode == "qr_balanced":
        train.make_compression = lambda tables, args, counts: (
            {t.name: QRConfig(collisions=math.isqrt(t.num_embeddings - 1) + 1,
                              operation="mult", codebook_dtype=torch.float16)
             for t in tables}, None)
    elif mode == "hash_mult":
        rows = dict(kv.split("=") for kv in os.environ.get("PROBE_ROWS", "").split(",") if kv)
        if not rows:
            raise SystemExit("hash_mult needs PROBE_ROWS=<table>=<rows>,... (rows of each of A "
                             "and B per table), e.g. PROBE_ROWS=t_user=7249,t_item=10084")
        modules.build_table = _with_hash_mult(modules.build_table)
        sharder.build_table = _with_hash_mult(sharder.build_table)
        train.make_compression = functools.partial(hash_mult_compression, rows)
    else:
        raise SystemExit(f"mode must be 'dense', 'qr1', 'qr_balanced' or 'hash_mult', got "
                         f"{mode!r}")
    train.main(argv)


if __name__ == "__main__":
    main()
