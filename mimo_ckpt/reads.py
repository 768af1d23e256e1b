"""Executing read plans into numpy arrays: the one read path of load, diff, export and reshard.

Targets are raw arrays (unsigned ints of the stored itemsize), so every dtype, bfloat16 and
float8 included, moves as bits. No torch here: offline tools stay light.

Each planned read takes the cheapest of three routes:
- direct: the stored bytes are exactly a contiguous part of the target; read straight into it
  (in pieces of whole checksum blocks when verifying, each hashed while still in cache);
- runs: the overlap is made of long runs contiguous in both the stored shard and the target
  (a TP split on a trailing dimension); one scattered read covers many runs, straight into the
  target rows, with the short gaps between them read into scratch (one large read is cheaper
  than many small ones, and it lets every block checksum it covers be checked);
- span: read the stored span from the overlap's first to last element into a reused scratch
  buffer and copy out through a strided view (short rows, where many small reads would cost more).
The items of one file are read in file order through one open file, so the kernel sees one
sequential stream per file and keeps reading ahead across item boundaries; several files are read
at once (a writer's share is split into parts for that). Each item checks its own checksums (of
the whole shard, or of the blocks a partial read covers), so one file's hashing overlaps the
others' reading.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .box import Box, span_in, split_for_span, strides_of
from .checksums import check_blocks, crc_of
from .dtypes import ITEMSIZE
from .errors import CorruptShardError, StorageError
from .load_plan import ReadItem
from .storage import ReadInto, Storage

__all__ = ["RAW_DTYPES", "raw_dtype", "execute_reads"]

RAW_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
MIN_RUN_BYTES = 16 << 10
"""Runs at least this long are read straight into the target instead of through a span."""
MAX_GAP_BYTES = 128 << 10
"""Runs at most this far apart in the file are read together, the gap into scratch: on a cold
read, about what one more request to the disk costs."""
MAX_GAPS_BYTES = 32 << 20
"""Scratch for the gaps of one read."""
MAX_IOV = 1024
CHECKED_READ_BYTES = 1 << 20
"""Verified direct reads go in pieces of about this size (whole checksum blocks), each hashed
right after its read while its bytes are still in the CPU's cache; 0: one read, then one pass."""


def raw_dtype(code: str) -> type:
    """The unsigned integer numpy dtype with the itemsize of a stored dtype."""
    return RAW_DTYPES[ITEMSIZE[code]]


def _region(dst: np.ndarray, dst_box: Box, overlap: Box) -> np.ndarray:
    if dst.ndim == 0:
        return dst
    start = overlap.relative_to(dst_box)
    return dst[tuple(slice(o, o + n) for o, n in zip(start, overlap.shape))]


def _runs(item: ReadItem, dst: np.ndarray, dst_box: Box) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Source and target byte offsets of runs contiguous on both sides, and the run length;
    None when the runs are too short to be worth one read each."""
    overlap, shard = item.overlap, item.shard.box
    itemsize = dst.itemsize
    run = 1
    lead = overlap.ndim
    while lead > 0:
        lead -= 1
        run *= overlap.shape[lead]
        if overlap.shape[lead] != shard.shape[lead] or overlap.shape[lead] != dst_box.shape[lead]:
            break
    else:
        lead = 0
    if run * itemsize < MIN_RUN_BYTES or not dst.flags.c_contiguous:
        return None
    counts = overlap.shape[:lead]
    index = np.indices(counts, dtype=np.int64).reshape(lead, -1).T if lead else np.zeros((1, 0), np.int64)
    src_strides = np.array(strides_of(shard.shape)[:lead], dtype=np.int64)
    dst_strides = np.array(strides_of(dst_box.shape)[:lead], dtype=np.int64)
    src_base = sum(a * s for a, s in zip(overlap.relative_to(shard), strides_of(shard.shape)))
    dst_base = sum(a * s for a, s in zip(overlap.relative_to(dst_box), strides_of(dst_box.shape)))
    src = item.shard.begin + itemsize * (src_base + index @ src_strides)
    dst_offsets = itemsize * (dst_base + index @ dst_strides)
    return src, dst_offsets, run * itemsize


def execute_reads(
    storage: Storage, items: Sequence[ReadItem], targets: Sequence[tuple[np.ndarray, Box]],
    *, verify: bool, temp_bytes: int | None = None, threads: int = 1,
) -> int:
    """Fill `targets[item.request]` (array, its box) from storage; returns bytes read.

    Up to `threads` files are read at once, each as one stream in file order (the items' target
    regions are disjoint). Every thread's scratch buffer holds at most one stored span, or
    `temp_bytes` when given (the span is then read in pieces).
    """
    by_file: dict[str, list[ReadItem]] = {}
    for item in items:
        by_file.setdefault(item.shard.file, []).append(item)
    streams = [sorted(group, key=_file_order) for group in by_file.values()]
    streams.sort(key=_stream_bytes, reverse=True)  # the longest first: the others fill in around it
    per_thread = threading.local()

    def read_stream(stream: list[ReadItem]) -> int:
        if not hasattr(per_thread, "scratch"):
            per_thread.scratch = [np.empty(0, dtype=np.uint8)]  # reused across this thread's items
        total, item = 0, stream[0]
        try:
            with storage.reader(item.shard.file) as read:
                for item in stream:
                    total += _read_item(read, item, targets, verify, temp_bytes, per_thread.scratch)
        except StorageError as exc:
            raise StorageError(f"{item.what}, box {item.overlap}: {exc}") from exc
        return total

    if threads <= 1 or len(streams) <= 1:
        return sum(map(read_stream, streams))
    pool = ThreadPoolExecutor(min(threads, len(streams)))
    try:
        return sum(pool.map(read_stream, streams))  # the first failure, longest stream first, is raised
    finally:
        pool.shutdown(cancel_futures=True)


def _file_order(item: ReadItem) -> int:
    return item.begin


def _stream_bytes(stream: list[ReadItem]) -> int:
    return sum(item.end - item.begin for item in stream)


def _read_item(
    read: ReadInto, item: ReadItem, targets: Sequence[tuple[np.ndarray, Box]], verify: bool,
    temp_bytes: int | None, scratch: list[np.ndarray],
) -> int:
    dst, dst_box = targets[item.request]
    region = _region(dst, dst_box, item.overlap)
    if item.contiguous and region.flags.c_contiguous:
        raw = region.reshape(-1).view(np.uint8)
        if verify:
            _read_checked(read, item, raw)
        else:
            read(item.begin, memoryview(raw))
        return raw.nbytes
    runs = _runs(item, dst, dst_box)
    if runs is not None:
        return _read_runs(read, item, dst, *runs, verify, scratch)
    itemsize = dst.itemsize
    pieces = [item.overlap]
    if temp_bytes is not None and item.end - item.begin > temp_bytes:
        pieces = split_for_span(item.overlap, item.shard.box, max(1, temp_bytes // itemsize))
    strides = tuple(s * itemsize for s in strides_of(item.shard.box.shape))
    total = 0
    for piece in pieces:
        lo, hi = span_in(piece, item.shard.box)
        nbytes = (hi - lo) * itemsize
        if scratch[0].nbytes < nbytes:
            scratch[0] = np.empty(nbytes, dtype=np.uint8)
        tmp = scratch[0][:nbytes]
        read(item.shard.begin + lo * itemsize, memoryview(tmp))
        if verify:
            _check(item, item.shard.begin + lo * itemsize, [tmp])
        src = as_strided(tmp.view(dst.dtype), shape=piece.shape, strides=strides)
        _region(dst, dst_box, piece)[...] = src
        total += nbytes
    return total


def _read_runs(
    read: ReadInto, item: ReadItem, dst: np.ndarray, src: np.ndarray, dst_offsets: np.ndarray,
    run_bytes: int, verify: bool, scratch: list[np.ndarray],
) -> int:
    flat = dst.reshape(-1).view(np.uint8)
    views = [flat[o : o + run_bytes] for o in dst_offsets.tolist()]
    starts = src.tolist()
    gaps = [b - a - run_bytes for a, b in zip(starts, starts[1:])]  # gaps[k]: between runs k and k+1
    every: list[np.ndarray] = []  # all buffers in file order, when they make up the whole shard
    total, i = 0, 0
    while i < len(views):
        j, gap_bytes = i + 1, 0  # runs [i, j) go in one read
        while (j < len(views) and 2 * (j - i) < MAX_IOV and 0 <= gaps[j - 1] <= MAX_GAP_BYTES
               and gap_bytes + gaps[j - 1] <= MAX_GAPS_BYTES):
            gap_bytes += gaps[j - 1]
            j += 1
        if scratch[0].nbytes < gap_bytes:
            scratch[0] = np.empty(gap_bytes, dtype=np.uint8)
        buffers, pos = [views[i]], 0
        for k in range(i + 1, j):
            if gaps[k - 1]:
                buffers.append(scratch[0][pos : pos + gaps[k - 1]])
                pos += gaps[k - 1]
            buffers.append(views[k])
        read(starts[i], *map(memoryview, buffers))
        if verify and item.whole_shard:
            every += buffers
        elif verify:
            _check(item, starts[i], buffers)
        total += run_bytes * (j - i) + gap_bytes
        i = j
    if every:
        _check(item, item.begin, every)
    return total


def _read_checked(read: ReadInto, item: ReadItem, raw: np.ndarray) -> None:
    """Read `raw` from `item.begin` in pieces of whole checksum blocks, each checked right after
    its read: the check costs a pass over cache instead of a second pass over memory. Every
    block the bytes cover completely is checked; for a whole shard, that is all of it."""
    shard = item.shard
    if not shard.block_crcs or not CHECKED_READ_BYTES:
        read(item.begin, memoryview(raw))
        _check(item, item.begin, [raw])
        return
    blocks_per_piece = max(1, CHECKED_READ_BYTES // shard.block_bytes)
    pos, end = item.begin, item.begin + raw.nbytes
    while pos < end:
        piece_end = shard.begin + ((pos - shard.begin) // shard.block_bytes + blocks_per_piece) * shard.block_bytes
        piece = raw[pos - item.begin : min(end, piece_end) - item.begin]
        read(pos, memoryview(piece))
        _check(item, pos, [piece])
        pos += piece.nbytes


def _check(item: ReadItem, file_offset: int, buffers: Sequence[memoryview | np.ndarray]) -> None:
    """Check what was read of one shard: the whole-shard crc when it is all of the shard (in
    order), else every block checksum the contiguous bytes at `file_offset` cover completely."""
    shard = item.shard
    where = f"{item.what + ': ' if item.what else ''}{shard.file} (box {shard.box})"
    nbytes = sum(memoryview(b).nbytes for b in buffers)
    if file_offset == shard.begin and nbytes == shard.end - shard.begin:
        if crc_of(buffers) != shard.crc32c:
            raise CorruptShardError(f"{where}: checksum mismatch in bytes {shard.begin}..{shard.end}: the file is corrupt")
    elif shard.block_crcs:
        check_blocks(shard.begin, shard.end, shard.block_bytes, shard.block_crcs, file_offset, buffers, where)
