"""Moving tensor bytes between torch tensors and storage, without intermediate copies where possible."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from mimo_ckpt.model.box import Box
from mimo_ckpt.model.dtypes import RAW_BY_ITEMSIZE
from mimo_ckpt.format.checksums import BLOCK_BYTES, ShardSums, shard_sums
from mimo_ckpt.errors import CorruptShardError
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.plan.load import ReadItem
from mimo_ckpt.io.read import ReadOptions, execute_reads
from mimo_ckpt.plan.save import FilePlan
from mimo_ckpt.io.storage import IO_THREADS, Storage

__all__ = ["host_bytes", "write_shard_files", "write_file_images", "write_shard_file", "write_file_image", "fill_tensors"]

T = TypeVar("T")


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order on the host (a view when it already is contiguous on CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def write_shard_file(
    storage: Storage, plan: FilePlan, data: Mapping[tuple[str, Box], torch.Tensor], rank: int = -1, *,
    block_bytes: int = BLOCK_BYTES,
) -> list[ShardSums]:
    """Write one planned file; returns each item's checksums (blocks of `block_bytes`), in plan order."""
    buffers = [host_bytes(data[(item.key, item.box)]) for item in plan.items]
    for item, buf in zip(plan.items, buffers):
        if len(buf) != item.end - item.begin:
            raise CorruptShardError(
                f"{plan.path}: tensor {item.key!r} box {item.box} has {len(buf)} bytes, plan says "
                f"{item.end - item.begin}"
            )
    return _write_checksummed(storage, plan.path, [plan.prefix, *buffers], buffers, rank, block_bytes)


def write_file_image(
    storage: Storage, plan: FilePlan, image: torch.Tensor, rank: int = -1, *, block_bytes: int = BLOCK_BYTES,
) -> list[ShardSums]:
    """Write a staged file image (host uint8 tensor: header, then the items at their offsets);
    returns checksums like `write_shard_file`."""
    view = memoryview(image.numpy())
    buffers = [view[item.begin : item.end] for item in plan.items]
    middle = plan.items[len(plan.items) // 2].begin if plan.items else len(view)
    return _write_checksummed(storage, plan.path, [view[:middle], view[middle:]], buffers, rank, block_bytes)


def write_shard_files(
    storage: Storage, files: Sequence[tuple[FilePlan, Mapping[tuple[str, Box], torch.Tensor]]], rank: int = -1, *,
    block_bytes: int = BLOCK_BYTES,
) -> list[list[ShardSums]]:
    """Write each planned file from its tensors, all files at once (each file's fsync runs in
    parallel); each file's item checksums, in order."""
    return _all_at_once([partial(write_shard_file, storage, plan, data, rank, block_bytes=block_bytes)
                         for plan, data in files])


def write_file_images(
    storage: Storage, files: Sequence[tuple[FilePlan, torch.Tensor]], rank: int = -1, *, block_bytes: int = BLOCK_BYTES,
) -> list[list[ShardSums]]:
    """`write_shard_files` for staged file images (`write_file_image`)."""
    return _all_at_once([partial(write_file_image, storage, plan, image, rank, block_bytes=block_bytes)
                         for plan, image in files])


def _all_at_once(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run each call on a thread of its own (file writes: each file's fsync runs in parallel);
    their results in order. Returns once all have finished; then raises the first failure."""
    if len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def _write_checksummed(
    storage: Storage, path: str, chunks: list[memoryview | bytes], items: list[memoryview], rank: int, block_bytes: int,
) -> list[ShardSums]:
    """Write `chunks` as the file while a worker thread checksums each item's bytes (crc32c
    releases the GIL); each item's checksums."""
    with ThreadPoolExecutor(1) as hasher:
        sums = hasher.map(partial(shard_sums, block_bytes=block_bytes), items)
        storage.write_file(path, _with_fault_point(chunks, rank))
        return list(sums)


def _with_fault_point(chunks: list[memoryview | bytes], rank: int) -> Iterator[memoryview | bytes]:
    half = len(chunks) // 2
    for i, chunk in enumerate(chunks):
        if i == half:
            fault_point("save.write", rank)
        yield chunk


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The same memory as unsigned ints of the same itemsize (numpy has no bfloat16/float8)."""
    return t.view(_RAW_TORCH[t.element_size()])


_RAW_TORCH = {size: getattr(torch, name) for size, name in RAW_BY_ITEMSIZE.items()}


def fill_tensors(
    storage: Storage, items: Sequence[ReadItem], targets: Sequence[tuple[torch.Tensor, Box]],
    *, verify: bool, threads: int = IO_THREADS, options: ReadOptions = ReadOptions(),
) -> int:
    """Fill torch tensors in place from a read plan, `threads` reads at a time; returns bytes
    read. Device tensors are staged through host memory."""
    hosts, staged = [], []
    for tensor, box in targets:
        t = tensor.detach()
        if t.device.type != "cpu":
            host = torch.empty(t.shape, dtype=t.dtype)
            staged.append((t, host))
            t = host
        hosts.append((_raw(t).numpy(), box))
    nbytes = execute_reads(storage, items, hosts, verify=verify, threads=threads, options=options)
    for device_tensor, host in staged:
        device_tensor.copy_(host)
    return nbytes
