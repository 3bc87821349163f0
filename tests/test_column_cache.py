"""The memory-mapped column cache of PreprocessedDataset (torchrec_cce.data.column_cache): the
same arrays and batches as decoding into private memory, one build shared by later readers and
by concurrent processes, rebuilt after a re-run of the preprocessing, no cache when the
directory is read-only or the ids are bad."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from multiprocess import run_multiprocess
from test_preprocessed_dataset import make_dir
from torchrec_cce.data import PreprocessedDataset


@pytest.fixture()
def data_dir(tmp_path):
    return make_dir(tmp_path, n=600)


def _arrays(ds):
    return [np.asarray(ds.labels), np.asarray(ds.dense), np.asarray(ds.ids)] + [
        np.asarray(a) for f in sorted(ds.bags) for a in ds.bags[f]]


def _batches(ds):
    out = []
    for b in ds:
        kjt = b.sparse_features
        out.append((b.dense_features, b.labels, kjt.values(), kjt.lengths()))
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_mapped_equals_private(data_dir, split):
    private = PreprocessedDataset(str(data_dir), split, batch_size=32, seed=3, mmap=False)
    mapped = PreprocessedDataset(str(data_dir), split, batch_size=32, seed=3)
    assert not private.mapped and mapped.mapped
    assert isinstance(mapped.ids, np.memmap) and isinstance(mapped.dense, np.memmap)
    assert os.path.isfile(data_dir / "mmap" / split / "ids.npy")
    for a, b in zip(_arrays(private), _arrays(mapped), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for x, y in zip(_batches(private), _batches(mapped), strict=True):
        for s, t in zip(x, y):
            assert torch.equal(s, t)
    # the multi-hot feature's bags: offsets from 0, values = the parquet list column's
    col = pq.read_table(data_dir / f"{split}.parquet", columns=["g"]).column(0).combine_chunks()
    offs, vals = mapped.bags["g"]
    np.testing.assert_array_equal(offs, col.offsets.to_numpy() - col.offsets.to_numpy()[0])
    np.testing.assert_array_equal(vals, col.values.to_numpy())


def test_second_reader_maps_without_rebuilding_and_rerun_rebuilds(data_dir):
    PreprocessedDataset(str(data_dir), "val", batch_size=32)
    files = sorted((data_dir / "mmap" / "val").glob("*.npy"))
    assert [f.name for f in files] == ["bag_0_offsets.npy", "bag_0_values.npy", "dense.npy",
                                       "ids.npy", "labels.npy"]
    before = {f.name: f.stat().st_mtime_ns for f in files}
    again = PreprocessedDataset(str(data_dir), "val", batch_size=32)
    assert {f.name: f.stat().st_mtime_ns for f in files} == before
    # a re-run of the preprocessing writes a new parquet file: the cache is rebuilt from it
    path = data_dir / "val.parquet"
    table = pq.read_table(path)
    labels = table.column("label").to_numpy()
    i = table.schema.get_field_index("label")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(1 - labels)), path)
    rebuilt = PreprocessedDataset(str(data_dir), "val", batch_size=32)
    np.testing.assert_array_equal(rebuilt.labels, 1 - labels)
    np.testing.assert_array_equal(again.labels, labels)  # an open map keeps its old file


def test_unwritable_cache_location_decodes_privately(data_dir, tmp_path):
    """A cache directory that cannot be created (here: below a regular file; in practice a
    read-only data directory) means private arrays, no error."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ref = PreprocessedDataset(str(data_dir), "test", batch_size=16, mmap=False)
    ds = PreprocessedDataset(str(data_dir), "test", batch_size=16,
                             cache_dir=str(blocker / "mmap"))
    assert not ds.mapped and not isinstance(ds.ids, np.memmap)
    for a, b in zip(_arrays(ref), _arrays(ds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cache_dir_elsewhere(data_dir, tmp_path):
    cache = tmp_path / "elsewhere"
    ds = PreprocessedDataset(str(data_dir), "test", batch_size=16, cache_dir=str(cache))
    assert ds.mapped and (cache / "test" / "labels.npy").is_file()
    assert not (data_dir / "mmap").exists()


def test_bad_ids_leave_no_cache(data_dir):
    meta_path = data_dir / "meta.json"
    meta = meta_path.read_text()
    m = json.loads(meta)
    m["features"][1]["vocab_size"] = 3  # ids of "it" now fall outside [0, 3)
    meta_path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="ids of 'it' outside"):
        PreprocessedDataset(str(data_dir), "train", batch_size=32)
    cache = data_dir / "mmap" / "train"
    assert not (cache / "stamp.json").exists() and not list(cache.glob("*.npy"))
    assert not list(cache.glob(".*tmp"))
    meta_path.write_text(meta)
    assert PreprocessedDataset(str(data_dir), "train", batch_size=32).mapped


def _open_together(rank, world, data_dir):
    ds = PreprocessedDataset(data_dir, "train", batch_size=32, rank=rank, world_size=world)
    return [a.copy() for a in _arrays(ds)], ds.mapped


def test_two_processes_build_once_and_read_the_same(data_dir):
    """Two spawned processes open the split at the same time: one builds under the lock, both
    map the same files, equal to a private decode."""
    results = run_multiprocess(_open_together, 2, str(data_dir))
    ref = _arrays(PreprocessedDataset(str(data_dir), "train", batch_size=32, mmap=False))
    for arrays, mapped in results:
        assert mapped
        for a, b in zip(ref, arrays, strict=True):
            np.testing.assert_array_equal(a, b)
    leftovers = [p for p in os.listdir(data_dir / "mmap" / "train") if p.endswith(".tmp")]
    assert leftovers == []
    shutil.rmtree(data_dir / "mmap")
