"""Criteo-shaped synthetic data: determinism, shapes, Zipf skew, click rate, and a real Bayes floor."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from torchrec_cce.data.synthetic import CriteoSyntheticDataset, scaled_cardinalities

# Criteo Kaggle's cardinalities times 0.001, rounded, at least 3 (written out by hand).
SCALED_0_001 = [3, 3, 10131, 2203, 3, 3, 13, 3, 3, 93, 6, 8352, 3, 3, 15, 5461, 3, 6, 3, 3, 7047, 3, 3, 286, 3, 143]


@pytest.fixture(scope="module")
def train():
    return CriteoSyntheticDataset("train", batch_size=4096, num_batches=8, seed=0)


@pytest.fixture(scope="module")
def test_split():
    return CriteoSyntheticDataset("test", batch_size=4096, num_batches=8, seed=0)


def ids_of(batch) -> torch.Tensor:
    return batch.sparse_features.values().view(26, -1).t()


def assert_same(a, b) -> None:
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.labels, b.labels)


def test_batch_layout(train):
    batch = next(iter(train))
    assert batch.dense_features.shape == (4096, 13) and batch.dense_features.dtype == torch.float32
    assert batch.labels.shape == (4096,) and batch.labels.dtype == torch.float32
    assert set(batch.labels.unique().tolist()) == {0.0, 1.0}
    kjt = batch.sparse_features
    assert kjt.keys() == [f"cat_{i}" for i in range(26)] and kjt.values().dtype == torch.int64
    assert kjt.lengths().tolist() == [1] * (26 * 4096)
    assert batch.dense_features.min().item() >= 0.0  # log1p of non-negative counts
    counts = torch.expm1(batch.dense_features.double())
    assert torch.allclose(counts, counts.round(), atol=1e-3)  # ... of integers


def test_determinism(train):
    again = CriteoSyntheticDataset("train", batch_size=4096, num_batches=8, seed=0)
    # same seed -> same batches, whatever was drawn before (batch 5 first here, 0..4 in `train`)
    assert_same(again.batch(5), list(train)[5])
    assert_same(again.batch(0), train.batch(0))
    other_seed = CriteoSyntheticDataset("train", batch_size=4096, num_batches=8, seed=1)
    assert not torch.equal(ids_of(other_seed.batch(0)), ids_of(train.batch(0)))
    test0 = CriteoSyntheticDataset("test", batch_size=4096, num_batches=8, seed=0).batch(0)
    assert not torch.equal(ids_of(test0), ids_of(train.batch(0)))  # train and test streams differ
    assert not torch.equal(ids_of(train.batch(0)), ids_of(train.batch(1)))


def test_rank_split_and_epoch_length(train):
    assert len(train) == train.batches_per_epoch == 8
    parts = [CriteoSyntheticDataset("train", batch_size=4096, num_batches=7, rank=r, world_size=2, seed=0) for r in range(2)]
    assert [len(p) for p in parts] == [4, 3] and list(parts[1].batch_indices()) == [1, 3, 5]
    assert_same(list(parts[1])[2], train.batch(5))  # rank 1's third batch is global batch 5
    assert len(list(parts[0])) == 4
    # DataLoader workers share a rank's batches without changing them or their order
    loaded = list(DataLoader(parts[0], batch_size=None, num_workers=2))
    assert len(loaded) == 4
    for i, batch in zip(parts[0].batch_indices(), loaded):
        assert_same(batch, train.batch(i))


def test_cardinalities_and_id_range(train):
    assert train.cardinalities == SCALED_0_001 == scaled_cardinalities(0.001)
    assert scaled_cardinalities(1.0)[2] == 10131227 and scaled_cardinalities(1e-7) == [3] * 26
    ids = torch.cat([ids_of(train.batch(i)) for i in range(4)])
    assert ids.min().item() >= 0
    assert (ids.max(0).values < torch.tensor(SCALED_0_001)).all()
    # the small features use their whole range
    assert [len(ids[:, f].unique()) for f in (0, 5, 8)] == [3, 3, 3]

    sizes = [7] * 26
    folded = CriteoSyntheticDataset("train", batch_size=4096, num_batches=8, seed=0, num_embeddings_per_feature=sizes)
    assert torch.equal(ids_of(folded.batch(0)), ids_of(train.batch(0)) % 7)
    assert torch.equal(folded.batch(0).labels, train.batch(0).labels)  # labels come from the true ids
    assert folded.num_embeddings_per_feature == sizes and train.num_embeddings_per_feature == SCALED_0_001
    with pytest.raises(ValueError, match="num_embeddings_per_feature"):
        CriteoSyntheticDataset(num_embeddings_per_feature=[5] * 3)


def test_zipf_skew(train):
    ids = torch.cat([ids_of(train.batch(i))[:, 2] for i in range(8)])  # cat_2: 10,131 ids
    counts = torch.bincount(ids, minlength=10131)
    top = counts.sort(descending=True).values
    top_share = top[:101].sum().item() / ids.numel()  # the top 1% of ids
    assert top_share > 0.45, top_share  # a power law with exponent 1.1 gives ~0.6; uniform 0.01
    assert top[0].item() > 50 * ids.numel() / 10131
    # frequent ids are spread over the id range, not the small ids
    assert (ids < 101).float().mean().item() < 0.1
    assert counts.argmax().item() != 0


def test_click_rate(train, test_split):
    for ds in (train, test_split):
        rate = torch.cat([b.labels for b in ds]).mean().item()
        assert 0.15 <= rate <= 0.35, rate


def test_bayes_floor_is_real(train, test_split):
    bayes = test_split.bayes_logloss()
    labels = torch.cat([b.labels for b in test_split])
    probs = torch.cat([test_split.batch_with_probs(i)[1] for i in range(test_split.num_batches)])
    assert math.isclose(bayes, F.binary_cross_entropy(probs.double(), labels.double()).item(), rel_tol=1e-9)
    assert math.isclose(bayes, test_split.bayes_logloss(), rel_tol=0)  # deterministic

    rate = torch.cat([b.labels for b in train]).mean().item()
    constant = F.binary_cross_entropy(torch.full_like(labels, rate), labels).item()
    assert bayes < constant - 0.05, (bayes, constant)

    # logistic regression on the dense features, a few hundred full-batch SGD steps
    x = torch.cat([b.dense_features for b in train])
    y = torch.cat([b.labels for b in train])
    x_test = torch.cat([b.dense_features for b in test_split])
    mean, std = x.mean(0), x.std(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add contention on a shared machine
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(13, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(300):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model((x - mean) / std).squeeze(1), y)
            loss.backward()
            opt.step()
        with torch.no_grad():
            lr_test = F.binary_cross_entropy_with_logits(model((x_test - mean) / std).squeeze(1), labels).item()
    finally:
        torch.set_num_threads(threads)
    assert lr_test < constant - 0.01, (lr_test, constant)  # the dense features carry signal...
    assert bayes < lr_test - 0.05, (bayes, lr_test)  # ... and the categorical structure much more


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        CriteoSyntheticDataset("validation")
    with pytest.raises(ValueError, match="rank"):
        CriteoSyntheticDataset(rank=2, world_size=2)
    with pytest.raises(ValueError, match="latent_dim"):
        CriteoSyntheticDataset(latent_dim=9)
