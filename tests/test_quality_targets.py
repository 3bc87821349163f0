"""benchmarks/quality_targets.py on hand-written cells: the best row, the planner's chosen
candidate per seed (tiered plans marked ``hot:``), the best non-tiered single method, CCE's
standing with its hot tier, and each issue-23 target met or missed by the stated rules."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _plan(method: str, hot_ids: int = 0, hot_mass: float = 0.0) -> dict:
    table = {"method": method, "rows": 7, "precision": "fp16"}
    if hot_ids:  # a tiered table's plan: method "<cold method>+hot", rows... of the cold part
        table.update(method=method + "+hot", hot_ids=hot_ids, hot_mass=hot_mass)
    return {"tables": {"t_user": table, "t_day": {"method": "full", "precision": "fp32"}}}


def _cell(test_ll: float, plan: dict, selection: dict = None) -> dict:
    m = {"evaluations": [{"val_logloss": test_ll + 0.01, "val_auc": 0.8}],
         "embedding_bytes": 100, "full_embedding_bytes": 1600, "best_epoch": 1, "epochs": 2,
         "test_logloss": test_ll, "test_auc": 0.8, "embedding_plan": plan}
    if selection:
        m["plan_selection"] = selection
    return m


def _selection(chosen: int) -> dict:
    return {"chosen": chosen, "candidates": [
        {"plan": _plan("cce"), "val_logloss": 0.41, "test_logloss": 0.39},
        {"plan": _plan("cce", hot_ids=5, hot_mass=0.4), "val_logloss": 0.40,
         "test_logloss": 0.38}]}


def test_targets_report_met_and_missed(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality
    import quality_targets

    cells = tmp_path / "work" / "cells"
    cells.mkdir(parents=True)
    spec = {"frappe__full__full__s0": _cell(0.30, _plan("full")),
            "frappe__full__full__s1": _cell(0.30, _plan("full")),
            # 1/16: planner 0.37 (met: below qr_mult's 0.41, closes 0.04 of the 0.11 gap)
            "frappe__qr_mult__1-16__s0": _cell(0.40, _plan("qr")),
            "frappe__qr_mult__1-16__s1": _cell(0.42, _plan("qr")),
            "frappe__cce__1-16__s0": _cell(0.45, _plan("cce")),
            "frappe__cce_hot__1-16__s0": _cell(0.43, _plan("cce", 5, 0.4)),
            "frappe__planner_val__1-16__s0": _cell(0.37, _plan("cce", 5, 0.4), _selection(1)),
            "frappe__planner_val__1-16__s1": _cell(0.37, _plan("cce"), _selection(0)),
            # 1/64: planner 0.52 behind qr_mult's 0.50 beyond its noise (0): both missed
            "frappe__qr_mult__1-64__s0": _cell(0.50, _plan("qr")),
            "frappe__planner_val__1-64__s0": _cell(0.52, _plan("cce"), _selection(0))}
    for name, m in spec.items():
        (cells / f"{name}.json").write_text(json.dumps(m))
    res = tmp_path / "res"
    quality.main(["--report-only", "--datasets", "frappe", "--workdir", str(tmp_path / "work"),
                  "--results", str(res)])
    rows = quality_targets.read_rows(str(res / "quality_frappe.csv"))
    hot = next(r for r in rows if r["method"] == "cce_hot")
    assert json.loads(hot["config"])["t_user"] == {"method": "cce+hot", "rows": 7,
                                                   "precision": "fp16", "hot_ids": 5,
                                                   "hot_mass": 0.4}
    # seed 1 chose the plan without the tier; the tiered one had the lower test log loss
    assert quality_targets.chosen_plans(rows, "planner_val", "1/16") == [
        "hot:cce (s0)", "cce (s1; test best hot:cce 0.3800)"]
    assert quality_targets.hot_tables(rows, "cce_hot", "1/16") == "user 5 (0.40)"

    c16 = quality_targets.check(rows, "1/16")
    assert (c16["best"], c16["single"]) == ("planner_val", "qr_mult")
    assert c16["planner_ok"] and c16["gap_ok"] and c16["full_ok"]
    gap = 0.41 - 0.30
    assert c16["gap_txt"] == f"gap {gap:.4f}, closed {(0.41 - 0.37) / gap:.0%}"
    # the rows ranked: planner_val, qr_mult, cce_hot, cce (cce_fp16 is cce's copy)
    assert c16["cce"] == f"cce_hot #3/4, {0.43 - 0.37:+.4f} vs best"

    c64 = quality_targets.check(rows, "1/64")
    assert c64["best"] == "qr_mult" and not c64["planner_ok"] and not c64["gap_ok"]
    assert c64["full_ok"]

    quality_targets.main(["--datasets", "frappe", "--budgets", "16,64", "--results", str(res)])
    text = (res / "quality_targets.md").read_text()
    assert "planner_val 0.3700 ±0.0000: hot:cce (s0), cce (s1; test best hot:cce 0.3800)" in text
    assert f"| 1/16 | {0.43 - 0.45:+.4f} (n=1) |\n" in text  # cce_hot - cce, seed 0 only
    assert "| budget | cce_hot |\n" in text  # tiered rows without their untiered row: no column
    assert text.count("**missed**") == 2


def test_a_tiered_row_without_any_tier_is_not_a_result() -> None:
    """A tiered row whose plan has no hot tier (none fitted, e.g. MPE at 1 bit per value) gets
    status 'no tier', so it is neither a tiered result nor a copy counted as the tier's effect."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    untiered = _cell(0.36, _plan("mpe"))
    row = quality.to_row("frappe", "mpe_hot", 16, 21304, 0, untiered)
    assert row["status"] == "no tier" and "no table's hot tier fits" in row["error"]
    assert quality.to_row("frappe", "mpe", 16, 21304, 0, untiered)["status"] == "ok"
    tiered = _cell(0.35, _plan("mpe", hot_ids=5, hot_mass=0.2))
    assert quality.to_row("frappe", "mpe_hot", 16, 21304, 0, tiered)["status"] == "ok"
