"""Input checks for the KJTs a compressed collection receives.

Every check raises a ``ValueError`` (or ``KeyError`` for feature names, see
:func:`torchrec_cce.stages.check_features`) that names the feature and the fix, so that a bad
batch never reaches fbgemm (where it would crash, read out of bounds or silently give NaN).
They run once per batch on the logical KJT and cost a few reductions over its lengths/weights.
"""

from typing import List

import torch
from torchrec import KeyedJaggedTensor


def _feature_of_position(keys: List[str], lengths: torch.Tensor, stride: int, position: int) -> str:
    """The feature owning value ``position`` of a KJT (keys-major layout)."""
    ends = torch.cumsum(lengths.view(len(keys), stride).sum(dim=1), dim=0)
    return keys[int(torch.searchsorted(ends, torch.tensor(position), right=True))]


def check_kjt_layout(features: KeyedJaggedTensor) -> None:
    """Lengths/values/weights of ``features`` are consistent and the values are usable ids.

    * ids and lengths are integer tensors (int32 or int64);
    * ``lengths`` holds ``batch_size`` entries per key, none negative, summing to the number
      of values;
    * per-id weights, if any, are floating point, one per value and finite (a NaN/inf weight
      would silently give NaN embeddings).
    """
    keys = features.keys()
    values, lengths = features.values(), features.lengths()
    if values.is_meta or torch.compiler.is_exporting():  # no values to read (meta, export)
        return
    if values.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"KJT ids must be int32 or int64, got {values.dtype} (features {keys}); cast the "
            f"values with .long()"
        )
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"KJT lengths must be int32 or int64, got {lengths.dtype} (features {keys})")
    stride = features.stride()
    if lengths.numel() != stride * len(keys):
        raise ValueError(
            f"KJT has {lengths.numel()} lengths for {len(keys)} features {keys}: expected "
            f"batch_size x features = {stride} x {len(keys)}; give every feature one length "
            f"per example"
        )
    if lengths.numel() and int(lengths.min()) < 0:
        bad = keys[int(torch.nonzero(lengths < 0)[0, 0]) // max(1, stride)]
        raise ValueError(f"feature '{bad}': KJT lengths must be >= 0, got {int(lengths.min())}")
    total = int(lengths.sum()) if lengths.numel() else 0
    if total != values.numel():
        raise ValueError(
            f"KJT lengths of features {keys} sum to {total} but there are {values.numel()} "
            f"values; lengths must count the ids of every bag (lengths.sum() == values.numel())"
        )
    weights = features.weights_or_none()
    if weights is None:
        return
    if not torch.is_floating_point(weights):
        raise ValueError(f"KJT weights must be floating point, got {weights.dtype} (features {keys})")
    if weights.numel() != values.numel():
        raise ValueError(
            f"KJT has {weights.numel()} weights for {values.numel()} values (features {keys}); "
            f"give one weight per id"
        )
    finite = torch.isfinite(weights)
    if not bool(finite.all()):
        position = int(torch.nonzero(~finite)[0, 0])
        feature = _feature_of_position(keys, lengths, stride, position)
        raise ValueError(
            f"feature '{feature}': per-id weight {float(weights[position])} at value {position} is "
            f"not finite; NaN/inf weights would give NaN embeddings: clean or clip the weights "
            f"upstream"
        )

