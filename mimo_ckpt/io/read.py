"""Executing read plans into numpy arrays: the one read path of load, diff, export and reshard.

Targets are raw arrays (unsigned ints of the stored itemsize), so every dtype, bfloat16 and
float8 included, moves as bits. No torch here: offline tools stay light.

Each planned read takes the cheapest of three routes:
- direct: the stored bytes are exactly a contiguous part of the target; read straight into it
  (in pieces of whole checksum blocks when verifying, each hashed while still in cache);
- runs: the overlap is made of long runs contiguous in both the stored shard and the target
  (a TP split on a trailing dimension); one scattered read covers many runs, straight into the
  target rows, with the short gaps between them read into scratch (one large read is cheaper
  than many small ones); verified, runs whose blocks touch share one read, so no block is read
  twice;
- span: read the stored span from the overlap's first to last element into a reused scratch
  buffer and copy out through a strided view (short rows, where many small reads would cost more).
The items of one file are read in file order through one open file, so the kernel sees one
sequential stream per file and keeps reading ahead across item boundaries; several files are read
at once (a writer's share is split into parts for that).

Verified reads check every byte they return. A read of part of a shard is widened to whole
checksum blocks: the head and tail of its partly covered edge blocks are read into scratch in the
same scattered read, and every block it touches is checked. A shard without blocks (one that fits
in a block, or from an older writer) has only its whole-shard crc, so the whole shard is read.
Each item checks its own bytes as they arrive, so one file's hashing overlaps the others' reading.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mimo_ckpt.model.box import Box, span_in, split_for_span, strides_of
from mimo_ckpt.format.checksums import BlockHasher
from mimo_ckpt.model.dtypes import ITEMSIZE, RAW_BY_ITEMSIZE
from mimo_ckpt.errors import CorruptShardError, StorageError
from mimo_ckpt.plan.load import ReadItem
from mimo_ckpt.format.manifest import StoredShard
from mimo_ckpt.io.storage import ReadInto, Storage
from mimo_ckpt.plan.options import ReadOptions

__all__ = ["RAW_DTYPES", "raw_dtype", "execute_reads", "ReadOptions"]

RAW_DTYPES = {size: np.dtype(name).type for size, name in RAW_BY_ITEMSIZE.items()}


def raw_dtype(code: str) -> type:
    """The unsigned integer numpy dtype with the itemsize of a stored dtype."""
    return RAW_DTYPES[ITEMSIZE[code]]


def _region(dst: np.ndarray, dst_box: Box, overlap: Box) -> np.ndarray:
    if dst.ndim == 0:
        return dst
    start = overlap.relative_to(dst_box)
    return dst[tuple(slice(o, o + n) for o, n in zip(start, overlap.shape))]


def _runs(item: ReadItem, dst: np.ndarray, dst_box: Box, min_run_bytes: int) -> tuple[np.ndarray, np.ndarray, int] | None:
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
    if run * itemsize < min_run_bytes or not dst.flags.c_contiguous:
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
    *, verify: bool, temp_bytes: int | None = None, threads: int = 1, options: ReadOptions = ReadOptions(),
) -> int:
    """Fill `targets[item.request]` (array, its box) from storage; returns bytes read.

    Up to `threads` files are read at once, each as one stream in file order (the items' target
    regions are disjoint). With `verify`, reads widen to the whole checksum blocks they touch (or
    the whole shard, when it has none) and every byte read is checked. Scratch per thread: the
    stored span being read (at most `temp_bytes` when given: the span is then read in pieces) and
    up to `options.max_gaps_bytes` of gaps read between runs.
    """
    by_file: dict[str, list[ReadItem]] = {}
    for item in items:
        by_file.setdefault(item.shard.file, []).append(item)
    streams = [sorted(group, key=_file_order) for group in by_file.values()]
    streams.sort(key=_stream_bytes, reverse=True)  # the longest first: the others fill in around it
    per_thread = threading.local()

    def read_stream(stream: list[ReadItem]) -> int:
        if not hasattr(per_thread, "work"):  # reused across this thread's items
            per_thread.work = _Work(options, [np.empty(0, dtype=np.uint8) for _ in range(_SCRATCH_SLOTS)])
        total, item = 0, stream[0]
        try:
            with storage.reader(item.shard.file) as read:
                for item in stream:
                    total += _read_item(read, item, targets, verify, temp_bytes, per_thread.work)
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
    temp_bytes: int | None, work: _Work,
) -> int:
    dst, dst_box = targets[item.request]
    region = _region(dst, dst_box, item.overlap)
    if item.contiguous and region.flags.c_contiguous:
        raw = region.reshape(-1).view(np.uint8)
        if verify:
            return _read_checked(read, item, raw, work)
        read(item.begin, memoryview(raw))
        return raw.nbytes
    runs = _runs(item, dst, dst_box, work.opts.min_run_bytes)
    if runs is not None:
        return _read_runs(read, item, dst, *runs, verify, work)
    return _read_spans(read, item, dst, dst_box, verify, temp_bytes, work)


def _read_spans(
    read: ReadInto, item: ReadItem, dst: np.ndarray, dst_box: Box, verify: bool, temp_bytes: int | None,
    work: _Work,
) -> int:
    """Each piece's stored span into work, then out through a strided view. Verified, the
    pieces are read as one widened stretch (a new one past a long run of untouched blocks)."""
    shard, itemsize = item.shard, dst.itemsize
    pieces = [item.overlap]
    if temp_bytes is not None and item.end - item.begin > temp_bytes:
        pieces = split_for_span(item.overlap, shard.box, max(1, temp_bytes // itemsize))
    strides = tuple(s * itemsize for s in strides_of(shard.box.shape))
    verifier, stretch_end, total = None, 0, 0
    for piece in pieces:
        lo, hi = span_in(piece, shard.box)
        begin, end = shard.begin + lo * itemsize, shard.begin + hi * itemsize
        tmp = _scratch(work, _SPAN, end - begin)
        if not verify:
            read(begin, memoryview(tmp))
            total += end - begin
        else:
            wide_begin, wide_end = _widened(shard, begin, end)
            if verifier is None or wide_begin - stretch_end > work.opts.max_gap_bytes:
                if verifier is not None:
                    total += _read_stretch(read, verifier, [stretch_end - verifier.pos], work)
                verifier = _Verifier(item, wide_begin)
            total += _read_stretch(read, verifier, [begin - verifier.pos, tmp], work)
            stretch_end = wide_end
        src = as_strided(tmp.view(dst.dtype), shape=piece.shape, strides=strides)
        _region(dst, dst_box, piece)[...] = src
    if verifier is not None:
        total += _read_stretch(read, verifier, [stretch_end - verifier.pos], work)
    return total


def _read_runs(
    read: ReadInto, item: ReadItem, dst: np.ndarray, src: np.ndarray, dst_offsets: np.ndarray,
    run_bytes: int, verify: bool, work: _Work,
) -> int:
    flat = dst.reshape(-1).view(np.uint8)
    views = [flat[o : o + run_bytes] for o in dst_offsets.tolist()]
    starts = src.tolist()
    if verify:
        return _read_runs_checked(read, item, views, starts, run_bytes, work)
    gaps = [b - a - run_bytes for a, b in zip(starts, starts[1:])]  # gaps[k]: between runs k and k+1
    opts = work.opts
    total, i = 0, 0
    while i < len(views):
        j, gap_bytes = i + 1, 0  # runs [i, j) go in one read
        while (j < len(views) and 2 * (j - i) < opts.max_iov and 0 <= gaps[j - 1] <= opts.max_gap_bytes
               and gap_bytes + gaps[j - 1] <= opts.max_gaps_bytes):
            gap_bytes += gaps[j - 1]
            j += 1
        gap_buffer = _scratch(work, _GAPS, gap_bytes)
        buffers, pos = [views[i]], 0
        for k in range(i + 1, j):
            if gaps[k - 1]:
                buffers.append(gap_buffer[pos : pos + gaps[k - 1]])
                pos += gaps[k - 1]
            buffers.append(views[k])
        read(starts[i], *map(memoryview, buffers))
        total += run_bytes * (j - i) + gap_bytes
        i = j
    return total


def _read_runs_checked(
    read: ReadInto, item: ReadItem, views: list[np.ndarray], starts: list[int], run_bytes: int,
    work: _Work,
) -> int:
    """Verified runs: each stretch of them is read from the start of its first run's first block
    to the end of its last run's last block, everything between the runs into scratch."""
    total = 0
    for first, last, begin, end in _stretches(item.shard, starts, run_bytes, work.opts.max_gap_bytes):
        segments: list[int | np.ndarray] = []
        pos = begin
        for k in range(first, last):
            segments += (starts[k] - pos, views[k])
            pos = starts[k] + run_bytes
        segments.append(end - pos)
        total += _read_stretch(read, _Verifier(item, begin), segments, work)
    return total


def _stretches(shard: StoredShard, starts: list[int], run_bytes: int, max_gap_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """(first run, last run + 1, begin, end) of the stretches that verified runs are read in.
    Runs whose widened ranges touch or overlap share one, so no block is read twice; runs at
    most `max_gap_bytes` apart too, as unverified runs are, since one read is cheaper than two."""
    first = 0
    begin, end = _widened(shard, starts[0], starts[0] + run_bytes)
    for k in range(1, len(starts)):
        lo, hi = _widened(shard, starts[k], starts[k] + run_bytes)
        if lo - end > max_gap_bytes:
            yield first, k, begin, end
            first, begin = k, lo
        end = hi
    yield first, len(starts), begin, end


def _read_checked(read: ReadInto, item: ReadItem, raw: np.ndarray, work: _Work) -> int:
    """Read `raw` (bytes [item.begin, item.end)) widened to whole checksum blocks, in pieces of
    whole blocks each checked right after its read: the check costs a pass over cache instead of
    a second pass over memory. A shard without blocks is read whole, in one read."""
    shard = item.shard
    begin, end = _widened(shard, item.begin, item.end)
    piece_bytes = 0
    checked = work.opts.checked_read_bytes
    if shard.block_crcs and checked:
        piece_bytes = max(1, checked // shard.block_bytes) * shard.block_bytes
    whole = not piece_bytes and (begin, end) == (shard.begin, shard.end)
    verifier = _Verifier(item, begin, whole=whole)
    return _read_stretch(read, verifier, [item.begin - begin, raw, end - item.end], work, piece_bytes)


def _widened(shard: StoredShard, begin: int, end: int) -> tuple[int, int]:
    """The bytes a verified read of [begin, end) of `shard` reads: whole checksum blocks, or the
    whole shard when it has no blocks."""
    if not shard.block_crcs:
        return shard.begin, shard.end
    size = shard.block_bytes
    lo = shard.begin + (begin - shard.begin) // size * size
    hi = shard.begin + -(-(end - shard.begin) // size) * size
    return lo, min(hi, shard.end)


def _read_stretch(
    read: ReadInto, verifier: "_Verifier", segments: Sequence[int | np.ndarray], work: _Work,
    piece_bytes: int = 0,
) -> int:
    """Read on from `verifier.pos` into `segments` in file order, and check every byte: arrays are
    filled (targets, or a span's work), counts are bytes read only to be hashed (into work).
    Each read's buffers go to `verifier` right after it. A read holds at most `max_iov` buffers and
    `max_gaps_bytes` of hashed-only bytes, and with `piece_bytes` at most that many bytes. Returns
    the bytes read."""
    skipped = sum(s for s in segments if isinstance(s, int))
    gaps = memoryview(_scratch(work, _GAPS, min(skipped, max(1, work.opts.max_gaps_bytes))))
    start = verifier.pos
    batch: list[memoryview] = []
    size = used = 0
    for segment in segments:
        view = None if isinstance(segment, int) else memoryview(segment).cast("B")
        length = segment if view is None else len(view)
        done = 0
        while done < length:
            room = length - done
            if piece_bytes:
                room = min(room, piece_bytes - size)
            if view is None:
                room = min(room, len(gaps) - used)
            if room <= 0 or len(batch) == work.opts.max_iov:
                verifier.read_and_check(read, batch)
                size = used = 0
                continue
            if view is None:
                batch.append(gaps[used : used + room])
                used += room
            else:
                batch.append(view[done : done + room])
            done += room
            size += room
    if batch:
        verifier.read_and_check(read, batch)
    return verifier.pos - start


class _Verifier:
    """Checks one shard's bytes as they are read in file order from `pos`, a block boundary:
    each block once its last byte is in. A shard without blocks (or any shard with `whole`, from
    its first byte) is checked as one block against its whole-shard crc."""

    __slots__ = ("item", "pos", "_whole", "_expected", "_first", "_start", "_hasher")

    def __init__(self, item: ReadItem, pos: int, *, whole: bool = False) -> None:
        shard = item.shard
        self.item, self.pos, self._start = item, pos, pos
        self._whole = whole or not shard.block_crcs
        size = max(1, shard.end - shard.begin) if self._whole else shard.block_bytes
        self._expected = (shard.crc32c,) if self._whole else shard.block_crcs
        self._first = (pos - shard.begin) // size
        self._hasher = BlockHasher(size)

    def read_and_check(self, read: ReadInto, batch: list[memoryview]) -> None:
        """Fill `batch` with the next bytes and check every block they complete; empties `batch`."""
        read(self.pos, *batch)
        hasher, checked = self._hasher, len(self._hasher.blocks)
        for buf in batch:
            hasher.update(buf)
        batch.clear()
        self.pos = self._start + hasher.nbytes
        if self.pos == self.item.shard.end:
            hasher.flush()  # the shard's last block, shorter than the others
        for k in range(checked, len(hasher.blocks)):
            if hasher.blocks[k] != self._expected[self._first + k]:
                raise self._mismatch(self._first + k)

    def _mismatch(self, block: int) -> CorruptShardError:
        item, shard = self.item, self.item.shard
        where = f"{item.what + ': ' if item.what else ''}{shard.file} (box {shard.box})"
        if self._whole:
            return CorruptShardError(f"{where}: checksum mismatch in bytes {shard.begin}..{shard.end}: the file is corrupt")
        lo = shard.begin + block * shard.block_bytes
        hi = min(lo + shard.block_bytes, shard.end)
        return CorruptShardError(f"{where}: checksum mismatch in block {block} (bytes {lo}..{hi}): the file is corrupt")


_SPAN, _GAPS = 0, 1
_SCRATCH_SLOTS = 2
"""Per-thread scratch: a span being copied out, and the bytes read between targets (a span's
scratch and its stretch's gaps are in use at once)."""


@dataclass(slots=True)
class _Work:
    """A reading thread's options and reused scratch buffers."""

    opts: ReadOptions
    buffers: list[np.ndarray]


def _scratch(work: _Work, slot: int, nbytes: int) -> np.ndarray:
    """The first `nbytes` of this thread's reused buffer `slot`, grown when too small."""
    if work.buffers[slot].nbytes < nbytes:
        work.buffers[slot] = np.empty(nbytes, dtype=np.uint8)
    return work.buffers[slot][:nbytes]
