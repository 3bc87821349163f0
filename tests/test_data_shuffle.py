"""The streaming readers' bounded shuffle buffer (torchrec_cce/data/common.py) and its use by
``examples/dlrm/train.py`` for raw Criteo TSV / Avazu CSV files.

* ``shuffle_rows`` emits a permutation of its input (every row exactly once), moves a row at
  most ``buffer_size`` places earlier, is reproducible for a seed and differs across seeds;
* the readers: one epoch = every row of the rank exactly once, another epoch (``set_epoch``)
  another order, the same epoch the same order; held-out blocks are chosen before the shuffle
  (the same rows every epoch, disjoint from training);
* ``train.py --data criteo_tsv`` with the buffer on: a run stopped mid-epoch and resumed gives
  the straight run's loss curve and metrics, and the order differs from file order.
"""

from pathlib import Path
from typing import List

import numpy as np
import pytest

from torchrec_cce.data import AvazuCsvDataset, CriteoTsvDataset
from torchrec_cce.data.common import shuffle_rows

SLOW = pytest.mark.timeout(900)


@pytest.mark.parametrize("n,buffer", [(0, 5), (1, 5), (10, 3), (100, 7), (100, 100), (50, 200),
                                      (1000, 64)])
def test_shuffle_buffer_is_a_permutation_with_bounded_displacement(n: int, buffer: int) -> None:
    out = list(shuffle_rows(range(n), buffer, seed=3))
    assert sorted(out) == list(range(n))  # every row exactly once
    # row k can only leave the buffer once it entered it: output position >= k - buffer
    assert all(pos >= row - buffer for pos, row in enumerate(out))
    if n >= 10:
        assert out != list(range(n))


def test_shuffle_buffer_seeds() -> None:
    rows = list(range(500))
    a = list(shuffle_rows(rows, 50, seed=1))
    assert a == list(shuffle_rows(iter(rows), 50, seed=1))  # reproducible, any iterable
    b = list(shuffle_rows(rows, 50, seed=2))
    assert a != b and sorted(b) == rows
    # a uniform draw: the first output is spread over the first 51 rows across seeds
    firsts = {next(iter(shuffle_rows(rows, 50, seed=s))) for s in range(200)}
    assert len(firsts) > 30 and max(firsts) <= 50


def test_shuffle_buffer_off_and_bad_size() -> None:
    assert list(shuffle_rows(range(20), 0, seed=1)) == list(range(20))
    assert list(shuffle_rows(range(20), 1, seed=1)) == list(range(20))
    with pytest.raises(ValueError, match="shuffle buffer size must be >= 0"):
        list(shuffle_rows(range(3), -1, seed=0))
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 0"):
        CriteoTsvDataset("x.tsv", 4, shuffle_buffer=-5)


def write_criteo(path: Path, rows: int, bad_every: int = 0) -> List[int]:
    """A small Criteo TSV whose first dense value is the row number (returned per good row)."""
    lines, numbers = [], []
    for i in range(rows):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append("2\t1")  # bad: wrong column count
            continue
        dense = [str(i)] + ["1"] * 12
        cats = [f"{(i * 7 + j) % 50:08x}" for j in range(26)]
        lines.append("\t".join([str(i % 2)] + dense + cats))
        numbers.append(i)
    path.write_text("\n".join(lines) + "\n")
    return numbers


def row_numbers(dataset) -> List[int]:  # noqa: ANN001
    """The first dense value (row number, undone from log1p) of every row, in order."""
    out = []
    for batch in dataset:
        out += np.rint(np.expm1(batch.dense_features[:, 0].double().numpy())).astype(int).tolist()
    return out


def test_criteo_reader_epoch_orders(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    numbers = write_criteo(path, 230, bad_every=23)  # 220 good rows
    plain = row_numbers(CriteoTsvDataset(str(path), 16, max_bad_fraction=0.1))
    assert plain == numbers
    ds = CriteoTsvDataset(str(path), 16, max_bad_fraction=0.1, shuffle_buffer=40, seed=7)
    epochs = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        epochs.append(row_numbers(ds))
    assert all(sorted(e) == numbers for e in epochs)  # every row exactly once per epoch
    assert epochs[0] != plain and epochs[0] != epochs[1]
    assert epochs[0] == epochs[2]  # the same epoch: the same order (what resume relies on)
    assert ds.bad_lines == {"wrong_column_count": 10}
    other = CriteoTsvDataset(str(path), 16, max_bad_fraction=0.1, shuffle_buffer=40, seed=8)
    assert row_numbers(other) != epochs[0]
    # rank split first, then each rank shuffles its own rows
    ranks = [CriteoTsvDataset(str(path), 16, max_bad_fraction=0.1, rank=r, world_size=2,
                              shuffle_buffer=40, seed=7)
             for r in range(2)]
    got = [row_numbers(r) for r in ranks]
    assert sorted(got[0] + got[1]) == numbers
    assert sorted(got[0]) == [x for x in numbers if x % 2 == 0]  # rows (lines) split by index


def test_held_out_blocks_are_chosen_before_the_shuffle(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    numbers = write_criteo(path, 200)
    bs, period = 10, 5
    test = row_numbers(CriteoTsvDataset(str(path), bs, blocks=lambda i: i % period == 0))
    assert test == [x for x in numbers if (x // bs) % period == 0]  # batch i of file order
    train = CriteoTsvDataset(str(path), bs, shuffle_buffer=25, seed=1,
                             blocks=lambda i: i % period != 0)
    for epoch in range(3):
        train.set_epoch(epoch)
        rows = row_numbers(train)
        assert sorted(rows + test) == numbers and not set(rows) & set(test)


def test_avazu_reader_shuffles_the_same_way(tmp_path: Path) -> None:
    from torchrec_cce.data.avazu import AVAZU_COLUMNS

    lines = [",".join(AVAZU_COLUMNS)]
    for i in range(120):
        row = [str(i), str(i % 2), f"141021{i % 24:02d}"] + [f"v{i}"] * (len(AVAZU_COLUMNS) - 3)
        lines.append(",".join(row))
    path = tmp_path / "a.csv"
    path.write_text("\n".join(lines) + "\n")

    def site_ids(ds) -> List[int]:  # noqa: ANN001
        return [int(x) for b in ds for x in b.sparse_features["cat_4"].values()]

    plain = site_ids(AvazuCsvDataset(str(path), 8))
    ds = AvazuCsvDataset(str(path), 8, shuffle_buffer=30, seed=0)
    first = site_ids(ds)
    ds.set_epoch(1)
    second = site_ids(ds)
    assert sorted(first) == sorted(plain) == sorted(second)
    assert first != plain and first != second


@SLOW
def test_train_raw_stream_resume_is_exact_with_the_buffer_on(tmp_path: Path) -> None:
    """--data criteo_tsv with a 300-row buffer: 2 epochs straight vs stopped after step 5 (in
    epoch 1, past its step-4 checkpoint) and resumed from the end-of-run checkpoint; the loss
    curves and the metrics are equal, and the shuffled run differs from file order."""
    from test_train_protocol import losses, run

    path = tmp_path / "c.tsv"
    write_criteo(path, 1200)
    base = ("--data", "criteo_tsv", "--train-path", str(path), "--batch-size", "100",
            "--method", "full", "--num-embeddings-per-feature", ",".join(["64"] * 26),
            "--warmup-steps", "2", "--no-progress", "--shuffle-buffer", "300")
    ck = str(tmp_path / "ck")
    straight = run(*base, "--epochs", "2")
    first = run(*base, "--epochs", "2", "--checkpoint-dir", ck, "--checkpoint-every", "4",
                "--max-steps", "5")
    resumed = run(*base, "--epochs", "2", "--checkpoint-dir", ck, "--resume")
    assert straight["steps"] == 16  # 12 batches a epoch: 0, 10 test; 1, 11 val; 8 train
    assert [s for s, _ in first["train_loss_curve"]] == list(range(1, 6))
    assert [s for s, _ in resumed["train_loss_curve"]] == list(range(6, 17))
    assert losses(first) + losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    assert resumed["test_logloss"] == pytest.approx(straight["test_logloss"], abs=1e-6)
    assert resumed["best_epoch"] == straight["best_epoch"]
    unshuffled = run(*base[:-2], "--shuffle-buffer", "0", "--epochs", "1")
    assert losses(unshuffled) != pytest.approx(losses(straight)[:8], abs=1e-6)
    assert "300-row shuffle buffer" in straight["stdout"]
