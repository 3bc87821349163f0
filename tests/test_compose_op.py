"""The compose stage's C++ op (``torch.ops.torchrec_cce.pair_compose``) against its per-feature
torch path: for collections mixing QR-mult, QR-add, QR-concat, CCE and full tables, outputs
and gradients of the pooled codebook values are bit-identical, and the op is used exactly when
the plan allows it (SUM pooling, float32, CPU)."""

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, QRConfig
from torchrec_cce import ops, stages

pytestmark = pytest.mark.skipif(not ops.fused_available(),
                                reason="the C++ ops could not be built here (no compiler?)")


def collection(pooling: PoolingType = PoolingType.SUM) -> CCEEmbeddingBagCollection:
    torch.manual_seed(0)
    names = ["mult", "add", "concat", "cce", "full"]
    tables = [EmbeddingBagConfig(name=n, embedding_dim=8, num_embeddings=50 + 10 * i,
                                 feature_names=[f"f_{n}", f"g_{n}"] if n == "mult" else [f"f_{n}"],
                                 pooling=pooling if n == "add" else PoolingType.SUM)
              for i, n in enumerate(names)]
    comp = {"mult": QRConfig(collisions=7, operation="mult"),
            "add": QRConfig(collisions=6, operation="add"),
            "concat": QRConfig(collisions=5, operation="concat"),
            "cce": CCEConfig(rows=4, chunks=2)}
    return CCEEmbeddingBagCollection(tables, comp, allow_larger=True)


def batch(ebc: CCEEmbeddingBagCollection) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(1)
    keys = ebc.feature_names()
    B = 6
    lengths = torch.randint(0, 4, (len(keys) * B,), generator=g)
    values = torch.randint(0, 40, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


def run(ebc: CCEEmbeddingBagCollection, kjt: KeyedJaggedTensor, use_op: bool,
        monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = torch.ops.torchrec_cce.pair_compose

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(stages, "_pair_compose_available", lambda: use_op)
    ebc._compose_cache.clear()
    pooled = ebc.codebooks(ebc.remap(kjt))
    values = pooled.values().detach().requires_grad_()
    from torchrec import KeyedTensor

    pooled = KeyedTensor(keys=pooled.keys(), length_per_key=pooled.length_per_key(),
                         values=values)
    with monkeypatch.context() as m:
        m.setattr(torch.ops.torchrec_cce, "pair_compose", counted, raising=False)
        out = ebc.compose(kjt, pooled)
    grad = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(2))
    (out.values() * grad).sum().backward()
    return out, values.grad, len(calls)


def test_op_equals_per_feature_path(monkeypatch: pytest.MonkeyPatch) -> None:
    ebc = collection()
    kjt = batch(ebc)
    out_op, grad_op, calls_op = run(ebc, kjt, True, monkeypatch)
    out_ref, grad_ref, calls_ref = run(ebc, kjt, False, monkeypatch)
    assert (calls_op, calls_ref) == (1, 0)
    assert out_op.keys() == out_ref.keys()
    assert torch.equal(out_op.values(), out_ref.values())
    assert torch.equal(grad_op, grad_ref)
    # the QR-mult feature really is Q * R of its pooled parts
    assert not torch.equal(out_op.values(), torch.zeros_like(out_op.values()))


def test_mean_pooling_keeps_the_per_feature_path(monkeypatch: pytest.MonkeyPatch) -> None:
    ebc = collection(PoolingType.MEAN)
    _, _, calls = run(ebc, batch(ebc), True, monkeypatch)
    assert calls == 0
