"""The fast path of torchrec_cce.data.preprocess (packed integer keys, dense columns parsed by the
CSV reader, prefetching) writes byte-for-byte the files of the string path, including files
that force its fall-backs mid-way (a long value, a non-numeric dense cell, a NUL byte)."""

import filecmp
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import torchrec_cce.data.preprocess as pp


def test_packed_keys_one_to_one_and_round_trip():
    values = ["", "a", "ab", "0000000a", "a0000000", "ffffffff", "é", "1234567", "12345678"]
    arr = pa.array(values)
    keys = pp.packed_keys(arr)
    want = [int.from_bytes(v.encode().ljust(8, b"\0"), "little") for v in values]
    assert keys.tolist() == want
    assert len(set(want)) == len(values)
    assert pp.unpack_keys(keys).to_pylist() == values
    assert pp.packed_keys(arr.slice(3, 4)).tolist() == want[3:7]  # sliced arrays: offsets
    assert pp.packed_keys(pa.array(["123456789"])) is None  # > 8 bytes
    assert pp.packed_keys(pa.array(["a\0"])) is None  # NUL: "a" and "a\0" would share a key


def test_fixed_width_keys_equal_packed_string_keys():
    """The CSV reader's fixed-width parse (nulls = empty cells) packs to the strings' keys."""
    values = ["abcdefgh", "", "12345678", "", "0000000a"]
    fixed = pa.array([v.encode() or None for v in values], pa.binary(8))
    want = pp.packed_keys(pa.array(values)).tolist()
    assert pp.packed_keys(fixed).tolist() == want
    assert pp.packed_keys(fixed.slice(1, 3)).tolist() == want[1:4]
    assert pp.text_values(fixed).to_pylist() == values
    assert pp.packed_keys(pa.array([b"abc\0defg", None], pa.binary(8))) is None
    assert pp.packed_keys(pa.array([b"abcdefgh", None, b"abc\0defg"], pa.binary(8)).slice(0, 2)).tolist() == [
        want[0], 0]  # the NUL is outside the slice


def _criteo_text(rng, n, long_at=None, bad_dense_at=None, nul_at=None, nul8_at=None, short_at=None):
    lines = []
    pools = [rng.integers(0, 1 << 32, size=s) for s in (5, 40, 3000)]
    for i in range(n):
        dense = [str(int(x)) if rng.random() > 0.2 else "" for x in rng.integers(-2, 1000, 13)]
        if i == bad_dense_at:
            dense[3] = "abc"
        cats = []
        for j in range(26):
            pool = pools[j % 3]
            v = pool[min(int(rng.zipf(1.3)) - 1, len(pool) - 1)]
            cats.append(f"{v:08x}" if rng.random() > 0.1 else "")
        if i == long_at:
            cats[2] = "0123456789abcdef"
        if i == nul_at:
            cats[5] = "ab\0cd"
        if i == nul8_at:  # 8 bytes: the fixed-width parse takes it, the packed keys must not
            cats[7] = "ab\0cdefg"
        if i == short_at:  # not 8 bytes: the fixed-width parse falls back to strings
            cats[9] = "abc"
        lines.append("\t".join([str(int(rng.random() < 0.25))] + dense + cats))
    return "\n".join(lines) + "\n"


def _run(tmp_path, monkeypatch, fast, name, args):
    monkeypatch.setattr(pp, "FAST_PATH", fast)
    out = tmp_path / name
    pp.preprocess(args + ["--no-progress", "--out", str(out)])
    return out


def _assert_same_files(a: Path, b: Path):
    names = sorted(os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs)
    assert names == sorted(os.path.relpath(os.path.join(r, f), b) for r, _, fs in os.walk(b) for f in fs)
    assert "train.parquet" in names and "meta.json" in names
    for n in names:
        if n == "meta.json":
            ma, mb = (json.loads((d / n).read_text()) for d in (a, b))
            ma.pop("command"), mb.pop("command")
            assert ma == mb
        else:
            assert filecmp.cmp(a / n, b / n, shallow=False), n


@pytest.mark.parametrize("case", ["clean", "fallbacks", "nul8", "short"])
def test_criteo_fast_path_bytes_equal_string_path(tmp_path, monkeypatch, case):
    rng = np.random.default_rng(0)
    kw = {"clean": {}, "fallbacks": {"long_at": 2500, "bad_dense_at": 1700, "nul_at": 3100},
          "nul8": {"nul8_at": 2900}, "short": {"short_at": 1200, "bad_dense_at": 3500}}[case]
    path = tmp_path / "c.tsv"
    path.write_text(_criteo_text(rng, 4000, **kw))
    args = ["--format", "criteo_tsv", "--input", str(path), "--block-size", "65536",
            "--min-count", "2"]
    fast = _run(tmp_path, monkeypatch, True, "fast", args)
    slow = _run(tmp_path, monkeypatch, False, "slow", args)
    _assert_same_files(fast, slow)
    meta = json.loads((fast / "meta.json").read_text())
    assert meta["source"]["bad_rows"]["total"] == int("bad_dense_at" in kw)


def test_csv_multi_hot_fast_path_bytes_equal_string_path(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rows = ["label,c,long,tags,d"]
    for i in range(3000):
        tags = "|".join(rng.choice(["t1", "t2", "t3", "tag-longer-than-8"] if i > 2000 else ["t1", "t2"],
                                   size=rng.integers(0, 4)))
        rows.append(f"{i % 2},v{int(rng.zipf(1.4)) % 200},value-{i % 37}-long,{tags},{rng.random():.6f}")
    path = tmp_path / "in.csv"
    path.write_text("\n".join(rows) + "\n")
    args = ["--format", "csv", "--input", str(path), "--block-size", "16384", "--dense-columns", "d",
            "--multi-hot-columns", "tags", "--split", "0.7,0.2,0.1"]
    _assert_same_files(_run(tmp_path, monkeypatch, True, "fast", args),
                       _run(tmp_path, monkeypatch, False, "slow", args))


@pytest.mark.parametrize("switch_at", [None, 9])
def test_value_counter_merges_equal_reference(monkeypatch, switch_at):
    """Counts and first-seen keys after many small merges (packed arrays merged by binary search,
    and a switch to strings part-way) equal a direct count."""
    monkeypatch.setattr(pp.ValueCounter, "MERGE_ROWS", 5)
    rng = np.random.default_rng(2)
    pool = [f"{v:08x}" for v in rng.integers(0, 1 << 32, 300)] + ["", "a"]
    counter, want, pos = pp.ValueCounter(), {}, 0
    for block in range(20):
        vals = [pool[min(int(rng.zipf(1.2)) - 1, len(pool) - 1)] for _ in range(int(rng.integers(1, 60)))]
        if block == switch_at:
            vals[0] = "longer-than-eight"
        order = np.arange(pos, pos + len(vals), dtype=np.int64) * 3 + 1
        for v, o in zip(vals, order):
            c, f = want.get(v, (0, None))
            want[v] = (c + 1, int(o) if f is None else f)
        pos += len(vals)
        if block % 2:
            counter.add(pa.array(vals), order)
        else:
            idx, dic = pp.dictionary_encode(pa.array(vals))
            counter.add_groups(*pp.count_distinct(idx, dic, order))
    t = counter.result()
    v = t.column("v")
    values = pp.unpack_keys(v.to_numpy()).to_pylist() if v.type == pa.uint64() else v.to_pylist()
    got = {s: (int(c), int(f)) for s, c, f in zip(values, t.column("count").to_numpy(), t.column("first").to_numpy())}
    assert got == want
    assert counter.packed == (switch_at is None)


@pytest.mark.parametrize("gz", [False, True])
def test_blocks_parsed_in_pieces_bytes_equal_whole_blocks(tmp_path, monkeypatch, gz):
    """Blocks parsed in pieces and put together are pyarrow's whole blocks (same parquet row
    groups), gzip input included; a line longer than a piece falls back to whole blocks."""
    rng = np.random.default_rng(3)
    text = _criteo_text(rng, 3000, long_at=2000)
    lines = text.splitlines()
    lines[2600] = lines[2600].replace("\t", "\t" + "7" * 5000, 1)  # a 5 kB dense cell: > a piece
    path = tmp_path / ("c.tsv.gz" if gz else "c.tsv")
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    args = ["--format", "criteo_tsv", "--input", str(path), "--block-size", str(1 << 16)]
    whole = _run(tmp_path, monkeypatch, True, "whole", args)  # 64 KiB pieces: whole blocks
    pieces = []
    real = pp.FileReader._next_batch

    def spy(self, reader):
        pieces.append(self.parse_split)
        return real(self, reader)

    monkeypatch.setattr(pp.FileReader, "_next_batch", spy)
    monkeypatch.setattr(pp, "PARSE_PIECE", 1 << 12)
    split = _run(tmp_path, monkeypatch, True, "pieces", args)
    _assert_same_files(whole, split)
    assert pieces[0] == 16 and pieces[-1] == 1  # 16 pieces a block until the long line
    assert pq_row_groups(whole / "train.parquet") > 4


def test_csv_blocks_parsed_in_pieces_bytes_equal_whole_blocks(tmp_path, monkeypatch):
    """The same for a headered CSV with quoted cells."""
    rng = np.random.default_rng(4)
    rows = ["label,c,tags,d"]
    for i in range(4000):
        tags = "|".join(rng.choice(["t1", "t2", "t3"], size=rng.integers(0, 4)))
        rows.append(f'{i % 2},"v{int(rng.zipf(1.4)) % 500}",{tags},{rng.random():.6f}')
    path = tmp_path / "in.csv"
    path.write_text("\n".join(rows) + "\n")
    args = ["--format", "csv", "--input", str(path), "--block-size", str(1 << 14), "--dense-columns", "d",
            "--multi-hot-columns", "tags"]
    whole = _run(tmp_path, monkeypatch, True, "whole", args)
    monkeypatch.setattr(pp, "PARSE_PIECE", 1 << 10)
    _assert_same_files(whole, _run(tmp_path, monkeypatch, True, "pieces", args))
    assert pq_row_groups(whole / "train.parquet") > 4


def pq_row_groups(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_row_groups
