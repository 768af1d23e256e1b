"""Boxes: axis-aligned hyper-rectangles of a global tensor, and the arithmetic planning needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Box", "first_overlap", "strides_of", "span_in", "split_for_span"]


@dataclass(frozen=True, slots=True, order=True)
class Box:
    """A region `[offset, offset + shape)` of a global tensor; a scalar is the 0-d box `()`."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def volume(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offset, self.shape))

    def fits_in(self, global_shape: tuple[int, ...]) -> bool:
        return len(global_shape) == self.ndim and all(
            o >= 0 and s >= 0 and o + s <= g for o, s, g in zip(self.offset, self.shape, global_shape)
        )

    def intersect(self, other: "Box") -> "Box | None":
        """The common region, or None when it is empty (boxes of zero volume never intersect)."""
        lo = tuple(max(a, b) for a, b in zip(self.offset, other.offset))
        hi = tuple(min(a, b) for a, b in zip(self.end, other.end))
        if any(h <= l for l, h in zip(lo, hi)):
            return None
        if self.volume == 0 or other.volume == 0:
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def relative_to(self, outer: "Box") -> tuple[int, ...]:
        return tuple(a - b for a, b in zip(self.offset, outer.offset))

    def __str__(self) -> str:
        if not self.shape:
            return "[scalar]"
        return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(self.offset, self.shape)) + "]"


def strides_of(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-order element strides."""
    out, acc = [], 1
    for size in reversed(shape):
        out.append(acc)
        acc *= size
    return tuple(reversed(out))


def first_overlap(boxes: list[Box], grid_limit: int = 4_000_000) -> tuple[int, int] | None:
    """Indexes (i < j) of two boxes that overlap, or None when no two do.

    Boxes cut by parallel layouts align to a grid: the distinct offsets and ends along each
    dimension. When that grid is small, each box marks the cells it covers and a cell marked twice
    is an overlap: linear in the number of boxes, and it stops at the first. Otherwise a sweep
    along the dimension with the most distinct offsets compares each box, as numpy arrays, with
    the earlier boxes still open along it."""
    if len(boxes) < 2:
        return None
    if boxes[0].ndim == 0:
        return (0, 1)
    nonempty = [i for i, b in enumerate(boxes) if b.volume]
    if len(nonempty) < 2:
        return None
    lo, hi = _corners([boxes[i] for i in nonempty])
    cuts = [np.unique(np.concatenate((lo[:, d], hi[:, d]))) for d in range(lo.shape[1])]
    if math.prod(max(len(c) - 1, 1) for c in cuts) <= grid_limit:
        found = _grid_overlap(lo, hi, cuts)
    else:
        found = _sweep_overlap(lo, hi)
    if found is None:
        return None
    i, j = nonempty[found[0]], nonempty[found[1]]
    return (min(i, j), max(i, j))


def _corners(boxes: list[Box]) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and ends as (n, ndim) arrays; int64 unless a coordinate does not fit."""
    offsets, ends = [b.offset for b in boxes], [b.end for b in boxes]
    try:
        return np.array(offsets, dtype=np.int64), np.array(ends, dtype=np.int64)
    except OverflowError:
        return np.array(offsets, dtype=object), np.array(ends, dtype=object)


def _grid_overlap(lo: np.ndarray, hi: np.ndarray, cuts: list[np.ndarray]) -> tuple[int, int] | None:
    """Each box writes its index into the grid cells it covers; one already owned is an overlap."""
    start = np.stack([np.searchsorted(c, lo[:, d]) for d, c in enumerate(cuts)])
    stop = np.stack([np.searchsorted(c, hi[:, d]) for d, c in enumerate(cuts)])
    shape = [len(c) - 1 for c in cuts]
    if (stop - start == 1).all():  # the usual case, one cell per box: look for a repeated cell
        cell = np.ravel_multi_index(tuple(start), shape)
        order = np.argsort(cell, kind="stable")
        repeats = np.flatnonzero(cell[order][1:] == cell[order][:-1])
        return (int(order[repeats[0]]), int(order[repeats[0] + 1])) if repeats.size else None
    owner = np.full(shape, -1, dtype=np.int32)
    for i, (a, b) in enumerate(zip(start.T.tolist(), stop.T.tolist())):
        cells = owner[tuple(map(slice, a, b))]
        taken = cells[cells >= 0]
        if taken.size:
            return int(taken[0]), i
        cells[...] = i
    return None


def _sweep_overlap(lo: np.ndarray, hi: np.ndarray) -> tuple[int, int] | None:
    """Along the dimension `d` with the most distinct offsets, in offset order: only the boxes
    still open there (ending past the current offset) can meet the current box, and they all meet
    it along `d`; the other dimensions are compared for all of them at once."""
    d = max(range(lo.shape[1]), key=lambda k: len(np.unique(lo[:, k])))
    others = [k for k in range(lo.shape[1]) if k != d]
    lo_t, hi_t = lo.T.copy(), hi.T.copy()  # one row per dimension: gathers along a row are cheap
    open_ = np.empty(0, dtype=np.int64)
    for i in np.argsort(lo_t[d], kind="stable").tolist():
        open_ = open_[hi_t[d][open_] > lo_t[d][i]]
        meets = open_
        for k in others:
            meets = meets[(lo_t[k][meets] < hi_t[k][i]) & (hi_t[k][meets] > lo_t[k][i])]
        if meets.size:
            return int(meets[0]), i
        open_ = np.append(open_, i)
    return None


def span_in(inner: Box, outer: Box) -> tuple[int, int]:
    """Element range [first, last + 1) that `inner` spans in `outer`'s C-order layout."""
    strides = strides_of(outer.shape)
    first = inner.relative_to(outer)
    lo = sum(i * s for i, s in zip(first, strides))
    if inner.volume == 0:
        return lo, lo
    hi = sum((i + n - 1) * s for i, n, s in zip(first, inner.shape, strides)) + 1
    return lo, hi


def split_for_span(inner: Box, outer: Box, max_elems: int) -> list[Box]:
    """Pieces of `inner`, in C order, each spanning at most `max_elems` elements of `outer`'s
    layout (a single element may exceed it). Bounds the buffers of box-by-box streaming."""
    out: list[Box] = []

    def go(box: Box, dim: int) -> None:
        lo, hi = span_in(box, outer)
        if hi - lo <= max_elems or dim >= box.ndim:
            out.append(box)
            return
        row = strides_of(outer.shape)[dim]
        one = Box(box.offset, box.shape[:dim] + (1,) + box.shape[dim + 1 :])
        one_lo, one_hi = span_in(one, outer)
        rows = max(1, 1 + (max_elems - (one_hi - one_lo)) // row) if one_hi - one_lo <= max_elems else 1
        for start in range(0, box.shape[dim], rows):
            n = min(rows, box.shape[dim] - start)
            offset = box.offset[:dim] + (box.offset[dim] + start,) + box.offset[dim + 1 :]
            sub = Box(offset, box.shape[:dim] + (n,) + box.shape[dim + 1 :])
            if rows == 1 and one_hi - one_lo > max_elems:
                go(sub, dim + 1)
            else:
                out.append(sub)

    go(inner, 0)
    return out


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[Box, int, int]]:
    """Elements [start, stop) of a C-order array of `shape` as boxes, each with its own element
    range [lo, hi): at most 2 * ndim - 1 of them, in order. A flat slice of a tensor (megatron's
    `flattened_range`, a DistributedOptimizer shard) is these boxes, each a view of the slice."""
    if not 0 <= start <= stop <= math.prod(shape):
        raise ValueError(f"range [{start}, {stop}) outside an array of shape {list(shape)}")
    if start == stop:
        return []
    if not shape:
        return [(Box((), ()), start, stop)]
    inner = math.prod(shape[1:])
    rest = shape[1:]

    def at_row(row: int, lo: int, hi: int) -> list[tuple[Box, int, int]]:
        base = row * inner
        return [(Box((row, *b.offset), (1, *b.shape)), base + a, base + z)
                for b, a, z in flat_range_boxes(rest, lo, hi)]

    first, first_col = divmod(start, inner)
    last, last_col = divmod(stop, inner)
    if first == last:
        return at_row(first, first_col, last_col)
    out = []
    if first_col:
        out += at_row(first, first_col, inner)
        first += 1
    if last > first:
        out.append((Box((first, *(0,) * len(rest)), (last - first, *rest)), first * inner, last * inner))
    if last_col:
        out += at_row(last, 0, last_col)
    return out
