"""The nearest-centroid kernels of the op library (``torchrec_cce/ops/csrc/nearest.cpp``).

:func:`nearest2` runs ``torch.ops.torchrec_cce.nearest2``: best and second-best score
``||c||^2 - 2 x.c`` and the best index of every row, without materialising distances;
:func:`nearest2_grouped` does the same over centroids grouped in bounding boxes
(:class:`CentroidGroups`), skipping the boxes that cannot hold a centroid within the caller's
near-tie margin of the best. They are built with the rest of the op library
(:func:`torchrec_cce.ops.load`, ``python -m torchrec_cce.ops``); the op call releases the GIL,
so k-means' Python worker threads run them in parallel. Where the library cannot be built,
:func:`available` is ``False`` (after the library's one-line notice) and callers use the
pure-torch path, which yields the same assignments. ``TORCHREC_CCE_NATIVE=0`` makes k-means use
the torch path without trying the library.
"""

import os
from typing import Tuple

import torch

from torchrec_cce import ops


def available() -> bool:
    """Whether the kernels can be used (builds or loads the op library on the first call)."""
    return os.environ.get("TORCHREC_CCE_NATIVE", "1") != "0" and ops.fused_available()


def simd() -> bool:
    """Whether this CPU runs the AVX2 + FMA kernels (else :func:`nearest2` runs its scalar
    kernel, with the same answers, and there is no grouped kernel)."""
    return available() and bool(torch.ops.torchrec_cce.nearest2_simd())


def nearest2(x: torch.Tensor, ct: torch.Tensor, bias: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best index int64, best score, second-best score) of each row of ``x [n, d]`` against
    centroids given as ``ct [d, kp]`` (``kp % 8 == 0``) and ``bias [kp]`` (``||c||^2``, ``inf``
    for padding); CPU float32, ``1 <= d <= 16``. Requires :func:`available`."""
    if not available():
        raise RuntimeError("nearest2: the op library is not available (python -m torchrec_cce.ops)")
    return torch.ops.torchrec_cce.nearest2(x.contiguous(), ct.contiguous(), bias.contiguous(),
                                           simd())


def grouped_supported() -> bool:
    """Whether the grouped (pruned) kernel runs here (it needs AVX2 + FMA)."""
    return simd()


def nearest2_grouped(x: torch.Tensor, groups: "CentroidGroups", xn: torch.Tensor,
                     margin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Like :func:`nearest2` (but the index is the centroid's own) over centroids arranged in
    bounding-box groups (:class:`CentroidGroups`): boxes whose distance from a row exceeds
    ``||x||^2 + best + 2 margin`` are skipped. ``xn``: ``||x||^2`` per row; ``margin``: the
    caller's near-tie margin per row (score units). Also returns the number of boxes scanned."""
    if not grouped_supported():
        raise RuntimeError("nearest2_grouped: no grouped kernel here (needs AVX2 + FMA)")
    gr = groups
    idx, best, second, visited = torch.ops.torchrec_cce.nearest2_grouped(
        x.contiguous(), gr.ct, gr.bias, gr.offsets, gr.num_groups, gr.lo, gr.hi, gr.num_supers,
        gr.super_lo, gr.super_hi, xn.contiguous(), margin.contiguous(), gr.perm)
    return idx, best, second, int(visited)


BOXES_PER_SUPER = 32  # csrc/nearest.cpp kBoxesPerSuper


class CentroidGroups:
    """Centroids ``[k, d]`` split into groups of at most ``leaf`` by a balanced k-d tree
    (median splits along the widest side), stored group by group for
    :func:`nearest2_grouped`: ``ct [d, kp]`` and ``bias [kp]`` (``||c||^2``, ``inf`` in the
    padding that rounds every group up to 8 columns), ``offsets [G + 1]``, ``perm [kp]``
    (column -> centroid index), the groups' bounding boxes ``lo``/``hi`` ``[d, gp]`` and
    those of each run of :data:`BOXES_PER_SUPER` consecutive groups (adjacent leaves of the
    tree), ``super_lo``/``super_hi`` ``[d, sp]``: the kernel bounds the superboxes first and
    the groups only inside the superboxes within reach, so a query costs ``O(G / 32)``
    bounds, not ``O(G)``.

    The tree is built level by level, every node of a level at once (two sorts per level)."""

    def __init__(self, centroids: torch.Tensor, sq: torch.Tensor, leaf: int) -> None:
        c = centroids
        k, d = c.shape
        num_leaves = max(1, -(-k // leaf))
        # order: the centroids node by node (each node a contiguous segment of it)
        order = torch.arange(k)
        starts = torch.zeros(1, dtype=torch.int64)
        sizes = torch.tensor([k], dtype=torch.int64)
        leaves = torch.tensor([num_leaves], dtype=torch.int64)
        while bool((leaves > 1).any()):
            nodes = starts.numel()
            node = torch.repeat_interleave(torch.arange(nodes), sizes)
            pts = c[order]
            where = node[:, None].expand(k, d)
            hi = torch.full((nodes, d), -float("inf")).scatter_reduce_(0, where, pts, "amax")
            lo = torch.full((nodes, d), float("inf")).scatter_reduce_(0, where, pts, "amin")
            dim = (hi - lo).argmax(1)
            key = pts.gather(1, dim[node][:, None]).squeeze(1)
            key = torch.where((leaves > 1)[node], key, torch.zeros_like(key))  # leaves: keep
            perm = torch.argsort(key, stable=True)
            perm = perm[torch.argsort(node[perm], stable=True)]  # by node, then by key
            order = order[perm]
            left = leaves // 2
            cut = torch.div(sizes * left * 2 + leaves, 2 * leaves, rounding_mode="floor")
            split = leaves > 1
            # children in order: (left, right) of split nodes, the node itself otherwise
            ls, lz, ll = starts, torch.where(split, cut, sizes), torch.where(split, left, leaves)
            rs, rz, rl = starts + cut, sizes - cut, leaves - left
            both_s = torch.stack([ls, rs], 1)
            both_z = torch.stack([lz, rz], 1)
            both_l = torch.stack([ll, rl], 1)
            keep = torch.stack([torch.ones_like(split), split], 1)
            starts, sizes, leaves = both_s[keep], both_z[keep], both_l[keep]
        self.num_groups = G = starts.numel()
        padded = (sizes + 7) // 8 * 8
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), padded.cumsum(0)])
        group = torch.repeat_interleave(torch.arange(G), sizes)
        cols = self.offsets[group] + torch.arange(k) - starts[group]
        kp = int(self.offsets[-1])
        self.num_supers = S = -(-G // BOXES_PER_SUPER)
        gp = S * BOXES_PER_SUPER
        sp = (S + 7) // 8 * 8
        pts = c[order]
        self.ct = torch.zeros(d, kp)
        self.ct[:, cols] = pts.t()
        self.bias = torch.full((kp,), float("inf"))
        self.bias[cols] = sq[order]
        self.perm = torch.zeros(kp, dtype=torch.int64)  # padding: any valid index (never wins)
        self.perm[cols] = order
        where = group[:, None].expand(k, d)
        lo = torch.full((gp, d), float("inf")).scatter_reduce_(0, where, pts, "amin")
        hi = torch.full((gp, d), -float("inf")).scatter_reduce_(0, where, pts, "amax")
        super_lo = lo.view(S, BOXES_PER_SUPER, d).amin(1)
        super_hi = hi.view(S, BOXES_PER_SUPER, d).amax(1)
        hi[G:] = float("inf")  # padding boxes: +inf on both sides (never within reach)
        self.lo, self.hi = lo.t().contiguous(), hi.t().contiguous()
        self.super_lo = torch.full((sp, d), float("inf"))
        self.super_hi = torch.full((sp, d), float("inf"))
        self.super_lo[:S], self.super_hi[:S] = super_lo, super_hi
        self.super_lo = self.super_lo.t().contiguous()
        self.super_hi = self.super_hi.t().contiguous()
