"""Preprocessing the real files of ../shared/data (read in place) and a batch from each:
Criteo and Avazu heads through their formats, Frappe, Yelp2018 and MovieLens through --format csv.
Expected figures come from independent reads of the files (the csv module) and their README."""

import csv
import datetime
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from torchrec_cce.data import PreprocessedDataset
from torchrec_cce.data.preprocess import AVAZU_CATEGORICAL, preprocess

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TORCHREC_CCE_SHARED_DATA", REPO / ".." / "shared" / "data"))
SPLITS = ("train", "val", "test")


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"shared data file {path} not found (expected <repo>/../shared/data, or set "
                    "TORCHREC_CCE_SHARED_DATA)")
    return path


def read_rows(path: Path, delimiter=","):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))


def vocab_of(out: Path, feature: str):
    return pq.read_table(out / "vocab" / f"{feature}.parquet").column("value").to_pylist()


def decoded(out: Path, split: str, feature: str):
    vocab = vocab_of(out, feature)
    col = pq.read_table(out / f"{split}.parquet").column(feature).to_pylist()
    if col and isinstance(col[0], list):
        return [[vocab[i] for i in bag] for bag in col]
    return [vocab[i] for i in col]


def check_counts_exact(out: Path, feature: str, raw_values):
    """Every vocabulary value occurs in the decoded splits exactly as often as in the raw file,
    ids are in descending train frequency, counts/<f>.npy is the train bincount."""
    vocab = vocab_of(out, feature)
    train = pq.read_table(out / "train.parquet").column(feature).to_numpy()
    counts = np.load(out / "counts" / f"{feature}.npy")
    np.testing.assert_array_equal(counts, np.bincount(train, minlength=len(vocab)))
    assert (np.diff(counts[1:]) <= 0).all()  # descending frequency
    assert (counts[1:] >= 1).all() and counts[0] == 0  # min-count 1: every value has a row
    raw = Counter(raw_values)
    dec = Counter()
    oov = 0
    for s in SPLITS:
        vals = decoded(out, s, feature)
        oov += sum(v is None for v in vals)
        dec.update(v for v in vals if v is not None)
    assert all(dec[v] == raw[v] for v in vocab[1:])
    in_vocab = set(vocab[1:])
    assert oov == sum(c for v, c in raw.items() if v not in in_vocab)
    assert sum(dec.values()) + oov == len(raw_values)


def one_batch(out: Path, split="train", batch_size=256):
    ds = PreprocessedDataset(str(out), split, batch_size=batch_size)
    batch = next(iter(ds))
    assert batch.sparse_features.keys() == ds.feature_names
    assert batch.labels.shape == (batch_size,) and batch.dense_features.shape == (batch_size, len(ds.dense_names))
    for key, v in zip(ds.feature_names, ds.vocab_sizes):
        vals = batch.sparse_features[key].values()
        assert vals.numel() == 0 or (0 <= int(vals.min()) and int(vals.max()) < v)
    return ds, batch


def test_criteo_head(tmp_path):
    path = shared("criteo_kaggle_head10k.tsv")
    out = tmp_path / "criteo"
    meta = preprocess(["--format", "criteo_tsv", "--input", str(path), "--split", "1,0,0",
                       "--no-progress", "--out", str(out)])
    rows = read_rows(path, "\t")
    assert meta["splits"]["train"]["rows"] == len(rows) == 10_000
    assert meta["splits"]["train"]["click_rate"] == pytest.approx(np.mean([r[0] == "1" for r in rows]))
    assert meta["splits"]["train"]["click_rate"] == pytest.approx(0.218, abs=5e-4)  # README
    sizes = [f["vocab_size"] for f in meta["features"]]
    assert sum(sizes) - 26 == 43_591 and min(sizes) - 1 == 3 and max(sizes) - 1 == 5_521  # README
    for j in range(26):
        raw = [r[14 + j] for r in rows]
        assert decoded(out, "train", f"cat_{j}") == raw  # round trip, file order
        assert sizes[j] - 1 == len(set(raw))
    t = pq.read_table(out / "train.parquet")
    for j in range(13):
        want = np.float32([np.log1p(max(int(r[1 + j]), 0)) if r[1 + j] else 0.0 for r in rows])
        np.testing.assert_allclose(t.column(f"int_{j}").to_numpy(), want, rtol=1e-6)
    check_counts_exact(out, "cat_2", [r[16] for r in rows])
    ds, batch = one_batch(out)
    assert batch.dense_features.shape == (256, 13) and len(ds.feature_names) == 26


def test_avazu_head(tmp_path):
    path = shared("avazu_head10k.csv")
    out = tmp_path / "avazu"
    meta = preprocess(["--format", "avazu_csv", "--input", str(path), "--split", "1,0,0",
                       "--no-progress", "--out", str(out)])
    header, *rows = read_rows(path)
    assert [f["name"] for f in meta["features"]] == AVAZU_CATEGORICAL
    assert meta["splits"]["train"]["rows"] == len(rows) == 9_999
    assert meta["splits"]["train"]["click_rate"] == pytest.approx(0.171, abs=5e-4)  # README
    for name in AVAZU_CATEGORICAL[2:]:
        raw = [r[header.index(name)] for r in rows]
        assert decoded(out, "train", name) == raw
    hours = [r[2] for r in rows]
    assert decoded(out, "train", "hour_of_day") == [str(int(h[6:])) for h in hours]
    assert decoded(out, "train", "weekday") == [
        str(datetime.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6])).weekday()) for h in hours]
    one_batch(out)


@pytest.fixture(scope="module")
def yelp(tmp_path_factory):
    path = shared("yelp2018.csv")
    out = tmp_path_factory.mktemp("yelp") / "pre"
    meta = preprocess(["--format", "csv", "--input", str(path), "--seed", "0", "--no-progress",
                       "--out", str(out)])
    return path, out, meta


def test_yelp2018(yelp):
    path, out, meta = yelp
    header, *rows = read_rows(path)
    assert sum(meta["splits"][s]["rows"] for s in SPLITS) == len(rows) == 935_796
    assert abs(meta["splits"]["train"]["rows"] / len(rows) - 0.8) < 0.005
    assert [f["name"] for f in meta["features"]] == ["user", "item"]
    users, items = [r[1] for r in rows], [r[2] for r in rows]
    assert len(set(users)) == 31_668 and len(set(items)) == 37_661  # README
    sizes = {f["name"]: f["vocab_size"] for f in meta["features"]}
    assert sizes["user"] - 1 <= 31_668 and sizes["item"] - 1 <= 37_661
    check_counts_exact(out, "user", users)
    check_counts_exact(out, "item", items)
    for s in SPLITS:
        clicks = pq.read_table(out / f"{s}.parquet").column("label").to_numpy().mean()
        assert meta["splits"][s]["click_rate"] == pytest.approx(clicks)
    one_batch(out, "val", 4096)


def test_frappe(tmp_path):
    path = shared("frappe.csv")
    out = tmp_path / "frappe"
    meta = preprocess(["--format", "csv", "--input", str(path), "--no-progress", "--out", str(out)])
    header, *rows = read_rows(path)
    assert header[0] == "label" and [f["name"] for f in meta["features"]] == header[1:]
    assert sum(meta["splits"][s]["rows"] for s in SPLITS) == len(rows) == 86_582
    for j, name in enumerate(header[1:], start=1):
        check_counts_exact(out, name, [r[j] for r in rows])
    assert {f["name"]: f["vocab_size"] for f in meta["features"]}["item"] - 1 <= 4_082
    one_batch(out)


def test_movielens_multi_hot_by_order(tmp_path):
    path = shared("movielens_latest_small.csv")
    out = tmp_path / "ml"
    meta = preprocess(["--format", "csv", "--input", str(path), "--split-by-order", "0.8,0.1,0.1",
                       "--categorical-columns", "user,movie,year,hour,weekday",
                       "--multi-hot-columns", "genres", "--multi-hot-separator", "|",
                       "--no-progress", "--out", str(out)])
    header, *rows = read_rows(path)
    n = len(rows)
    assert n == 100_836
    n_train, n_val = int(0.8 * n), int(0.9 * n) - int(0.8 * n)
    assert [meta["splits"][s]["rows"] for s in SPLITS] == [n_train, n_val, n - n_train - n_val]
    train = rows[:n_train]  # time order: the first 80% of the file
    col = {c: header.index(c) for c in header}
    for name in ("user", "movie"):
        assert decoded(out, "train", name) == [r[col[name]] for r in train]
        ref = Counter(r[col[name]] for r in train)
        assert next(f for f in meta["features"] if f["name"] == name)["vocab_size"] == len(ref) + 1
    bags = [r[col["genres"]].split("|") for r in train]
    assert decoded(out, "train", "genres") == bags  # multi-hot bags exact
    ref = Counter(g for b in bags for g in b)
    vocab = vocab_of(out, "genres")
    assert len(vocab) == len(ref) + 1 and set(vocab[1:]) == set(ref)
    np.testing.assert_array_equal(np.load(out / "counts" / "genres.npy")[1:], [ref[v] for v in vocab[1:]])
    assert len(set(g for r in rows for g in r[col["genres"]].split("|"))) == 20  # README
    test_users = [r[col["user"]] for r in rows[n_train + n_val:]]
    train_users = set(r[col["user"]] for r in train)
    assert decoded(out, "test", "user") == [u if u in train_users else None for u in test_users]
    ds, batch = one_batch(out, "test", 512)
    lengths = batch.sparse_features["genres"].lengths()
    assert lengths.tolist() == [len(r[col["genres"]].split("|")) for r in rows[n_train + n_val:][:512]]
