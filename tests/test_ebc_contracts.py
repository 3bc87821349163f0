"""TorchRec's own ``EmbeddingBagCollection`` contracts, checked on ``CCEEmbeddingBagCollection``.

Ports of TorchRec 1.8's ``torchrec/modules/tests/test_embedding_modules.py``
(``EmbeddingBagCollectionTest``) and of the EBC-using tests of
``torchrec/models/tests/test_dlrm.py``, with the class swapped in and parametrized over every
compression method applied to every table ("none": no compression). Where TorchRec asserts
hard-coded values (seeded init), the uncompressed collection is compared with a stock EBC built
under the same seed instead, bit for bit; for compressed tables, fx/TorchScript outputs are
compared with the eager forward, bit for bit. Further contracts: init_fn, reset_parameters,
the attributes TorchRec reads, a stock EBC's state dict, shared features, extra KJT keys.
"""

from functools import partial
from typing import Dict, List, Optional

import pytest
import torch
from torch.testing import FileCheck
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.fx import symbolic_trace
from torchrec.distributed.test_utils.model_input import ModelInput
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection, DLRMTrain, DLRMWrapper, SparseArch
from torchrec.modules.embedding_configs import PoolingType

from torchrec_cce import (CCEConfig, CCEEmbeddingBagCollection, CEConfig, HashingTrickConfig,
                          MEmComConfig, MPEConfig, QRConfig)
from torchrec_cce.ops import fused_available

METHODS = ["none", "hashing", "ce", "qr_mult", "qr_add", "qr_concat", "cce", "memcom", "mpe"]
# The rows of these methods' codebooks are (parts of) the vectors at init: init_fn applies.
INIT_FN_METHODS = [m for m in METHODS if m != "mpe"]
MPE_SCRIPT = ("MPE tables look themselves up in Python (quantise the batch's unique rows, then "
              "pool): fx records them as one Python call, which TorchScript cannot compile; "
              "serve MPE through torchrec_cce.mpe.export")


def config(method: str, t: EmbeddingBagConfig):
    """A small config of ``method`` for table ``t`` (None: uncompressed)."""
    v, d = t.num_embeddings, t.embedding_dim
    chunks = 2 if d % 2 == 0 else 1
    return {
        "none": lambda: None,
        "hashing": lambda: HashingTrickConfig(rows=max(2, v // 3)),
        "ce": lambda: CEConfig(rows=4, chunks=chunks),
        "qr_mult": lambda: QRConfig(collisions=4, operation="mult"),
        "qr_add": lambda: QRConfig(collisions=4, operation="add"),
        "qr_concat": lambda: QRConfig(collisions=4, operation="concat"),
        "cce": lambda: CCEConfig(rows=4, chunks=chunks),
        "memcom": lambda: MEmComConfig(rows=4),
        "mpe": lambda: MPEConfig(groups=2, counts=list(range(v, 0, -1))),
    }[method]()


def collection(tables: List[EmbeddingBagConfig], method: str, **kwargs) -> CCEEmbeddingBagCollection:
    compression = {t.name: config(method, t) for t in tables} if method != "none" else {}
    return CCEEmbeddingBagCollection(tables, compression, allow_larger=True, **kwargs)


def t1_t2(d1: int = 3, d2: int = 4, f1=("f1", "f3"), v: int = 10) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name="t1", embedding_dim=d1, num_embeddings=v, feature_names=list(f1)),
            EmbeddingBagConfig(name="t2", embedding_dim=d2, num_embeddings=v, feature_names=["f2"])]


def weighted_kjt(device: str = "cpu") -> KeyedJaggedTensor:
    """TorchRec's test_weighted input (keys f1, f3, f2; batch 2)."""
    return KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f3", "f2"],
        values=torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 1, 3, 4, 7], device=device),
        offsets=torch.tensor([0, 2, 4, 6, 8, 10, 12], device=device),
        weights=torch.tensor([0.1, 0.2, 0.4, 0.5, 0.4, 0.3, 0.2, 0.9, 0.1, 0.3, 0.4, 0.7],
                             device=device))


def f1_f2_kjt() -> KeyedJaggedTensor:
    """TorchRec's test_unweighted input: f1 [0,1] [] [2]; f2 [3] [4] [5,6,7]."""
    return KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f2"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]),
        offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8]))


def assert_same(a, b) -> None:
    assert a.keys() == b.keys() and a.length_per_key() == b.length_per_key()
    assert torch.equal(a.values(), b.values()), (a.values() - b.values()).abs().max()


def same_as_stock(tables_fn, method: str, kjt: KeyedJaggedTensor, **kwargs) -> None:
    """Uncompressed: built under the same seed, our collection equals TorchRec's EBC exactly."""
    if method != "none":
        return
    torch.manual_seed(0)
    stock = EmbeddingBagCollection(tables_fn(), **kwargs)
    torch.manual_seed(0)
    ours = collection(tables_fn(), "none", **kwargs)
    assert_same(ours(kjt), stock(kjt))


# ================================================================ EmbeddingBagCollectionTest
@pytest.mark.parametrize("method", METHODS)
def test_unweighted(method: str) -> None:
    def tables():
        return [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f1"],
                                   init_fn=partial(torch.nn.init.normal_, mean=0.0, std=1.5)),
                EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"],
                                   init_fn=partial(torch.nn.init.uniform_, a=-0.036, b=0.036))]
    pooled = collection(tables(), method)(f1_f2_kjt())
    assert pooled.values().size() == (3, 8)
    assert pooled.keys() == ["f1", "f2"]
    assert pooled.offset_per_key() == [0, 4, 8]
    same_as_stock(tables, method, f1_f2_kjt())


@pytest.mark.parametrize("method", METHODS)
def test_shared_tables(method: str) -> None:
    def tables():
        return [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10,
                                   feature_names=["f1", "f2"])]
    pooled = collection(tables(), method)(f1_f2_kjt())
    assert pooled.values().size() == (3, 8)
    assert pooled.keys() == ["f1", "f2"]
    assert pooled.offset_per_key() == [0, 4, 8]
    same_as_stock(tables, method, f1_f2_kjt())


@pytest.mark.parametrize("method", METHODS)
def test_shared_features(method: str) -> None:
    """One feature in two tables: keys ``f1@t1``, ``f1@t2`` (TorchRec's rule), each equal to
    its table's lookup of the feature alone."""
    def tables(second: str = "f1"):
        return [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f1"]),
                EmbeddingBagConfig(name="t2", embedding_dim=2, num_embeddings=10,
                                   feature_names=[second])]
    kjt = KeyedJaggedTensor.from_offsets_sync(
        keys=["f1"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]),
        offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8]))
    ebc = collection(tables(), method)
    pooled = ebc(kjt)
    assert pooled.values().size() == (6, 6)
    assert pooled.keys() == ["f1@t1", "f1@t2"]
    assert pooled.offset_per_key() == [0, 4, 6]
    assert ebc._embedding_names == ["f1@t1", "f1@t2"]
    # The same tables with the second feature renamed, same state: the same vectors.
    apart = collection(tables("g1"), method)
    apart.load_state_dict(ebc.state_dict())
    two = KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "g1"], values=torch.cat([kjt.values(), kjt.values()]),
        offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8, 10, 10, 11, 12, 13, 16]))
    expected = apart(two)
    assert torch.equal(pooled.values(), expected.values())
    same_as_stock(tables, method, kjt)


@pytest.mark.parametrize("method", METHODS)
def test_weighted(method: str) -> None:
    pooled = collection(t1_t2(), method, is_weighted=True)(weighted_kjt())
    assert pooled.values().size() == (2, 10)
    assert pooled.keys() == ["f1", "f3", "f2"]
    assert pooled.offset_per_key() == [0, 3, 6, 10]
    same_as_stock(t1_t2, method, weighted_kjt(), is_weighted=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fused", [True, False])
def test_forward_with_meta_device(method: str, fused: bool) -> None:
    if fused and not fused_available():
        pytest.skip("the fused op is not available in this process")
    ebc = collection(t1_t2(d2=4), method, is_weighted=True, device=torch.device("meta"),
                     fused=fused)
    assert ebc.fused == fused
    pooled = ebc(weighted_kjt("meta"))
    assert pooled.values().size() == (2, 10)
    assert pooled.keys() == ["f1", "f3", "f2"]
    assert pooled.offset_per_key() == [0, 3, 6, 10]
    assert pooled.values().device == torch.device("meta")


def _traced(method: str, tables=None, is_weighted: bool = True):
    torch.manual_seed(0)
    ebc = collection(tables or t1_t2(d2=4), method, is_weighted=is_weighted).eval()
    return ebc, symbolic_trace(ebc)


@pytest.mark.parametrize("method", METHODS)
def test_fx(method: str) -> None:
    ebc, gm = _traced(method)
    pooled = gm(weighted_kjt())
    assert pooled.values().size() == (2, 10)
    assert pooled.keys() == ["f1", "f3", "f2"]
    assert pooled.offset_per_key() == [0, 3, 6, 10]
    assert_same(pooled, ebc(weighted_kjt()))
    # the traced graph reads the module's state: a later change of the weights is seen
    with torch.no_grad():
        for p in ebc.parameters():
            p.mul_(2.0)
    assert_same(gm(weighted_kjt()), ebc(weighted_kjt()))


@pytest.mark.parametrize("method", METHODS)
def test_fx_script(method: str) -> None:
    if method == "mpe":
        pytest.skip(MPE_SCRIPT)
    if not fused_available():
        pytest.skip("TorchScript of the collection calls torch.ops.torchrec_cce.remap")
    ebc, gm = _traced(method)
    scripted = torch.jit.script(gm)
    assert_same(scripted(weighted_kjt()), ebc(weighted_kjt()))
    # keys in another order and an extra key: the same output
    kjt = weighted_kjt()
    jts = kjt.to_dict()
    reordered = KeyedJaggedTensor.from_jt_dict({"zz": jts["f2"], "f2": jts["f2"], "f1": jts["f1"],
                                                "f3": jts["f3"]})
    assert_same(scripted(reordered), ebc(kjt))


SCRIPT_SAMPLE = ["none", "cce"]  # TorchScript compiles take ~2 s: each method is scripted once
# in test_fx_script; the other scripting entry points run on these


@pytest.mark.parametrize("method", SCRIPT_SAMPLE)
def test_scripting(method: str) -> None:
    """``torch.jit.script(collection)`` (TorchRec scripts its EBC directly): scripts the fx trace."""
    if method == "mpe":
        pytest.skip(MPE_SCRIPT)
    if not fused_available():
        pytest.skip("TorchScript of the collection calls torch.ops.torchrec_cce.remap")
    ebc = collection([EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10,
                                         feature_names=["f1"])], method).eval()
    scripted = torch.jit.script(ebc)
    kjt = KeyedJaggedTensor.from_offsets_sync(keys=["f1"], values=torch.tensor([0, 1, 9]),
                                              offsets=torch.tensor([0, 2, 2, 3]))
    assert_same(scripted(kjt), ebc(kjt))


def test_duplicate_config_name_fails() -> None:
    with pytest.raises(ValueError, match="duplicate table names"):
        CCEEmbeddingBagCollection(t1_t2(f1=("f1",)) + t1_t2(f1=("f9",))[:1])


@pytest.mark.parametrize("method", METHODS)
def test_device(method: str) -> None:
    tables = [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f1"])]
    ebc = collection(tables, method, device=torch.device("meta"))
    assert ebc.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in ebc.parameters())
    if method == "none":  # TorchRec's own check (a compressed table's codebooks have other names)
        assert ebc.embedding_bags["t1"].weight.device == torch.device("meta")
    with torch.device("meta"):
        ebc = collection(tables, method)
    assert ebc.device == torch.device("meta")
    assert all(t.device.type == "meta" for t in [*ebc.parameters(), *ebc.buffers()])
    ebc = collection(tables, method)
    assert ebc.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in [*ebc.parameters(), *ebc.buffers()])


# ================================================================ further contracts
def _codebook_weights(ebc: CCEEmbeddingBagCollection) -> Dict[str, torch.Tensor]:
    return {n: b.weight for n, b in ebc.codebooks.embedding_bags.items()}


@pytest.mark.parametrize("method", INIT_FN_METHODS)
def test_init_fn_initialises_every_codebook(method: str) -> None:
    calls = []

    def init(w: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(w.shape))
        return torch.nn.init.constant_(w, 1.5)

    tables = [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=40,
                                 feature_names=["f1"], init_fn=init)]
    ebc = collection(tables, method)
    weights = _codebook_weights(ebc)
    assert sorted(calls) == sorted(tuple(w.shape) for w in weights.values())
    for w in weights.values():
        assert torch.equal(w, torch.full_like(w, 1.5))
    # one id per bag: the vector is 1.5 per column; CCE A + B: 3; QR product / sum: 2.25 / 3
    expected = {"cce": 3.0, "qr_mult": 2.25, "qr_add": 3.0}.get(method, 1.5)
    out = ebc(KeyedJaggedTensor.from_lengths_sync(keys=["f1"], values=torch.tensor([7, 39]),
                                                  lengths=torch.tensor([1, 1])))
    assert torch.equal(out.values(), torch.full((2, 4), expected))


@pytest.mark.parametrize("method", ["none", "hashing"])
def test_init_fn_std_as_measured_in_the_issue(method: str) -> None:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=3000, feature_names=["f1"],
                                 init_fn=partial(torch.nn.init.normal_, std=1.5))]
    ebc = collection(tables, method)
    (w,) = _codebook_weights(ebc).values()
    assert w.numel() >= 16 * 1000
    assert abs(float(w.std()) - 1.5) < 0.05


@pytest.mark.parametrize("method", METHODS)
def test_reset_parameters(method: str) -> None:
    """Trained state (weights, CCE's p and hash generation) back to the construction's."""
    init = partial(torch.nn.init.constant_, val=0.25)
    tables = t1_t2(d2=4)
    for t in tables:
        t.init_fn = init
    ebc = collection(tables, method)
    fresh = {k: v.clone() for k, v in ebc.state_dict().items()}
    with torch.no_grad():
        for p in ebc.parameters():
            p.add_(1.0)
        for m in ebc.tables.values():
            if hasattr(m, "write_assignment"):
                m.write_assignment(torch.arange(10), torch.zeros(10, m.chunks, dtype=torch.int64))
                m.h_generation.fill_(2)
    changed = [k for k, v in ebc.state_dict().items() if not torch.equal(v, fresh[k])]
    assert changed
    ebc.reset_parameters()
    for key, value in ebc.state_dict().items():
        assert torch.equal(value, fresh[key]), key


def test_reset_parameters_on_meta_is_a_no_op() -> None:
    ebc = collection(t1_t2(), "cce", device=torch.device("meta"))
    ebc.reset_parameters()
    assert all(p.is_meta for p in ebc.parameters())


@pytest.mark.parametrize("method", ["none", "cce", "mpe"])
def test_attributes_torchrec_reads_match_the_stock_ebc(method: str) -> None:
    def tables():
        return [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10,
                                   feature_names=["f1", "f3"]),
                EmbeddingBagConfig(name="t2", embedding_dim=2, num_embeddings=10,
                                   feature_names=["f3"], pooling=PoolingType.MEAN)]
    stock = EmbeddingBagCollection(tables(), is_weighted=True)
    given = tables()
    ours = collection(given, method, is_weighted=True)
    assert ours.embedding_bag_configs() is given and ours._embedding_bag_configs is given
    assert ours.is_weighted() is True and ours._is_weighted is True
    assert ours.device == stock.device
    for attr in ("_feature_names", "_embedding_names", "_lengths_per_embedding"):
        assert getattr(ours, attr) == getattr(stock, attr), attr
    assert ours.embedding_bags is ours.codebooks.embedding_bags
    if method == "none":
        assert list(ours.embedding_bags) == list(stock.embedding_bags)
    assert ours.feature_names() == ["f1", "f3", "f3"]
    assert [c.name for c in ours.embedding_bag_configs()] == [
        c.name for c in stock.embedding_bag_configs()]


@pytest.mark.parametrize("method", ["hashing", "cce", "memcom"])
def test_stock_state_dict_loads_into_uncompressed_tables(method: str) -> None:
    def tables():
        return t1_t2(d1=4, d2=4)
    torch.manual_seed(1)
    stock = EmbeddingBagCollection(tables())
    full = CCEEmbeddingBagCollection(tables())
    full.load_state_dict(stock.state_dict())
    assert_same(full(weighted_kjt()), stock(weighted_kjt()))
    # t2 compressed: t1 loads, t2's stock key is unexpected (its rows are not the vectors)
    mixed = CCEEmbeddingBagCollection(tables(), {"t2": config(method, tables()[1])})
    result = mixed.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == ["embedding_bags.t2.weight"]
    assert torch.equal(mixed.codebooks.embedding_bags["t1"].weight,
                       stock.embedding_bags["t1"].weight)
    out, ref = mixed(weighted_kjt()), stock(weighted_kjt())
    assert torch.equal(out.values()[:, :8], ref.values()[:, :8])  # f1, f3 from t1
    # our own keys keep loading, and a stock state dict inside a larger model too
    again = CCEEmbeddingBagCollection(tables(), {"t2": config(method, tables()[1])})
    again.load_state_dict(mixed.state_dict())
    assert_same(again(weighted_kjt()), out)
    wrapped = torch.nn.ModuleDict({"ebc": CCEEmbeddingBagCollection(tables())})
    wrapped.load_state_dict(torch.nn.ModuleDict({"ebc": stock}).state_dict())
    assert_same(wrapped["ebc"](weighted_kjt()), ref)


@pytest.mark.parametrize("method", METHODS)
def test_extra_kjt_keys_are_ignored_and_missing_ones_named(method: str) -> None:
    ebc = collection(t1_t2(d2=4), method, is_weighted=True)
    kjt = weighted_kjt()
    jts = kjt.to_dict()
    extra = KeyedJaggedTensor.from_jt_dict({"f4": jts["f1"], "f2": jts["f2"], "f1": jts["f1"],
                                            "f5": jts["f3"], "f3": jts["f3"]})
    assert_same(ebc(extra), ebc(kjt))
    lacking = KeyedJaggedTensor.from_jt_dict({"f1": jts["f1"], "f4": jts["f2"]})
    with pytest.raises(KeyError, match=r"lacks features \['f3', 'f2'\]"):
        ebc(lacking)


# ================================================================ test_dlrm.py
SPARSE_KEYS = ["f1", "f2", "f3", "f4", "f5"]


def sparse_arch_kjt() -> KeyedJaggedTensor:
    """TorchRec's SparseArch input: five keys, of which t1/t2 serve f1, f3, f2 (f4, f5 extra)."""
    return KeyedJaggedTensor.from_offsets_sync(
        keys=SPARSE_KEYS, values=torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 1, 2, 4, 5, 4, 3, 2, 9, 1, 2, 3]),
        offsets=torch.tensor([0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19]))


def dlrm_kjt() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f3", "f2"], values=torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 1, 2, 3]),
        offsets=torch.tensor([0, 2, 4, 6, 8, 10, 11]))


def f2_kjt() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_offsets_sync(keys=["f2"], values=torch.tensor(range(3)),
                                               offsets=torch.tensor([0, 2, 3]))


@pytest.mark.parametrize("method", METHODS)
def test_sparse_arch_basic(method: str) -> None:
    torch.manual_seed(0)
    arch = SparseArch(collection(t1_t2(d1=3, d2=3), method))
    out = arch(sparse_arch_kjt())
    assert out.shape == (2, len(arch.sparse_feature_names), 3)
    if method == "none":
        torch.manual_seed(0)
        stock = SparseArch(EmbeddingBagCollection(t1_t2(d1=3, d2=3)))
        assert torch.equal(out, stock(sparse_arch_kjt()))


@pytest.mark.parametrize("method", METHODS)
def test_sparse_arch_fx_and_shape(method: str) -> None:
    torch.manual_seed(0)
    arch = SparseArch(collection(t1_t2(d1=3, d2=3), method)).eval()
    gm = symbolic_trace(arch)
    FileCheck().check("KeyedJaggedTensor").check("cat").run(gm.code)
    out = gm(sparse_arch_kjt())
    assert out.shape == (2, len(arch.sparse_feature_names), 3)
    assert torch.equal(out, arch(sparse_arch_kjt()))


@pytest.mark.parametrize("method", SCRIPT_SAMPLE)
def test_sparse_arch_fx_script(method: str) -> None:
    if method == "mpe":
        pytest.skip(MPE_SCRIPT)
    tables = [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f1"]),
              EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"])]
    arch = SparseArch(collection(tables, method)).eval()
    scripted = torch.jit.script(symbolic_trace(arch))
    assert torch.equal(scripted(sparse_arch_kjt()), arch(sparse_arch_kjt()))


def _dlrm(cls, ebc, **kwargs):
    common = dict(embedding_bag_collection=ebc, dense_in_features=100,
                  dense_arch_layer_sizes=[20, 8], over_arch_layer_sizes=[5, 1])
    if cls is DLRM_Projection:
        n = len(ebc._embedding_names)
        common.update(interaction_branch1_layer_sizes=[n * 8 + 8, 4 * 8],
                      interaction_branch2_layer_sizes=[n * 8 + 8, 4 * 8])
    if cls is DLRM_DCN:
        common.update(dcn_num_layers=2, dcn_low_rank_dim=8)
    common.update(kwargs)
    return cls(**common)


@pytest.mark.parametrize("cls", [DLRM, DLRM_Projection, DLRM_DCN])
@pytest.mark.parametrize("method", METHODS)
def test_dlrm_basic(cls, method: str) -> None:
    """DLRMTest / DLRM_ProjectionTest / DLRM_DCNTest.test_basic: the uncompressed model equals
    the stock one built under the same seed (TorchRec compares with its seeded logits)."""
    torch.manual_seed(0)
    model = _dlrm(cls, collection(t1_t2(d1=8, d2=8, v=100), method))
    dense = torch.rand((2, 100))
    logits = model(dense_features=dense, sparse_features=dlrm_kjt())
    assert logits.size() == (2, 1)
    if method == "none":
        torch.manual_seed(0)
        stock = _dlrm(cls, EmbeddingBagCollection(t1_t2(d1=8, d2=8, v=100)))
        assert torch.equal(logits, stock(dense_features=dense, sparse_features=dlrm_kjt()))


@pytest.mark.parametrize("method", METHODS)
def test_dlrm_one_sparse_fx_and_train(method: str) -> None:
    """DLRMTest.test_one_sparse / test_fx, DLRMTrainTest / DLRM_ProjectionTrainTest /
    DLRM_DCNTrainTest.test_basic."""
    tables = [EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=100, feature_names=["f2"])]
    model = _dlrm(DLRM, collection(tables, method)).eval()
    dense = torch.rand((2, 100))
    logits = model(dense_features=dense, sparse_features=f2_kjt())
    assert logits.size() == (2, 1)
    gm = symbolic_trace(model)
    FileCheck().check("KeyedJaggedTensor").check("f2").run(gm.code)
    assert torch.equal(gm(dense_features=dense, sparse_features=f2_kjt()), logits)
    for cls, kwargs in [(DLRM, {}), (DLRM_Projection, dict(interaction_branch1_layer_sizes=[80, 40],
                                                           interaction_branch2_layer_sizes=[80, 48])),
                        (DLRM_DCN, {})]:
        train = DLRMTrain(_dlrm(cls, collection(tables, method), **kwargs))
        batch = Batch(dense_features=dense, sparse_features=f2_kjt(),
                      labels=torch.randint(2, (2,)))
        loss, (_, logits, _) = train(batch)
        assert logits.size() == (2,)
        loss.backward()


@pytest.mark.parametrize("method", ["none", "qr_mult"])
def test_dlrm_fx_script(method: str) -> None:
    torch.manual_seed(0)
    model = _dlrm(DLRM, collection(t1_t2(d1=8, d2=8, v=100), method)).eval()
    dense = torch.rand((2, 100))
    scripted = torch.jit.script(symbolic_trace(model))
    assert torch.equal(scripted(dense, dlrm_kjt()), model(dense_features=dense,
                                                          sparse_features=dlrm_kjt()))


def test_dlrm_no_sparse() -> None:
    with pytest.raises(AssertionError):
        _dlrm(DLRM, CCEEmbeddingBagCollection([]), dense_arch_layer_sizes=[20, 1])


@pytest.mark.parametrize("cls", [DLRM_Projection, DLRM_DCN])
def test_dlrm_dense_size(cls) -> None:
    with pytest.raises(ValueError):
        _dlrm(cls, collection(t1_t2(d1=8, d2=8, v=100), "cce"), dense_arch_layer_sizes=[20, 9])


def test_dlrm_projection_interaction_size() -> None:
    with pytest.raises(ValueError):
        _dlrm(DLRM_Projection, collection(t1_t2(d1=8, d2=8, v=100), "cce"),
              interaction_branch1_layer_sizes=[32, 33])


@pytest.mark.parametrize("method", ["cce", "qr_add", "mpe"])
def test_torch_export(method: str) -> None:
    """``torch.export`` (non-strict) of a model holding the collection equals eager exactly
    (~5 s per export: the remap op with CCE, the pair-compose op with QR; every method but
    MPE exports, checked by hand)."""
    if method == "mpe":
        pytest.skip("MPE's lookup branches on its stage buffer and on the batch's id count "
                    "(data-dependent under torch.export); serve MPE through torchrec_cce.mpe.export")
    if not fused_available():
        pytest.skip("the fused op's fake kernels are what torch.export traces")

    class Values(torch.nn.Module):
        def __init__(self, ebc: CCEEmbeddingBagCollection) -> None:
            super().__init__()
            self.ebc = ebc

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            return self.ebc(kjt).values()

    model = Values(collection(t1_t2(d2=4), method, is_weighted=True))  # training mode: CCE
    exported = torch.export.export(model, (weighted_kjt(),), strict=False)
    assert torch.equal(exported.module()(weighted_kjt()), model(weighted_kjt()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["basic_with_multiple_features", "empty_sparse_features"])
def test_dlrm_wrapper_functionality(method: str, case: str) -> None:
    """DLRMWrapperTest.test_wrapper_functionality: eval gives logits, train (loss, logits)."""
    if case == "empty_sparse_features":
        tables = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1"])]
        kjt = KeyedJaggedTensor.from_offsets_sync(keys=["f1"], values=torch.tensor([], dtype=torch.long),
                                                  offsets=torch.tensor([0, 0, 0]))
    else:
        tables, kjt = t1_t2(d1=8, d2=8, v=100), dlrm_kjt()
    wrapper = DLRMWrapper(embedding_bag_collection=collection(tables, method), dense_in_features=100,
                          dense_arch_layer_sizes=[20, 8], over_arch_layer_sizes=[5, 1])
    model_input = ModelInput(float_features=torch.rand((2, 100)), idlist_features=kjt,
                             idscore_features=None, label=torch.rand((2,)))
    wrapper.eval()
    logits = wrapper(model_input)
    assert isinstance(logits, torch.Tensor) and logits.size() == (2, 1)
    wrapper.train()
    loss, pred = wrapper(model_input)
    assert loss.size() == () and pred.size() == (2, 1)
    assert torch.equal(pred, logits)  # the same parameters: training mode changes no output
