"""Choosing between the budget planner's candidate plans on validation data
(``train.py --plan-select validation``).

Every distinct plan of :func:`torchrec_cce.plan_candidates` is trained with the same seed and
recipe; then, optionally, the best of them again with each of a few variants (``train.py``:
a share of the budget for a per-id bias, ``--plan-select-id-bias``). The run with the lowest
best validation log loss is kept (its test metrics are the result; the test set plays no part
in the choice).
"""

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

PLAN_FIELDS = ("val_logloss", "val_auc", "test_logloss", "test_auc", "best_epoch",
               "wall_seconds")


def _label(variant: Any) -> str:
    """``k=v, ...`` for a mapping of flag overrides, else ``str(variant)``."""
    if isinstance(variant, dict):
        return ", ".join(f"{k}={v}" for k, v in variant.items())
    return str(variant)


def _lowest_val(runs: List[Tuple[Dict[str, Any], Any]]) -> int:
    """Index of the run with the lowest validation log loss (the earliest on a tie)."""
    return min(range(len(runs)), key=lambda j: (runs[j][0]["val_logloss"], j))


def select_plan(train_candidate: Callable[[int], Tuple[Dict[str, Any], Any]],
                log: Callable[[str], None] = print, variants: Sequence[Any] = (),
                train_variant: Optional[Callable[[int, Any], Tuple[Dict[str, Any], Any]]] = None
                ) -> Tuple[Dict[str, Any], Any]:
    """Train candidate 0, 1, ... with ``train_candidate(i) -> (metrics, extra)`` until
    ``metrics["plan_candidates"]`` (the number of candidates) are done, then the candidate
    ``b`` with the lowest validation loss again as ``train_variant(b, v)`` for every ``v`` in
    ``variants``; returns the chosen run's ``(metrics, extra)``.

    The chosen metrics gain ``plan_selection`` = ``{"chosen": index, "candidates": [{"plan",
    "method", "variant" (None, or the ``v`` it was trained with), val/test log loss and AUC,
    "best_epoch", "wall_seconds", "reclusterings" (how many ran)}, ...]}``; their
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
    labels: List[Any] = [None] * len(runs)
    if variants:
        if train_variant is None:
            raise ValueError("select_plan: variants need train_variant")
        base = _lowest_val(runs)
        for v in variants:
            log(f"-- candidate plan {base + 1} with {_label(v)} (--plan-select validation)")
            metrics, extra = train_variant(base, v)
            metrics.pop("plan_candidates", None)
            runs.append((metrics, extra))
            labels.append(v)
    best = _lowest_val(runs)
    metrics, extra = runs[best]
    metrics = dict(metrics)
    metrics["plan_selection"] = {
        "chosen": best,
        "candidates": [{"plan": m["embedding_plan"], "method": m["method"], "variant": v,
                        **{k: m[k] for k in PLAN_FIELDS},
                        "reclusterings": len(m.get("reclusterings") or [])}
                       for (m, _), v in zip(runs, labels)]}
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["args"] = dict(metrics["args"], plan_candidate=None)
    log("plan selection (lowest val log loss): " + ", ".join(
        f"{j}: {m['method']}{'' if v is None else ' + ' + _label(v)} {m['val_logloss']:.4f}"
        + (" *" if j == best else "") for j, ((m, _), v) in enumerate(zip(runs, labels))))
    return metrics, extra
