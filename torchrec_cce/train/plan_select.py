"""Choosing between the budget planner's candidate plans on validation data
(``train.py --plan-select validation``).

Every distinct plan of :func:`torchrec_cce.plan_candidates` is trained with the same seed and
recipe; the run with the lowest best validation log loss is kept (its test metrics are the
result; the test set plays no part in the choice).
"""

import time
from typing import Any, Callable, Dict, List, Tuple

PLAN_FIELDS = ("val_logloss", "val_auc", "test_logloss", "test_auc", "best_epoch",
               "wall_seconds")


def select_plan(train_candidate: Callable[[int], Tuple[Dict[str, Any], Any]],
                log: Callable[[str], None] = print) -> Tuple[Dict[str, Any], Any]:
    """Train candidate 0, 1, ... with ``train_candidate(i) -> (metrics, extra)`` until
    ``metrics["plan_candidates"]`` (the number of candidates) are done; returns the chosen
    run's ``(metrics, extra)``.

    The chosen metrics gain ``plan_selection`` = ``{"chosen": index, "candidates": [{"plan",
    "method", val/test log loss and AUC, "best_epoch", "wall_seconds", "reclusterings" (how
    many ran)}, ...]}``; their
    ``wall_seconds`` covers every run and ``args["plan_candidate"]`` is reset to None."""
    start = time.perf_counter()
    runs: List[Tuple[Dict[str, Any], Any]] = []
    i, count = 0, 1
    while i < count:
        log(f"-- candidate plan {i + 1}{'' if i == 0 else f' of {count}'} "
            "(--plan-select validation)")
        metrics, extra = train_candidate(i)
        count = metrics.pop("plan_candidates")
        runs.append((metrics, extra))
        i += 1
    best = min(range(len(runs)), key=lambda j: (runs[j][0]["val_logloss"], j))
    metrics, extra = runs[best]
    metrics = dict(metrics)
    metrics["plan_selection"] = {
        "chosen": best,
        "candidates": [{"plan": m["embedding_plan"], "method": m["method"],
                        **{k: m[k] for k in PLAN_FIELDS},
                        "reclusterings": len(m.get("reclusterings") or [])} for m, _ in runs]}
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["args"] = dict(metrics["args"], plan_candidate=None)
    log("plan selection (lowest val log loss): " + ", ".join(
        f"{j}: {m['method']} {m['val_logloss']:.4f}" + (" *" if j == best else "")
        for j, (m, _) in enumerate(runs)))
    return metrics, extra
