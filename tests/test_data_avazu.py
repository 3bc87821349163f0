"""Avazu reader: exact first row, hour split, rank split, and a hash stable across processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchrec_cce.data.avazu import AVAZU_FEATURES, AvazuCsvDataset, split_hour, string_id

REPO = Path(__file__).resolve().parents[1]
AVAZU_CSV = REPO.parent / "shared" / "data" / "avazu_head10k.csv"


@pytest.fixture(scope="module")
def avazu_csv() -> str:
    if not AVAZU_CSV.exists():
        pytest.skip(f"shared Avazu sample not found at {AVAZU_CSV} (expected <repo>/../shared/data)")
    return str(AVAZU_CSV)


# Golden values of the stable string hash: changing the hash changes every id, so it is pinned.
GOLDEN = {("C1", "1005"): 6232968934081169647, ("site_id", "1fbe01fe"): 2112823008573083740,
          ("C20", "-1"): 8272265143622558842}


def test_string_hash_golden_values():
    for (feature, value), expected in GOLDEN.items():
        assert string_id(feature, value) == expected
    assert string_id("C1", "1005") != string_id("C14", "1005")  # features hash independently
    assert all(0 <= v < 2**63 for v in GOLDEN.values())


def test_first_row_exact(avazu_csv):
    # 1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,
    # 07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79
    batch = next(iter(AvazuCsvDataset(avazu_csv, batch_size=4)))
    assert batch.dense_features.shape == (4, 0) and batch.dense_features.dtype == torch.float32
    assert batch.labels.tolist() == [0.0, 0.0, 0.0, 0.0]
    kjt = batch.sparse_features
    assert kjt.keys() == [f"cat_{i}" for i in range(23)]
    assert kjt.lengths().tolist() == [1] * (23 * 4) and kjt.values().dtype == torch.int64
    first = kjt.values().view(23, 4)[:, 0].tolist()
    raw = "1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79"
    expected = [0, 1] + [string_id(name, value) for name, value in zip(AVAZU_FEATURES[2:], raw.split(","))]
    assert first == expected
    assert first[2] == GOLDEN[("C1", "1005")] and first[4] == GOLDEN[("site_id", "1fbe01fe")]
    assert first[-2] == GOLDEN[("C20", "-1")]
    assert AVAZU_FEATURES[:3] == ["hour_of_day", "weekday", "C1"] and len(AVAZU_FEATURES) == 23


def test_hour_split():
    assert split_hour("14102100") == (0, 1)  # 2014-10-21 is a Tuesday (Monday = 0)
    assert split_hour("14102913") == (13, 2)  # Wednesday, 1 pm
    assert split_hour("14102623") == (23, 6)  # Sunday, 11 pm
    for bad in ("1410210", "14102124", "14133100", "1410210x"):
        with pytest.raises(ValueError):
            split_hour(bad)


def test_whole_file_rank_split_and_modulo(avazu_csv):
    ds = AvazuCsvDataset(avazu_csv, batch_size=4096)
    batches = list(ds)
    assert [len(b.labels) for b in batches] == [4096, 4096, 1807] and ds.bad_lines == {}
    labels = torch.cat([b.labels for b in batches])
    ids = torch.cat([b.sparse_features.values().view(23, -1).t() for b in batches])
    assert int(labels.sum()) == 1706  # click rate 0.171
    assert set(ids[:, 0].tolist()) == {0} and set(ids[:, 1].tolist()) == {1}  # one hour in the file

    for rank in range(2):
        part = list(AvazuCsvDataset(avazu_csv, batch_size=1000, rank=rank, world_size=2))
        part_ids = torch.cat([b.sparse_features.values().view(23, -1).t() for b in part])
        assert torch.equal(part_ids, ids[rank::2])

    sizes = [24, 7] + [1000 + f for f in range(21)]
    mod = list(AvazuCsvDataset(avazu_csv, batch_size=4096, num_embeddings_per_feature=sizes, constant_dense=True))
    mod_ids = torch.cat([b.sparse_features.values().view(23, -1).t() for b in mod])
    assert torch.equal(mod_ids, ids % torch.tensor(sizes))
    assert mod[0].dense_features.shape == (4096, 1) and bool((mod[0].dense_features == 1).all())


def test_bad_lines(tmp_path):
    header = "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
    good = "1,1,14102913,1005,0,a,b,c,d,e,f,g,h,i,1,2,3,4,5,6,7,8,9,10"
    lines = [header] + [good] * 10 + ["2,1,14102913,1005"] + ["3,2" + good[3:]] + ["4,0,14109913" + good[12:]]
    path = tmp_path / "a.csv"
    path.write_text("\r\n".join(lines) + "\r\n")
    ds = AvazuCsvDataset(str(path), batch_size=4, max_bad_fraction=0.5)
    batches = list(ds)
    assert sum(len(b.labels) for b in batches) == 10
    assert ds.bad_lines == {"wrong_column_count": 1, "bad_label": 1, "bad_hour": 1}
    assert batches[0].sparse_features.values().view(23, -1)[:2, 0].tolist() == [13, 2]
    with pytest.raises(ValueError, match=r"a\.csv:14: bad_hour"):
        list(AvazuCsvDataset(str(path), batch_size=4))
    path.write_text("id,click,time\n1,0,1\n")
    with pytest.raises(ValueError, match="Avazu header"):
        AvazuCsvDataset(str(path), batch_size=4)


def test_string_hash_same_in_another_process():
    """Python's salted hash() differs between processes; our ids must not."""
    pairs = [("site_id", "1fbe01fe"), ("device_ip", "ddd2926e"), ("C21", "79"), ("app_id", "")]
    code = (
        "from torchrec_cce.data.avazu import string_id\n"
        f"print(' '.join(str(string_id(f, v)) for f, v in {pairs!r}))\n"
        "print(hash('salted?'))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ids_there, salted_there = out.stdout.split("\n")[:2]
    assert ids_there == " ".join(str(string_id(f, v)) for f, v in pairs)
    if os.environ.get("PYTHONHASHSEED") != "12345":
        assert salted_there != str(hash("salted?"))  # the built-in hash really differs
