"""A sound full-table reference: the same small recipe search for the full table and for the
compressed rows that beat it, per dataset (issue 23, item 2).

    .venv/bin/python benchmarks/tune_reference.py                       # every dataset
    .venv/bin/python benchmarks/tune_reference.py --datasets frappe     # one
    .venv/bin/python benchmarks/tune_reference.py --report-only

For each dataset and each row of :data:`ROWS` (the full table, and the compressed rows of the
committed grid that beat it, at their budget), every recipe of :data:`GRID` is trained at seed 0
on top of the dataset's ``quality.RECIPES`` entry (epoch cap, patience, batch, evaluation
interval unchanged; best validation evaluation as in the grid); the recipe with the lowest
validation log loss is then trained at seeds 1 and 2, and the row's tuned result is the test
log loss mean ± std (population, as in quality.py) over seeds 0-2 of that recipe. Each cell is
one ``examples/dlrm/train.py`` run built by ``quality.cell_args`` plus the recipe's flags (later
flags win); a finished cell's metrics JSON in ``--workdir`` is never rerun.

``--probes`` adds, where the tuned full table still loses (:data:`MIN_COUNT_PROBES`), the same
full table and recipe on the data preprocessed with ``--min-count k``: evidence of whether the
compressed rows win by pooling rare ids.

Outputs: ``benchmarks/results/tune_reference.csv`` (one row per cell) and
``tune_reference.md`` (per dataset: every recipe's seed-0 validation/test log loss per row, the
chosen recipe, and the old (committed grid) and tuned results with the verdict: is the tuned
full table best, within one std of, or behind the best compressed row).
"""

import argparse
import csv
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402

RESULTS = quality.RESULTS

# recipe name -> train.py flags added to the dataset's recipe ("lr*x" scales the recipe's
# sparse lr). One factor at a time from the grid's recipe, plus gain with the milder L2.
GRID: Dict[str, List[str]] = {
    "base": [],
    "lr/3": ["lr*0.3333333333333333"],
    "dense_lr/3": ["--dense-lr", "0.016666666666666666"],
    "gain": ["--embedding-gain"],
    "l2=1e-3": ["--embedding-l2", "0.001"],
    "l2=1e-2": ["--embedding-l2", "0.01"],
    "dropout=0.2": ["--embedding-dropout", "0.2"],
    "gain+l2=1e-3": ["--embedding-gain", "--embedding-l2", "0.001"],
}
# dataset -> rows tuned: (quality.METHODS row, budget fraction or None for the full table).
# The compressed rows are the committed grid's best single-method rows that beat the full
# table by more than one std (benchmarks/results/quality_summary.md).
ROWS: Dict[str, List[Tuple[str, Optional[int]]]] = {
    "frappe": [("full", None), ("cce", 4)],
    "movielens": [("full", None), ("ce_fp16", 4)],
    "yelp2018": [("full", None), ("qr_mult", 4)],
    "synthetic": [("full", None), ("qr_mult_fp16", 64)],
    "criteo_head": [("full", None), ("hashing_fp16", 64)],
}
SEEDS = (0, 1, 2)
# Evidence where the tuned full table still loses: the same full table and tuned recipe on the
# dataset preprocessed with ``--min-count k`` (ids seen fewer than k times in training share
# the OOV row): does merging rare ids alone close the gap? (``--probes``)
MIN_COUNT_PROBES: Dict[str, Tuple[int, ...]] = {"criteo_head": (2, 4), "synthetic": (4,)}
CSV_FIELDS = ["dataset", "row", "budget_fraction", "recipe", "seed", "status", "val_logloss",
              "test_logloss", "test_auc", "best_epoch", "epochs_run", "embedding_bytes",
              "wall_seconds", "train_args", "error"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="frappe,movielens,yelp2018,synthetic,criteo_head")
    p.add_argument("--workdir", default=os.path.join(quality.ROOT, "runs", "quality"),
                   help="quality.py's workdir (preprocessed data); cells go to <workdir>/tune")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--order", help="comma-separated GRID recipes: the order the seed-0 cells "
                   "are trained in (default GRID's; a partial search reports what ran)")
    p.add_argument("--probes", action="store_true",
                   help="also train the MIN_COUNT_PROBES cells (after the full table's search)")
    p.add_argument("--only", choices=["full", "compressed"],
                   help="train only the full rows or only the compressed ones (the report "
                        "reads every finished cell)")
    return p.parse_args(argv)


def cell_path(workdir: str, dataset: str, row: str, fraction: Optional[int], recipe: str,
              seed: int) -> str:
    budget = "full" if fraction is None else f"1-{fraction}"
    safe = recipe.replace("/", "_div").replace("*", "x").replace("=", "")
    return os.path.join(workdir, "tune", f"{dataset}__{row}__{budget}__{safe}__s{seed}.json")


def train_args(dataset: str, row: str, budget_bytes: Optional[int], recipe: str, seed: int,
               data_args: List[str], qargs: argparse.Namespace) -> List[str]:
    """quality.py's cell arguments plus the recipe's flags."""
    args = quality.cell_args(dataset, row, budget_bytes, seed, data_args, qargs,
                             full_recipe=False)
    for flag in GRID[recipe]:
        if flag.startswith("lr*"):
            args += ["--lr", repr(quality.recipe(dataset, qargs)["lr"] * float(flag[3:]))]
        else:
            args.append(flag)
    return args


def run_cell(dataset: str, row: str, fraction: Optional[int], budget_bytes: Optional[int],
             recipe: str, seed: int, data_args: List[str], qargs: argparse.Namespace,
             workdir: str, train: bool = True) -> Optional[Dict]:
    """Train one cell (or read it); its CSV row, or None if it is missing and not trained."""
    path = cell_path(workdir, dataset, row, fraction, recipe, seed)
    args = (train_args(dataset, row, budget_bytes, recipe, seed, data_args, qargs)
            if data_args else [])
    if not os.path.exists(path):
        if not train:
            return None
        quality.train_into(path, args, error_extra={"train_args": args})
    with open(path) as f:
        m = json.load(f)
    out = {k: "" for k in CSV_FIELDS}
    out.update(dataset=dataset, row=row, recipe=recipe, seed=seed,
               budget_fraction="" if fraction is None else f"1/{fraction}")
    if "error" in m:
        out.update(status="failed", error=m["error"])
        return out
    best = min(m["evaluations"], key=lambda e: e["val_logloss"])
    out.update(status="ok", val_logloss=best["val_logloss"], test_logloss=m["test_logloss"],
               test_auc=m["test_auc"], best_epoch=m.get("best_epoch", ""),
               epochs_run=m.get("epochs", ""), embedding_bytes=m["embedding_bytes"],
               wall_seconds=m.get("wall_seconds", ""),
               train_args=" ".join(GRID[recipe]))
    print(f"  {dataset} {row} {out['budget_fraction'] or 'full'} {recipe} s{seed}: val "
          f"{best['val_logloss']:.4f} test {m['test_logloss']:.4f}", flush=True)
    return out


def chosen(rows: List[Dict]) -> Optional[str]:
    """The recipe with the lowest seed-0 validation log loss (the earlier in GRID on a tie),
    once every recipe has its seed-0 cell."""
    if {r["recipe"] for r in rows if r["seed"] == 0} != set(GRID):
        return None
    s0 = {r["recipe"]: float(r["val_logloss"]) for r in rows
          if r["seed"] == 0 and r["status"] == "ok"}
    return min(s0, key=lambda g: (s0[g], list(GRID).index(g))) if s0 else None


def tune_row(dataset: str, row: str, fraction: Optional[int], full_bytes: Optional[int],
             data_args: List[str], qargs: argparse.Namespace, workdir: str,
             train: bool, order: Optional[List[str]] = None) -> List[Dict]:
    budget = None if fraction is None else full_bytes // fraction
    order = (order or []) + [g for g in GRID if g not in (order or [])]
    out = [r for g in order for r in [run_cell(dataset, row, fraction, budget, g, 0, data_args,
                                               qargs, workdir, train)] if r]
    out.sort(key=lambda r: list(GRID).index(r["recipe"]))
    pick = chosen(out)
    if pick is not None:
        out += [r for s in SEEDS[1:] for r in [run_cell(dataset, row, fraction, budget, pick, s,
                                                        data_args, qargs, workdir, train)] if r]
    return out


def min_count_data(dataset: str, k: int, workdir: str) -> List[str]:
    """train.py data arguments of ``dataset`` preprocessed with ``--min-count k`` (the base
    preprocessing command of its meta.json plus the flag; made on first use)."""
    import subprocess

    base = os.path.join(workdir, "data", dataset)
    out = f"{base}_min{k}"
    if not os.path.exists(os.path.join(out, "meta.json")):
        with open(os.path.join(base, "meta.json")) as f:
            cmd = list(json.load(f)["command"])
        cmd = cmd[:cmd.index("--out")] + ["--min-count", str(k), "--no-progress", "--out", out]
        subprocess.run([sys.executable, *cmd[1:]], cwd=quality.ROOT, check=True,
                       env=quality._env(), stdout=sys.stderr)
    return ["--data", "preprocessed", "--data-dir", out]


def probe_rows(dataset: str, pick: Optional[str], qargs: argparse.Namespace, workdir: str,
               train: bool) -> List[Dict]:
    """The full table with the tuned recipe ``pick`` on the min-count data, seeds 0-2 (row
    ``full_min<k>``)."""
    out = []
    for k in MIN_COUNT_PROBES.get(dataset, ()) if pick else ():
        data_args = min_count_data(dataset, k, workdir) if train else []
        for s in SEEDS:
            path = cell_path(workdir, dataset, f"full_min{k}", None, pick, s)
            if not train and not os.path.exists(path):
                continue
            if train and not os.path.exists(path):
                quality.train_into(path, train_args(dataset, "full", None, pick, s, data_args,
                                                    qargs))
            out.append(run_cell(dataset, f"full_min{k}", None, None, pick, s, [], qargs,
                                workdir, train=False))
    return [r for r in out if r]


def old_grid(dataset: str) -> Dict[Tuple[str, str], Tuple[float, float, int]]:
    """(row, fraction) -> (mean, std, n) test log loss of the committed quality_<dataset>.csv."""
    path = os.path.join(RESULTS, f"quality_{dataset}.csv")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    stats = quality.mean_by(rows, "test_logloss")
    return {k: (v[0], v[3], v[2]) for k, v in stats.items()}


def _stats(xs: List[float]) -> Tuple[float, float, int]:
    mean = sum(xs) / len(xs)
    return mean, (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5, len(xs)


def _pm(s: Optional[Tuple[float, float, int]]) -> str:
    if s is None:
        return ""
    return f"{s[0]:.4f} ± {s[1]:.4f}" + (f" ({s[2]} seeds)" if s[2] != 3 else "")


def report(dataset: str, rows: List[Dict], results: str) -> List[str]:
    """Markdown for one dataset: the search table and the old/tuned comparison."""
    old = old_grid(dataset)
    tuned: Dict[Tuple[str, str], Tuple[str, Tuple[float, float, int]]] = {}
    out = [f"### {dataset}", "", "Seed-0 validation / test log loss per recipe (lowest "
           "validation in bold: the chosen recipe):", "",
           "| recipe | " + " | ".join(f"{r} {f or 'full'}" for r, f in _row_keys(rows))
           + " |", "|---|" + "---|" * len(_row_keys(rows))]
    picks = {}
    for key in _row_keys(rows):
        mine = [r for r in rows if (r["row"], r["budget_fraction"]) == key]
        picks[key] = chosen(mine)
        if picks[key] is not None:
            test = [float(r["test_logloss"]) for r in mine
                    if r["recipe"] == picks[key] and r["status"] == "ok"]
            tuned[key] = (picks[key], _stats(test))
    for g in GRID:
        cells = []
        for key in _row_keys(rows):
            r = next((r for r in rows if (r["row"], r["budget_fraction"]) == key
                      and r["recipe"] == g and r["seed"] == 0), None)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append("failed")
            else:
                txt = f"{float(r['val_logloss']):.4f} / {float(r['test_logloss']):.4f}"
                cells.append(f"**{txt}**" if picks[key] == g else txt)
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    out += ["", "| row | budget | old recipe (committed grid) | tuned recipe | tuned (3 seeds) "
            "|", "|---|---|---|---|---|"]
    for key in _row_keys(rows):
        pick, st = tuned.get(key, ("(search unfinished)", None))
        out.append(f"| {key[0]} | {key[1] or 'full'} | {_pm(old.get(key))} | {pick} | "
                   f"{_pm(st)} |")
    missing = [f"{r} {'1/' + str(f) if f else 'full'}" for r, f in ROWS.get(dataset, [])
               if (r, f"1/{f}" if f else "") not in _row_keys(rows)]
    if missing:
        out += ["", "Not run yet (compute): " + ", ".join(missing) + "."]
    full = tuned.get(("full", ""))
    if full is not None:
        out += ["", verdict(full[1], old, tuned)]
    return out + probe_report(rows) + [""]


def summary(dataset: str, rows: List[Dict]) -> List[str]:
    """Markdown rows of the cross-dataset table: per budget of the committed grid, its best
    row (grid recipe), the tuned compressed row there (if any), the old and tuned full table and
    the tuned full table's standing against the better of the two."""
    old = old_grid(dataset)
    tuned = {}
    for key in _row_keys(rows):
        mine = [r for r in rows if (r["row"], r["budget_fraction"]) == key]
        pick = chosen(mine)
        test = [float(r["test_logloss"]) for r in mine
                if r["recipe"] == pick and r["status"] == "ok"]
        if pick is not None and test:
            tuned[key] = (pick, _stats(test))
    full = tuned.get(("full", ""))
    out = []
    for f in sorted({f for _, f in old if f}, key=lambda f: int(f.split("/")[1])):
        grid = {m: v for (m, ff), v in old.items() if ff == f and m not in quality.SERVING_ROWS
                and m not in quality.ROW_ALIASES}
        if not grid:
            continue
        best = min(grid, key=lambda m: grid[m][0])
        mine = [(k[0], v) for k, v in tuned.items() if k[1] == f]
        rivals = [grid[best]] + [v[1] for _, v in mine]
        top = min(rivals, key=lambda v: v[0])
        if full is None:
            stand = ""
        elif full[1][0] <= top[0]:
            stand = "best"
        elif full[1][0] - top[0] <= max(full[1][1], top[1]):
            stand = f"within 1 std (+{full[1][0] - top[0]:.4f})"
        else:
            stand = f"**behind** by {full[1][0] - top[0]:.4f} (std {max(full[1][1], top[1]):.4f})"
        out.append(f"| {dataset} | {f} | {best} {_pm(grid[best])} | "
                   + "; ".join(f"{m} {_pm(v[1])} ({v[0]})" for m, v in mine) + f" | "
                   f"{_pm(old.get(('full', '')))} | "
                   + (f"{_pm(full[1])} ({full[0]})" if full else "") + f" | {stand} |")
    return out


def _row_keys(rows: List[Dict]) -> List[Tuple[str, str]]:
    """The searched rows (not the min-count probes), in order."""
    return list(dict.fromkeys((r["row"], r["budget_fraction"]) for r in rows
                              if not r["row"].startswith("full_min")))


def probe_report(rows: List[Dict]) -> List[str]:
    """Markdown lines of the min-count probes (full table, tuned recipe, seeds 0-2)."""
    probes = [r for r in rows if r["row"].startswith("full_min") and r["status"] == "ok"]
    if not probes:
        return []
    out = ["", "The tuned full table on the data preprocessed with `--min-count k` (ids seen "
           "fewer than k times in training share the OOV row; same recipe):", "",
           "| k | table rows (bytes) | test log loss |", "|---|---|---|"]
    for row in dict.fromkeys(r["row"] for r in probes):
        mine = [r for r in probes if r["row"] == row]
        nbytes = int(mine[0]["embedding_bytes"])
        out.append(f"| {row[len('full_min'):]} | {nbytes // 64:,} ({nbytes:,} B) | "
                   f"{_pm(_stats([float(r['test_logloss']) for r in mine]))} |")
    return out


def verdict(full: Tuple[float, float, int], old: Dict, tuned: Dict) -> str:
    """Where the tuned full table stands against every compressed row: the tuned rows, and the
    committed grid's rows (their old recipe) that no tuning here touched."""
    rivals = {k: (v[1], "tuned") for k, v in tuned.items() if k[0] != "full"}
    for k, v in old.items():
        if k[1] and k not in rivals and k[0] not in quality.SERVING_ROWS \
                and k[0] not in quality.ROW_ALIASES:
            rivals[k] = (v, "grid")
    if not rivals:
        return "No compressed row to compare."
    (m, f), (s, src) = min(rivals.items(), key=lambda kv: kv[1][0][0])
    if full[0] <= s[0]:
        return (f"Tuned full table {_pm(full)} is the best row (next: {m} at {f}, {src} "
                f"recipe, {_pm(s)}).")
    spread = max(full[1], s[1])
    word = "within one std of" if full[0] - s[0] <= spread else "BEHIND"
    return (f"Tuned full table {_pm(full)} is {word} the best compressed row, {m} at {f} "
            f"({src} recipe) {_pm(s)}: {full[0] - s[0]:+.4f} vs std {spread:.4f}.")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    qargs = quality.parse_args(["--workdir", args.workdir])
    lines = ["# Tuned full-table reference (benchmarks/tune_reference.py)", "",
             "Recipes (added to each dataset's quality.RECIPES entry): " + "; ".join(
                 f"`{g}` {' '.join(f) or '(as is)'}" for g, f in GRID.items()) + ".", ""]
    all_rows: List[Dict] = []
    table = ["| dataset | budget | best grid row (grid recipe) | tuned compressed row (recipe) "
             "| full, grid recipe | full, tuned (recipe) | tuned full vs best compressed |",
             "|---|---|---|---|---|---|---|"]
    details: List[str] = []
    for dataset in args.datasets.split(","):
        data_args = [] if args.report_only else quality.prepare(dataset, qargs)
        rows: List[Dict] = []
        full_bytes = None
        for row, fraction in ROWS[dataset]:
            if fraction is not None and full_bytes is None:
                base = [r for r in rows if r["row"] == "full" and r["status"] == "ok"]
                if not base:
                    break
                full_bytes = int(base[0]["embedding_bytes"])
            wanted = args.only is None or (args.only == "full") == (fraction is None)
            rows += tune_row(dataset, row, fraction, full_bytes, data_args, qargs,
                             args.workdir, wanted and not args.report_only,
                             args.order.split(",") if args.order else None)
            if fraction is None:
                rows += probe_rows(dataset, chosen([r for r in rows if r["row"] == "full"]),
                                   qargs, args.workdir, args.probes and not args.report_only)
        all_rows += rows
        details += report(dataset, rows, args.results)
        table += summary(dataset, rows)
    lines += ["Test log loss, mean ± std over seeds 0-2 (population std). \"best grid row\": "
              "the committed grid's best row at that budget that trains within it "
              "(quality_<dataset>.csv, recipe of its time); \"tuned\": the recipe chosen "
              "on seed-0 validation log loss, then seeds 0-2. \"within 1 std\": the gap is at "
              "most the larger std of the two rows.", ""] + table + [""] + details
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "tune_reference.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(all_rows)
    with open(os.path.join(args.results, "tune_reference.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
