"""Evaluation and the best-validation protocol.

Each evaluation measures the validation and the test split on the same model state; the
reported test numbers are those of the evaluation with the lowest validation log loss. That is
exact (the test numbers of that very state, nothing restored) and cheap (one forward pass over
test per evaluation, no copy of the model). Early stopping: ``patience`` evaluations in a row
without a new best. Metrics: torchmetrics AUROC and mean BCE (log loss), synchronised across
ranks.
"""

import contextlib
import json
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torchmetrics
from torch import nn

from torchrec_cce.serving import served_codebooks
from torchrec_cce.train.distributed import in_step
from torchrec_cce.train.heap import TRIM_EVERY, release_free_heap


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], device: torch.device) -> Dict[str, float]:
    """Log loss (mean BCE) and AUC of ``model`` (returning ``(loss, (_, logits, labels))`` like
    TorchRec's ``DLRMTrain``) on ``batches``, over all ranks (collective)."""
    model.eval()
    auroc = torchmetrics.classification.BinaryAUROC().to(device)
    logloss = torchmetrics.MeanMetric().to(device)
    for i, batch in enumerate(in_step(batches), start=1):
        if i % TRIM_EVERY == 0:  # see torchrec_cce.train.heap
            release_free_heap()
        batch = batch.to(device)
        _, (_, logits, labels) = model(batch)
        probs = torch.sigmoid(logits.float())
        auroc.update(probs, labels.int())
        logloss.update(nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none"))
    model.train()
    out = {"logloss": float(logloss.compute()), "auc": float(auroc.compute())}
    release_free_heap()
    return out


def evaluate_val_test(model: nn.Module, val: Callable[[], Iterable[Any]],
                      test: Callable[[], Iterable[Any]], device: torch.device,
                      serving_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """``val_logloss``, ``val_auc``, ``test_logloss``, ``test_auc`` of the current state; with
    ``serving_dtype`` (``torch.int8`` / ``torch.quint4x2``) on the served codebook values."""
    served = (served_codebooks(model, serving_dtype) if serving_dtype is not None
              else contextlib.nullcontext())
    with served:
        v = evaluate(model, val(), device)
        t = evaluate(model, test(), device)
    return {"val_logloss": v["logloss"], "val_auc": v["auc"],
            "test_logloss": t["logloss"], "test_auc": t["auc"]}


class Protocol:
    """Every evaluation, the best one (lowest validation log loss; ties: the earlier), and the
    early-stopping rule: stop after ``patience`` evaluations in a row without a new best.

    Records are dicts with at least ``step`` and ``val_logloss``."""

    def __init__(self, patience: Optional[int] = None) -> None:
        self.patience = patience
        self.evaluations: List[Dict[str, Any]] = []

    def add(self, record: Dict[str, Any]) -> bool:
        """Record an evaluation; True if it is the new best."""
        self.evaluations.append(record)
        return self.best is record

    @property
    def best(self) -> Optional[Dict[str, Any]]:
        if not self.evaluations:
            return None
        return min(self.evaluations, key=lambda r: r["val_logloss"])  # first of equal minima

    @property
    def since_best(self) -> int:
        best = self.best
        return 0 if best is None else len(self.evaluations) - 1 - self.evaluations.index(best)

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def last_step(self) -> Optional[int]:
        return self.evaluations[-1]["step"] if self.evaluations else None

    def state(self) -> str:
        """JSON of the evaluations so far (for a checkpoint)."""
        return json.dumps(self.evaluations)

    def load(self, state: str) -> None:
        self.evaluations = json.loads(state) if state else []
