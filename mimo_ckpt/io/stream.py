"""Box-by-box streaming between checkpoints under a memory budget (offline tools; no torch).

Every offline command moves bytes the same way: cut a target box into pieces that fit a buffer,
fill each piece from whatever stored shards overlap it, and hand the piece on (to a file, a
checksum, a comparison). Buffers are reused, so memory stays at `chunk_bytes + temp_bytes`.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import crc32c
import numpy as np

from mimo_ckpt.model.box import Box, split_for_span
from mimo_ckpt.format.checksums import BlockHasher, ShardSums
from mimo_ckpt.model.dtypes import ITEMSIZE
from mimo_ckpt.errors import CorruptShardError, StorageError
from mimo_ckpt.format.paths import check_relpath
from mimo_ckpt.plan.load import plan_tensor_reads
from mimo_ckpt.format.manifest import StoredShard, StoredTensor
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.io.read import execute_reads, raw_dtype
from mimo_ckpt.io.storage import LocalStorage, Storage

__all__ = ["Budget", "iter_box", "StreamItem", "write_streamed_file", "write_file_of_pieces", "share_file", "current_rss"]

MIN_BUFFER = 64 << 10


@dataclass(frozen=True, slots=True)
class Budget:
    """Buffer sizes for one process: the piece being assembled and the read temporary."""

    chunk_bytes: int
    temp_bytes: int

    @classmethod
    def from_cap(cls, max_memory: int, workers: int = 1) -> "Budget":
        """Split `max_memory` (peak RSS of all processes) between baselines and buffers."""
        baseline = current_rss()
        margin = 8 << 20
        processes = workers + (1 if workers > 1 else 0)
        per_worker = (max_memory - processes * baseline - margin) // max(workers, 1)
        if per_worker < 2 * MIN_BUFFER:
            need = processes * baseline + margin + 2 * MIN_BUFFER * workers
            raise ValueError(
                f"--max-memory {max_memory >> 20} MiB is too small for {workers} worker(s): "
                f"each process needs about {baseline >> 20} MiB to run; use at least {(need >> 20) + 1} MiB"
            )
        return cls(chunk_bytes=per_worker // 2, temp_bytes=per_worker // 2)


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def iter_box(
    storage: Storage, module: str, key: str, stored: StoredTensor, box: Box, budget: Budget,
    buffer: np.ndarray | None = None,
) -> Iterator[tuple[Box, np.ndarray]]:
    """Pieces of `box` in C order with their raw values (views into one reused buffer), every byte
    checked against the stored checksums: offline tools never hand on, or re-checksum, corrupt
    data. A shard without blocks that spans several pieces is checked whole once, up front;
    checking it with each piece would read it whole for every piece."""
    itemsize = ITEMSIZE[stored.dtype]
    if buffer is None:
        buffer = np.empty(max(budget.chunk_bytes, itemsize), dtype=np.uint8)
    piece_elements = max(1, budget.chunk_bytes // itemsize)
    checked: set[StoredShard] = set()
    for piece in split_for_span(box, box, piece_elements):
        nbytes = piece.volume * itemsize
        out = buffer[:nbytes].view(raw_dtype(stored.dtype)).reshape(piece.shape)
        items = plan_tensor_reads(module, key, stored, piece)
        for item in items:
            shard = item.shard
            if not shard.block_crcs and shard not in checked and shard.box.volume > piece_elements:
                _check_whole(storage, shard, budget.temp_bytes, item.what)
                checked.add(shard)
        execute_reads(storage, [i for i in items if i.shard in checked], [(out, piece)],
                      verify=False, temp_bytes=budget.temp_bytes)
        execute_reads(storage, [i for i in items if i.shard not in checked], [(out, piece)],
                      verify=True, temp_bytes=budget.temp_bytes)
        yield piece, out


def _check_whole(storage: Storage, shard: StoredShard, chunk_bytes: int, what: str) -> None:
    buf = np.empty(max(1, min(chunk_bytes, shard.end - shard.begin)), dtype=np.uint8)
    crc = 0
    for start in range(shard.begin, shard.end, len(buf)):
        view = buf[: min(len(buf), shard.end - start)]
        storage.read_into(shard.file, start, memoryview(view))
        crc = crc32c.crc32c(view, crc)
    if crc != shard.crc32c:
        raise CorruptShardError(f"{what + ': ' if what else ''}{shard.file} (box {shard.box}): checksum mismatch "
                                f"in bytes {shard.begin}..{shard.end}: the file is corrupt")


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One tensor region to write: `box` of source tensor `key`."""

    key: str
    stored: StoredTensor
    box: Box


def write_streamed_file(
    src: Storage, dst: Storage, module: str, path: str, prefix: bytes, items: Sequence[StreamItem],
    budget: Budget, progress: Progress | None = None,
) -> list[ShardSums]:
    """Write `prefix` then each item's bytes, copied from stored tensors, to `dst:path`; returns
    each item's checksums."""
    buffer = np.empty(budget.chunk_bytes, dtype=np.uint8)
    pieces = ((values for _, values in iter_box(src, module, i.key, i.stored, i.box, budget, buffer)) for i in items)
    return write_file_of_pieces(dst, path, prefix, pieces, progress)


def write_file_of_pieces(
    dst: Storage, path: str, prefix: bytes, items: Iterable[Iterable[np.ndarray]], progress: Progress | None = None,
) -> list[ShardSums]:
    """Write `prefix` then each item's pieces (arrays in C order, each used before the next is
    asked for, so they may share a buffer) to `dst:path`; returns each item's checksums, whole
    and per block, hashed as the pieces go by (the same as a save's: one writer contract)."""
    sums: list[ShardSums] = []

    def chunks() -> Iterator[memoryview]:
        yield memoryview(prefix)
        for pieces in items:
            hasher = BlockHasher()
            for values in pieces:
                raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
                hasher.update(raw)
                yield memoryview(raw)
                if progress is not None:
                    progress.advance(len(raw))
            sums.append(hasher.sums())

    dst.write_file(path, chunks())
    return sums


def share_file(src: Storage, dst: Storage, path: str, budget: Budget) -> None:
    """Give `dst` the source's file under the same name: a hard link where both are local on one
    filesystem, else a streamed copy. Either way a new name: the source is only read."""
    if isinstance(src, LocalStorage) and isinstance(dst, LocalStorage):
        target = os.path.join(dst.root, check_relpath(path))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(os.path.join(src.root, check_relpath(path)), target, follow_symlinks=False)
            return
        except FileExistsError:
            raise StorageError(f"{target} already exists; a writer only creates new files") from None
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise StorageError(f"linking {target} to the source's file: {exc}") from exc
    size = src.size(path)
    if size is None:
        raise StorageError(f"{path}: missing in the source checkpoint")

    def chunks():
        buf = bytearray(budget.chunk_bytes)
        for start in range(0, size, len(buf)):
            view = memoryview(buf)[: min(len(buf), size - start)]
            src.read_into(path, start, view)
            yield view
    dst.write_file(path, chunks())
