"""The read executor against numpy slicing of a full reference, including bounded temporaries."""

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from mimo_ckpt.model.box import Box, span_in, split_for_span
from mimo_ckpt.plan.load import plan_module_load
from mimo_ckpt.format.manifest import ModuleEntry, StoredShard, StoredTensor
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.io.read import execute_reads
from mimo_ckpt.plan.options import ReadOptions
from mimo_ckpt.model.shard import TensorMeta
from mimo_ckpt.format.checksums import shard_sums
from mimo_ckpt.errors import CorruptShardError
from mimo_ckpt.io.storage import LocalStorage

import crc32c


def _store(tmp_path, full, boxes, files=1):
    """Box i goes to file i % files, after the boxes before it there."""
    shards, blobs = [], [bytearray() for _ in range(files)]
    for i, b in enumerate(boxes):
        part = np.ascontiguousarray(full[tuple(slice(o, o + n) for o, n in zip(b.offset, b.shape))])
        raw, blob = part.tobytes(), blobs[i % files]
        shards.append(StoredShard(b, f"m/r{i % files}.bin", len(blob), len(blob) + len(raw), crc32c.crc32c(raw)))
        blob += raw
    (tmp_path / "m").mkdir()
    for i, blob in enumerate(blobs):
        (tmp_path / "m" / f"r{i}.bin").write_bytes(bytes(blob))
    return ModuleEntry(ModuleLayout(), {"w": StoredTensor("F32", full.shape, tuple(shards))}, {})


@pytest.mark.parametrize("threads, files", [(1, 1), (3, 1), (1, 3), (3, 3)])
@pytest.mark.parametrize("min_run", [4, 1 << 30], ids=["runs", "spans"])
@pytest.mark.parametrize("temp_bytes", [None, 4, 40, 400])
@pytest.mark.parametrize("want", [
    Box((0, 0, 0), (4, 6, 8)), Box((1, 2, 3), (2, 3, 4)), Box((0, 5, 0), (4, 1, 8)), Box((3, 0, 7), (1, 6, 1)),
])
def test_any_box_from_any_tiling(tmp_path, min_run, temp_bytes, want, threads, files):
    full = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    boxes = [Box((0, 0, 0), (4, 3, 5)), Box((0, 0, 5), (4, 3, 3)), Box((0, 3, 0), (2, 3, 8)), Box((2, 3, 0), (2, 3, 8))]
    entry = _store(tmp_path, full, boxes, files)
    items = plan_module_load("m", entry, [TensorMeta("w", "F32", (4, 6, 8), want, True)])
    out = np.full(want.shape, np.nan, dtype=np.float32).view(np.uint32)
    execute_reads(LocalStorage(tmp_path), items, [(out, want)], verify=True, temp_bytes=temp_bytes, threads=threads,
                  options=ReadOptions(min_run_bytes=min_run))
    ref = full[tuple(slice(o, o + n) for o, n in zip(want.offset, want.shape))]
    assert np.array_equal(out.view(np.float32), ref)


class _Recording(LocalStorage):
    """Records, per reader opened, its file and the offsets read through it, and the most
    readers open at once."""

    def __init__(self, root):
        super().__init__(root)
        self.streams, self.open, self.most_open = [], 0, 0
        self._lock = threading.Lock()

    @contextmanager
    def reader(self, path):
        offsets = []
        with self._lock:
            self.streams.append((path, offsets))
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            with super().reader(path) as read:
                def recorded(offset, *out):
                    offsets.append(offset)
                    time.sleep(0.01)  # long enough for the other streams to start
                    read(offset, *out)
                yield recorded
        finally:
            with self._lock:
                self.open -= 1


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_each_file_is_read_as_one_stream_in_file_order(tmp_path, threads):
    full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    boxes = [Box((r, 0), (1, 6)) for r in (5, 2, 7, 0, 3, 6, 1, 4)]  # file order differs from tensor order
    entry = _store(tmp_path, full, boxes, files=3)
    want = Box((0, 0), (8, 6))
    items = plan_module_load("m", entry, [TensorMeta("w", "F32", (8, 6), want, True)])
    storage = _Recording(tmp_path)
    out = np.zeros((8, 6), dtype=np.uint32)
    execute_reads(storage, items, [(out, want)], verify=True, threads=threads)
    assert np.array_equal(out.view(np.float32), full)
    assert sorted(path for path, _ in storage.streams) == ["m/r0.bin", "m/r1.bin", "m/r2.bin"]
    assert all(offsets == sorted(offsets) and len(offsets) >= 2 for _, offsets in storage.streams)
    assert storage.most_open == min(threads, 3)


@pytest.mark.parametrize("max_gap, max_iov", [(0, 1024), (0, 4), (1 << 20, 4), (1 << 20, 1024)])
@pytest.mark.parametrize("want", [Box((0, 0, 0), (4, 6, 8)), Box((1, 2, 3), (2, 3, 4)), Box((3, 0, 7), (1, 6, 1))])
def test_runs_read_apart_or_together_with_their_gaps(tmp_path, max_gap, max_iov, want):
    options = ReadOptions(min_run_bytes=4, max_gap_bytes=max_gap, max_iov=max_iov)
    full = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    boxes = [Box((0, 0, 0), (4, 6, 5)), Box((0, 0, 5), (4, 6, 3))]
    entry = _store(tmp_path, full, boxes)
    items = plan_module_load("m", entry, [TensorMeta("w", "F32", (4, 6, 8), want, True)])
    out = np.full(want.shape, np.nan, dtype=np.float32).view(np.uint32)
    nbytes = execute_reads(LocalStorage(tmp_path), items, [(out, want)], verify=False, options=options)  # verified reads widen to whole blocks/shards
    ref = full[tuple(slice(o, o + n) for o, n in zip(want.offset, want.shape))]
    assert np.array_equal(out.view(np.float32), ref)
    spans = sum(4 * (lambda lo, hi: hi - lo)(*span_in(i.overlap, i.shard.box)) for i in items)
    if not max_gap:  # only runs that touch are joined: no byte read in vain
        assert nbytes == 4 * want.volume
    elif max_iov == 1024:  # one read per shard: its whole span
        assert nbytes == spans
    else:  # some reads of at most 2 runs and a gap: spans less some gaps
        assert 4 * want.volume <= nbytes <= spans


@pytest.mark.parametrize("max_gap", [0, 1 << 20])
def test_gaps_read_with_the_runs_have_their_blocks_checked(tmp_path, max_gap):
    """The left half of a (16, 64) F32 shard, in 1 KiB blocks: read row by row or together with
    the right halves between its rows, every block it touches is read and checked whole, so a flip
    in a right half is caught."""
    options = ReadOptions(min_run_bytes=4, max_gap_bytes=max_gap)
    full = np.arange(16 * 64, dtype=np.float32).reshape(16, 64)
    raw = bytearray(full.tobytes())
    sums = shard_sums(memoryview(bytes(raw)), block_bytes=1024)
    whole, blocks = sums.crc32c, sums.block_crcs
    raw[5 * 256 + 200] ^= 1  # row 5, column 50
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "r0.bin").write_bytes(bytes(raw))
    shard = StoredShard(Box((0, 0), (16, 64)), "m/r0.bin", 0, len(raw), whole, 1024, blocks)
    entry = ModuleEntry(ModuleLayout(), {"w": StoredTensor("F32", (16, 64), (shard,))}, {})
    want = Box((0, 0), (16, 32))
    items = plan_module_load("m", entry, [TensorMeta("w", "F32", (16, 64), want, True)])
    out = np.zeros((16, 32), dtype=np.uint32)
    with pytest.raises(CorruptShardError, match="block 1 "):
        execute_reads(LocalStorage(tmp_path), items, [(out, want)], verify=True, options=options)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("want, piece_bytes, offsets", [
    (Box((0, 0), (16, 64)), 1024, [0, 1024, 2048, 3072]),  # the whole shard
    (Box((0, 0), (16, 64)), 2048, [0, 2048]),
    (Box((3, 0), (10, 64)), 1024, [0, 1024, 2048, 3072]),  # rows 3-12 (bytes 768..3328), widened to blocks
    (Box((3, 0), (10, 64)), 2048, [0, 2048]),
    (Box((0, 0), (16, 64)), 0, [0]),  # one read, then the whole-shard crc
])
def test_direct_reads_go_in_pieces_of_whole_checksum_blocks(tmp_path, want, piece_bytes, offsets, flip):
    """A (16, 64) F32 shard in 1 KiB blocks, read straight into the target: one read per piece
    (split where the shard's blocks split), and a flip in block 2 is caught and named."""
    options = ReadOptions(checked_read_bytes=piece_bytes)
    full = np.arange(16 * 64, dtype=np.float32).reshape(16, 64)
    raw = bytearray(full.tobytes())
    sums = shard_sums(memoryview(bytes(raw)), block_bytes=1024)
    whole, blocks = sums.crc32c, sums.block_crcs
    if flip:
        raw[2100] ^= 1
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "r0.bin").write_bytes(bytes(raw))
    shard = StoredShard(Box((0, 0), (16, 64)), "m/r0.bin", 0, len(raw), whole, 1024, blocks)
    entry = ModuleEntry(ModuleLayout(), {"w": StoredTensor("F32", (16, 64), (shard,))}, {})
    items = plan_module_load("m", entry, [TensorMeta("w", "F32", (16, 64), want, True)])
    assert [i.contiguous for i in items] == [True]
    storage = _Recording(tmp_path)
    out = np.zeros(want.shape, dtype=np.uint32)
    if flip:
        with pytest.raises(CorruptShardError, match="block 2 " if piece_bytes else "bytes 0..4096"):
            execute_reads(storage, items, [(out, want)], verify=True, options=options)
    else:
        execute_reads(storage, items, [(out, want)], verify=True, options=options)
        assert np.array_equal(out.view(np.float32), full[3:13] if want.shape[0] == 10 else full)
        assert storage.streams == [("m/r0.bin", offsets)]


def test_split_for_span_bounds_every_piece():
    outer, inner = Box((0, 0, 0), (5, 7, 9)), Box((1, 2, 3), (4, 5, 6))
    for limit in (1, 6, 9, 20, 63, 64, 1000):
        pieces = split_for_span(inner, outer, limit)
        assert sum(p.volume for p in pieces) == inner.volume
        for p in pieces:
            lo, hi = span_in(p, outer)
            assert hi - lo <= max(limit, 1) or p.volume == 1
        cells = {(a, b, c) for p in pieces for a in range(p.offset[0], p.end[0])
                 for b in range(p.offset[1], p.end[1]) for c in range(p.offset[2], p.end[2])}
        assert len(cells) == inner.volume


@pytest.mark.parametrize("flip", [False, True])
def test_run_reads_verify_whole_shards(tmp_path, flip):
    options = ReadOptions(min_run_bytes=4)
    full = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    entry = _store(tmp_path, full, [Box((0, 0), (6, 4)), Box((0, 4), (6, 4))])
    if flip:
        path = tmp_path / "m" / "r0.bin"
        data = bytearray(path.read_bytes())
        data[100] ^= 1
        path.write_bytes(bytes(data))
    want = Box((0, 0), (6, 8))
    items = plan_module_load("m", entry, [TensorMeta("w", "F32", (6, 8), want, True)])
    assert all(not i.contiguous or i.whole_shard for i in items)
    out = np.zeros((6, 8), dtype=np.uint32)
    if flip:
        with pytest.raises(CorruptShardError, match="checksum"):
            execute_reads(LocalStorage(tmp_path), items, [(out, want)], verify=True, options=options)
    else:
        execute_reads(LocalStorage(tmp_path), items, [(out, want)], verify=True, options=options)
        assert np.array_equal(out.view(np.float32), full)


def test_parallel_piece_writes_keep_order_and_allow_buffer_reuse(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 1, 6, 7, 8, 50, 301)]
    reused = bytearray(max(map(len, parts)))

    def chunks():  # one buffer, refilled for every chunk
        for part in parts:
            reused[: len(part)] = part
            yield memoryview(reused)[: len(part)]

    LocalStorage(tmp_path, io_threads=4, write_piece_bytes=7).write_file("m/f.bin", chunks())  # many pieces in flight
    assert (tmp_path / "m" / "f.bin").read_bytes() == b"".join(parts)
