"""Construction and forward errors: the right exception type, naming the table/feature and the
fix, raised before anything reaches torch."""

import pytest
import torch
from torchrec import EmbeddingBagConfig

from conftest import make_kjt
from torchrec_cce import (CCEConfig, CEConfig, CCEEmbeddingBagCollection, HashingTrickConfig,
                          MEmComConfig, QRConfig, compression_for_budget)


def tbl(name="t_user", v=1000, dim=16, features=None):
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=v,
                              feature_names=features or [f"f_{name}"])


def build_err(tables, compression=None, exc=ValueError, **kw):
    with pytest.raises(exc) as info:
        CCEEmbeddingBagCollection(tables, compression, **kw)
    return str(info.value)


@pytest.mark.parametrize("cfg", [CCEConfig(rows=8, chunks=3), CEConfig(rows=8, chunks=5)])
def test_dim_not_divisible_by_chunks(cfg):
    msg = build_err([tbl()], {"t_user": cfg})
    assert "'t_user'" in msg
    assert "embedding_dim=16" in msg and f"chunks={cfg.chunks}" in msg
    assert "choose chunks in [1, 2, 4, 8, 16]" in msg  # the fix: the divisors of 16


@pytest.mark.parametrize("cfg", [CCEConfig(rows=0), CCEConfig(rows=-3), CEConfig(rows=0),
                                 HashingTrickConfig(rows=0), MEmComConfig(rows=-1)])
def test_rows_not_positive(cfg):
    msg = build_err([tbl()], {"t_user": cfg})
    assert "'t_user'" in msg and "rows must be a positive int" in msg
    assert "rows=1024" in msg  # suggested fix


@pytest.mark.parametrize("chunks", [0, -2])
def test_chunks_not_positive(chunks):
    msg = build_err([tbl()], {"t_user": CCEConfig(rows=8, chunks=chunks)})
    assert "'t_user'" in msg and "chunks must be a positive int" in msg


@pytest.mark.parametrize("collisions", [
    0,
    -5])
def test_qr_collisions_not_positive(collisions):
    msg = build_err([tbl()], {"t_user": QRConfig(collisions=collisions)})
    assert "'t_user'" in msg and "collisions must be a positive int" in msg
    assert "collisions=1024" in msg


def test_bad_qr_operation():
    msg = build_err([tbl()], {"t_user": QRConfig(collisions=10, operation="max")})
    assert "'t_user'" in msg and "'max'" in msg
    assert "'mult', 'add' or 'concat'" in msg


def test_qr_concat_needs_two_columns():
    msg = build_err([tbl(dim=1)], {"t_user": QRConfig(collisions=10, operation="concat")})
    assert "'t_user'" in msg and "embedding_dim >= 2" in msg


def test_compression_key_naming_no_table():
    # A common mistake: keying by feature name instead of table name.
    msg = build_err([tbl()], {"f_t_user": HashingTrickConfig(rows=10)})
    assert "['f_t_user']" in msg and "['t_user']" in msg
    assert "EmbeddingBagConfig.name, not feature names" in msg


def test_config_larger_than_full_table_raises():
    cfg = HashingTrickConfig(rows=2000)  # 2000 * 16 > 1000 * 16
    msg = build_err([tbl()], {"t_user": cfg})
    assert "'t_user'" in msg and "32000" in msg and "16000" in msg
    assert "allow_larger=True" in msg


def test_config_larger_than_full_table_warns_with_allow_larger():
    with pytest.warns(UserWarning, match="t_user.*32000.*16000"):
        ebc = CCEEmbeddingBagCollection([tbl()], {"t_user": HashingTrickConfig(rows=2000)},
                                        allow_larger=True)
    assert ebc.codebooks.embedding_bags["t_user__hash"].weight.shape == (2000, 16)


def test_cce_larger_than_full_counts_both_codebooks():
    # 2 * rows * dim = 2 * 600 * 16 = 19200 > 16000, although rows < V.
    msg = build_err([tbl()], {"t_user": CCEConfig(rows=600)})
    assert "19200" in msg and "16000" in msg


def test_duplicate_table_names():
    msg = build_err([tbl("t_a", features=["x"]), tbl("t_a", features=["y"])])
    assert "duplicate table names" in msg and "t_a" in msg


def test_duplicate_table_names_message_gives_fix():
    msg = build_err([tbl("t_a", features=["x"]), tbl("t_a", features=["y"])])
    assert "rename" in msg.lower() or "unique" in msg.lower()


def test_feature_listed_twice_in_one_table():
    # (a feature served by several tables is allowed, as in TorchRec: test_ebc_contracts.py)
    msg = build_err([tbl("t_a", features=["x", "x"])])
    assert "'t_a'" in msg and "['x', 'x']" in msg and "list each feature once" in msg


def test_double_underscore_in_table_name():
    msg = build_err([tbl("t__user")])
    assert "'t__user'" in msg and "rename the table" in msg


def test_memcom_budget_too_small():
    with pytest.raises(ValueError, match="'t_user'.*raise the budget"):
        compression_for_budget([tbl()], "memcom", 1000)


def test_unknown_budget_method():
    with pytest.raises(ValueError, match="unknown method 'cqr'"):
        compression_for_budget([tbl()], "cqr", 1000)


def test_unsupported_config_type():
    with pytest.raises(TypeError, match="'t_user'.*CCEConfig"):
        CCEEmbeddingBagCollection([tbl()], {"t_user": "cce"})


# ---------------------------------------------------------------- forward
def _module():
    return CCEEmbeddingBagCollection(
        [tbl("t_user", v=50, dim=4, features=["u"]), tbl("t_item", v=30, dim=4, features=["i"])],
        {"t_item": CCEConfig(rows=4, chunks=2)})


def test_unknown_kjt_key_is_ignored_like_torchrecs_ebc():
    ebc = _module()
    with_extra = ebc(make_kjt({"u": [[1]], "zzz": [[3]], "i": [[2]]}))
    assert with_extra.keys() == ["u", "i"]
    assert torch.equal(with_extra.values(), ebc(make_kjt({"u": [[1]], "i": [[2]]})).values())


def test_missing_feature():
    ebc = _module()
    with pytest.raises(KeyError) as info:
        ebc(make_kjt({"u": [[1]]}))
    msg = info.value.args[0]
    assert "['i']" in msg and "['u', 'i']" in msg


@pytest.mark.parametrize("bad", [50, 51, 10**12, -1, -(2**63)])
def test_full_table_out_of_range_id(bad):
    ebc = _module()
    with pytest.raises(ValueError) as info:
        ebc(make_kjt({"u": [[0], [3, bad]], "i": [[2], []]}))
    msg = str(info.value)
    assert "'t_user'" in msg and str(bad) in msg and "[0, 50)" in msg


def test_full_table_boundary_ids_are_fine():
    ebc = _module()
    out = ebc(make_kjt({"u": [[0, 49]], "i": [[-5]]})).to_dict()["u"]
    w = ebc.codebooks.embedding_bags["t_user"].weight
    torch.testing.assert_close(out[0], w[0] + w[49])
