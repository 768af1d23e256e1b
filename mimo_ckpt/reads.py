"""Executing read plans into numpy arrays: the one read path of load, diff, export and reshard.

Targets are raw arrays (unsigned ints of the stored itemsize), so every dtype, bfloat16 and
float8 included, moves as bits. No torch here: offline tools stay light.
"""

from __future__ import annotations

from typing import Sequence

import crc32c
import numpy as np
from numpy.lib.stride_tricks import as_strided

from .box import Box, span_in, split_for_span, strides_of
from .dtypes import ITEMSIZE
from .errors import CorruptShardError
from .load_plan import ReadItem
from .storage import Storage

__all__ = ["RAW_DTYPES", "raw_dtype", "execute_reads"]

RAW_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def raw_dtype(code: str) -> type:
    """The unsigned integer numpy dtype with the itemsize of a stored dtype."""
    return RAW_DTYPES[ITEMSIZE[code]]


def _region(dst: np.ndarray, dst_box: Box, overlap: Box) -> np.ndarray:
    if dst.ndim == 0:
        return dst
    start = overlap.relative_to(dst_box)
    return dst[tuple(slice(o, o + n) for o, n in zip(start, overlap.shape))]


def _check(raw: np.ndarray, item: ReadItem) -> None:
    if crc32c.crc32c(raw) != item.shard.crc32c:
        raise CorruptShardError(
            f"checksum mismatch in {item.shard.file} bytes {item.begin}..{item.end} "
            f"(box {item.shard.box}): the file is corrupt"
        )


def execute_reads(
    storage: Storage, items: Sequence[ReadItem], targets: Sequence[tuple[np.ndarray, Box]],
    *, verify: bool, temp_bytes: int | None = None,
) -> int:
    """Fill `targets[item.request]` (array, its box) from storage; returns bytes read.

    Spans that hold exactly the overlap are read straight into the destination. Others go through
    a temporary buffer and a strided copy; it holds at most one stored shard, or `temp_bytes`
    when given (the overlap is then read in pieces, and whole-shard checksums are not checked).
    """
    total = 0
    for item in items:
        dst, dst_box = targets[item.request]
        region = _region(dst, dst_box, item.overlap)
        nbytes = item.end - item.begin
        if item.contiguous and region.flags.c_contiguous:
            raw = region.reshape(-1).view(np.uint8)
            storage.read_into(item.shard.file, item.begin, memoryview(raw))
            if verify and item.whole_shard:
                _check(raw, item)
            total += nbytes
            continue
        itemsize = dst.itemsize
        pieces = [item.overlap]
        if temp_bytes is not None and nbytes > temp_bytes:
            pieces = split_for_span(item.overlap, item.shard.box, max(1, temp_bytes // itemsize))
        strides = tuple(s * itemsize for s in strides_of(item.shard.box.shape))
        for piece in pieces:
            lo, hi = span_in(piece, item.shard.box)
            tmp = np.empty((hi - lo) * itemsize, dtype=np.uint8)
            storage.read_into(item.shard.file, item.shard.begin + lo * itemsize, memoryview(tmp))
            if verify and item.whole_shard and len(pieces) == 1:
                _check(tmp, item)
            src = as_strided(tmp.view(dst.dtype), shape=piece.shape, strides=strides)
            _region(dst, dst_box, piece)[...] = src
            total += len(tmp)
    return total
