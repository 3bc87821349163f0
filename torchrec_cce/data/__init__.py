"""Data readers yielding ``torchrec.datasets.utils.Batch``: Criteo (TSV and TorchRec npy),
Avazu (CSV), the Criteo-shaped synthetic generator (the default dataset), and directories made
by ``python -m torchrec_cce.data.preprocess`` (true vocabularies; :class:`PreprocessedDataset`)."""

from torchrec_cce.data.avazu import AVAZU_FEATURES, AvazuCsvDataset, string_id
from torchrec_cce.data.criteo import (
    CRITEO_KAGGLE_CARDINALITIES,
    MISSING_ID,
    CriteoNpyDataset,
    CriteoTsvDataset,
)
from torchrec_cce.data.preprocessed import PreprocessedDataset, load_meta
from torchrec_cce.data.synthetic import DEFAULT_SCALE, CriteoSyntheticDataset, scaled_cardinalities

__all__ = [
    "AVAZU_FEATURES",
    "AvazuCsvDataset",
    "CRITEO_KAGGLE_CARDINALITIES",
    "CriteoNpyDataset",
    "CriteoSyntheticDataset",
    "CriteoTsvDataset",
    "DEFAULT_SCALE",
    "load_meta",
    "MISSING_ID",
    "PreprocessedDataset",
    "scaled_cardinalities",
    "string_id",
]
