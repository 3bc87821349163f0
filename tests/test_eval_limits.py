"""``--limit-val-batches`` / ``--limit-test-batches`` (data.sources.limit_eval_batches): the
evaluation batches are the first N of the unlimited ones, on every rank, and bad limits are
refused."""

import argparse

import pytest
import torch

from test_preprocessed_dataset import make_dir
from torchrec_cce.data.sources import load_data


def _args(data_dir, **kw):
    return argparse.Namespace(data="preprocessed", data_dir=str(data_dir), batch_size=16, seed=0,
                              **kw)


def _flat(batches):
    return [(b.labels, b.dense_features, b.sparse_features.values()) for b in batches]


@pytest.mark.parametrize("rank,world", [(0, 1), (0, 2), (1, 2)])
def test_first_batches_only(tmp_path, rank, world):
    data_dir = make_dir(tmp_path, n=700)
    full = load_data(_args(data_dir), rank, world)
    cut = load_data(_args(data_dir, limit_val_batches=2, limit_test_batches=3), rank, world)
    for split, limit in (("val", 2), ("test", 3)):
        want = _flat(getattr(full, split)())
        got = _flat(getattr(cut, split)())
        assert len(want) > limit and len(got) == limit
        for a, b in zip(want[:limit], got, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert len(_flat(getattr(cut, split)())) == limit  # every call starts again
    assert len(list(cut.train(0))) == len(list(full.train(0)))  # training untouched


def test_bad_limit(tmp_path):
    data_dir = make_dir(tmp_path, n=300)
    with pytest.raises(ValueError, match="--limit-test-batches must be >= 1"):
        load_data(_args(data_dir, limit_test_batches=0), 0, 1)
