"""``benchmarks/scale.py`` at a tiny size: the generator exactly (row count, field layout, every
column's values within its cardinality, the Zipf head share against the sampler's CDF, decoded
back from the hex values), the library's preprocessing of that file (every row kept, vocabulary
sizes bounded, counts summing to the training rows), and one short world-2 training cell (CCE
with its scheduled re-clusterings and a mid-epoch checkpoint) with the per-rank peak RSS the
benchmark records. ~1-2 min on a loaded 2-core machine (torchrun imports twice)."""

import math
import os
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import scale  # noqa: E402

ROWS = 6000


def _read(path: Path) -> pa.Table:
    names = ["label"] + [f"i{j}" for j in range(13)] + [f"c{j}" for j in range(26)]
    return pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=names),
                         parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
                         convert_options=pcsv.ConvertOptions(
                             column_types={n: pa.string() for n in names}, strings_can_be_null=False))


def _ranks(hexes: list, column: int) -> np.ndarray:
    """Invert the generator's bijection: rank = (v - column * 0x01000193) / 0x9E3779B1 mod 2**32."""
    inv = pow(0x9E3779B1, -1, 1 << 32)
    return np.array([((int(h, 16) - column * 0x01000193) * inv) % (1 << 32) for h in hexes])


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("scale")
    info = scale.generate_tsv(str(tmp / "train.tsv"), ROWS, seed=3)
    return {"dir": tmp, "info": info, "table": _read(tmp / "train.tsv")}


def test_cardinalities_scale_large_vocabularies_only() -> None:
    full = scale.cardinalities(scale.KAGGLE_ROWS)
    assert full == scale.KAGGLE_CARDINALITIES
    half = scale.cardinalities(scale.KAGGLE_ROWS // 2)
    tiny = scale.cardinalities(1000)
    for c, h, t in zip(scale.KAGGLE_CARDINALITIES, half, tiny):
        if c <= scale.KEEP_BELOW:  # small vocabularies keep Kaggle's size
            assert h == t == c
        else:  # large ones shrink with the rows, down to KEEP_BELOW
            assert abs(h - c / 2) <= 1 or h == scale.KEEP_BELOW
            assert t == scale.KEEP_BELOW


def test_generated_tsv_rows_fields_and_cardinalities(generated: dict) -> None:
    t, cards = generated["table"], generated["info"]["cardinalities"]
    assert t.num_rows == ROWS == generated["info"]["rows"]
    labels = np.array(t.column("label").to_pylist(), dtype=np.int64)
    assert set(labels.tolist()) <= {0, 1}
    assert abs(labels.mean() - generated["info"]["click_rate"]) < 1e-12
    for j in range(13):  # counts or empty
        vals = [v for v in t.column(f"i{j}").to_pylist() if v != ""]
        assert all(int(v) >= 0 for v in vals) and len(vals) < ROWS
    for j, card in enumerate(cards):
        hexes = t.column(f"c{j}").to_pylist()
        assert all(len(h) == 8 for h in hexes)
        r = _ranks(hexes, j)
        assert r.min() >= 1 and r.max() <= card
        assert len(set(hexes)) <= card


@pytest.mark.parametrize("column", [2, 6, 9])  # large vocabularies (10^4 ... 10^7 at full size)
def test_zipf_head_share_matches_the_sampler_cdf(generated: dict, column: int) -> None:
    card = generated["info"]["cardinalities"][column]
    r = _ranks(generated["table"].column(f"c{column}").to_pylist(), column)
    for k in (1, 10, 100):
        p = float(scale.zipf_cdf(k, card))
        observed = float((r <= k).mean())
        sigma = math.sqrt(p * (1 - p) / ROWS)
        assert abs(observed - p) < 5 * sigma, (k, observed, p)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_preprocess_and_one_training_cell(generated: dict) -> None:
    tmp: Path = generated["dir"]
    out = tmp / "preprocessed"
    pre = scale.preprocess(str(tmp / "train.tsv"), str(out), ROWS, str(tmp / "pre.log"))
    assert pre["rows"] == ROWS == sum(pre["splits"].values())
    assert pre["peak_rss"] > 0 and pre["rows_per_s"] > 0
    for j, (v, card) in enumerate(zip(pre["vocab_sizes"], generated["info"]["cardinalities"])):
        assert 2 <= v <= card + 1  # id 0 = out of vocabulary
        counts = np.load(out / "counts" / f"cat_{j}.npy")
        assert counts.shape == (v,) and int(counts.sum()) == pre["splits"]["train"]
    # CCE at 1/16 of the bytes, one epoch, world 2, checkpoint mid-epoch.
    batch = 256
    steps = pre["splits"]["train"] // (2 * batch)
    args = Namespace(batch_size=batch, dim=16, checkpoint_every=max(1, steps // 2),
                     run_steps=steps, epoch_steps=steps, eval_batches=None)
    full = scale.full_bytes(pre["vocab_sizes"], 16)
    cell = scale.train_cell("cce", str(out), str(tmp), args, full)
    assert cell["steps"] == steps
    assert cell["full_embedding_bytes"] == full
    assert cell["embedding_bytes"] <= full / 16 * 1.0001
    assert cell["reclusterings"] == 2 and cell["recluster_seconds"] > 0
    assert set(cell["peak_rss_per_rank"]) == {"rank0", "rank1"}
    assert all(v > 50 * 2**20 for v in cell["peak_rss_per_rank"].values())
    assert cell["checkpoint_bytes"] > 0
    assert math.isfinite(cell["test_logloss"]) and cell["samples_per_s"] > 0
    assert os.path.isdir(cell["checkpoint_dir"])
    # --max-steps / --eval-batches: the first half of the epoch, both re-clusterings inside it
    half = Namespace(batch_size=batch, dim=16, checkpoint_every=max(1, steps // 4),
                     run_steps=steps // 2, epoch_steps=steps, eval_batches=1)
    part = scale.train_cell("full", str(out), str(tmp), half, full)
    assert part["steps"] == steps // 2 and part["eval_batches_per_rank"] == 1
    # every cell after the first reads the memory-mapped columns the first one wrote, once
    assert part["page_cache_bytes"] == scale.dir_bytes(str(out / "mmap")) > 0
    part = scale.train_cell("cce", str(out), str(tmp), half, full)
    assert part["steps"] == steps // 2 and part["reclusterings"] == 2


def test_results_of_concurrent_runs_merge_without_overwriting(tmp_path: Path, monkeypatch) -> None:
    """Two invocations (different --rows) share scale.json: each writes only its own cells, so a
    stale copy of the other's cells never overwrites the newer ones on disk."""
    monkeypatch.setattr(scale, "RESULTS", str(tmp_path / "scale.json"))
    monkeypatch.setattr(scale, "TABLE", str(tmp_path / "scale.md"))
    a = {"cells": {"10/other/full": {"v": 1}}}
    scale.save_results(a, ["10/other/full"])
    b = scale.load_results()  # b starts now: sees a's first version
    a["cells"]["10/other/full"] = {"v": 2}
    a["cells"]["10/other/qr"] = {"v": 3}
    scale.save_results(a, ["10/other/full", "10/other/qr"])
    b["cells"]["20/other/full"] = {"v": 4}
    scale.save_results(b, ["20/other/full"])
    assert scale.load_results()["cells"] == {"10/other/full": {"v": 2}, "10/other/qr": {"v": 3},
                                             "20/other/full": {"v": 4}}
    assert b["cells"] == scale.load_results()["cells"]


def test_table_rows_per_phase(tmp_path: Path, monkeypatch) -> None:
    """A --max-steps run ("train@N") is tabulated apart from the whole-epoch "train" phase, its
    ratios against its own full cell."""
    monkeypatch.setattr(scale, "TABLE", str(tmp_path / "scale.md"))
    cell = dict(seconds=10.0, samples_per_s=100.0, recluster_seconds=0.0,
                peak_rss_per_rank={"rank0": 2**30}, predicted_per_rank=2**20,
                embedding_bytes=2**20, full_embedding_bytes=2**24, test_logloss=0.5)
    cells = {"10/train/full": dict(cell), "10/train@5/full": dict(cell, samples_per_s=50.0),
             "10/train@5/cce": dict(cell, samples_per_s=75.0, eval_batches_per_rank=3)}
    scale.write_table({"cells": cells})
    rows = [r for r in (tmp_path / "scale.md").read_text().splitlines() if r.startswith("| train")]
    assert [r.split(" | ")[:2] for r in rows] == [["| train", "full"], ["| train (5 steps)", "full"],
                                                  ["| train (5 steps)", "cce"]]
    assert "1.50x*" in rows[2] and "first 3 batches per rank" in rows[2]
