"""``CCEEmbeddingBagCollection``: a drop-in ``EmbeddingBagCollection`` with compressed tables.

Data flows one way: KJT -> :meth:`remap` (logical ids -> codebook row ids, one stream per
codebook lookup) -> ``self.codebooks`` (a stock ``torchrec.EmbeddingBagCollection`` holding every
codebook as an ordinary 2-D table) -> :meth:`compose` (pooled codebook outputs -> each logical
feature's pooled vector) -> ``KeyedTensor`` with the logical feature names.

Because the middle stage is a stock EBC, TorchRec's sharders, planner, fused optimizers and
checkpointing apply to the codebooks unchanged.

Pooling: every codebook table pools with SUM; a logical table with MEAN pooling divides the
composed sum by the bag length in :meth:`compose` (empty bags give 0). For weighted inputs this
is ``sum(w * e) / length``, fbgemm's MEAN semantics. Pooling commutes with CCE, CE, hashing,
QR-add/concat and MEmCom; QR-mult pools each table before multiplying (see ``QRConfig``).
"""

import warnings
from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.types import ShardedModule
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_configs import DataType, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from torchrec_cce.configs import CONFIG_TYPES, CompressionConfig
from torchrec_cce.methods import (
    CompressedTable,
    build_table,
    codebook_feature_name,
    codebook_table_name,
)
from torchrec_cce.ops import fused_default
from torchrec_cce.stages import (
    check_features,
    compose_pooled,
    embedding_names,
    empty_pooled,
    mean_lengths,
    remap_features,
)
from torchrec_cce.tracing import is_fx_tracing, traced_forward


def _validate_tables(
    tables: List[EmbeddingBagConfig], compression: Dict[str, CompressionConfig]
) -> None:
    names = [t.name for t in tables]
    for t in tables:
        if not t.name:
            raise ValueError("every EmbeddingBagConfig needs a non-empty name")
        if "__" in t.name:
            raise ValueError(
                f"table '{t.name}': '__' is reserved for codebook names (<table>__<codebook>); "
                f"rename the table"
            )
        if t.num_embeddings <= 0 or t.embedding_dim <= 0:
            raise ValueError(
                f"table '{t.name}': num_embeddings and embedding_dim must be positive, got "
                f"{t.num_embeddings} and {t.embedding_dim}"
            )
        if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table '{t.name}': pooling must be SUM or MEAN, got {t.pooling}")
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate table names {dups} in {names}; give every "
                         f"EmbeddingBagConfig a unique name")
    unknown = sorted(set(compression) - set(names))
    if unknown:
        raise ValueError(
            f"compression names unknown tables {unknown}; the tables are {names} "
            f"(compression keys are EmbeddingBagConfig.name, not feature names)"
        )
    for t in tables:
        features = t.feature_names or [t.name]
        if len(set(features)) != len(features):
            raise ValueError(f"table '{t.name}' lists a feature twice in {features}; list each "
                             f"feature once")


def _check_config(table: EmbeddingBagConfig, config: object) -> None:
    if not isinstance(config, CONFIG_TYPES):
        raise TypeError(
            f"table '{table.name}': compression config must be one of "
            f"{[c.__name__ for c in CONFIG_TYPES]}, got {config!r}"
        )
    config.validate(table)


def _check_budget(table: EmbeddingBagConfig, config: CompressionConfig, allow_larger: bool) -> None:
    full = table.num_embeddings * table.embedding_dim
    compressed = config.num_parameters(table)
    if compressed > full:
        msg = (
            f"table '{table.name}': {type(config).__name__} has {compressed} parameters, more "
            f"than the full table's {full}; leave the table uncompressed, shrink the config, "
            f"or pass allow_larger=True"
        )
        if not allow_larger:
            raise ValueError(msg)
        warnings.warn(msg)


def codebook_configs(
    table: EmbeddingBagConfig, method: CompressedTable, names: Optional[List[str]] = None
) -> List[EmbeddingBagConfig]:
    """The inner EBC tables of one logical table: SUM pooling, the logical table's init range
    and ``init_fn`` (every codebook row is initialised like a row of the full table), features
    ``<embedding name>__<stream>`` (``names``: the table's output keys, see
    :func:`torchrec_cce.stages.embedding_names`; default its feature names)."""
    names = names or table.feature_names or [table.name]
    return [
        EmbeddingBagConfig(
            name=codebook_table_name(table.name, cb.suffix),
            num_embeddings=cb.num_embeddings,
            embedding_dim=cb.embedding_dim,
            feature_names=[codebook_feature_name(e, s) for e in names for s in cb.streams],
            pooling=PoolingType.SUM,
            data_type=(getattr(method, "codebook_data_types", {}).get(cb.suffix)
                       or getattr(method, "codebook_data_type", None) or table.data_type),
            weight_init_min=table.get_weight_init_min(),
            weight_init_max=table.get_weight_init_max(),
            init_fn=table.init_fn,
        )
        for cb in method.codebooks
    ]


def _store_bfloat16_as_bfloat16(ebc: EmbeddingBagCollection) -> None:
    """TorchRec's unsharded EBC stores a ``DataType.BF16`` table as float16: store it as
    bfloat16, as the sharded TBE does (same values after rounding, same bytes)."""
    for config in ebc.embedding_bag_configs():
        if config.data_type == DataType.BF16:
            bag = ebc.embedding_bags[config.name]
            bag.weight = nn.Parameter(bag.weight.detach().to(torch.bfloat16))


class CCEEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An ``EmbeddingBagCollection`` whose tables may be compressed.

    Args:
        tables: the logical tables, exactly as for ``torchrec.EmbeddingBagCollection``.
        compression: ``{table name: config}`` (``CCEConfig``, ``CEConfig``,
            ``HashingTrickConfig``, ``QRConfig``, ``MEmComConfig``); tables not named stay full.
        is_weighted: whether input KJTs carry per-id weights.
        device: where to build (``torch.device("meta")`` for planning/DMP).
        allow_larger: a config with more parameters than its full table raises ``ValueError``
            unless this is True (then it only warns).
        fused: remap with the fused C++ op (``torchrec_cce.ops``) instead of the torch-ops
            reference path; None (default): fused unless ``TORCHREC_CCE_FUSED=0`` or the op
            cannot be built/loaded (then one logged notice). Both give identical results.

    Example::

        ebc = CCEEmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="t_user", embedding_dim=64,
                                       num_embeddings=10_000_000, feature_names=["user"])],
            compression={"t_user": CCEConfig(rows=4096, chunks=4)},
        )
        pooled = ebc(kjt)  # KeyedTensor with key "user", 64 columns
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression: Optional[Dict[str, CompressionConfig]] = None,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        allow_larger: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__()
        compression = dict(compression or {})
        _validate_tables(tables, compression)
        for t in tables:
            if not t.feature_names:
                t.feature_names = [t.name]
            if t.name in compression:
                _check_config(t, compression[t.name])
                _check_budget(t, compression[t.name], allow_larger)
        # device=None builds where torch's default device points (``with torch.device(...)``),
        # as TorchRec's EBC does.
        device = torch.device(device) if device is not None else torch.empty(0).device
        self._embedding_bag_configs = tables
        self._compression = compression
        self._is_weighted = is_weighted
        self._fused = fused
        self._fused_resolved: Optional[bool] = None
        self._remap_cache: Dict[object, object] = {}
        self._compose_cache: Dict[object, object] = {}
        self._trace_cache: Dict[object, object] = {}
        self._device = device
        # TorchRec's EBC attributes: features per table, output keys and widths.
        self._feature_names: List[List[str]] = [list(t.feature_names) for t in tables]
        names = embedding_names(tables)
        self._embedding_names: List[str] = [e for table_names in names for e in table_names]
        self._lengths_per_embedding: List[int] = [
            t.embedding_dim for t in tables for _ in t.feature_names]
        self.tables: nn.ModuleDict = nn.ModuleDict(
            {t.name: build_table(t, compression.get(t.name), device=device) for t in tables}
        )
        self._feature_table: Dict[str, str] = {}
        for t in tables:  # a feature served by several tables maps to the first
            for f in t.feature_names:
                self._feature_table.setdefault(f, t.name)
        self._inner_weighted = is_weighted or any(
            m.method_name == "memcom" or getattr(m, "id_weighted", False)
            for m in self.tables.values()
        )
        inner = [c for t, table_names in zip(tables, names)
                 for c in codebook_configs(t, self.tables[t.name], table_names)]
        self.codebooks = EmbeddingBagCollection(
            tables=inner, is_weighted=self._inner_weighted, device=device
        )
        _store_bfloat16_as_bfloat16(self.codebooks)
        self.register_load_state_dict_pre_hook(_load_stock_ebc_keys)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "codebooks" and isinstance(value, ShardedModule):
            # DMP shards the inner stock EBC when no sharder handles this module.
            raise TypeError(
                "DistributedModelParallel is sharding the codebooks inside a "
                "CCEEmbeddingBagCollection with TorchRec's EmbeddingBagCollectionSharder, which "
                "cannot run the remap/compose stages: pass our sharder, e.g. "
                "DistributedModelParallel(model, sharders=[CCEEmbeddingBagCollectionSharder(), "
                "*get_default_sharders()], ...) (from torchrec_cce.distributed import "
                "CCEEmbeddingBagCollectionSharder; from torchrec.distributed.sharding_plan import "
                "get_default_sharders), and plan with the same sharders"
            )
        super().__setattr__(name, value)

    # ---- EmbeddingBagCollectionInterface ----
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The logical tables (so DLRM and other TorchRec models accept this module)."""
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def compression(self) -> Dict[str, CompressionConfig]:
        return dict(self._compression)

    def feature_names(self) -> List[str]:
        """Every served feature, table by table (a feature served by several tables appears
        once per table, as in TorchRec's EBC)."""
        return [f for t in self._embedding_bag_configs for f in t.feature_names]

    @property
    def embedding_bags(self) -> nn.ModuleDict:
        """The codebook tables by name, as TorchRec's EBC's ``embedding_bags`` (an uncompressed
        table keeps its name; a compressed one's are ``<table>__<codebook>``)."""
        return self.codebooks.embedding_bags

    def codebook_table_configs(self) -> List[EmbeddingBagConfig]:
        """The inner codebook tables, as the sharding planner sees them."""
        return self.codebooks.embedding_bag_configs()

    def reset_parameters(self) -> None:
        """Re-initialise every table as at construction (TorchRec's
        ``EmbeddingBagCollection.reset_parameters``): codebook rows by their table's
        ``init_fn``, CCE's ``p`` back to its initial hash, MEmCom's weights to 1, MPE's master
        weights to their seeded initial values. No-op on the meta device."""
        if self._device.type == "meta":
            return
        self.codebooks.reset_parameters()
        for method in self.tables.values():
            reset = getattr(method, "reset_parameters", None)
            if reset is not None:
                reset()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if is_fx_tracing():  # torch.fx / torchrec.fx.symbolic_trace: see torchrec_cce/tracing.py
            return traced_forward(self, features)
        if features.stride() == 0:  # a batch of no examples (stock TorchRec's EBC fails on it)
            self.check_features(features)
            return empty_pooled(self._embedding_bag_configs, features.values().device)
        remapped = self.remap(features)
        if not self.codebooks.embedding_bag_configs():  # only self-looked-up (MPE) tables
            empty = torch.empty(features.stride(), 0, device=features.values().device)
            return self.compose(features, KeyedTensor(keys=[], length_per_key=[], values=empty))
        return self.compose(features, self.codebooks(remapped))

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script(collection)`` scripts its fx trace (see torchrec_cce/tracing.py):
        TorchRec's ``symbolic_trace`` of this module, which TorchScript compiles."""
        return symbolic_trace(self)

    # ---- the two stages (shared with the sharded module: see torchrec_cce/stages.py) ----
    def check_features(self, features: KeyedJaggedTensor) -> None:
        """Raise ``KeyError`` if the KJT lacks a served feature (other keys are ignored)."""
        check_features(self._feature_table, self.feature_names(), features)

    @property
    def fused(self) -> bool:
        """Whether the remap runs the fused C++ op (resolved on first use)."""
        if self._fused_resolved is None:
            self._fused_resolved = fused_default(self._fused)
        return self._fused_resolved

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Remap stage: logical KJT -> KJT of codebook row ids (keys ``<feature>__<stream>``)."""
        self.check_features(features)
        return remap_features(self._embedding_bag_configs, self.tables, features,
                              self._is_weighted, self._inner_weighted, fused=self.fused,
                              cache=self._remap_cache)

    def _compose_lengths(self, features: KeyedJaggedTensor) -> Dict[str, object]:
        """What compose needs of the input: MEAN features' bag lengths, and the JaggedTensor of
        every feature of a table that looks itself up (MPE)."""
        lengths: Dict[str, object] = dict(mean_lengths(self._embedding_bag_configs, features))
        local = [f for t in self._embedding_bag_configs
                 if getattr(self.tables[t.name], "local_lookup", False) for f in t.feature_names]
        if local:
            per_feature = features.to_dict()
            lengths.update({f: per_feature[f] for f in local})
        return lengths

    def compose(self, features: KeyedJaggedTensor, pooled: KeyedTensor) -> KeyedTensor:
        """Compose stage: pooled codebook outputs -> ``KeyedTensor`` of the logical features."""
        return compose_pooled(self._embedding_bag_configs, self.tables,
                              self._compose_lengths(features), pooled, self._is_weighted,
                              cache=self._compose_cache)


def _load_stock_ebc_keys(module: CCEEmbeddingBagCollection, state_dict: Dict[str, object],
                         prefix: str, *args: object) -> None:
    """``load_state_dict`` pre-hook: a stock ``EmbeddingBagCollection``'s keys
    (``embedding_bags.<table>.weight``) load into the uncompressed tables
    (``codebooks.embedding_bags.<table>.weight``), so a model can start from a trained full
    one. Keys of compressed tables stay unexpected (their rows are not the vectors:
    ``torchrec_cce.warm_start`` builds them from trained rows)."""
    full = {t.name for t in module.embedding_bag_configs() if t.name not in module._compression}
    for table in full:
        stock = f"{prefix}embedding_bags.{table}.weight"
        ours = f"{prefix}codebooks.embedding_bags.{table}.weight"
        if stock in state_dict and ours not in state_dict:
            state_dict[ours] = state_dict.pop(stock)
