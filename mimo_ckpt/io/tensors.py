"""Moving tensor bytes between torch tensors and storage, without intermediate copies where possible."""

from __future__ import annotations

import itertools
from functools import partial
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch

from mimo_ckpt.errors import CorruptShardError
from mimo_ckpt.format.checksums import BLOCK_BYTES, ShardSums
from mimo_ckpt.io.images import all_at_once, with_fault_point, write_checksummed, write_images
from mimo_ckpt.io.read import ReadOptions, execute_reads
from mimo_ckpt.io.staging import (
    CHUNK_BYTES, DevicePiece, StagedFile, load_pieces, plan_device_pieces, staged_through_chunks,
)
from mimo_ckpt.io.storage import IO_THREADS, KeptOpen, Storage
from mimo_ckpt.model.box import Box
from mimo_ckpt.model.dtypes import RAW_BY_ITEMSIZE
from mimo_ckpt.plan.load import ReadItem
from mimo_ckpt.plan.save import FilePlan

__all__ = ["host_bytes", "write_shard_files", "write_file_images", "write_shard_file", "fill_tensors",
           "fill_device_tensors"]


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
    """Write one planned file; returns each item's checksums (blocks of `block_bytes`), in plan order.
    Host tensors are written from their own memory; a file holding device tensors goes through
    reused host chunks, copied ahead of the writes (`io.staging`)."""
    tensors = [data[(item.key, item.box)] for item in plan.items]
    for item, t in zip(plan.items, tensors):
        if t.numel() * t.element_size() != item.end - item.begin:
            raise CorruptShardError(
                f"{plan.path}: tensor {item.key!r} box {item.box} has {t.numel() * t.element_size()} bytes, "
                f"plan says {item.end - item.begin}"
            )
    if any(staged_through_chunks(t) for t in tensors):
        staged = StagedFile(tensors, block_bytes=block_bytes)
        chunks = itertools.chain([memoryview(plan.prefix)], staged.chunks())
        storage.write_file(plan.path, with_fault_point(chunks, 1 + staged.count, rank))
        return staged.sums()
    buffers = [host_bytes(t) for t in tensors]
    return write_checksummed(storage, plan.path, [plan.prefix, *buffers], buffers, rank, block_bytes)


def write_shard_files(
    storage: Storage, files: Sequence[tuple[FilePlan, Mapping[tuple[str, Box], torch.Tensor]]], rank: int = -1, *,
    block_bytes: int = BLOCK_BYTES,
) -> list[list[ShardSums]]:
    """Write each planned file from its tensors, all files at once (each file's fsync runs in
    parallel); each file's item checksums, in order."""
    if any(staged_through_chunks(t) for _, data in files for t in data.values()):
        _synchronize()  # the copies run on side streams: what the caller's streams wrote is done
    return all_at_once([partial(write_shard_file, storage, plan, data, rank, block_bytes=block_bytes)
                         for plan, data in files])


def write_file_images(
    storage: Storage, files: Sequence[tuple[FilePlan, torch.Tensor]], rank: int = -1, *, block_bytes: int = BLOCK_BYTES,
) -> list[list[ShardSums]]:
    """Write staged file images (host uint8 tensors: header, then the items at their offsets), all
    files at once; each file's item checksums, in order."""
    return write_images(storage, [(plan.path, memoryview(image.numpy()), [(i.begin, i.end) for i in plan.items])
                                  for plan, image in files], rank, block_bytes=block_bytes)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The same memory as unsigned ints of the same itemsize (numpy has no bfloat16/float8)."""
    return t.view(_RAW_TORCH[t.element_size()])


_RAW_TORCH = {size: getattr(torch, name) for size, name in RAW_BY_ITEMSIZE.items()}


def fill_tensors(
    storage: Storage, items: Sequence[ReadItem], targets: Sequence[tuple[torch.Tensor, Box]],
    *, verify: bool, threads: int = IO_THREADS, options: ReadOptions = ReadOptions(),
) -> int:
    """Fill host tensors in place from a read plan, `threads` reads at a time; returns bytes read."""
    hosts = [(_raw(tensor.detach()).numpy(), box) for tensor, box in targets]
    return execute_reads(storage, items, hosts, verify=verify, threads=threads, options=options)


READERS_PER_THREAD = 4
"""A device load's reading threads per `threads`: each reads one chunk at a time, so more threads
than whole-file streams keep the disk busy. A cold 7.25 GB load into an H100 (bench/gpu.py) took
3.55 s with 8 reading threads, 3.43 s with 16 and 3.29 s with 32, against a raw 4-file read of
3.30 s; 16 hold 1 GiB of pinned chunks at once, 32 would hold 2."""


def fill_device_tensors(
    storage: Storage, plan: Callable[[Sequence[tuple[int, Box]]], list[ReadItem]],
    targets: Sequence[tuple[torch.Tensor, Box]], *, verify: bool, threads: int = IO_THREADS,
    options: ReadOptions = ReadOptions(),
) -> int:
    """Fill device tensors in place, through host chunks that `READERS_PER_THREAD * threads`
    threads read into and copy from, two chunks each in flight (`io.staging`); `plan(requests)`
    gives the reads that fill each (target index, box). Returns the bytes read."""
    _synchronize()  # what the caller's streams do to the targets (zeroing padding) comes first
    dense = [t.detach() if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=t.device)
             for t, _ in targets]
    # targets in the order their bytes lie in the files, so each thread's run of chunks reads on in one file
    first_read: dict[int, int] = {}
    for position, item in enumerate(plan([(i, box) for i, (_, box) in enumerate(targets)])):
        first_read.setdefault(item.request, position)
    order = sorted(range(len(targets)), key=lambda i: first_read.get(i, -1))
    batches = plan_device_pieces([(i, targets[i][1], dense[i].element_size()) for i in order], CHUNK_BYTES)

    @contextmanager
    def reader() -> Iterator[Callable[[Sequence[DevicePiece], Sequence[torch.Tensor]], int]]:
        with KeptOpen(storage) as kept:  # a thread's files stay open across its chunks
            def read(pieces: Sequence[DevicePiece], views: Sequence[torch.Tensor]) -> int:
                items = plan([(p.request, p.box) for p in pieces])  # request k fills views[k]
                return execute_reads(kept, items, [(v.numpy(), p.box) for v, p in zip(views, pieces)],
                                     verify=verify, options=options)
            yield read

    nbytes = load_pieces(batches, dense, reader, threads=READERS_PER_THREAD * threads, depth=2)
    for (target, _), filled in zip(targets, dense):
        if filled is not target:
            target.copy_(filled)
    return nbytes


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
