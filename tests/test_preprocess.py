"""python -m torchrec_cce.data.preprocess on hand-made files: vocabulary exactness (ids, order,
--min-count, OOV, counts, multi-hot bags, meta sizes), round trips, splits, bad input."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from torchrec_cce.data.preprocess import main, preprocess

REPO = Path(__file__).resolve().parents[1]

TRAIN = """label,user,item,genres,x
1,u1,i1,a|b,1.5
0,u2,i1,b,
1,u1,i2,,2
0,u3,i1,a|c|a,-1
1,u2,i3,b|c,0.25
0,u1,i1,c,3
"""
TEST = """label,user,item,genres,x
1,u9,i1,zz|a,1
0,u3,i2,b,2
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def rows_of(text: str):
    lines = text.strip().split("\n")
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


def reference_vocab(values_in_order, min_count):
    """Independent reference: ids 1.. by descending count, ties by first appearance."""
    counts = Counter(values_in_order)
    first = {}
    for i, v in enumerate(values_in_order):
        first.setdefault(v, i)
    kept = sorted((v for v in counts if counts[v] >= min_count), key=lambda v: (-counts[v], first[v]))
    ids = {v: i + 1 for i, v in enumerate(kept)}
    oov = sum(c for v, c in counts.items() if c < min_count)
    return ids, [oov] + [counts[v] for v in kept], len(counts)


def read_vocab(out: Path, feature: str):
    t = pq.read_table(out / "vocab" / f"{feature}.parquet").to_pydict()
    assert t["id"] == list(range(len(t["id"])))
    return t["value"]


@pytest.fixture
def handmade(tmp_path):
    out = tmp_path / "out"
    meta = preprocess([
        "--format", "csv", "--input", write(tmp_path / "train.csv", TRAIN),
        "--test-input", write(tmp_path / "test.csv", TEST), "--split", "1,0",
        "--categorical-columns", "user,item", "--multi-hot-columns", "genres",
        "--dense-columns", "x", "--min-count", "2", "--no-progress", "--out", str(out)])
    return out, meta


def test_vocabulary_exact(handmade):
    out, meta = handmade
    train, test = rows_of(TRAIN), rows_of(TEST)
    assert meta["splits"]["train"]["rows"] == 6 and meta["splits"]["val"]["rows"] == 0
    assert meta["splits"]["test"]["rows"] == 2
    assert meta["splits"]["train"]["click_rate"] == pytest.approx(3 / 6)
    assert [f["name"] for f in meta["features"]] == ["user", "item", "genres"]
    assert [f["kind"] for f in meta["features"]] == ["categorical", "categorical", "multi_hot"]
    enc_train = pq.read_table(out / "train.parquet").to_pydict()
    enc_test = pq.read_table(out / "test.parquet").to_pydict()
    for feat in meta["features"]:
        name = feat["name"]
        if name == "genres":
            seq = [g for r in train for g in r["genres"].split("|") if g]
        else:
            seq = [r[name] for r in train]
        ids, counts, distinct = reference_vocab(seq, 2)
        vocab = read_vocab(out, name)
        assert vocab[0] is None and feat["oov_id"] == 0
        assert vocab[1:] == list(ids)  # contiguous ids in descending frequency, first-seen ties
        assert feat["vocab_size"] == len(ids) + 1 == len(vocab)
        assert feat["distinct_train_values"] == distinct
        np.testing.assert_array_equal(np.load(out / "counts" / f"{name}.npy"), counts)
        assert np.load(out / "counts" / f"{name}.npy").dtype == np.int64
        for enc, raw in ((enc_train, train), (enc_test, test)):
            if name == "genres":
                want = [[ids.get(g, 0) for g in r["genres"].split("|") if g] for r in raw]
            else:
                want = [ids.get(r[name], 0) for r in raw]
            assert enc[name] == want
    # the hand-computed values, to pin the ordering rules themselves
    assert read_vocab(out, "user") == [None, "u1", "u2"]  # u3 seen once < min-count 2
    assert read_vocab(out, "item") == [None, "i1"]
    assert read_vocab(out, "genres") == [None, "a", "b", "c"]  # all 3 times: first-seen order
    assert enc_test["user"] == [0, 0]  # u9 unseen, u3 below min-count
    assert enc_test["genres"] == [[0, 1], [2]]
    assert enc_train["genres"][2] == []  # empty cell -> empty bag
    assert {f["name"]: f["oov_train_rows"] for f in meta["features"]} == {"user": 1, "item": 2, "genres": 0}
    np.testing.assert_array_equal(enc_train["x"], np.float32([1.5, 0, 2, -1, 0.25, 3]))
    assert enc_train["label"] == [1, 0, 1, 0, 1, 0]
    assert pq.read_schema(out / "train.parquet").field("label").type == "int8"
    assert meta["min_count"] == 2 and meta["format_version"] == 1 and meta["dense_features"] == ["x"]
    assert meta["command"][:3] == ["python", "-m", "torchrec_cce.data.preprocess"]
    assert json.loads((out / "meta.json").read_text()) == meta


def random_table(rng, n, with_rid=True):
    """A CSV with short, long (> 8 bytes, the hashed lookup path) and empty values."""
    short = np.array([f"s{i}" for i in range(40)] + [""])
    long_ = np.array([f"a-long-value-{i:04d}-" + "x" * (i % 30) for i in range(300)])
    rows = ["label,rid,short,long,tags,d"]
    cols = {"rid": [], "short": [], "long": [], "tags": []}
    for i in range(n):
        s = short[min(int(rng.zipf(1.5)) - 1, len(short) - 1)]
        lv = long_[min(int(rng.zipf(1.3)) - 1, len(long_) - 1)]
        tags = "|".join(rng.choice(["t1", "t2", "t3", "ttttttttt4"], size=rng.integers(0, 4)))
        rows.append(f"{int(rng.random() < 0.3)},r{i},{s},{lv},{tags},{rng.integers(-5, 100)}")
        cols["rid"].append(f"r{i}")
        cols["short"].append(str(s))
        cols["long"].append(str(lv))
        cols["tags"].append([t for t in tags.split("|") if t])
    return "\n".join(rows) + "\n", cols


def decode(out: Path, split: str):
    enc = pq.read_table(out / f"{split}.parquet").to_pydict()
    vocabs = {n: read_vocab(out, n) for n in ("rid", "short", "long", "tags")}
    dec = {n: [vocabs[n][i] for i in enc[n]] for n in ("rid", "short", "long")}
    dec["tags"] = [[vocabs["tags"][i] for i in bag] for bag in enc["tags"]]
    return enc, dec


@pytest.mark.parametrize("order", [False, True])
def test_round_trip_and_splits(tmp_path, order):
    rng = np.random.default_rng(5)
    text, cols = random_table(rng, 3000)
    out = tmp_path / "out"
    flag = "--split-by-order" if order else "--split"
    meta = preprocess(["--format", "csv", "--input", write(tmp_path / "in.csv", text),
                       flag, "0.7,0.2,0.1", "--multi-hot-columns", "tags", "--dense-columns", "d",
                       "--seed", "3", "--block-size", "20000", "--no-progress", "--out", str(out)])
    by_rid = {r: i for i, r in enumerate(cols["rid"])}
    seen = []
    train_vocab = {n: set(read_vocab(out, n)[1:]) for n in ("short", "long", "tags")}
    for split in ("train", "val", "test"):
        enc, dec = decode(out, split)
        assert len(enc["label"]) == meta["splits"][split]["rows"]
        if split == "train":  # rids are unique, so train rows are identified by their rid
            rows = [by_rid[r] for r in dec["rid"]]
        else:
            assert set(enc["rid"]) == {0}  # val/test rids are unseen in train -> OOV
            rows = None
        seen.append((split, rows, enc, dec))
    train_rows = seen[0][1]
    for n in ("short", "long"):
        assert seen[0][3][n] == [cols[n][i] for i in train_rows]  # exact round trip
    assert seen[0][3]["tags"] == [cols["tags"][i] for i in train_rows]
    assert sum(meta["splits"][s]["rows"] for s in ("train", "val", "test")) == 3000
    if order:
        assert train_rows == list(range(len(train_rows)))  # first 70% of the file, in order
        assert [meta["splits"][s]["rows"] for s in ("train", "val", "test")] == [2100, 600, 300]
    else:
        assert train_rows == sorted(train_rows)  # file order kept within the split
        assert abs(meta["splits"]["train"]["rows"] - 2100) < 120
    # values of val/test: in the train vocabulary -> decode exactly, else id 0
    for split, _, enc, dec in seen[1:]:
        for n in ("short", "long"):
            for i, v in zip(enc[n], dec[n]):
                assert (i == 0) == (v is None)
                if i:
                    assert v in train_vocab[n]


def test_split_disjoint_complete_with_row_ids(tmp_path):
    """Rows identified by a dense column d = row number: every row lands in exactly one split."""
    lines = ["label,c,d"] + [f"{i % 2},v{i % 7},{i}" for i in range(5000)]
    path = write(tmp_path / "in.csv", "\n".join(lines) + "\n")
    for flag in ("--split", "--split-by-order"):
        out = tmp_path / flag.strip("-")
        meta = preprocess(["--format", "csv", "--input", path, flag, "0.6,0.3,0.1",
                           "--dense-columns", "d", "--block-size", "10000", "--no-progress",
                           "--out", str(out)])
        parts = [pq.read_table(out / f"{s}.parquet").column("d").to_numpy().astype(int)
                 for s in ("train", "val", "test")]
        allr = np.concatenate(parts)
        assert len(allr) == 5000 and len(set(allr.tolist())) == 5000  # disjoint and complete
        assert [len(p) for p in parts] == [meta["splits"][s]["rows"] for s in ("train", "val", "test")]
        for p in parts:
            assert (np.diff(p) > 0).all()  # file order inside each split
        if flag == "--split-by-order":
            np.testing.assert_array_equal(parts[0], np.arange(3000))
            np.testing.assert_array_equal(parts[1], np.arange(3000, 4500))
        labels = pq.read_table(out / "train.parquet").column("label").to_numpy()
        np.testing.assert_array_equal(labels, parts[0] % 2)
        c = pq.read_table(out / "train.parquet").column("c").to_numpy()
        vocab = read_vocab(out, "c")
        assert [vocab[i] for i in c] == [f"v{i % 7}" for i in parts[0]]


def test_random_val_test_keeps_train_first_and_mixes_the_tail(tmp_path):
    """--split-by-order --random-val-test: train is the first fraction of lines, as without it;
    each later row is val iff the seeded row hash of its order key (file << 40 | line number)
    is below val / (val + test), so val and test interleave over the same period."""
    from torchrec_cce.data.preprocess import row_uniform

    lines = ["label,c,d"] + [f"{i % 2},v{i % 7},{i}" for i in range(5000)]
    path = write(tmp_path / "in.csv", "\n".join(lines) + "\n")
    got = {}
    for name, seed, block in (("a", 4, 10000), ("b", 4, 1 << 20), ("c", 5, 10000)):
        out = tmp_path / name
        meta = preprocess(["--format", "csv", "--input", path, "--split-by-order", "0.6,0.3,0.1",
                           "--random-val-test", "--seed", str(seed), "--dense-columns", "d",
                           "--block-size", str(block), "--no-progress", "--out", str(out)])
        parts = [pq.read_table(out / f"{s}.parquet").column("d").to_numpy().astype(np.int64)
                 for s in ("train", "val", "test")]
        np.testing.assert_array_equal(parts[0], np.arange(3000))  # train: the first 60%, in order
        tail = np.arange(3000, 5000)
        is_val = row_uniform(seed, tail + 2) < 0.3 / 0.4  # data row i is line i + 2 (header: 1)
        np.testing.assert_array_equal(parts[1], tail[is_val])
        np.testing.assert_array_equal(parts[2], tail[~is_val])
        assert [len(p) for p in parts] == [meta["splits"][s]["rows"] for s in ("train", "val", "test")]
        assert meta["source"]["split"]["random_val_test"] is True
        got[name] = parts[1]
    assert abs(len(got["a"]) - 1500) < 100 and 3000 <= got["a"].min() < 3050 and got["a"].max() > 4950
    np.testing.assert_array_equal(got["a"], got["b"])  # independent of block boundaries
    assert not np.array_equal(got["a"], got["c"])  # --seed draws another mix


def test_random_val_test_needs_split_by_order(tmp_path):
    path = write(tmp_path / "in.csv", TRAIN)
    with pytest.raises(ValueError, match="give --split-by-order too"):
        preprocess(["--format", "csv", "--input", path, "--split", "0.8,0.1,0.1",
                    "--random-val-test", "--no-progress", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="test split is the --test-input files"):
        preprocess(["--format", "csv", "--input", path, "--test-input", write(tmp_path / "t.csv", TEST),
                    "--split-by-order", "0.9,0.1", "--random-val-test", "--no-progress",
                    "--out", str(tmp_path / "o2")])


def test_random_split_seeded(tmp_path):
    lines = ["label,c,d"] + [f"0,v{i % 3},{i}" for i in range(2000)]
    path = write(tmp_path / "in.csv", "\n".join(lines) + "\n")
    got = {}
    for name, seed, block in (("a", 1, 4000), ("b", 1, 1 << 20), ("c", 2, 4000)):
        preprocess(["--format", "csv", "--input", path, "--dense-columns", "d", "--seed", str(seed),
                    "--block-size", str(block), "--no-progress", "--out", str(tmp_path / name)])
        got[name] = pq.read_table(tmp_path / name / "train.parquet").column("d").to_numpy()
    np.testing.assert_array_equal(got["a"], got["b"])  # independent of block boundaries
    assert not np.array_equal(got["a"], got["c"])


def test_dense_log_transform_and_missing(tmp_path):
    path = write(tmp_path / "in.csv", "label,c,d\n0,a,3\n1,a,\n0,b,-2\n")
    out = tmp_path / "o"
    preprocess(["--format", "csv", "--input", path, "--dense-columns", "d", "--dense-transform", "log",
                "--split", "1,0,0", "--no-progress", "--out", str(out)])
    d = pq.read_table(out / "train.parquet").column("d").to_numpy()
    np.testing.assert_allclose(d, np.float32([np.log1p(3.0), 0.0, 0.0]))


def test_criteo_format_small(tmp_path):
    row = ["1"] + [str(i) for i in range(13)] + [f"{i:08x}" for i in range(26)]
    row2 = ["0"] + [""] * 13 + [""] * 25 + ["0000000a"]
    text = "\t".join(row) + "\n" + "\t".join(row2) + "\n" + "\t".join(row) + "\n"
    out = tmp_path / "o"
    meta = preprocess(["--format", "criteo_tsv", "--input", write(tmp_path / "c.tsv", text),
                       "--split", "1,0,0", "--no-progress", "--out", str(out)])
    assert meta["dense_features"] == [f"int_{i}" for i in range(13)]
    assert [f["name"] for f in meta["features"]] == [f"cat_{i}" for i in range(26)]
    enc = pq.read_table(out / "train.parquet").to_pydict()
    assert enc["cat_0"] == [1, 2, 1]  # "00000000" twice -> id 1, "" once -> id 2
    assert read_vocab(out, "cat_0") == [None, "00000000", ""]
    assert read_vocab(out, "cat_25") == [None, "00000019", "0000000a"]
    np.testing.assert_allclose(enc["int_5"], np.float32([np.log1p(5), 0, np.log1p(5)]))


# ----------------------------------------------------------------------------------- bad input
def run_err(args):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        preprocess(args + ["--no-progress"])
    return str(e.value)


def test_bad_rows_counted_below_threshold(tmp_path):
    lines = ["label,c,d"] + [f"0,v{i % 5},{i}" for i in range(400)]
    lines[101] = "1,extra,1,2"  # line 102 of the file: wrong field count
    lines[201] = "0,v1,abc"  # line 202: non-numeric dense
    path = write(tmp_path / "in.csv", "\n".join(lines) + "\n")
    meta = preprocess(["--format", "csv", "--input", path, "--dense-columns", "d",
                       "--max-bad-fraction", "0.01", "--no-progress", "--out", str(tmp_path / "o")])
    bad = meta["source"]["bad_rows"]
    assert bad["by_reason"] == {"wrong_field_count": 1, "non_numeric_dense": 1}
    assert bad["total"] == 2 and bad["rows_read"] == 400
    assert bad["first"]["line"] == 102
    assert sum(s["rows"] for s in meta["splits"].values()) == 398


def test_bad_rows_above_threshold(tmp_path):
    lines = ["label,c,d"] + [f"0,v{i % 5},{i}" for i in range(100)]
    lines[30] = "0,v1,notanumber"  # line 31
    lines[60] = "0,v1"  # line 61
    path = write(tmp_path / "in.csv", "\n".join(lines) + "\n")
    msg = run_err(["--format", "csv", "--input", path, "--dense-columns", "d", "--out", str(tmp_path / "o")])
    assert path in msg and "line 31" in msg and "non_numeric_dense=1" in msg
    assert "wrong_field_count=1" in msg and "--max-bad-fraction" in msg
    # the line number is exact also after a skipped (wrong field count) row
    lines[30] = "0,v1,29"
    lines[50] = "0,v1,2,3"  # line 51
    lines[70] = "0,v1,x"  # line 71
    path = write(tmp_path / "in.csv", "\n".join(lines) + "\n")
    meta = preprocess(["--format", "csv", "--input", path, "--dense-columns", "d", "--max-bad-fraction",
                       "0.5", "--no-progress", "--out", str(tmp_path / "o2")])
    assert meta["source"]["bad_rows"]["by_reason"] == {"wrong_field_count": 2, "non_numeric_dense": 1}
    d = pq.read_table(tmp_path / "o2" / "train.parquet").column("d").to_numpy()
    for s in ("val", "test"):
        d = np.concatenate([d, pq.read_table(tmp_path / "o2" / f"{s}.parquet").column("d").to_numpy()])
    assert sorted(d.astype(int).tolist()) == sorted(set(range(100)) - {49, 59, 69})


def test_bad_label_missing_column_empty_file(tmp_path):
    path = write(tmp_path / "lab.csv", "label,c\n0,a\n1,b\n2,c\n")
    msg = run_err(["--format", "csv", "--input", path, "--out", str(tmp_path / "o")])
    assert f"{path}:4" in msg and "'label'" in msg and "'2'" in msg and "0 or 1" in msg
    path = write(tmp_path / "col.csv", "label,c\n0,a\n")
    msg = run_err(["--format", "csv", "--input", path, "--categorical-columns", "c,user",
                   "--out", str(tmp_path / "o")])
    assert path in msg and "'user'" in msg and "--categorical-columns" in msg
    msg = run_err(["--format", "csv", "--input", path, "--label-column", "click", "--out", str(tmp_path / "o")])
    assert "'click'" in msg and "--label-column" in msg
    for text in ("", "label,c\n"):
        path = write(tmp_path / "empty.csv", text)
        msg = run_err(["--format", "csv", "--input", path, "--out", str(tmp_path / "o")])
        assert path in msg and "empty" in msg
    path = write(tmp_path / "empty.tsv", "")
    msg = run_err(["--format", "criteo_tsv", "--input", path, "--out", str(tmp_path / "o")])
    assert path in msg and "empty" in msg
    msg = run_err(["--format", "csv", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert "nope.csv" in msg
    path = write(tmp_path / "avz.csv", "id,click,hour\n1,0,14102100\n")
    msg = run_err(["--format", "avazu_csv", "--input", path, "--out", str(tmp_path / "o")])
    assert path in msg and "'C1'" in msg
    msg = run_err(["--format", "csv", "--input", path, "--split", "0.5,0.2", "--out", str(tmp_path / "o")])
    assert "--split" in msg


def test_cli_exit_code_and_message(tmp_path, capsys):
    path = write(tmp_path / "lab.csv", "label,c\n0,a\nyes,b\n")
    assert main(["--format", "csv", "--input", path, "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert f"{path}:3" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    """``python -m torchrec_cce.data.preprocess`` runs as a command."""
    path = write(tmp_path / "in.csv", "label,c\n0,a\n1,a\n0,b\n")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "torchrec_cce.data.preprocess", "--format", "csv",
                        "--input", path, "--split", "1,0,0", "--no-progress", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["features"][0]["vocab_size"] == 3 and "c=3" in r.stdout


def test_multiple_and_gzip_inputs_equal_one_file(tmp_path):
    """--input a,b.gz gives the same vocabulary, order and splits as the concatenated file."""
    import gzip

    lines = [f"{i % 2},v{(i * 7) % 13},{i}" for i in range(1200)]
    header = "label,c,d"
    one = write(tmp_path / "all.csv", "\n".join([header] + lines) + "\n")
    a = write(tmp_path / "a.csv", "\n".join([header] + lines[:500]) + "\n")
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write("\n".join([header] + lines[500:]) + "\n")
    outs = []
    for name, inputs in (("one", one), ("two", f"{a},{tmp_path / 'b.csv.gz'}")):
        preprocess(["--format", "csv", "--input", inputs, "--split-by-order", "0.7,0.2,0.1",
                    "--dense-columns", "d", "--no-progress", "--out", str(tmp_path / name)])
        outs.append({s: pq.read_table(tmp_path / name / f"{s}.parquet").to_pydict()
                     for s in ("train", "val", "test")})
        assert read_vocab(tmp_path / name, "c")[1:4] == ["v0", "v7", "v1"]  # ties: first seen
    assert outs[0] == outs[1]
    assert outs[0]["val"]["d"] == [float(i) for i in range(840, 1080)]
