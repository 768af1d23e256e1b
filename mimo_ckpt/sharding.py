"""How a module's layout cuts each tensor: inferred when saving, replayed for a new layout.

A split spec lists, for every tensor dimension, the parallel dimensions that cut it, major first
(`(("pp",), ("tp", "dp"))`: dim 0 by PP, dim 1 by TP and, inside each TP part, by DP). Offline
tools use it to choose boxes under another layout; correctness never depends on it, since any
tiling loads under any layout.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .box import Box
from .layout import ModuleLayout

__all__ = ["SplitSpec", "infer_split", "box_for_rank", "boxes_for_layout"]

SplitSpec = tuple[tuple[str, ...], ...]


def infer_split(layout: ModuleLayout, boxes_by_rank: Mapping[int, Box], ndim: int) -> SplitSpec:
    """Which parallel dims move each tensor dim's offset, ordered by how far they move it.

    For every rank and parallel dim p, compare the rank's box offset with that of its neighbour one
    step further along p; the largest move per (tensor dim, p) ranks the cutting dims. Vectorised:
    it runs once per tensor for every rank of the module."""
    if not boxes_by_rank or ndim == 0:
        return tuple(() for _ in range(ndim))
    ranks = np.fromiter(boxes_by_rank, dtype=np.int64)
    offsets = np.array([boxes_by_rank[r].offset for r in boxes_by_rank], dtype=np.int64).reshape(len(ranks), ndim)
    row_of = np.full(layout.size, -1, dtype=np.int64)
    row_of[ranks - layout.rank_offset] = np.arange(len(ranks))
    index = ranks - layout.rank_offset
    jump: list[dict[str, int]] = [{} for _ in range(ndim)]
    stride = 1
    for p in layout.order:
        size = getattr(layout, p)
        has_next = (index // stride) % size + 1 < size
        rows = np.nonzero(has_next)[0]
        neighbour = row_of[index[rows] + stride]
        keep = neighbour >= 0
        if keep.any():
            moves = np.abs(offsets[neighbour[keep]] - offsets[rows[keep]]).max(axis=0)
            for d in range(ndim):
                if moves[d]:
                    jump[d][p] = int(moves[d])
        stride *= size
    return tuple(tuple(sorted(j, key=lambda p: (-j[p], p))) for j in jump)


def _part(n: int, parts: int, index: int) -> tuple[int, int]:
    """Offset and size of part `index` of `n` split as evenly as possible."""
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def box_for_rank(split: SplitSpec, global_shape: tuple[int, ...], layout: ModuleLayout, rank: int) -> Box:
    coords = layout.coords(rank)
    offset, shape = [], []
    for size, dims in zip(global_shape, split):
        index, parts = 0, 1
        for p in dims:  # major first: mixed radix
            index = index * getattr(layout, p) + coords[p]
            parts *= getattr(layout, p)
        o, s = _part(size, parts, index)
        offset.append(o)
        shape.append(s)
    return Box(tuple(offset), tuple(shape))


def boxes_for_layout(split: SplitSpec, global_shape: tuple[int, ...], layout: ModuleLayout) -> dict[int, Box]:
    return {rank: box_for_rank(split, global_shape, layout, rank) for rank in layout.ranks}
