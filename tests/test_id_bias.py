"""torchrec_cce.id_bias: the per-id first-order term. Exact against a per-sample loop (SUM and
MEAN bags, weights, empty bags, ids past the prefix, features of other tables), its gradient,
sizing for a byte budget, memory_report's bytes, and DMP + TrainPipelineSparseDist at world 2
training it as world 1 does."""

from typing import List, Tuple

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain

from multiprocess import run_multiprocess
from test_pooled import B, train_pipelined
from torchrec_cce import (CCEEmbeddingBagCollection, IdBias, QRConfig, WithIdBias,
                          hot_ids_for_bytes, memory_report, with_id_bias)

TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=20, feature_names=["a", "a2"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=8, num_embeddings=7, feature_names=["b"],
                       pooling=PoolingType.MEAN),
    EmbeddingBagConfig(name="t_c", embedding_dim=8, num_embeddings=9, feature_names=["c"]),
]


def _kjt(seed: int, batch: int, keys: List[str], sizes: List[int], weighted: bool
         ) -> Tuple[KeyedJaggedTensor, List[List[torch.Tensor]], List[List[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    bags = [[torch.randint(0, v, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
             for _ in range(batch)] for v in sizes]
    wts = [[torch.rand(len(b), generator=g) for b in f] for f in bags]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat([b for f in bags for b in f]),
        lengths=torch.tensor([len(b) for f in bags for b in f]),
        weights=torch.cat([w for f in wts for w in f]) if weighted else None)
    return kjt, bags, wts


@pytest.mark.parametrize("weighted", [False, True])
def test_equals_a_per_sample_loop(weighted: bool) -> None:
    hot = {"t_a": 5, "t_b": "all"}  # t_c has no bias; "x" is no table's feature
    bias = IdBias(TABLES, hot)
    assert bias.hot_ids == {"t_a": 5, "t_b": 7} and bias.weight.numel() == 12
    torch.manual_seed(0)
    with torch.no_grad():
        bias.weight.copy_(torch.randn(12))
    keys, sizes = ["c", "b", "x", "a", "a2"], [9, 7, 30, 20, 20]
    kjt, bags, wts = _kjt(3, 6, keys, sizes, weighted)
    out = bias(kjt)
    # the reference: per sample, a loop over its bags; and d sum(out) / d scalar, each
    # occurrence's weight (divided by its bag's length in the MEAN table)
    table_of = {"a": ("t_a", 0), "a2": ("t_a", 0), "b": ("t_b", 5)}
    expect, grad = torch.zeros(6), torch.zeros(12)
    scalars = bias.weight.detach()
    for f, key in enumerate(keys):
        if key not in table_of:
            continue
        table, offset = table_of[key]
        for s in range(6):
            n = len(bags[f][s])
            scale = 1 / n if table == "t_b" and n else 1.0
            for i, id_ in enumerate(bags[f][s].tolist()):
                if id_ < bias.hot_ids[table]:
                    w = (float(wts[f][s][i]) if weighted else 1.0) * scale
                    expect[s] += float(scalars[offset + id_]) * w
                    grad[offset + id_] += w
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    assert grad[5:].abs().sum() > 0  # the MEAN table's ids occur
    torch.testing.assert_close(bias.weight.grad, grad)


def test_bad_tables_and_sizes_raise() -> None:
    with pytest.raises(ValueError, match=r"unknown tables \['t_z'\]"):
        IdBias(TABLES, {"t_z": 3})
    with pytest.raises(ValueError, match="table 't_b' has 7 ids"):
        IdBias(TABLES, {"t_b": 8})
    with pytest.raises(ValueError, match="table 't_a'"):
        IdBias(TABLES, {"t_a": -1})
    with pytest.raises(ValueError, match="no training counts for tables"):
        hot_ids_for_bytes(TABLES, {"t_a": np.ones(20)}, 40)


def test_hot_ids_for_bytes_takes_the_most_frequent_ids_over_all_tables() -> None:
    counts = {"t_a": np.array([50, 40, 9, 8] + [1] * 16), "t_b": np.array([45, 30, 2, 1, 1, 0, 0]),
              "t_c": np.array([7] + [0] * 8)}
    # the 6 most frequent ids: a0 a1 b0 b1 a2 a3 (counts 50 45 40 30 9 8)
    assert hot_ids_for_bytes(TABLES, counts, 6 * 4 + 3) == {"t_a": 4, "t_b": 2}
    assert hot_ids_for_bytes(TABLES, counts, 7 * 4) == {"t_a": 4, "t_b": 2, "t_c": 1}
    assert hot_ids_for_bytes(TABLES, counts, 3) == {}
    everything = hot_ids_for_bytes(TABLES, counts, 10 ** 6)
    assert everything == {"t_a": 20, "t_b": 7, "t_c": 9}


def _dlrm(ebc: torch.nn.Module) -> DLRM:
    torch.manual_seed(0)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4,
                dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1],
                dense_device=torch.device("cpu"))


def test_wrapped_model_starts_equal_and_memory_report_counts_the_bias() -> None:
    ebc = CCEEmbeddingBagCollection(TABLES, {"t_a": QRConfig(collisions=4)})
    plain = _dlrm(ebc)
    before = memory_report(plain)
    assert with_id_bias(plain, TABLES, None) is plain
    model = with_id_bias(plain, TABLES, {"t_a": 6, "t_c": "all"})
    assert isinstance(model, WithIdBias) and model.sparse_arch is plain.sparse_arch
    kjt, _, _ = _kjt(1, 5, ["a", "a2", "b", "c"], [20, 20, 7, 9], False)
    dense = torch.randn(5, 4)
    assert torch.equal(model(dense, kjt), plain(dense, kjt))  # zero-initialised
    with torch.no_grad():
        model.id_bias.weight.fill_(0.5)
    diff = model(dense, kjt) - plain(dense, kjt)
    torch.testing.assert_close(diff.squeeze(-1), model.id_bias(kjt))
    after = memory_report(model)
    for table, extra in {"t_a": 24, "t_b": 0, "t_c": 36}.items():
        assert after[table]["id_bias_bytes"] == extra
        for key in ("compressed_bytes", "training_bytes", "serving_bytes"):
            assert after[table][key] == before[table][key] + extra, (table, key)
        assert after[table]["params"] == before[table]["params"] + extra // 4


# ------------------------------------------------------------------ DMP + pipeline, world 2


def _batch(seed: int, rows: slice) -> Batch:
    g = torch.Generator().manual_seed(seed)
    n = 2 * B
    sizes = {"a": 20, "a2": 20, "b": 7, "c": 9}
    bags = [[torch.randint(0, v, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g)
             for _ in range(n)][rows] for v in sizes.values()]
    dense, labels = torch.randn(n, 4, generator=g), torch.bernoulli(torch.full((n,), 0.5),
                                                                    generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(sizes), values=torch.cat([b for f in bags for b in f]),
        lengths=torch.tensor([len(b) for f in bags for b in f], dtype=torch.int64))
    return Batch(dense_features=dense[rows], sparse_features=kjt, labels=labels[rows])


def _train_world(rank: int, world: int) -> Tuple[List[float], torch.Tensor]:
    ebc = CCEEmbeddingBagCollection(TABLES, {"t_a": QRConfig(collisions=4)},
                                    device=torch.device("meta"))
    model = DLRMTrain(with_id_bias(_dlrm(ebc), TABLES, {"t_a": 10, "t_b": "all"}))
    losses, dmp = train_pipelined(model, rank, world, _batch)
    weight = dict(dmp.named_parameters())["model.id_bias.weight"].detach().clone()
    return losses, weight


@pytest.mark.timeout(900)
def test_bias_trains_the_same_under_dmp_at_world_2_as_at_world_1() -> None:
    """The bias is a dense parameter: DMP replicates it, DDP averages its gradient, and the
    pipeline's tracer leaves its lookup alone; two ranks with B samples each train it as one
    rank with their 2B samples (as the gain of test_pooled)."""
    (one_loss, one_w), = run_multiprocess(_train_world, 1)
    (loss0, w0), (loss1, w1) = run_multiprocess(_train_world, 2)
    assert torch.equal(w0, w1)  # replicated
    assert w0.abs().sum() > 0  # it trained
    torch.testing.assert_close(w0, one_w, rtol=1e-4, atol=1e-6)
    assert loss0 == loss1
    torch.testing.assert_close(torch.tensor(loss0), torch.tensor(one_loss), rtol=1e-4,
                               atol=1e-5)


def test_the_biased_model_exports_to_torchscript_and_torch_export(tmp_path) -> None:
    """export_for_inference (fx trace + TorchScript, INT8 codebooks) and export_program keep
    the bias: the served model equals the eager (quantised) one, on other batches too."""
    from torchrec_cce.export import export_for_inference, export_program, quantize_model

    ebc = CCEEmbeddingBagCollection(TABLES, {"t_a": QRConfig(collisions=4)})
    model = with_id_bias(_dlrm(ebc), TABLES, {"t_a": 6, "t_c": "all"}).eval()
    with torch.no_grad():
        model.id_bias.weight.normal_()
    dense = torch.randn(5, 4)
    kjt, _, _ = _kjt(1, 5, ["a", "a2", "b", "c"], [20, 20, 7, 9], False)
    other, _, _ = _kjt(2, 5, ["a", "a2", "b", "c"], [20, 20, 7, 9], False)
    eager = quantize_model(model)
    path = str(tmp_path / "served.pt")
    torch.jit.save(export_for_inference(model), path)
    served = torch.jit.load(path)
    program = export_program(model, (dense, kjt)).module()
    with torch.no_grad():
        for x in (kjt, other):
            expected = eager(dense, x)
            assert not torch.equal(expected, _strip(eager)(dense, x))  # the bias is in it
            torch.testing.assert_close(served(dense, x), expected, rtol=0, atol=1e-6)
        # torch.export's program: for the example's shapes (as test_export's), other ids
        same_shape = KeyedJaggedTensor(keys=kjt.keys(), lengths=kjt.lengths(), values=torch.cat(
            [(jt.values() * 7 + 3) % n for jt, n in zip(kjt.to_dict().values(), [20, 20, 7, 9])]))
        for x in (kjt, same_shape):
            torch.testing.assert_close(program(dense, x), eager(dense, x), rtol=0, atol=1e-6)
        assert not torch.equal(eager(dense, kjt), eager(dense, same_shape))


def _strip(model: torch.nn.Module) -> torch.nn.Module:
    return model.model

