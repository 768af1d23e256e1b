"""Boxes: axis-aligned hyper-rectangles of a global tensor, and the arithmetic planning needs."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

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
    along the dimension with the most distinct offsets compares only boxes that meet along it."""
    if len(boxes) < 2:
        return None
    ndim = boxes[0].ndim
    if ndim == 0:
        return (0, 1)
    nonempty = [i for i, b in enumerate(boxes) if b.volume]
    cuts = [sorted({boxes[i].offset[d] for i in nonempty} | {boxes[i].offset[d] + boxes[i].shape[d] for i in nonempty})
            for d in range(ndim)]
    if math.prod(max(len(c) - 1, 1) for c in cuts) <= grid_limit:
        return _grid_overlap(boxes, nonempty, cuts)
    return _sweep_overlap(boxes)


def _grid_overlap(boxes: list[Box], nonempty: list[int], cuts: list[list[int]]) -> tuple[int, int] | None:
    position = [{v: k for k, v in enumerate(c)} for c in cuts]
    owner: dict[tuple[int, ...], int] = {}
    for i in nonempty:
        b = boxes[i]
        ranges = [range(position[d][b.offset[d]], position[d][b.offset[d] + b.shape[d]]) for d in range(b.ndim)]
        for cell in itertools.product(*ranges):
            j = owner.setdefault(cell, i)
            if j != i:
                return (min(i, j), max(i, j))
    return None


def _sweep_overlap(boxes: list[Box]) -> tuple[int, int] | None:
    ndim = boxes[0].ndim
    d = max(range(ndim), key=lambda k: len({b.offset[k] for b in boxes}))
    order = sorted(range(len(boxes)), key=lambda i: boxes[i].offset[d])
    for pos, i in enumerate(order):
        end_d = boxes[i].offset[d] + boxes[i].shape[d]
        for j in order[pos + 1 :]:
            if boxes[j].offset[d] >= end_d:
                break
            if boxes[i].intersect(boxes[j]) is not None:
                return (min(i, j), max(i, j))
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
