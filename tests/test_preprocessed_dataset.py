"""PreprocessedDataset: batch contents against the parquet rows, rank/world-size semantics
(train: one seeded permutation per epoch on every rank, tail dropped; val/test: every row
exactly once, equal batch counts) and a real 2-process DMP run over uneven last batches."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from multiprocess import run_multiprocess
from torchrec_cce.data import PreprocessedDataset, load_meta
from torchrec_cce.data.preprocess import preprocess
from torchrec_cce.data.preprocessed import eval_batch_bounds


def make_dir(path, n=1001, seed=0, split=("--split", "0.6,0.2,0.2")):
    rng = np.random.default_rng(seed)
    lines = ["label,u,it,g,x,y"]
    for i in range(n):
        g = "|".join(rng.choice(["a", "b", "c", "d", "e"], size=rng.integers(0, 4)))
        lines.append(f"{int(rng.random() < 0.4)},u{rng.integers(0, 50)},i{rng.integers(0, 300)},{g},"
                     f"{i},{rng.normal():.4f}")
    src = path / "in.csv"
    src.write_text("\n".join(lines) + "\n")
    out = path / "pre"
    preprocess(["--format", "csv", "--input", str(src), "--multi-hot-columns", "g",
                "--dense-columns", "x,y", *split, "--no-progress", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("pre"))


def rows_of(batch):
    """Row numbers of a batch: dense column x is the source row number."""
    return batch.dense_features[:, 0].round().long().tolist()


def test_batch_contents(data_dir):
    raw = pq.read_table(data_dir / "train.parquet").to_pydict()
    by_x = {int(round(x)): i for i, x in enumerate(raw["x"])}
    ds = PreprocessedDataset(str(data_dir), "train", batch_size=64, seed=1)
    assert ds.feature_names == ["u", "it", "g"] and ds.dense_names == ["x", "y"]
    meta = load_meta(str(data_dir))
    assert ds.vocab_sizes == [f["vocab_size"] for f in meta["features"]]
    np.testing.assert_array_equal(ds.counts("g"), np.load(data_dir / "counts" / "g.npy"))
    n_batches = 0
    for batch in ds:
        n_batches += 1
        assert batch.dense_features.dtype == torch.float32 and batch.labels.dtype == torch.float32
        kjt = batch.sparse_features
        assert kjt.keys() == ["u", "it", "g"] and kjt.values().dtype == torch.int64
        assert kjt.stride() == 64
        jt = {k: v.to_dense() for k, v in kjt.to_dict().items()}
        for b, x in enumerate(rows_of(batch)):
            i = by_x[x]
            assert batch.labels[b].item() == raw["label"][i]
            assert batch.dense_features[b, 1].item() == pytest.approx(raw["y"][i])
            assert jt["u"][b].tolist() == [raw["u"][i]]
            assert jt["it"][b].tolist() == [raw["it"][i]]
            assert jt["g"][b].tolist() == raw["g"][i]  # the bag, in order
    assert n_batches == len(ds) == len(raw["x"]) // 64


def test_no_dense_columns(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("label,a\n" + "".join(f"{i % 2},v{i % 3}\n" for i in range(30)))
    preprocess(["--format", "csv", "--input", str(src), "--split", "1,0,0", "--no-progress",
                "--out", str(tmp_path / "o")])
    batch = next(iter(PreprocessedDataset(str(tmp_path / "o"), "train", batch_size=8)))
    assert batch.dense_features.shape == (8, 0)
    assert batch.sparse_features.values().shape == (8,)


def test_train_world2_semantics(data_dir):
    n = load_meta(str(data_dir))["splits"]["train"]["rows"]
    b, w = 32, 2

    def epoch_rows(seed, epoch, rank):
        ds = PreprocessedDataset(str(data_dir), "train", batch_size=b, rank=rank, world_size=w, seed=seed)
        ds.set_epoch(epoch)
        return [rows_of(batch) for batch in ds], ds

    x_of_row = pq.read_table(data_dir / "train.parquet").column("x").to_numpy().round().astype(int)
    r0, ds0 = epoch_rows(7, 0, 0)
    r1, ds1 = epoch_rows(7, 0, 1)
    assert len(r0) == len(r1) == len(ds0) == len(ds1) == n // (b * w)  # tail dropped, equal counts
    assert all(len(x) == b for x in r0 + r1)
    np.testing.assert_array_equal(ds0.order(), ds1.order())  # one permutation on every rank
    assert sorted(ds0.order().tolist()) == list(range(n))
    flat = [x for k in range(len(r0)) for x in r0[k] + r1[k]]
    assert len(set(flat)) == len(flat) == len(r0) * b * w  # ranks disjoint
    # the global order is the permutation: global batch k = rank 0's then rank 1's slice
    assert flat == x_of_row[ds0.order()][: len(flat)].tolist()
    assert epoch_rows(7, 0, 0)[0] == r0  # reproducible by seed
    assert epoch_rows(7, 1, 0)[0] != r0  # a different permutation per epoch
    assert epoch_rows(8, 0, 0)[0] != r0  # and per seed
    assert len(flat) == n - n % (b * w)


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("w,b", [(1, 64), (2, 64), (2, 7), (3, 50)])
def test_eval_every_row_once(data_dir, split, w, b):
    n = load_meta(str(data_dir))["splits"][split]["rows"]
    per_rank = []
    for r in range(w):
        ds = PreprocessedDataset(str(data_dir), split, batch_size=b, rank=r, world_size=w)
        per_rank.append([rows_of(batch) for batch in ds])
        assert len(per_rank[-1]) == len(ds)
    assert len({len(x) for x in per_rank}) == 1  # every rank the same number of batches
    assert len(per_rank[0]) == -(-n // (b * w))
    flat = [x for rank in per_rank for batch in rank for x in batch]
    want = pq.read_table(data_dir / f"{split}.parquet").column("x").to_numpy().round().astype(int)
    assert sorted(flat) == sorted(want.tolist())  # every row exactly once
    assert all(1 <= len(batch) <= b for rank in per_rank for batch in rank)


def test_eval_bounds_grid():
    for w in (1, 2, 3, 4):
        for b in (1, 2, 3, 8):
            for n in range(w, 80):
                if b == 1 and w > 1 and n % w:
                    with pytest.raises(ValueError, match="batch_size"):
                        eval_batch_bounds(n, b, w)
                    continue
                cuts = eval_batch_bounds(n, b, w)
                sizes = np.diff(cuts, axis=1)
                assert cuts.shape == (-(-n // (b * w)), w + 1)
                assert (sizes >= 1).all() and (sizes <= b).all()
                # contiguous, in order, covering [0, n) exactly once
                flat = np.concatenate([np.arange(c[r], c[r + 1]) for c in cuts for r in range(w)])
                np.testing.assert_array_equal(flat, np.arange(n))
    with pytest.raises(ValueError, match="ranks"):
        eval_batch_bounds(1, 4, 2)


def test_errors(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_meta(str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((data_dir / "meta.json").read_text())
    meta["format_version"] = 99
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=str(bad)):
        load_meta(str(bad))
    with pytest.raises(ValueError, match="split"):
        PreprocessedDataset(str(data_dir), "dev")
    with pytest.raises(ValueError, match="smaller batch size"):
        PreprocessedDataset(str(data_dir), "train", batch_size=10_000)
    with pytest.raises(KeyError, match="nope"):
        PreprocessedDataset(str(data_dir), "val", batch_size=10).counts("nope")


# ------------------------------------------------------------------ 2 processes, DMP
def _dmp_eval(rank, world, data_dir):
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_cce.distributed.tensors import scatter_full

    ds = PreprocessedDataset(data_dir, "val", batch_size=64, rank=rank, world_size=world)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=v, feature_names=[f])
              for f, v in zip(ds.feature_names, ds.vocab_sizes)]
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(tables=tables)
    module = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {t.name: table_wise(rank=i % world) for i, t in enumerate(tables)},
        local_size=world, world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, device=torch.device("cpu"))
    full = ref.state_dict()
    for key, value in dmp.state_dict().items():
        scatter_full(value, full[key])
    sizes, err = [], 0.0
    with torch.no_grad():
        for batch in ds:
            out = dmp(batch.sparse_features).wait().to_dict()
            want = ref(batch.sparse_features).to_dict()
            assert sorted(out) == sorted(want) == sorted(ds.feature_names)
            err = max(err, max((out[k] - want[k]).abs().max().item() for k in want))
            sizes.append(batch.labels.shape[0])
    return sizes, err


def test_dmp_world2_uneven_last_batch(tmp_path):
    """Sharded (table-wise over 2 ranks) lookups of the val batches equal the unsharded
    module's, with ranks holding different last-batch sizes (val = 201 rows, batch 64)."""
    data_dir = make_dir(tmp_path, n=1005, split=("--split-by-order", "0.6,0.2,0.2"))
    n = load_meta(str(data_dir))["splits"]["val"]["rows"]
    assert n == 201
    (s0, e0), (s1, e1) = run_multiprocess(_dmp_eval, 2, str(data_dir), timeout=900)
    assert s0 == [64, 36] and s1 == [64, 37]  # the last global batch (73 rows) dealt 36 / 37
    assert e0 < 1e-6 and e1 < 1e-6
