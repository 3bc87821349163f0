"""Shared helpers for the foundation tests: an independent pure-Python reference of the hash
family (splitmix64 on Python ints, written from the published algorithm, not from the
package's torch code), a KJT builder, and a plain-indexing reference of every method's pooled
output computed from a module's own codebook weights (for MPE: from its master weights, logits,
steps and offsets through the documented LSQ+ formula, not through the module's forward)."""

import functools
import math

from typing import Dict, List, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from torchrec_cce import CCEConfig, CEConfig, HashingTrickConfig, MEmComConfig, MPEConfig, QRConfig
from torchrec_cce.hashing import derive_seed

M64 = (1 << 64) - 1
M63 = (1 << 63) - 1
GOLDEN = 0x9E3779B97F4A7C15

# The tests use tiny tensors: intra-op threads only add contention (embedding_bag on 2 threads
# was ~15x slower than on 1 here).
torch.set_num_threads(1)


def ref_mix64(x: int) -> int:
    """The splitmix64 finaliser on an unsigned 64-bit Python int."""
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_hash(x: int, key: int, rows: int) -> int:
    """hash_ids on one id: mix(mix(id + key * golden) + golden), sign bit dropped, mod rows."""
    h = ref_mix64((ref_mix64((x + key * GOLDEN) & M64) + GOLDEN) & M64)
    return (h & M63) % rows


def ref_combine(base_key: int, generation: int) -> int:
    """combine_keys: mix(generation * golden + base_key) with the sign bit dropped."""
    return ref_mix64((generation * GOLDEN + base_key) & M64) & M63


def make_kjt(bags: Dict[str, List[List[int]]],
             weights: Optional[Dict[str, List[List[float]]]] = None) -> KeyedJaggedTensor:
    """``{feature: [bag ids, ...]}`` (same batch size for every feature) -> KJT."""
    keys = list(bags)
    values = [x for k in keys for bag in bags[k] for x in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    w = None
    if weights is not None:
        w = torch.tensor([x for k in keys for bag in weights[k] for x in bag], dtype=torch.float32)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64), weights=w)


def _weight(ebc, name: str) -> torch.Tensor:
    return ebc.codebooks.embedding_bags[name].weight


def ref_mpe_group(cfg: MPEConfig, num_embeddings: int, x: int) -> int:
    """MPE's documented grouping: ids ranked by descending training count (stable), groups of
    ``ceil(V / groups)`` consecutive ranks; ids already frequency-ordered (counts of ids 1..V-1
    non-increasing, the OOV id 0 first) keep rank = id."""
    size = -(-num_embeddings // cfg.groups)
    return _ref_mpe_rank(tuple(int(c) for c in cfg.counts), x) // size


@functools.lru_cache(maxsize=64)
def _ref_mpe_ranks(counts: tuple) -> Dict[int, int]:
    if all(counts[i] >= counts[i + 1] for i in range(1, len(counts) - 1)):
        return {i: i for i in range(len(counts))}
    order = sorted(range(len(counts)), key=lambda i: -counts[i])  # sorted() is stable
    return {x: r for r, x in enumerate(order)}


def _ref_mpe_rank(counts: tuple, x: int) -> int:
    return _ref_mpe_ranks(counts)[x]


def ref_lsq(w: torch.Tensor, alpha: float, beta: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ+ value of one fp32 row at ``bits`` (the quantiser's documented formula):
    ``clamp(round((w - beta) / a), -2^(b-1), 2^(b-1) - 1) * a + beta`` with ``a = |alpha| +
    1e-10``; 0 bits = pruned (0, no offset). fp32 element-wise ops, so the rounding points are
    those of fp32 arithmetic."""
    if bits == 0:
        return torch.zeros_like(w)
    a = torch.tensor(abs(alpha), dtype=torch.float32) + torch.tensor(1e-10, dtype=torch.float32)
    u = (w - beta) / a
    codes = torch.tensor([min(max(round(float(v)), -2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                          for v in u], dtype=torch.float32)
    return codes * a + beta


def ref_mpe_row(m, cfg: MPEConfig, table: EmbeddingBagConfig, x: int) -> torch.Tensor:
    """One MPE row as the model uses it: search = ``sum_b softmax(logits_g / tau)_b * q_b(w)``
    (softmax in float64 here), retrain = ``q_{selected_g}(w)``, warm-up = ``w``."""
    w, beta = m.weight.detach()[x].float(), m.offsets().detach().float()
    stage = int(m.stage)
    if stage == 0:
        return w.clone()
    g = ref_mpe_group(cfg, table.num_embeddings, x)
    alphas = [float(a) for a in m.steps().detach()]
    if stage == 2:
        b = int(m.selected[g])
        return ref_lsq(w, alphas[list(cfg.bits).index(b)], beta, b)
    z = [float(v) / cfg.tau for v in m.logits.detach()[g]]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    p = [v / sum(e) for v in e]
    return sum(pb * ref_lsq(w, a, beta, b) for pb, a, b in zip(p, alphas, cfg.bits))


def ref_parts(ebc, table: EmbeddingBagConfig, x: int) -> List[torch.Tensor]:
    """The per-id vectors of one id, recomputed from the documented hash keys and layouts.

    Returns one vector for linear methods, ``[Q[q], R[r]]`` for QR."""
    n, cfg = table.name, ebc.compression.get(table.name)
    if cfg is None:
        return [_weight(ebc, n)[x]]
    if isinstance(cfg, HashingTrickConfig):
        return [_weight(ebc, f"{n}__hash")[ref_hash(x, derive_seed(cfg.seed, n, 0, "hash"), cfg.rows)]]
    if isinstance(cfg, CEConfig):
        w = _weight(ebc, f"{n}__ce")
        return [torch.cat([w[i * cfg.rows + ref_hash(x, derive_seed(cfg.seed, n, i, "ce"), cfg.rows)]
                           for i in range(cfg.chunks)])]
    if isinstance(cfg, MEmComConfig):
        row = ref_hash(x, derive_seed(cfg.seed, n, 0, "memcom"), cfg.rows)
        return [ebc.tables[n].id_weight[x % table.num_embeddings] * _weight(ebc, f"{n}__memcom")[row]]
    if isinstance(cfg, MPEConfig):
        if not 0 <= x < table.num_embeddings:
            raise ValueError(f"MPE id {x} outside [0, {table.num_embeddings})")
        # a served (exported) table is checked against the trained table it was exported from
        trained = getattr(ebc, "trained_mpe_tables", {}).get(n, ebc.tables[n])
        return [ref_mpe_row(trained, cfg, table, x)]
    if isinstance(cfg, QRConfig):
        xr = x % table.num_embeddings  # python % is floor-mod, like torch.remainder
        return [_weight(ebc, f"{n}__qr_q")[xr // cfg.collisions],
                _weight(ebc, f"{n}__qr_r")[xr % cfg.collisions]]
    if isinstance(cfg, CCEConfig):
        m = ebc.tables[n]
        gen, rows = int(m.h_generation), cfg.rows
        chunks = []
        for i in range(cfg.chunks):
            if 0 <= x < m.assigned_ids:
                p = int(m.read_assignment(torch.tensor([x]))[0, i])
            else:
                p = ref_hash(x, derive_seed(cfg.seed, n, i, "p"), rows)
            h = ref_hash(x, ref_combine(derive_seed(cfg.seed, n, i, "h"), gen), rows)
            # One codebook table: chunk i's A_i in rows [2i*rows, (2i+1)*rows), then B_i.
            w = _weight(ebc, f"{n}__cce")
            chunks.append(w[2 * i * rows + p] + w[(2 * i + 1) * rows + h])
        return [torch.cat(chunks)]
    raise TypeError(cfg)


def ref_pool(ebc, table: EmbeddingBagConfig, bag: Sequence[int],
             weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Reference pooled vector of one bag.

    SUM: sum_j w_j e(x_j); MEAN: that sum / len(bag) (empty bag -> 0).
    QR-mult (not linear) pools each table first: SUM -> (sum_j w_j Q_j) * (sum_j w_j R_j);
    MEAN -> (sum_j w_j Q_j / n) * (sum_j w_j R_j / n), i.e. mean(Q) * mean(R) as in the DLRM
    reference's QREmbeddingBag."""
    cfg = ebc.compression.get(table.name)
    if not bag:
        return torch.zeros(table.embedding_dim)
    w = [1.0] * len(bag) if weights is None else list(weights)
    per_id = [ref_parts(ebc, table, x) for x in bag]
    sums = [sum(wj * p[k] for wj, p in zip(w, per_id)) for k in range(len(per_id[0]))]
    mean = table.pooling == PoolingType.MEAN
    if isinstance(cfg, QRConfig):
        if mean:
            sums = [s / len(bag) for s in sums]
        if cfg.operation == "mult":
            return sums[0] * sums[1]
        return sums[0] + sums[1] if cfg.operation == "add" else torch.cat(sums)
    return sums[0] / len(bag) if mean else sums[0]


def ref_forward(ebc, bags: Dict[str, List[List[int]]],
                weights: Optional[Dict[str, List[List[float]]]] = None) -> Dict[str, torch.Tensor]:
    """``{feature: [batch, dim]}`` reference output for the bags given to :func:`make_kjt`."""
    out = {}
    for t in ebc.embedding_bag_configs():
        for f in t.feature_names:
            out[f] = torch.stack([
                ref_pool(ebc, t, bag, None if weights is None else weights[f][b])
                for b, bag in enumerate(bags[f])])
    return out
