"""``benchmarks/preprocess.py``'s output comparison (old vs new code): equal outputs compare equal
although the loader added its column cache (``mmap/``) to one of them; a changed file, a missing
file or a changed ``meta.json`` field (other than ``command``) is reported."""

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import preprocess as bench  # noqa: E402


def _out(d: Path, command: str, count: bytes = b"\x01\x02") -> Path:
    (d / "counts").mkdir(parents=True)
    (d / "counts" / "cat_0.npy").write_bytes(count)
    (d / "train.parquet").write_bytes(b"PAR1 rows PAR1")
    (d / "meta.json").write_text(json.dumps({"command": [command], "splits": {"train": {"rows": 3}}}))
    return d


def test_same_outputs_ignores_loader_cache_and_command(tmp_path):
    a, b = _out(tmp_path / "a", "new"), _out(tmp_path / "b", "old")
    (a / "mmap" / "train").mkdir(parents=True)
    (a / "mmap" / "train" / "ids.npy").write_bytes(b"cache")
    assert bench.same_outputs(str(a), str(b)) == []


def test_same_outputs_reports_differences(tmp_path):
    a, b = _out(tmp_path / "a", "new"), _out(tmp_path / "b", "old", count=b"\x01\x03")
    assert bench.same_outputs(str(a), str(b)) == [str(Path("counts") / "cat_0.npy")]
    (b / "counts" / "cat_0.npy").write_bytes(b"\x01\x02")
    (b / "val.parquet").write_bytes(b"x")
    meta = json.loads((b / "meta.json").read_text())
    meta["splits"]["train"]["rows"] = 4
    (b / "meta.json").write_text(json.dumps(meta))
    assert sorted(bench.same_outputs(str(a), str(b))) == ["meta.json", "val.parquet"]
