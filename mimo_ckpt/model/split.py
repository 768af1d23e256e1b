"""How a module's layout cuts each tensor: inferred when saving, replayed for a new layout.

A split spec lists, for every tensor dimension, the parallel dimensions that cut it, major first
(`(("pp",), ("tp", "dp"))`: dim 0 by PP, dim 1 by TP and, inside each TP part, by DP). Offline
tools use it to choose boxes under another layout; correctness never depends on it, since any
tiling loads under any layout.

Replay is hierarchical: each parallel dim of a spec cuts the part chosen by the dims before it,
with `balanced_part`. The one exception is ZeRO: optimizer state is split over the dp x cp group
as one flat range (`optim.params.zero1_rows`), so dp and cp next to each other form one level.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from mimo_ckpt.model.box import Box
from mimo_ckpt.model.layout import ModuleLayout

__all__ = [
    "SplitSpec", "MUST_DIVIDE", "balanced_part", "split_levels", "uneven_levels", "infer_split", "box_for_rank",
    "boxes_for_layout",
]

SplitSpec = tuple[tuple[str, ...], ...]

# Model-parallel dims: megatron builds a TP, EP or PP part only from equal pieces (it asserts
# divisibility, pads vocabularies and sets uneven pipeline stages explicitly). dp and cp cut only
# ZeRO optimizer state, which is balanced-uneven by design.
MUST_DIVIDE = frozenset({"tp", "ep", "pp"})
_FLAT = frozenset({"dp", "cp"})


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


def balanced_part(n: int, parts: int, index: int) -> tuple[int, int]:
    """Offset and size of part `index` of `n` cut into `parts` contiguous runs, remainder to the first.

    The one rule for uneven splits, shared by reshard and the ZeRO-1 optimizer. The first `n % parts`
    parts get one more element, as `torch.tensor_split` / `numpy.array_split` do, which megatron-core
    uses where it splits unevenly (the MIMO bridge's batch fan-out)."""
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def split_levels(dims: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The levels one tensor dim is cut at, major first: adjacent dp and cp merge into one."""
    levels: list[tuple[str, ...]] = []
    for p in dims:
        if levels and p in _FLAT and levels[-1][-1] in _FLAT:
            levels[-1] += (p,)
        else:
            levels.append((p,))
    return levels


def _level_parts(level: tuple[str, ...], layout: ModuleLayout) -> int:
    return math.prod(getattr(layout, p) for p in level)


def uneven_levels(dims: tuple[str, ...], size: int, layout: ModuleLayout) -> list[tuple[str, int, int]]:
    """(parallel dim, extent, parts) of each model-parallel cut of one tensor dim that leaves a remainder."""
    found = []
    extents = {size}
    for level in split_levels(dims):
        parts = _level_parts(level, layout)
        if level[0] in MUST_DIVIDE:
            found += [(level[0], e, parts) for e in sorted(extents) if e % parts]
        # balanced parts of e are e // parts long, and one longer where there is a remainder
        extents = {e // parts + (1 if e % parts and i else 0) for e in extents for i in (0, 1)}
    return found


def box_for_rank(split: SplitSpec, global_shape: tuple[int, ...], layout: ModuleLayout, rank: int) -> Box:
    coords = layout.coords(rank)
    offset, shape = [], []
    for size, dims in zip(global_shape, split):
        o, s = 0, size
        for level in split_levels(dims):
            index = 0
            for p in level:  # major first: mixed radix
                index = index * getattr(layout, p) + coords[p]
            lo, s = balanced_part(s, _level_parts(level, layout), index)
            o += lo
        offset.append(o)
        shape.append(s)
    return Box(tuple(offset), tuple(shape))


def boxes_for_layout(split: SplitSpec, global_shape: tuple[int, ...], layout: ModuleLayout) -> dict[int, Box]:
    return {rank: box_for_rank(split, global_shape, layout, rank) for rank in layout.ranks}
