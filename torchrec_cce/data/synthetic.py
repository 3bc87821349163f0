"""Criteo-shaped synthetic click data with planted cluster structure and a known Bayes floor.

The generative model, fixed by ``seed``:

* 26 categorical features with Criteo Kaggle's cardinalities times ``scale`` (at least
  ``min_cardinality``). A row draws each feature's popularity rank from a truncated power law
  (Zipf, exponent ``zipf_exponent``) by inverse CDF and maps rank -> id through the bijection
  ``(rank * a + b) % card`` (``a`` coprime to ``card``), so popular ids are not the small ids.
* Each id has a latent vector (``latent_dim`` = 8): one of ``num_clusters`` per-feature
  centres, picked by :func:`torchrec_cce.hashing.hash_ids`, plus small uniform noise read from
  the bytes of a seeded ``mix64`` hash of the id. Nothing of size O(cardinality) is stored.
  The clusters are the structure CCE's re-clustering can find.
* 13 dense features ``log1p(n)``, ``n`` a non-negative integer whose log is correlated with a
  projection of the summed latents.
* A fixed teacher: ``logit = bias + FM(latents) + <w, latents> + <u, standardized dense>`` with
  each term scaled to a set spread and ``bias`` calibrated to a click rate of ``click_rate``;
  ``label ~ Bernoulli(sigmoid(logit))``.

Batch ``j`` of a split is a pure function of ``(seed, split, j, batch_size)``: it is generated
from a ``torch.Generator`` seeded with those, so any number of rows streams with no storage,
and "train" and "test" come from different seed streams of the same world. Rank ``r`` of
``world_size`` reads batches ``r, r + world_size, ...``, so the union over ranks is the same
data for any world size. The default ``scale = 0.001`` (largest table 10,131 rows, ~34k ids in
all) fits a 2-core CPU demo; ``scale=1`` gives Criteo Kaggle's real sizes at the same speed
(generation never touches a per-id table). :meth:`CriteoSyntheticDataset.bayes_logloss` is the
log loss of the true probabilities on a split's labels: the floor no model can beat.
"""

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, INT_FEATURE_COUNT
from torchrec.datasets.utils import Batch

from torchrec_cce.data.common import check_num_embeddings, check_rank, make_batch, remap_ids
from torchrec_cce.data.criteo import CRITEO_KAGGLE_CARDINALITIES
from torchrec_cce.hashing import derive_seed, hash_ids, mix64

DEFAULT_SCALE = 0.001
DEFAULT_NUM_BATCHES: Dict[str, int] = {"train": 1024, "val": 128, "test": 128}
_BYTE_STD = math.sqrt((256**2 - 1) / 12)  # std of a uniform byte


def _signed(x: int) -> int:
    """The int64 with the low 64 bits of ``x``."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)  # splitmix64's increment: spreads consecutive keys


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch ops on one thread, then restore the thread count.

    Generation is ~50 elementwise ops on ~1 MB tensors: intra-op threads cost more than they
    save there, and on a busy machine they can slow a batch down tenfold.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scaled_cardinalities(scale: float = DEFAULT_SCALE, min_cardinality: int = 3) -> List[int]:
    """Criteo Kaggle's 26 cardinalities times ``scale``, each at least ``min_cardinality``."""
    return [max(min_cardinality, int(round(c * scale))) for c in CRITEO_KAGGLE_CARDINALITIES]


def _coprime_multiplier(key: int, card: int) -> int:
    """A multiplier in ``[1, card)`` coprime to ``card`` (1 when card <= 2)."""
    a = key % card
    while card > 2 and (a == 0 or math.gcd(a, card) != 1):
        a = (a + 1) % card
    return max(a, 1)


class _World:
    """The fixed generative model (ids, latents, teacher) of one seed."""

    def __init__(
        self,
        seed: int,
        cardinalities: List[int],
        zipf_exponent: float,
        latent_dim: int,
        num_clusters: int,
        noise_scale: float,
        click_rate: float,
    ) -> None:
        if not 1 <= latent_dim <= 8:
            raise ValueError(f"latent_dim must be in [1, 8] (a hash byte per coordinate), got {latent_dim}")
        if zipf_exponent <= 0:
            raise ValueError(f"zipf_exponent must be positive, got {zipf_exponent}")
        self.seed = seed
        self.num_features = F = len(cardinalities)
        self.card = torch.tensor(cardinalities, dtype=torch.int64)
        self.card_float = self.card.to(torch.float64)
        self.card_plus_one = self.card_float + 1.0
        self.exponent = zipf_exponent
        self.num_clusters = num_clusters
        self.noise_scale = noise_scale
        a = [_coprime_multiplier(derive_seed(seed, "synthetic/perm", f, "a"), c)
             for f, c in enumerate(cardinalities)]
        b = [derive_seed(seed, "synthetic/perm", f, "b") % c for f, c in enumerate(cardinalities)]
        self.perm_a = torch.tensor(a, dtype=torch.int64)
        self.perm_b = torch.tensor(b, dtype=torch.int64)
        self.latent_dim = latent_dim
        self.cluster_key = derive_seed(seed, "synthetic/latent", 0, "cluster")
        self.noise_key = _signed(derive_seed(seed, "synthetic/latent", 0, "noise"))
        self.feature_offset = torch.arange(F, dtype=torch.int64)
        self.cluster_offset = self.feature_offset * num_clusters

        g = torch.Generator().manual_seed(derive_seed(seed, "synthetic/teacher"))
        D = INT_FEATURE_COUNT
        # Noise byte n in [0, 256) adds noise_step * n; the centres absorb its mean so the
        # noise has mean 0 and std noise_scale per coordinate.
        self.noise_step = noise_scale / _BYTE_STD
        self.centres = torch.randn(F * num_clusters, latent_dim, generator=g) - 127.5 * self.noise_step
        self.w_linear = torch.randn(F * latent_dim, generator=g)
        self.projection = torch.randn(latent_dim, D, generator=g)
        self.dense_mu = torch.rand(D, generator=g) * 4.0  # typical log-count of each dense feature
        self.dense_sigma = 0.5 + torch.rand(D, generator=g)
        self.w_dense = torch.randn(D, generator=g)
        self._calibrate(click_rate)

    # --- sampling -------------------------------------------------------------------------
    def sample_ids(self, u: torch.Tensor) -> torch.Tensor:
        """Uniforms ``[B, F]`` (float64) -> ids: Zipf rank by inverse CDF, then the bijection."""
        n = self.card_plus_one
        if abs(self.exponent - 1.0) < 1e-9:
            x = torch.exp(u * n.log())
        else:  # x = (1 - u (1 - n^e))^(1/e), e = 1 - exponent; exp/log is faster than pow
            e = 1.0 - self.exponent
            x = torch.exp(torch.log1p(-u * (1.0 - n.pow(e))) * (1.0 / e))
        rank = torch.minimum(x, self.card_float).long() - 1  # x in [1, card + 1)
        return (rank * self.perm_a + self.perm_b) % self.card

    def latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, F]`` -> latent vectors ``[B, F, latent_dim]``: centre + hashed noise.

        The centre is picked by ``hash_ids``; the noise coordinates are the bytes of one
        64-bit ``mix64`` hash (uniform on 256 levels, read little-endian).
        """
        B, F = ids.shape
        folded = ids * F + self.feature_offset  # one key per (feature, id)
        cluster = hash_ids(folded, self.cluster_key, self.num_clusters) + self.cluster_offset
        noise_bits = mix64(folded * _GOLDEN + self.noise_key)
        noise = noise_bits.view(torch.uint8).view(B, F, 8)[..., : self.latent_dim]
        v = self.centres.index_select(0, cluster.view(-1)).view(B, F, self.latent_dim)
        return v.add_(noise.float(), alpha=self.noise_step)

    def sample(self, g: torch.Generator, batch_size: int) -> Dict[str, torch.Tensor]:
        """One batch and the teacher's parts: ids, dense, fm, linear, dense_term, logit, probs."""
        u = torch.rand(batch_size, self.num_features, generator=g, dtype=torch.float64)
        ids = self.sample_ids(u)
        v = self.latents(ids)
        flat = v.view(batch_size, -1)
        s = v.sum(1)
        z = (s @ self.projection - self.z_mean) / self.z_std
        eps = torch.randn(batch_size, INT_FEATURE_COUNT, generator=g)
        log_count = self.dense_mu + self.dense_sigma * (0.8 * z + 0.6 * eps)
        dense = torch.log1p(torch.floor(torch.expm1(log_count).clamp_min(0)))
        out = {
            "ids": ids,
            "dense": dense,
            "fm": 0.5 * (torch.linalg.vecdot(s, s) - torch.linalg.vecdot(flat, flat)),
            "linear": flat @ self.w_linear,
            "dense_term": ((dense - self.dense_mean) / self.dense_std) @ self.w_dense,
        }
        out["logit"] = (
            self.bias
            + self.fm_scale * out["fm"]
            + self.linear_scale * out["linear"]
            + self.dense_scale * out["dense_term"]
        )
        out["probs"] = torch.sigmoid(out["logit"])
        return out

    # --- calibration: set the teacher's scales and bias on a fixed calibration sample -------
    @_single_threaded()
    def _calibrate(self, click_rate: float, rows: int = 16384) -> None:
        self.z_mean, self.z_std = torch.zeros(INT_FEATURE_COUNT), torch.ones(INT_FEATURE_COUNT)
        self.dense_mean, self.dense_std = torch.zeros(INT_FEATURE_COUNT), torch.ones(INT_FEATURE_COUNT)
        self.bias, self.fm_scale, self.linear_scale, self.dense_scale = 0.0, 1.0, 1.0, 1.0

        def draw() -> Dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "synthetic/calibration"))
            return self.sample(g, rows)

        s = self.latents(draw()["ids"]).sum(1) @ self.projection
        self.z_mean, self.z_std = s.mean(0), s.std(0)
        parts = draw()
        self.dense_mean, self.dense_std = parts["dense"].mean(0), parts["dense"].std(0).clamp_min(1e-6)
        parts = draw()
        # Spread of each term of the logit: interactions dominate, dense features help a bit.
        self.fm_scale = 1.2 / parts["fm"].std().item()
        self.linear_scale = 0.8 / parts["linear"].std().item()
        self.dense_scale = 0.5 / parts["dense_term"].std().item()
        logit = (
            self.fm_scale * parts["fm"]
            + self.linear_scale * parts["linear"]
            + self.dense_scale * parts["dense_term"]
        )
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection: mean sigmoid(logit + bias) = click_rate
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if torch.sigmoid(logit + mid).mean().item() < click_rate else (lo, mid)
        self.bias = 0.5 * (lo + hi)


class CriteoSyntheticDataset(IterableDataset):
    """Streams one split of the Criteo-shaped synthetic data as ``Batch`` es.

    Args:
        split: "train", "val" or "test" (independent seed streams of the same world).
        batch_size: rows per batch.
        num_batches: batches per epoch over all ranks (default 1024 train, 128 val/test).
        rank, world_size: this rank reads global batches ``rank::world_size``; pick
            ``num_batches`` divisible by ``world_size`` for equal batch counts per rank.
        seed: fixes the world (ids, latents, teacher) and the data.
        scale: multiplies Criteo Kaggle's cardinalities (default 0.001).
        num_embeddings_per_feature: if given, ids are taken modulo these table sizes.
        zipf_exponent, latent_dim, num_clusters, noise_scale, click_rate: the generative model.

    Attributes:
        cardinalities: the scaled Criteo list; ids lie in ``[0, cardinalities[f])``.
        num_embeddings_per_feature: the table sizes ids fall in (``cardinalities`` by default).
        num_batches: global batches per epoch; ``len(ds)`` / ``batches_per_epoch``: this rank's.
    """

    def __init__(
        self,
        split: str = "train",
        batch_size: int = 4096,
        num_batches: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        scale: float = DEFAULT_SCALE,
        num_embeddings_per_feature: Optional[List[int]] = None,
        min_cardinality: int = 3,
        zipf_exponent: float = 1.1,
        latent_dim: int = 8,
        num_clusters: int = 16,
        noise_scale: float = 0.2,
        click_rate: float = 0.25,
    ) -> None:
        if split not in DEFAULT_NUM_BATCHES:
            raise ValueError(f"split must be one of {list(DEFAULT_NUM_BATCHES)}, got {split!r}")
        check_rank(rank, world_size)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.num_batches = DEFAULT_NUM_BATCHES[split] if num_batches is None else int(num_batches)
        if self.num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.keys: List[str] = list(DEFAULT_CAT_NAMES)
        self.cardinalities: List[int] = scaled_cardinalities(scale, min_cardinality)
        self._sizes = check_num_embeddings(num_embeddings_per_feature, len(self.keys))
        self.num_embeddings_per_feature: List[int] = self._sizes or list(self.cardinalities)
        self._world = _World(
            seed, self.cardinalities, zipf_exponent, latent_dim, num_clusters, noise_scale, click_rate
        )

    def batch_indices(self) -> range:
        """Global indices of the batches this rank reads in one epoch."""
        return range(self.rank, self.num_batches, self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batch_indices())

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch_with_probs(self, index: int, split: Optional[str] = None) -> Tuple[Batch, torch.Tensor]:
        """Global batch ``index`` of ``split`` (default: this dataset's) and the true click
        probabilities of its rows."""
        split = split or self.split
        if split not in DEFAULT_NUM_BATCHES:
            raise ValueError(f"unknown split {split!r}")
        key = derive_seed(self.seed, f"synthetic/{split}", index, str(self.batch_size))
        g = torch.Generator().manual_seed(key)
        with _single_threaded():
            out = self._world.sample(g, self.batch_size)
            labels = torch.bernoulli(out["probs"], generator=g)
            ids = remap_ids(out["ids"], self._sizes)
            return make_batch(out["dense"], ids, labels, self.keys), out["probs"]

    def batch(self, index: int) -> Batch:
        """Global batch ``index`` of this split."""
        return self.batch_with_probs(index)[0]

    def bayes_logloss(self, num_batches: Optional[int] = None, split: Optional[str] = None) -> float:
        """Log loss of the true click probabilities on the labels of the first ``num_batches``
        global batches of ``split`` (default: all of this dataset's batches, all ranks): the
        floor no model can beat on that data."""
        n = self.num_batches if num_batches is None else num_batches
        total, rows = 0.0, 0
        for index in range(n):
            batch, probs = self.batch_with_probs(index, split)
            loss = torch.nn.functional.binary_cross_entropy(
                probs.double(), batch.labels.double(), reduction="sum"
            )
            total += loss.item()
            rows += batch.labels.numel()
        return total / max(rows, 1)

    def __iter__(self) -> Iterator[Batch]:
        indices = self.batch_indices()
        worker = get_worker_info()
        if worker is not None:  # DataLoader workers share this rank's batches round-robin
            indices = indices[worker.id :: worker.num_workers]
        for index in indices:
            yield self.batch(index)
