"""Writing staged file images (a file's header and items, laid out as on disk, in host memory),
checksummed as they are written. No torch: the async writer process runs this too."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from mimo_ckpt.format.checksums import BLOCK_BYTES, ShardSums, shard_sums
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.io.storage import Storage

__all__ = ["write_image", "write_images", "write_checksummed", "with_fault_point", "all_at_once"]

T = TypeVar("T")


def write_image(
    storage: Storage, path: str, image: memoryview, items: Sequence[tuple[int, int]], rank: int = -1, *,
    block_bytes: int = BLOCK_BYTES,
) -> list[ShardSums]:
    """Write a staged file image; `items` are the byte ranges of its tensors. Returns each item's
    checksums (blocks of `block_bytes`), in order."""
    view = image.cast("B")
    buffers = [view[begin:end] for begin, end in items]
    middle = items[len(items) // 2][0] if items else len(view)
    return write_checksummed(storage, path, [view[:middle], view[middle:]], buffers, rank, block_bytes)


def write_images(
    storage: Storage, files: Sequence[tuple[str, memoryview, Sequence[tuple[int, int]]]], rank: int = -1, *,
    block_bytes: int = BLOCK_BYTES,
) -> list[list[ShardSums]]:
    """`write_image` for each (path, image, item ranges), all files at once."""
    return all_at_once([partial(write_image, storage, path, image, items, rank, block_bytes=block_bytes)
                        for path, image, items in files])


def all_at_once(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run each call on a thread of its own (file writes: each file's fsync runs in parallel);
    their results in order. Returns once all have finished; then raises the first failure."""
    if len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def write_checksummed(
    storage: Storage, path: str, chunks: list[memoryview | bytes], items: list[memoryview], rank: int, block_bytes: int,
) -> list[ShardSums]:
    """Write `chunks` as the file while a worker thread checksums each item's bytes (crc32c
    releases the GIL); each item's checksums."""
    with ThreadPoolExecutor(1) as hasher:
        sums = hasher.map(partial(shard_sums, block_bytes=block_bytes), items)
        storage.write_file(path, with_fault_point(chunks, len(chunks), rank))
        return list(sums)


def with_fault_point(chunks: Iterable[memoryview | bytes], count: int, rank: int) -> Iterator[memoryview | bytes]:
    """The `count` chunks in order, passing the `save.write` fault point halfway."""
    for i, chunk in enumerate(chunks):
        if i == count // 2:
            fault_point("save.write", rank)
        yield chunk
