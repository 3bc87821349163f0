"""Diagnostic: does a learned per-dimension gain on the pooled embeddings explain QR-mult's
lead on Yelp2018? (quality_notes.md, "Why CCE loses on Yelp2018".) Not part of the grid.

    .venv/bin/python benchmarks/gain_probe.py dense <train.py arguments>
    .venv/bin/python benchmarks/gain_probe.py qr1 <train.py arguments, --method qr>

``dense``: DLRM whose pooled embeddings ``[B, F, D]`` are multiplied by a learned ``[F, D]``
gain (initialised to 1, trained by the dense optimizer), for any ``--method``.
``qr1``: every table is QR-mult with ``collisions = V`` (the full table ``R`` times a one-row
quotient table ``Q``, a gain trained by the sparse optimizer; 1 row more than the full table).
"""

import functools
import os
import sys

import torch
from torch import nn
from torchrec.models.dlrm import DLRM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                                "dlrm"))
import train  # noqa: E402

from torchrec_cce.configs import QRConfig  # noqa: E402


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
    else:
        raise SystemExit(f"mode must be 'dense' or 'qr1', got {mode!r}")
    train.main(argv)


if __name__ == "__main__":
    main()
