"""How much of a user-item dataset's label is (user, item) pair memorisation, and how many bytes
storing the memorised pairs takes at the least: the evidence behind the quality grid's gaps to
the full table (benchmarks/README.md, "Why the gaps stay open").

Per dataset, from the preprocessed train and test splits (``quality.py``'s, made on first use):

* the share of test rows whose (user, item) pair occurs in training, and their positive rate;
* the test log loss of two count tables with no embedding at all: each item's training positive
  rate (smoothed towards the global rate), and the same with a pair seen in training predicted
  at its training positive rate;
* the test log loss of the per-item rate table kept for only the ``K`` most frequent items (the
  rest at their pooled rate), for the ``K`` of :data:`TOP_ITEMS`: how many items' rates carry
  the signal;
* the information-theoretic least number of bytes that tell which of the ``users x items`` pairs
  are the ``P`` positive training pairs, ``log2 C(users * items, P) / 8`` (any method, any
  encoding), next to the grid's budgets.

    python benchmarks/memorisation_bound.py [--datasets frappe,movielens,yelp2018]
"""

import argparse
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import (RESULTS, full_embedding_bytes, parse_args as quality_args,  # noqa: E402
                     prepare)

# the user and the item feature of each user-item dataset
PAIR_FEATURES: Dict[str, tuple] = {"frappe": ("user", "item"), "movielens": ("user", "movie"),
                                   "yelp2018": ("user", "item")}
PRIOR = 10.0  # pseudo-rows of the global positive rate added to each item's count
BUDGETS = (16, 64, 256, 1024)
TOP_ITEMS = (64, 256, 1024, 4096)


def _read(data_dir: str, split: str, columns: List[str]) -> Dict[str, np.ndarray]:
    t = pq.read_table(os.path.join(data_dir, f"{split}.parquet"), columns=columns)
    return {c: t.column(c).to_numpy().astype(np.int64) for c in columns}


def _logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def log2_binomial(n: int, k: int) -> float:
    """``log2 C(n, k)``: the bits that name one ``k``-subset of ``n`` things."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def pair_statistics(train: Dict[str, np.ndarray], test: Dict[str, np.ndarray], user: str,
                    item: str) -> Dict[str, float]:
    """The figures of the module docstring for one dataset's splits."""
    n_items = int(max(train[item].max(), test[item].max())) + 1
    key = lambda r: r[user] * n_items + r[item]  # noqa: E731
    pairs, inverse = np.unique(key(train), return_inverse=True)
    count = np.bincount(inverse).astype(float)
    positives = np.bincount(inverse, weights=train["label"])
    at = np.minimum(np.searchsorted(pairs, key(test)), len(pairs) - 1)
    seen = pairs[at] == key(test)

    rate = train["label"].mean()
    item_count = np.bincount(train[item], minlength=n_items).astype(float)
    item_pos = np.bincount(train[item], weights=train["label"], minlength=n_items)
    item_rate = ((item_pos + PRIOR * rate) / (item_count + PRIOR))[test[item]]
    top_items = {}
    for k in TOP_ITEMS:
        own = np.zeros(n_items, bool)
        own[np.argsort(-item_count, kind="stable")[:k]] = True
        pooled = (item_pos[~own].sum() + PRIOR * rate) / (item_count[~own].sum() + PRIOR)
        rates = np.where(own, (item_pos + PRIOR * rate) / (item_count + PRIOR), pooled)
        top_items[k] = _logloss(rates[test[item]], test["label"])
    with_pairs = item_rate.copy()
    with_pairs[seen] = ((positives[at] + 0.5) / (count[at] + 1.0))[seen]

    n_users = int(max(train[user].max(), test[user].max())) + 1
    n_pos_pairs = int((positives > 0).sum())
    return {"test_rows": len(test["label"]), "seen_share": float(seen.mean()),
            "seen_positive_rate": float(test["label"][seen].mean()) if seen.any() else float("nan"),
            "unseen_positive_rate": float(test["label"][~seen].mean()),
            "constant_logloss": _logloss(np.full(len(seen), rate), test["label"]),
            "item_rate_logloss": _logloss(item_rate, test["label"]),
            "top_items_rate_logloss": top_items,
            "item_rate_and_pairs_logloss": _logloss(with_pairs, test["label"]),
            "users": n_users, "items": n_items, "positive_pairs": n_pos_pairs,
            "pair_set_bytes": log2_binomial(n_users * n_items, n_pos_pairs) / 8}


def report(stats: Dict[str, Dict], full_bytes: Dict[str, int]) -> str:
    out = ["| dataset | test rows with a training (user, item) pair (positive rate) | unseen "
           "pairs' positive rate | test log loss: constant / per-item rate / + seen pairs | "
           "positive training pairs of users x items | least bytes to store them | budgets "
           + " / ".join(f"1/{b}" for b in BUDGETS) + " |", "|---|---|---|---|---|---|---|"]
    for d, s in stats.items():
        budgets = " / ".join(f"{full_bytes[d] / b / 1024:.1f}" for b in BUDGETS)
        out.append(
            f"| {d} | {s['seen_share']:.1%} ({s['seen_positive_rate']:.2f}) | "
            f"{s['unseen_positive_rate']:.2f} | {s['constant_logloss']:.4f} / "
            f"{s['item_rate_logloss']:.4f} / {s['item_rate_and_pairs_logloss']:.4f} | "
            f"{s['positive_pairs']:,} of {s['users']:,} x {s['items']:,} | "
            f"{s['pair_set_bytes'] / 1024:.1f} KiB | {budgets} KiB |")
    out += ["", "Per-item rate table kept for the K most frequent items only (test log loss):", "",
            "| dataset | " + " | ".join(f"K = {k:,}" for k in TOP_ITEMS) + " | every item |",
            "|---|" + "---|" * (len(TOP_ITEMS) + 1)]
    for d, s in stats.items():
        out.append(f"| {d} | " + " | ".join(f"{s['top_items_rate_logloss'][k]:.4f}"
                                          for k in TOP_ITEMS) + f" | {s['item_rate_logloss']:.4f} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=",".join(PAIR_FEATURES))
    p.add_argument("--workdir", default=None, help="quality.py's --workdir (its data/ is used)")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    qargs = quality_args([] if args.workdir is None else ["--workdir", args.workdir])
    stats, full_bytes = {}, {}
    for d in args.datasets.split(","):
        if d not in PAIR_FEATURES:
            raise SystemExit(f"--datasets: '{d}' is not a user-item dataset "
                             f"({', '.join(PAIR_FEATURES)})")
        try:
            data_dir = prepare(d, qargs)[-1]
        except FileNotFoundError as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        user, item = PAIR_FEATURES[d]
        cols = ["label", user, item]
        stats[d] = pair_statistics(_read(data_dir, "train", cols), _read(data_dir, "test", cols),
                                   user, item)
        full_bytes[d] = full_embedding_bytes(data_dir, embedding_dim=16)
    text = report(stats, full_bytes)
    print(text)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "memorisation_bound.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
