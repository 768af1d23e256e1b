"""How a module's layout cuts each tensor: inferred when saving, replayed for a new layout.

A split spec lists, for every tensor dimension, the parallel dimensions that cut it, major first
(`(("pp",), ("tp", "dp"))`: dim 0 by PP, dim 1 by TP and, inside each TP part, by DP). Offline
tools use it to choose boxes under another layout; correctness never depends on it, since any
tiling loads under any layout.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

from .box import Box
from .layout import PARALLEL_DIMS, ModuleLayout

__all__ = ["SplitSpec", "infer_split", "box_for_rank", "boxes_for_layout"]

SplitSpec = tuple[tuple[str, ...], ...]


def infer_split(layout: ModuleLayout, boxes_by_rank: Mapping[int, Box], ndim: int) -> SplitSpec:
    """Which parallel dims move each tensor dim's offset, ordered by how far they move it."""
    coords = {rank: layout.coords(rank) for rank in boxes_by_rank}
    by_coords = {tuple(c[d] for d in PARALLEL_DIMS): rank for rank, c in coords.items()}
    jump: list[dict[str, int]] = [defaultdict(int) for _ in range(ndim)]
    for rank, box in boxes_by_rank.items():
        here = coords[rank]
        for i, p in enumerate(PARALLEL_DIMS):
            nxt = tuple(here[d] + (1 if j == i else 0) for j, d in enumerate(PARALLEL_DIMS))
            other = by_coords.get(nxt)
            if other is None:
                continue
            for d in range(ndim):
                delta = abs(boxes_by_rank[other].offset[d] - box.offset[d])
                if delta:
                    jump[d][p] = max(jump[d][p], delta)
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
