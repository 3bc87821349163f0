"""torchrec_cce.train.pooled: the gain, L2 pull and dropout on a DLRM's pooled embeddings, for a
full table and a compressed one, unsharded and inside DMP + TrainPipelineSparseDist at world 2."""

import copy
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

from multiprocess import run_multiprocess
from torchrec_cce import CCEEmbeddingBagCollection, QRConfig
from torchrec_cce.train import (Optimizers, PooledRegularizer, apply_sparse_optimizer,
                                dense_optimizer, regularize_pooled, shard)
from torchrec_cce.train.pooled import l2_pull

SIZES = {"a": 50, "b": 30}
B, D = 16, 8


def _tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=D, num_embeddings=n,
                               feature_names=[f]) for f, n in SIZES.items()]


def _batch(seed: int, n: int = B, rows: slice = slice(None)
           ) -> Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """``n`` samples (bags of 0-2 ids per feature: empty and multi-id bags); ``rows`` picks a
    slice of them (a rank's share of a global batch)."""
    g = torch.Generator().manual_seed(seed)
    bags = [[torch.randint(0, v, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g)
             for _ in range(n)] for v in SIZES.values()]
    dense, labels = torch.randn(n, 4, generator=g), torch.bernoulli(torch.full((n,), 0.5),
                                                                    generator=g)
    bags = [f[rows] for f in bags]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SIZES), values=torch.cat([b for f in bags for b in f]),
        lengths=torch.tensor([len(b) for f in bags for b in f], dtype=torch.int64))
    return dense[rows], kjt, labels[rows]


def _dlrm(method: str, dcn: bool = False) -> DLRM:
    torch.manual_seed(0)
    if method == "full":
        ebc = EmbeddingBagCollection(tables=_tables())
    else:
        ebc = CCEEmbeddingBagCollection(_tables(), {"t_a": QRConfig(collisions=4),
                                                    "t_b": QRConfig(collisions=3)})
    kw = dict(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[16, D],
              over_arch_layer_sizes=[8, 1])
    return DLRM_DCN(**kw, dcn_num_layers=1, dcn_low_rank_dim=4) if dcn else DLRM(**kw)


def _grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "qr"])
@pytest.mark.parametrize("dcn", [False, True])
def test_gain_starts_at_one_leaves_outputs_and_gradients_and_learns(method: str,
                                                                    dcn: bool) -> None:
    plain = _dlrm(method, dcn)
    gained = regularize_pooled(copy.deepcopy(plain), gain=True)
    assert isinstance(gained.inter_arch, PooledRegularizer)
    assert gained.inter_arch.gain.shape == (len(SIZES), D)
    dense, kjt, labels = _batch(1)
    out_p, out_g = plain(dense, kjt), gained(dense, kjt)
    assert torch.equal(out_p, out_g)
    loss = torch.nn.functional.binary_cross_entropy_with_logits
    loss(out_p.squeeze(-1), labels).backward()
    loss(out_g.squeeze(-1), labels).backward()
    gp, gg = _grads(plain), _grads(gained)
    for name, grad in gp.items():  # every original parameter: the same gradient
        other = name.replace("inter_arch.", "inter_arch.interaction.")
        torch.testing.assert_close(gg[other], grad, rtol=0, atol=0)
    # the gain's gradient: d loss / d gain[f, d] = sum_b dL/dx[b, f, d] * e[b, f, d], with x
    # the interaction's sparse input; computed here with a leaf gain on the plain model
    e = plain.sparse_arch(kjt).detach()
    g_leaf = torch.ones(len(SIZES), D, requires_grad=True)
    logits = plain.over_arch(plain.inter_arch(dense_features=plain.dense_arch(dense),
                                              sparse_features=e * g_leaf))
    loss(logits.squeeze(-1), labels).backward()
    torch.testing.assert_close(gg["inter_arch.gain"], g_leaf.grad)
    assert gg["inter_arch.gain"].abs().sum() > 0
    # and a step moves it: outputs differ afterwards
    with torch.no_grad():
        gained.inter_arch.gain.sub_(0.5 * gg["inter_arch.gain"])
    assert not torch.equal(gained(dense, kjt), out_p)


@pytest.mark.parametrize("method", ["full", "qr"])
def test_l2_adds_the_penalty_gradient_and_leaves_the_forward(method: str) -> None:
    """Every embedding parameter's gradient equals that of loss + l2/2 * mean_b sum e^2."""
    strength = 0.3
    plain = _dlrm(method)
    pulled = regularize_pooled(copy.deepcopy(plain), l2=strength)
    dense, kjt, labels = _batch(2)
    loss = torch.nn.functional.binary_cross_entropy_with_logits
    e = plain.sparse_arch(kjt)
    logits = plain.over_arch(plain.inter_arch(dense_features=plain.dense_arch(dense),
                                              sparse_features=e))
    penalty = strength / 2 * e.pow(2).sum(dim=(1, 2)).mean()
    (loss(logits.squeeze(-1), labels) + penalty).backward()
    out = pulled(dense, kjt)
    assert torch.equal(out, logits)
    loss(out.squeeze(-1), labels).backward()
    gp, gl = _grads(plain), _grads(pulled)
    emb = [n for n in gp if "embedding_bag_collection" in n]
    assert emb
    for name in gp:
        other = name.replace("inter_arch.", "inter_arch.interaction.")
        torch.testing.assert_close(gl[other], gp[name], rtol=1e-6, atol=1e-7)
    # without the penalty the embedding gradients differ (the pull is not a no-op)
    plain.zero_grad()
    logits2 = plain(dense, kjt)
    loss(logits2.squeeze(-1), labels).backward()
    assert any(not torch.allclose(p.grad, gl[n]) for n, p in plain.named_parameters()
               if n in emb)


def test_l2_pull_alone_and_eval_mode() -> None:
    x = torch.randn(5, 3, 2, requires_grad=True)
    y = l2_pull(x, 0.4)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1 + 0.4 / 5 * x.detach())
    reg = PooledRegularizer(lambda dense_features, sparse_features: sparse_features, 3, 2,
                            l2=0.4)  # type: ignore[arg-type]
    reg.eval()  # no pull at evaluation
    x.grad = None
    reg(dense_features=None, sparse_features=x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_dropout_trains_only_and_bad_values_raise() -> None:
    reg = PooledRegularizer(lambda dense_features, sparse_features: sparse_features, 3, 4,
                            dropout=0.5)  # type: ignore[arg-type]
    torch.manual_seed(0)
    x = torch.ones(200, 3, 4)
    y = reg(dense_features=None, sparse_features=x)
    zeros = (y == 0).float().mean().item()
    assert 0.4 < zeros < 0.6 and set(y.unique().tolist()) == {0.0, 2.0}
    reg.eval()
    assert torch.equal(reg(dense_features=None, sparse_features=x), x)
    with pytest.raises(ValueError, match="dropout"):
        PooledRegularizer(torch.nn.Identity(), 3, 4, dropout=1.0)
    with pytest.raises(ValueError, match="l2"):
        PooledRegularizer(torch.nn.Identity(), 3, 4, l2=-1.0)
    plain = _dlrm("full")
    assert regularize_pooled(plain) is plain and not isinstance(plain.inter_arch,
                                                                PooledRegularizer)


# ------------------------------------------------------------------ DMP + pipeline, world 2
STEPS = 6


def _fill_embeddings(dmp: torch.nn.Module) -> None:
    """Give every embedding row the same values whatever the sharding: 0.1 sin(7 row + col)
    (DMP initialises meta tables per shard)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    def fill(t: torch.Tensor, row0: int, col0: int) -> None:
        rows = torch.arange(row0, row0 + t.shape[0]).unsqueeze(1)
        cols = torch.arange(col0, col0 + t.shape[1]).unsqueeze(0)
        t.copy_(0.1 * torch.sin(7.0 * rows + cols))

    filled = 0
    with torch.no_grad():
        for name, v in dmp.state_dict().items():
            if "embedding_bag_collection" not in name or not name.endswith("weight"):
                continue
            if isinstance(v, ShardedTensor):
                for s in v.local_shards():
                    fill(s.tensor, *s.metadata.shard_offsets)
                    filled += 1
            elif v.is_floating_point() and v.dim() == 2:
                fill(v, 0, 0)
                filled += 1
    counts = torch.tensor([filled])
    dist.all_reduce(counts)
    assert int(counts) >= 3, f"no embedding weights found to fill: {list(dmp.state_dict())}"


def train_pipelined(model: torch.nn.Module, rank: int, world: int,
                    batch_of: Callable[[int, slice], Any]
                    ) -> Tuple[List[float], torch.nn.Module]:
    """``model`` (a DLRMTrain on the meta device) sharded by DMP over ``world`` ranks, its
    embedding rows filled alike whatever the sharding, trained ``STEPS`` pipelined steps
    (row-wise Adagrad 0.1 in backward, dense Adagrad 0.1) on global batches of 2B samples:
    ``batch_of(seed, rows)`` is this rank's share ``rows`` of the batch of ``seed``. Returns
    the mean loss over the ranks per step and the DMP module."""
    apply_sparse_optimizer(model.model.sparse_arch, "rowwise_adagrad", 0.1)
    dmp, _ = shard(model, world, torch.device("cpu"), 2 * B // world)
    _fill_embeddings(dmp)
    optim = Optimizers(dmp, dense_optimizer("adagrad", 0.1), dense_lr=0.1, sparse_lr=0.1)
    pipeline = TrainPipelineSparseDist(dmp, optim.dense, torch.device("cpu"))
    share = 2 * B // world
    batches = iter([batch_of(s, slice(rank * share, (rank + 1) * share))
                    for s in range(1, STEPS + 1)])
    losses = []
    for _ in range(STEPS):
        loss = pipeline.progress(batches)[0].detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
    return losses, dmp


def _train_world(rank: int, world: int) -> Tuple[List[float], torch.Tensor]:
    """Pipelined DMP training of a full + QR DLRM with gain and L2 on global batches of 2B
    samples (rank r trains its share); returns the mean loss per step and the final gain."""
    from torchrec.datasets.utils import Batch

    ebc = CCEEmbeddingBagCollection(_tables(), {"t_b": QRConfig(collisions=3)},
                                    device=torch.device("meta"))
    torch.manual_seed(0)
    dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=4,
                dense_arch_layer_sizes=[16, D], over_arch_layer_sizes=[8, 1],
                dense_device=torch.device("cpu"))
    model = DLRMTrain(regularize_pooled(dlrm, gain=True, l2=0.5))
    losses, dmp = train_pipelined(model, rank, world,
                                  lambda s, rows: Batch(*_batch(s, 2 * B, rows)))
    gain = dict(dmp.named_parameters())["model.inter_arch.gain"].detach().clone()
    return losses, gain


@pytest.mark.timeout(900)
def test_gain_and_l2_train_the_same_under_dmp_at_world_2_as_at_world_1() -> None:
    """DDP averages the gain's gradient over the ranks and each rank's L2 pull is scaled by its
    own batch, so two ranks with B samples each train as one rank with their 2B samples (the
    sharded tables' row-wise Adagrad sees summed rather than averaged gradients: equal up to
    its eps)."""
    (one_loss, one_gain), = run_multiprocess(_train_world, 1)
    (loss0, gain0), (loss1, gain1) = run_multiprocess(_train_world, 2)
    assert torch.equal(gain0, gain1)  # replicated: the same gain on both ranks
    assert not torch.allclose(gain0, torch.ones_like(gain0), atol=1e-3)  # it trained
    torch.testing.assert_close(gain0, one_gain, rtol=1e-4, atol=1e-5)
    assert loss0 == loss1
    torch.testing.assert_close(torch.tensor(loss0), torch.tensor(one_loss), rtol=1e-4,
                               atol=1e-5)
    assert loss0[-1] < loss0[0]
