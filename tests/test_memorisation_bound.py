"""benchmarks/memorisation_bound.py on hand-made splits: seen-pair share and rate, the count
tables' log losses and the least bytes of the positive pair set, against direct computation."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memorisation_bound as mb  # noqa: E402


def test_top_items_pool_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    a = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    train = {"label": a(1, 1, 0, 0, 1, 0), "user": a(1, 2, 3, 1, 2, 3), "item": a(1, 1, 1, 2, 2, 3)}
    test = {"label": a(1, 0), "user": a(1, 1), "item": a(1, 3)}
    monkeypatch.setattr(mb, "TOP_ITEMS", (1,))
    s = mb.pair_statistics(train, test, "user", "item")
    rate = 0.5
    own1 = (2 + mb.PRIOR * rate) / (3 + mb.PRIOR)  # item 1: 2 positives in 3 rows
    pooled = (1 + mb.PRIOR * rate) / (3 + mb.PRIOR)  # items 2 and 3: 1 positive in 3 rows
    want = -(np.log(own1) + np.log(1 - pooled)) / 2
    assert s["top_items_rate_logloss"][1] == pytest.approx(want)


def test_log2_binomial_counts_subsets() -> None:
    assert mb.log2_binomial(10, 3) == pytest.approx(math.log2(120))
    assert mb.log2_binomial(5, 0) == pytest.approx(0.0, abs=1e-12)


def test_pair_statistics_match_a_direct_computation() -> None:
    a = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    train = {"label": a(1, 1, 0, 0, 1), "user": a(1, 1, 2, 2, 3), "item": a(1, 2, 1, 3, 3)}
    test = {"label": a(1, 0, 1, 0), "user": a(1, 2, 3, 1), "item": a(2, 3, 3, 3)}
    s = mb.pair_statistics(train, test, "user", "item")
    # test pairs (1,2) (2,3) (3,3) are in training, (1,3) is not
    assert s["seen_share"] == pytest.approx(0.75)
    assert s["seen_positive_rate"] == pytest.approx(2 / 3)
    assert s["unseen_positive_rate"] == 0.0
    rate = 3 / 5
    item_rate = {3: (1 + mb.PRIOR * rate) / (2 + mb.PRIOR), 2: (1 + mb.PRIOR * rate) / (1 + mb.PRIOR)}
    y = test["label"]

    def ll(p):
        p = np.array(p)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    assert s["constant_logloss"] == pytest.approx(ll([rate] * 4))
    assert s["item_rate_logloss"] == pytest.approx(ll([item_rate[2], item_rate[3], item_rate[3],
                                                       item_rate[3]]))
    # items by training count: 1 (2 rows), 3 (2 rows), 2 (1 row); with K >= 3 every item is kept
    assert s["top_items_rate_logloss"][64] == pytest.approx(s["item_rate_logloss"])
    # seen pairs at (positives + 0.5) / (count + 1): (1,2) 1.5/2, (2,3) 0.5/2, (3,3) 1.5/2
    assert s["item_rate_and_pairs_logloss"] == pytest.approx(ll([0.75, 0.25, 0.75, item_rate[3]]))
    # 3 positive pairs among 4 users x 4 items (ids 0..3)
    assert (s["users"], s["items"], s["positive_pairs"]) == (4, 4, 3)
    assert s["pair_set_bytes"] == pytest.approx(math.log2(math.comb(16, 3)) / 8)
