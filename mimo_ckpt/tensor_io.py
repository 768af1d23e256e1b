"""Moving tensor bytes between torch tensors and storage, without intermediate copies where possible."""

from __future__ import annotations

from typing import Sequence

import crc32c
import torch

from .box import Box, strides_of
from .errors import CorruptShardError
from .load_plan import ReadItem
from .save_plan import FilePlan
from .storage import Storage

__all__ = ["host_bytes", "write_shard_file", "execute_reads"]


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order on the host (a view when it already is contiguous on CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def write_shard_file(storage: Storage, plan: FilePlan, data: dict[tuple[str, Box], torch.Tensor]) -> list[int]:
    """Write one planned file; returns the crc32c of each item in plan order."""
    buffers = [host_bytes(data[(item.key, item.box)]) for item in plan.items]
    for item, buf in zip(plan.items, buffers):
        if len(buf) != item.end - item.begin:
            raise CorruptShardError(
                f"{plan.path}: tensor {item.key!r} box {item.box} has {len(buf)} bytes, plan says "
                f"{item.end - item.begin}"
            )
    crcs = [crc32c.crc32c(buf) for buf in buffers]
    storage.write_file(plan.path, [plan.prefix, *buffers])
    return crcs


def _region(dst: torch.Tensor, dst_box: Box, overlap: Box) -> torch.Tensor:
    view = dst
    for dim, (start, length) in enumerate(zip(overlap.relative_to(dst_box), overlap.shape)):
        view = view.narrow(dim, start, length)
    return view


def execute_reads(
    storage: Storage, items: Sequence[ReadItem], targets: Sequence[tuple[torch.Tensor, Box]],
    *, verify: bool,
) -> int:
    """Fill `targets[item.request]` from storage; returns bytes read.

    Spans that hold exactly the overlap go straight into the destination; others are read into a
    temporary no larger than one stored shard and copied out through a strided view.
    """
    total = 0
    for item in items:
        dst, dst_box = targets[item.request]
        region = _region(dst, dst_box, item.overlap)
        nbytes = item.end - item.begin
        total += nbytes
        direct = item.contiguous and region.is_contiguous() and region.device.type == "cpu"
        if direct:
            buf = region.reshape(-1).view(torch.uint8)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        raw = memoryview(buf.numpy())
        if nbytes:
            storage.read_into(item.shard.file, item.begin, raw)
        if verify and item.whole_shard and crc32c.crc32c(raw) != item.shard.crc32c:
            raise CorruptShardError(
                f"checksum mismatch in {item.shard.file} bytes {item.begin}..{item.end} "
                f"(box {item.shard.box}): the file is corrupt"
            )
        if not direct:
            src = buf.view(dst.dtype).as_strided(item.overlap.shape, strides_of(item.shard.box.shape))
            region.copy_(src)
    return total
