"""Criteo readers: exact parsing of the shared Kaggle head, rank split, bad lines, npy wrapper."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_cce.data.criteo import MISSING_ID, CriteoNpyDataset, CriteoTsvDataset

CRITEO_TSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo_kaggle_head10k.tsv"


@pytest.fixture(scope="module")
def criteo_tsv() -> str:
    if not CRITEO_TSV.exists():
        pytest.skip(f"shared Criteo sample not found at {CRITEO_TSV} (expected <repo>/../shared/data)")
    return str(CRITEO_TSV)


def rows_of(batches):
    """Concatenate batches into (dense [N, 13], ids [N, 26], labels [N])."""
    dense = torch.cat([b.dense_features for b in batches])
    ids = torch.cat([b.sparse_features.values().view(26, -1).t() for b in batches])
    labels = torch.cat([b.labels for b in batches])
    return dense, ids, labels


def test_first_rows_parse_exactly(criteo_tsv):
    batch = next(iter(CriteoTsvDataset(criteo_tsv, batch_size=5)))
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (5, 13)
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == [0.0] * 5
    kjt = batch.sparse_features
    assert kjt.keys() == [f"cat_{i}" for i in range(26)]
    assert kjt.values().dtype == torch.int64 and kjt.lengths().tolist() == [1] * (26 * 5)
    ids = kjt.values().view(26, 5).t()

    lg = math.log1p
    # line 1: 0 1 1 5 0 1382 4 15 2 181 1 2 <empty> 2
    expected_dense_1 = [lg(1), lg(1), lg(5), 0.0, lg(1382), lg(4), lg(15), lg(2), lg(181), lg(1), lg(2), 0.0, lg(2)]
    # line 3: 0 2 0 1 14 767 89 4 2 245 1 3 3 45
    expected_dense_3 = [lg(2), 0.0, lg(1), lg(14), lg(767), lg(89), lg(4), lg(2), lg(245), lg(1), lg(3), lg(3), lg(45)]
    # line 5: 0 3 -1 <empty> 0 2 0 3 0 0 1 1 <empty> 0  (negative -> 0 before the log)
    expected_dense_5 = [lg(3), 0.0, 0.0, 0.0, lg(2), 0.0, lg(3), 0.0, 0.0, lg(1), lg(1), 0.0, 0.0]
    torch.testing.assert_close(batch.dense_features[0], torch.tensor(expected_dense_1))
    torch.testing.assert_close(batch.dense_features[2], torch.tensor(expected_dense_3))
    torch.testing.assert_close(batch.dense_features[4], torch.tensor(expected_dense_5))

    M = MISSING_ID
    expected_ids_1 = [
        0x68FD1E64, 0x80E26C9B, 0xFB936136, 0x7B4723C4, 0x25C83C98, 0x7E0CCCCF, 0xDE7995B8,
        0x1F89B562, 0xA73EE510, 0xA8CD5504, 0xB2CB9C98, 0x37C9C164, 0x2824A5F6, 0x1ADCE6EF,
        0x8BA8B39A, 0x891B62E7, 0xE5BA7672, 0xF54016B9, 0x21DDCDC9, 0xB1252A9D, 0x07B5194C,
        M, 0x3A171ECB, 0xC5C50484, 0xE8B83407, 0x9727DD16,
    ]
    expected_ids_3 = [
        0x287E684F, 0x0A519C5C, 0x02CF9876, 0xC18BE181, 0x25C83C98, 0x7E0CCCCF, 0xC78204A1,
        0x0B153874, 0xA73EE510, 0x3B08E48B, 0x5F5E6091, 0x8FE001F4, 0xAA655A2F, 0x07D13A8F,
        0x6DC710ED, 0x36103458, 0x8EFEDE7F, 0x3412118D, M, M, 0xE587C466, 0xAD3062EB,
        0x3A171ECB, 0x3B183C5C, M, M,
    ]
    assert ids[0].tolist() == expected_ids_1
    assert ids[2].tolist() == expected_ids_3
    assert MISSING_ID == 2**32


def test_whole_file_stats_and_modulo(criteo_tsv):
    ds = CriteoTsvDataset(criteo_tsv, batch_size=4096)
    batches = list(ds)
    assert [len(b.labels) for b in batches] == [4096, 4096, 1808]
    dense, ids, labels = rows_of(batches)
    assert ds.bad_lines == {} and ds.lines_read == 10_000
    assert int(labels.sum()) == 2182  # click rate 0.218
    distinct = [len(torch.unique(ids[:, f])) for f in range(26)]
    assert min(distinct) == 3 and max(distinct) == 5521 and sum(distinct) == 43_591

    sizes = [1000 + f for f in range(26)]
    _, ids_mod, _ = rows_of(list(CriteoTsvDataset(criteo_tsv, batch_size=4096, num_embeddings_per_feature=sizes)))
    assert torch.equal(ids_mod, ids % torch.tensor(sizes))
    assert len(list(CriteoTsvDataset(criteo_tsv, batch_size=4096, drop_last=True))) == 2


def test_rank_split_covers_every_row_once(criteo_tsv):
    dense, ids, labels = rows_of(list(CriteoTsvDataset(criteo_tsv, batch_size=1000)))
    parts = [rows_of(list(CriteoTsvDataset(criteo_tsv, batch_size=1000, rank=r, world_size=2))) for r in range(2)]
    assert [len(p[2]) for p in parts] == [5000, 5000]
    # row i of the file is row i // 2 of rank i % 2
    for r, (d, i, l) in enumerate(parts):
        assert torch.equal(d, dense[r::2]) and torch.equal(i, ids[r::2]) and torch.equal(l, labels[r::2])


def _good_line(row: int) -> str:
    dense = [str(row)] + ["1"] * 12
    cats = [f"{row * 31 + f:08x}" for f in range(26)]
    return "\t".join([str(row % 2)] + dense + cats)


def _write_tsv(path: Path, n_good: int, bad: dict) -> None:
    """``n_good`` good lines; ``bad`` maps a 1-based line number to a malformed line."""
    lines, good = [], 0
    for number in range(1, n_good + len(bad) + 1):
        if number in bad:
            lines.append(bad[number])
        else:
            lines.append(_good_line(good))
            good += 1
    path.write_text("\n".join(lines) + "\n")


BAD = {
    3: "\t".join(_good_line(0).split("\t")[:30]),  # wrong column count
    7: _good_line(0).replace("\t00000010\t", "\tzz000010\t"),  # non-hex categorical
    9: _good_line(0).replace("\t1\t", "\tx1\t", 1),  # non-integer dense
    12: _good_line(0).replace("\t00000010\t", "\t-0000010\t"),  # negative hex: not an 8-hex-digit id
    16: _good_line(0).replace("\t1\t", f"\t{2**70}\t", 1),  # dense value too big for int64
}


def test_bad_lines_are_counted_and_skipped(tmp_path):
    path = tmp_path / "bad.tsv"
    _write_tsv(path, 20, BAD)
    assert "\tzz000010\t" in path.read_text() and "\t-0000010\t" in path.read_text() and "\tx1\t" in path.read_text()
    ds = CriteoTsvDataset(str(path), batch_size=8, max_bad_fraction=0.5)
    dense, ids, labels = rows_of(list(ds))
    assert ds.bad_lines == {
        "wrong_column_count": 1, "non_hex_categorical": 2, "non_integer_dense": 1, "dense_out_of_range": 1
    }
    assert ds.lines_read == 25 and len(labels) == 20
    # the good rows are rows 0..19 in order: int_0 = row, label = row % 2
    torch.testing.assert_close(dense[:, 0], torch.log1p(torch.arange(20, dtype=torch.float32)))
    assert labels.tolist() == [float(r % 2) for r in range(20)]
    assert ids[5, 1].item() == 5 * 31 + 1
    assert "5 bad lines of 25" in ds.summary()


def test_too_many_bad_lines_raise_with_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    _write_tsv(path, 20, BAD)
    with pytest.raises(ValueError, match=r"bad\.tsv:16: dense_out_of_range.*max_bad_fraction=0\.01"):
        list(CriteoTsvDataset(str(path), batch_size=8))
    # checked at every bad line once min_lines_for_check lines were read: line 3 is too early,
    # at line 7 two of seven lines are bad (> 0.2)
    with pytest.raises(ValueError, match=r"bad\.tsv:7: non_hex_categorical"):
        list(CriteoTsvDataset(str(path), batch_size=8, max_bad_fraction=0.2, min_lines_for_check=5))


def test_few_bad_lines_below_threshold_pass(tmp_path):
    path = tmp_path / "one_bad.tsv"
    _write_tsv(path, 149, {50: "1\t2\t3"})
    ds = CriteoTsvDataset(str(path), batch_size=64)  # 1 / 150 < 0.01
    assert sum(len(b.labels) for b in ds) == 149
    assert ds.bad_lines == {"wrong_column_count": 1}


def _write_npy(tmp_path: Path, name: str, rows: np.ndarray):
    """TorchRec's layout: dense float32 [N, 13], sparse int32 [N, 26], labels int32 [N, 1]."""
    n = len(rows)
    dense = (rows[:, None] + np.arange(13) / 100.0).astype(np.float32)  # int_0 = global row index
    sparse = (rows[:, None] * 26 + np.arange(26) - 7).astype(np.int32)  # row 0 has negative ids
    labels = (rows % 3 == 0).astype(np.int32).reshape(n, 1)
    paths = [str(tmp_path / f"{name}_{kind}.npy") for kind in ("dense", "sparse", "labels")]
    for p, arr in zip(paths, (dense, sparse, labels)):
        np.save(p, arr)
    return paths, dense, sparse, labels


def test_npy_round_trip_and_rank_split(tmp_path):
    (d0, s0, l0), dense0, sparse0, labels0 = _write_npy(tmp_path, "day_0", np.arange(37))
    (d1, s1, l1), dense1, sparse1, labels1 = _write_npy(tmp_path, "day_1", np.arange(37, 58))
    dense = np.concatenate([dense0, dense1])
    sparse = np.concatenate([sparse0, sparse1]).astype(np.int64)
    labels = np.concatenate([labels0, labels1]).reshape(-1).astype(np.float32)
    kw = dict(dense_paths=[d0, d1], sparse_paths=[s0, s1], labels_paths=[l0, l1], batch_size=8)

    ds = CriteoNpyDataset(**kw)
    batches = list(ds)
    assert len(ds) == len(batches) == 8  # 58 rows = 7 * 8 + 2
    b = batches[0]
    assert b.dense_features.dtype == torch.float32 and b.labels.dtype == torch.float32
    assert b.sparse_features.values().dtype == torch.int64
    assert b.sparse_features.keys() == [f"cat_{i}" for i in range(26)]
    got_dense, got_ids, got_labels = rows_of(batches)
    np.testing.assert_array_equal(got_dense.numpy(), dense)
    np.testing.assert_array_equal(got_ids.numpy(), sparse)
    np.testing.assert_array_equal(got_labels.numpy(), labels)

    sizes = [5 + f for f in range(26)]
    _, ids_mod, _ = rows_of(list(CriteoNpyDataset(**kw, num_embeddings_per_feature=sizes)))
    np.testing.assert_array_equal(ids_mod.numpy(), sparse % np.array(sizes))
    assert ids_mod.min().item() >= 0 and sparse.min() < 0
    _, ids_loaded, _ = rows_of(list(CriteoNpyDataset(**kw, num_embeddings_per_feature=sizes, mmap_mode=False)))
    assert torch.equal(ids_loaded, ids_mod)  # TorchRec's in-memory path gives the same ids

    seen = []
    for rank in range(2):
        part = list(CriteoNpyDataset(**kw, rank=rank, world_size=2))
        seen += rows_of(part)[0][:, 0].long().tolist()
    assert sorted(seen) == list(range(58))  # every row exactly once
