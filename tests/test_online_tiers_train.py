"""Training with an online hot tier (OnlineTieredConfig) through the library's training hooks
(``training_hooks(...).after_step(step)``, the loop's only call): on a planted Zipf task with
shuffled ids (the hot ids are no prefix), the online tier's held-out loss tracks the prefix
tier's (TieredConfig on the same ids renumbered by true frequency, the preprocessing-counts
case), and both beat the cold method alone at fewer bytes than either tier adds."""

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_cce import (CCEEmbeddingBagCollection, HashingTrickConfig, OnlineTieredConfig,
                          TieredConfig)
from torchrec_cce.train import MigrationHook, training_hooks

V, DIM, H, ROWS = 2000, 8, 100, 32
BATCH, STEPS, MIGRATE = 256, 120, 30


def planted(seed=0):
    """Zipf(1.1) frequency ranks, a random permutation of ids over ranks, a true vector per
    id, labels ~ Bernoulli(sigmoid(3 * <e(x), u>))."""
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, V + 1, dtype=torch.float64) ** -1.1
    id_of_rank = torch.randperm(V, generator=g)
    true = torch.randn(V, DIM, generator=g)
    u = torch.randn(DIM, generator=g) / DIM ** 0.5

    def draw(n):
        ranks = torch.multinomial(p, n, replacement=True, generator=g)
        logits = 3 * true[ranks] @ u  # indexed by rank: the task is the same for both id orders
        y = torch.bernoulli(torch.sigmoid(logits), generator=g)
        return ranks, y

    train = [draw(BATCH) for _ in range(STEPS)]
    test = draw(20_000)
    return id_of_rank, train, test


class Model(nn.Module):
    def __init__(self, config, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.ebc = CCEEmbeddingBagCollection(
            [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=V,
                                feature_names=["f"])], {"t": config})
        self.head = nn.Linear(DIM, 1)

    def forward(self, ids):
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids,
                                                  lengths=torch.ones_like(ids))
        return self.head(self.ebc(kjt).values()).squeeze(1)


def train_eval(config, ids_of):
    """Train ``STEPS`` steps (Adagrad) with the library's hooks; held-out log loss."""
    _, train, (test_x, test_y) = DATA
    model = Model(config)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    hooks = training_hooks(model, steps_per_epoch=STEPS, optimizers=[opt])
    bce = nn.BCEWithLogitsLoss()
    for step, (x, y) in enumerate(train, start=1):
        model.train()
        opt.zero_grad()
        bce(model(ids_of(x)), y).backward()
        opt.step()
        hooks.after_step(step)
    model.eval()
    with torch.no_grad():
        return float(bce(model(ids_of(test_x)), test_y)), model, hooks


DATA = planted()


@pytest.fixture(scope="module")
def runs():
    id_of_rank = DATA[0]
    cold = HashingTrickConfig(rows=ROWS, seed=1)
    return {
        "prefix": train_eval(TieredConfig(hot_ids=H, cold=cold), lambda r: r),
        "online": train_eval(OnlineTieredConfig(hot_ids=H, cold=cold, migrate_every=MIGRATE,
                                                sketch_width=512, sketch_depth=4),
                             lambda r: id_of_rank[r]),
        "cold": train_eval(cold, lambda r: id_of_rank[r]),
    }


def test_online_tier_loss_tracks_prefix_tier(runs):
    prefix, online, cold = (runs[k][0] for k in ("prefix", "online", "cold"))
    gap = cold - prefix
    assert gap > 0.02, (prefix, cold)  # the task rewards a hot tier
    # The online tier learns its hot set from the stream: most of the prefix tier's gain.
    assert online < cold - 0.75 * gap, (prefix, online, cold)


def test_migrations_ran_from_the_hooks_and_found_the_true_hot_ids(runs):
    _, model, hooks = runs["online"]
    hook = hooks.of_type(MigrationHook)
    assert [r["step"] for r in hook.log] == list(range(MIGRATE, STEPS + 1, MIGRATE))
    assert hook.log[0]["tables"]["t"]["promoted"] == H
    method = model.ebc.tables["t"]
    assert method.sketch.total == STEPS * BATCH  # training batches only (eval not counted)
    true_hot = set(DATA[0][:H].tolist())  # ranks 0..H-1
    found = len(true_hot & set(method.hot_set().tolist())) / H
    assert found >= 0.8, found
