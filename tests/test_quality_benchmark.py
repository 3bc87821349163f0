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


@pytest.mark.slow
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
    # the planner (no --method) at 1/4 and 1/16: every table at float16; by its share of its
    # float16 bytes each table takes CCE, QR's unique-pair form or CE (budget.AUTO_LADDER):
    # Frappe's item table gets CCE at 1/4 and QR at 1/16
    import json

    for b, item in (("1/4", "cce"), ("1/16", "qr")):
        planner = next(r for r in rows if r["method"] == "planner" and r["budget_fraction"] == b)
        config = {n: t for n, t in json.loads(planner["config"]).items() if n != "cce"}
        assert config and {t["method"] for t in config.values()} <= {"full", "cce", "qr", "ce"}
        assert all(t["precision"] == "fp16" for t in config.values())
        assert config["t_item"]["method"] == item
    assert (out / "quality_frappe.png").stat().st_size > 0
    assert "### frappe" in (out / "quality_summary.md").read_text()
    # resumable: a second run trains nothing and rebuilds the same CSV
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "--metrics-json" not in again.stdout
    with open(out / "quality_frappe.csv") as f:
        assert list(csv.DictReader(f)) == rows


def _cell(test_ll: float, nbytes: int, method: str = "cce") -> dict:
    return {"evaluations": [{"val_logloss": test_ll + 0.01, "val_auc": 0.8}],
            "embedding_bytes": nbytes, "embedding_training_bytes": nbytes * 3,
            "full_embedding_bytes": 1600, "best_epoch": 1, "epochs": 2, "test_logloss": test_ll,
            "test_auc": 0.8, "embedding_plan": {"tables": {"t": {"method": method, "rows": 7}}},
            "cce_settings": {"init": "qr", "recluster_steps": [1]}}


def test_report_only_splits_ablations_and_tabulates_means(tmp_path: Path) -> None:
    """--report-only on hand-written cells: grid rows and ablation rows go to their own CSVs,
    the summary's tables carry the means over seeds."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    cells = tmp_path / "work" / "cells"
    cells.mkdir(parents=True)
    spec = {"frappe__full__full__s0": _cell(0.30, 1600, "full"),
            "frappe__qr_mult__1-16__s0": _cell(0.40, 100, "qr"),
            "frappe__qr_mult__1-16__s1": _cell(0.42, 100, "qr"),
            "frappe__cce__1-16__s0": _cell(0.45, 99),
            "frappe__abl_base__1-16__s0": _cell(0.35, 98),
            "frappe__abl_base__1-16__s1": _cell(0.37, 98),
            "frappe__mpe__1-16__s0": {"error": "ValueError: byte budget 100 bytes cannot hold"}}
    for name, m in spec.items():
        (cells / f"{name}.json").write_text(json.dumps(m))
    quality.main(["--report-only", "--datasets", "frappe", "--workdir", str(tmp_path / "work"),
                  "--results", str(tmp_path / "res")])
    with open(tmp_path / "res" / "quality_frappe.csv") as f:
        grid = list(csv.DictReader(f))
    with open(tmp_path / "res" / "quality_frappe_ablations.csv") as f:
        abl = list(csv.DictReader(f))
    # cce_fp16 is --method cce's default: its rows are copies of the cce cells
    assert {r["method"] for r in grid} == {"full", "qr_mult", "cce", "cce_fp16", "mpe"}
    copy = next(r for r in grid if r["method"] == "cce_fp16")
    assert copy["note"].startswith("copy of the cce cell") and copy["test_logloss"] == "0.45"
    assert {r["method"] for r in abl} == {"abl_base"} and len(abl) == 2
    assert next(r for r in grid if r["method"] == "mpe")["status"] == "infeasible"
    cce = next(r for r in grid if r["method"] == "cce")
    assert int(cce["embedding_training_bytes"]) == 297
    assert json.loads(cce["config"]) == {"t": {"method": "cce", "rows": 7},
                                         "cce": {"init": "qr"}}
    text = (tmp_path / "res" / "quality_summary.md").read_text()
    assert "| 1/16 | **qr_mult** | 0.4100 ± 0.0100 |" in text  # mean ± std of the two seeds
    assert "| abl_base | 0.3600 ± 0.0100 (n=2) |" in text
    assert "| best non-CCE grid row | qr_mult 0.4100 |" in text
    assert "Cells whose best validation epoch is the epoch cap: 0 of" in text
    tables = (tmp_path / "res" / "quality_tables.md").read_text()
    # best row qr_mult (2 seeds, the most), CCE one seed of two, MPE infeasible
    assert ("| 1/16 | **qr_mult** 0.4100 ±0.0100 | 0.4500 (1) | qr_mult 0.4100 ±0.0100 |  |  |"
            "  | infeasible |") in tables


def test_summary_reports_whether_validation_ranks_rows_like_test(tmp_path: Path) -> None:
    """The summary's validation/test agreement table: Spearman over the rows' means, the row
    validation would pick and the test winner; the alias and serving rows are left out."""
    import json

    from scipy.stats import spearmanr

    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    cells = tmp_path / "work" / "cells"
    cells.mkdir(parents=True)
    # (val, test) per row at 1/16: validation ranks a < b < c < d, test d < b < a < c
    vt = {"qr_mult": (0.30, 0.42), "ce": (0.31, 0.41), "cce": (0.32, 0.43),
          "hashing": (0.33, 0.40)}
    spec = {"frappe__full__full__s0": _cell(0.30, 1600, "full")}
    for method, (v, t) in vt.items():
        cell = _cell(t, 100, method)
        cell["evaluations"] = [{"val_logloss": v, "val_auc": 0.8}]
        spec[f"frappe__{method}__1-16__s0"] = cell
    spec["frappe__mpe__1-16__s0"] = _cell(0.10, 100, "mpe")  # serving row: not ranked
    for name, m in spec.items():
        (cells / f"{name}.json").write_text(json.dumps(m))
    quality.main(["--report-only", "--datasets", "frappe", "--workdir", str(tmp_path / "work"),
                  "--results", str(tmp_path / "res")])
    text = (tmp_path / "res" / "quality_summary.md").read_text()
    names = ["cce", "ce", "hashing", "qr_mult"]  # the ranked rows (cce_fp16 is cce's copy)
    rho = spearmanr([vt[m][0] for m in names], [vt[m][1] for m in names]).correlation
    assert rho == pytest.approx(-0.4)  # the 4 rows' ranks; with mpe's row it would differ
    assert f"| 1/16 | 4 | {rho:+.2f} | qr_mult 0.3000 / 0.4200 | hashing 0.3300 / 0.4000 |" in text


def test_partial_runs_merge_into_the_results_csv(tmp_path: Path) -> None:
    """A --report-only run from a workdir holding part of the grid keeps the rows already in
    the results CSV (other budgets, seeds, datasets), replaces those it re-ran, and the summary
    still covers the dataset it did not run."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    res = str(tmp_path / "res")

    def run(work: str, spec: dict, dataset: str = "frappe") -> list:
        cells = tmp_path / work / "cells"
        cells.mkdir(parents=True)
        for name, m in spec.items():
            (cells / f"{name}.json").write_text(json.dumps(m))
        quality.main(["--report-only", "--datasets", dataset, "--workdir", str(tmp_path / work),
                      "--results", res])
        with open(tmp_path / "res" / f"quality_{dataset}.csv") as f:
            return list(csv.DictReader(f))

    run("a", {"frappe__full__full__s0": _cell(0.30, 1600, "full"),
              "frappe__qr_mult__1-16__s0": _cell(0.40, 100, "qr"),
              "frappe__qr_mult__1-16__s1": _cell(0.42, 100, "qr")})
    run("m", {"movielens__full__full__s0": _cell(0.60, 1600, "full")}, "movielens")
    rows = run("b", {"frappe__full__full__s0": _cell(0.30, 1600, "full"),
                     "frappe__qr_mult__1-16__s1": _cell(0.44, 100, "qr"),
                     "frappe__qr_mult__1-64__s0": _cell(0.50, 25, "qr")})
    got = {(r["method"], r["budget_fraction"], r["seed"]): r["test_logloss"] for r in rows}
    assert got == {("full", "", "0"): "0.3", ("qr_mult", "1/16", "0"): "0.4",
                   ("qr_mult", "1/16", "1"): "0.44", ("qr_mult", "1/64", "0"): "0.5"}
    text = (tmp_path / "res" / "quality_summary.md").read_text()
    assert "### frappe" in text and "### movielens" in text
    assert "| 1/16 | **qr_mult** | 0.4200 ± 0.0200 |" in text  # seed 0 kept, seed 1 replaced


def test_id_bias_rows() -> None:
    """full_id_bias trains once per seed without a budget and with the full table's tuned
    recipe; planner_val_bias is planner_val plus the bias shares; a bias candidate's label in
    the planner note says so."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    args = quality.parse_args([])
    full = quality.cell_args("frappe", "full_id_bias", None, 0, ["--data", "x"], args)
    assert full[full.index("--method") + 1] == "full" and "--embedding-budget-mb" not in full
    assert full[full.index("--id-bias") + 1] == "all"
    for flag in quality.FULL_RECIPES["frappe"]:
        assert flag in full
    pvb = quality.cell_args("frappe", "planner_val_bias", 4096, 0, ["--data", "x"], args)
    assert pvb[pvb.index("--plan-select-id-bias") + 1] == "0.25,0.5"
    assert pvb[pvb.index("--plan-select") + 1] == "validation"
    assert "planner_val_bias" in quality.PLANNER_ROWS
    plan = {"tables": {"t_a": {"method": "cce+hot", "hot_ids": 5}, "t_b": {"method": "full"}}}
    m = dict(_cell(0.3, 100), plan_selection={"chosen": 1, "candidates": [
        {"plan": plan, "val_logloss": 0.31, "test_logloss": 0.32},
        {"plan": plan, "variant": {"id_bias": 0.25}, "val_logloss": 0.30, "test_logloss": 0.3}]})
    row = quality.to_row("frappe", "planner_val_bias", 16, 100, 0, m)
    assert row["note"].endswith("hot:cce 0.3100/0.3200, bias0.25:hot:cce 0.3000/0.3000 *")
