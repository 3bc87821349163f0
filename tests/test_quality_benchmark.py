"""benchmarks/quality.py --quick end to end: preprocess Frappe, train every quick method at two
byte budgets through train.py, write the CSV, PNG and summary; every cell fits its budget."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TORCHREC_CCE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.mark.timeout(1200)
def test_quick_quality_benchmark_writes_csv_within_budgets(tmp_path: Path) -> None:
    if not (SHARED / "frappe.csv").exists():
        pytest.skip(f"{SHARED}/frappe.csv is absent (../shared/data or $TORCHREC_CCE_SHARED_DATA)")
    env = dict(os.environ, TORCHREC_CCE_SHARED_DATA=str(SHARED),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick",
           "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "results" / "quick"
    with open(out / "quality_frappe.csv") as f:
        rows = list(csv.DictReader(f))
    cells = {(r["method"], r["budget_fraction"]) for r in rows}
    expected = {("full", "")} | {(m, b) for m in ("hashing", "qr_mult", "cce", "planner")
                                 for b in ("1/4", "1/16")}
    assert cells == expected
    full = next(r for r in rows if r["method"] == "full")
    assert full["status"] == "ok"
    for r in rows:
        assert r["status"] in ("ok", "infeasible"), r
        if r["status"] == "ok":
            assert 0 < float(r["test_logloss"]) < 1 and 0 <= float(r["test_auc"]) <= 1
            if r["budget_bytes"]:  # everything a method stores fits its byte budget
                assert int(r["embedding_bytes"]) <= int(r["budget_bytes"]), r
                assert int(r["full_embedding_bytes"]) == int(full["full_embedding_bytes"])
    assert (out / "quality_frappe.png").stat().st_size > 0
    assert "### frappe" in (out / "quality_summary.md").read_text()
    # resumable: a second run trains nothing and rebuilds the same CSV
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "--metrics-json" not in again.stdout
    with open(out / "quality_frappe.csv") as f:
        assert list(csv.DictReader(f)) == rows
