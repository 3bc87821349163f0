"""Issue 23's targets checked on the quality grid's CSVs (``benchmarks/quality.py``).

    .venv/bin/python benchmarks/quality_targets.py --datasets frappe,movielens --budgets 16,64,256

Per dataset and budget: the best row, the validation planner's row (``planner_val``) with the
candidate plan each seed chose (``hot:`` marks a plan with hot tiers), the best non-tiered
single-method row, the full reference, and CCE's standing (its best row, tiered or not: rank
among the rows trained within the budget, gap to the best, the hot ids and their share of the
table's occurrences where tiered). Then each target, met or missed:

* planner: ``planner_val`` no worse than the best non-tiered single method beyond noise (the
  larger seed std of the two rows, as in the summary's verdicts);
* gap: where that method trails the full table by more than 0.005 log loss, ``planner_val``
  closes at least a third of the gap;
* full: the full table is the best row or within one std of it (the larger std of the two).

Test log loss, means over seeds. Written to ``<results>/quality_targets.md``.
"""

import argparse
import csv
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from quality import (PLANNER_ROWS, RESULTS, ROW_ALIASES, SERVING_ROWS, TIER_BASE, TIERED_ROWS,
                     mean_by)

GAP_FLOOR = 0.005      # the gap to the full table below which the planner need close nothing
GAP_SHARE = 1 / 3      # the share of a larger gap the planner must close
PLANNER = "planner_val"
PLANNERS = ("planner_val", "planner_val_bias")  # each gets its own targets table


def read_rows(path: str) -> List[Dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _candidates(note: str) -> List[Tuple[str, float, float, bool]]:
    """(label, val, test log loss, chosen) of each candidate in a planner_val CSV note
    (``candidates (val / test log loss): qr+ce 0.2758/0.2835 *, cce 0.2823/0.2882``)."""
    out = []
    for c in note.split(": ", 1)[-1].split(", "):
        label, losses, *star = c.split(" ")
        val, test = losses.split("/")
        out.append((label, float(val), float(test), star == ["*"]))
    return out


def chosen_plans(rows: List[Dict], method: str, fraction: str) -> List[str]:
    """The candidate each seed of ``method`` at ``fraction`` chose (its CSV note marks it
    ``*``), as ``<label> (s<seed>)``, and where another candidate had a lower test log loss,
    ``; test best <label> <its test log loss>``."""
    out = []
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        if r["method"] != method or r["budget_fraction"] != fraction or r["status"] != "ok":
            continue
        cands = _candidates(r["note"])
        pick = next(c for c in cands if c[3])
        oracle = min(cands, key=lambda c: c[2])
        out.append(f"{pick[0]} (s{r['seed']}" + ("" if oracle[2] >= pick[2] else
                                                 f"; test best {oracle[0]} {oracle[2]:.4f}")
                   + ")")
    return out


def hot_tables(rows: List[Dict], method: str, fraction: str) -> str:
    """``table hot ids (hot mass)`` of each tiered table of seed 0's cell (from the CSV's
    config: the plan is the same for every seed)."""
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        if r["method"] == method and r["budget_fraction"] == fraction and r["status"] == "ok":
            config = json.loads(r["config"] or "{}")
            return ", ".join(f"{n.removeprefix('t_')} {t['hot_ids']} ({t['hot_mass']:.2f})"
                             for n, t in config.items() if isinstance(t, dict)
                             and t.get("hot_ids"))
    return ""


def paired_difference(rows: List[Dict], a: str, b: str, fraction: str) -> List[float]:
    """Test log loss of row ``a`` minus row ``b`` at ``fraction``, per seed both ran (ok)."""
    ll = {(r["method"], r["seed"]): float(r["test_logloss"]) for r in rows
          if r["budget_fraction"] == fraction and r["status"] == "ok"}
    seeds = sorted({s for m, s in ll if m == a} & {s for m, s in ll if m == b}, key=int)
    return [ll[(a, s)] - ll[(b, s)] for s in seeds]


def _spread(ll: Dict, a: Tuple[str, str], b: Tuple[str, str]) -> float:
    return max(ll[a][3], ll[b][3])


def check(rows: List[Dict], fraction: str, planner: str = PLANNER) -> Optional[Dict]:
    """The figures and verdicts of one budget for the validation planner row ``planner`` (None
    when the full row or the budget's rows are missing)."""
    ll = mean_by(rows, "test_logloss")
    full = ("full", "")
    trained = sorted(m for m, f in ll if f == fraction and m not in SERVING_ROWS
                     and m not in ROW_ALIASES)
    singles = [m for m in trained if m not in PLANNER_ROWS and m not in TIERED_ROWS]
    if full not in ll or not singles:
        return None
    rank = sorted(trained, key=lambda m: (ll[(m, fraction)][0], m))
    best, single = rank[0], min(singles, key=lambda m: (ll[(m, fraction)][0], m))
    out = {"fraction": fraction, "ll": ll, "rank": rank, "best": best, "single": single}
    if (planner, fraction) in ll:
        p, s = ll[(planner, fraction)][0], ll[(single, fraction)][0]
        noise = _spread(ll, (planner, fraction), (single, fraction))
        out["planner_ok"] = p - s <= noise
        seeds = f"{ll[(planner, fraction)][2]}/{ll[(single, fraction)][2]}"
        out["planner_txt"] = f"{p - s:+.4f} vs {single} (noise {noise:.4f}, seeds {seeds})"
        gap = s - ll[full][0]
        if gap > GAP_FLOOR:
            closed = (s - p) / gap
            out["gap_ok"] = closed >= GAP_SHARE
            out["gap_txt"] = f"gap {gap:.4f}, closed {closed:.0%}"
        else:
            out["gap_txt"] = f"gap {gap:+.4f} <= {GAP_FLOOR} (n/a)"
    b = ll[(best, fraction)][0]
    out["full_ok"] = ll[full][0] - b <= _spread(ll, full, (best, fraction))
    out["full_txt"] = f"full {ll[full][0] - b:+.4f} vs {best}"
    cce = [m for m in rank if m.startswith("cce") and m not in ROW_ALIASES]
    if cce:
        c = cce[0]
        out["cce"] = (f"{c} #{rank.index(c) + 1}/{len(rank)}, "
                      f"{ll[(c, fraction)][0] - b:+.4f} vs best")
    return out


def _cell(ll: Dict, m: str, f: str) -> str:
    mean, _, n, std = ll[(m, f)]
    return f"{m} {mean:.4f}" + (f" ±{std:.4f}" if n > 1 else " (1 seed)")


def _verdict(ok: Optional[bool], txt: str) -> str:
    return txt if ok is None else f"{'met' if ok else '**missed**'}: {txt}"


def report(dataset: str, rows: List[Dict], fractions: List[str]) -> str:
    ll = mean_by(rows, "test_logloss")
    if ("full", "") not in ll:
        return f"### {dataset}\n\n(no full-table result)\n"
    out = [f"### {dataset}", "", f"Full reference (tuned recipe): {_cell(ll, 'full', '')}.", "",
           "| budget | best row | planner_val (choice per seed) | best non-tiered single | "
           "CCE standing | hot tier of cce_hot (ids, share of occurrences) |",
           "|---|---|---|---|---|---|"]
    checks = [c for c in (check(rows, f) for f in fractions) if c]
    for c in checks:
        f = c["fraction"]
        planner = (f"{_cell(ll, PLANNER, f)}: " + ", ".join(chosen_plans(rows, PLANNER, f))
                   if (PLANNER, f) in ll else "")
        out.append(f"| {f} | **{_cell(ll, c['best'], f)}** | {planner} | "
                   f"{_cell(ll, c['single'], f)} | {c.get('cce', '')} | "
                   f"{hot_tables(rows, 'cce_hot', f)} |")
    for planner in PLANNERS:
        if not any((planner, c["fraction"]) in ll for c in checks):
            continue
        if planner != PLANNER:
            out += ["", f"With `{planner}` as the planner:"]
            for c in checks:
                if (planner, c["fraction"]) in ll:
                    out.append(f"* {c['fraction']}: {_cell(ll, planner, c['fraction'])}: "
                               + ", ".join(chosen_plans(rows, planner, c["fraction"])))
        out += ["", f"| budget | {planner} no worse than the best non-tiered method | {planner} "
                "closes >= 1/3 of the gap to full | full best or within 1 std |",
                "|---|---|---|---|"]
        verdicts = checks if planner == PLANNER else [check(rows, c["fraction"], planner)
                                                      for c in checks]
        for c in verdicts:
            out.append(f"| {c['fraction']} | "
                       f"{_verdict(c.get('planner_ok'), c.get('planner_txt', ''))}"
                       f" | {_verdict(c.get('gap_ok'), c.get('gap_txt', ''))} | "
                       f"{_verdict(c['full_ok'], c['full_txt'])} |")
    tiers = [(m, TIER_BASE[m]) for m in TIERED_ROWS  # the tiered rows paired at some budget
             if any(paired_difference(rows, m, TIER_BASE[m], c["fraction"]) for c in checks)]
    out += ["", "The hot tier's effect (tiered row minus the same method without it, mean over "
            "the seeds both rows ran; n seeds):", "",
            "| budget | " + " | ".join(m for m, _ in tiers) + " |", "|---|" + "---|" * len(tiers)]
    for c in checks:
        f = c["fraction"]
        cells = []
        for t, b in tiers:
            d = paired_difference(rows, t, b, f)
            cells.append(f"{sum(d) / len(d):+.4f} (n={len(d)})" if d else "")
        out.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(out + [""])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="frappe,movielens")
    p.add_argument("--budgets", default="16,64,256")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    fractions = [f"1/{b}" for b in args.budgets.split(",")]
    texts = []
    for dataset in args.datasets.split(","):
        path = os.path.join(args.results, f"quality_{dataset}.csv")
        if not os.path.exists(path):
            raise SystemExit(f"dataset '{dataset}': {path} is missing (run benchmarks/quality.py "
                             f"--datasets {dataset} first)")
        texts.append(report(dataset, read_rows(path), fractions))
    with open(os.path.join(args.results, "quality_targets.md"), "w") as f:
        f.write("\n".join(texts))
    print("\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
