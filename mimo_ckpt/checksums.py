"""CRC-32C of whole shards and of fixed-size blocks within them.

The whole-shard checksum verifies a read of a whole shard. Block checksums (one per `BLOCK_BYTES`
of a shard's byte range, the last block shorter) verify partial reads, as resharded loads do:
every block that a contiguous read covers completely is checked.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import crc32c
import numpy as np

from .errors import CorruptShardError

__all__ = ["BLOCK_BYTES", "crc_of", "shard_checksums", "check_blocks"]

BLOCK_BYTES = 1 << 20


def crc_of(buffers: Iterable[memoryview | np.ndarray]) -> int:
    value = 0
    for b in buffers:
        value = crc32c.crc32c(b, value)
    return value


def shard_checksums(data: memoryview, block_bytes: int = BLOCK_BYTES) -> tuple[int, tuple[int, ...]]:
    """(crc of all bytes, crc per block); no blocks when the shard fits in one."""
    whole = crc32c.crc32c(data)
    if len(data) <= block_bytes:
        return whole, ()
    return whole, tuple(crc32c.crc32c(data[i : i + block_bytes]) for i in range(0, len(data), block_bytes))


def check_blocks(
    shard_begin: int, shard_end: int, block_bytes: int, block_crcs: Sequence[int],
    file_offset: int, buffers: Sequence[memoryview | np.ndarray], where: str,
) -> int:
    """Check the blocks that bytes `[file_offset, file_offset + len(buffers))` cover completely;
    returns how many were checked. Raises CorruptShardError naming the first bad block."""
    k = -(-(file_offset - shard_begin) // block_bytes)  # first block starting inside the read
    if k >= len(block_crcs):
        return 0
    lo = shard_begin + k * block_bytes
    hi = min(lo + block_bytes, shard_end)
    pos, crc, checked = file_offset, 0, 0
    for buf in buffers:  # one pass: each byte is hashed once, whatever the number of buffers
        view = memoryview(buf).cast("B")
        start, end = pos, pos + len(view)
        i = max(start, lo)
        while i < end:
            j = min(end, hi)
            crc = crc32c.crc32c(view[i - start : j - start], crc)
            i = j
            if i < hi:
                break
            if crc != block_crcs[k]:
                raise CorruptShardError(f"{where}: checksum mismatch in block {k} (bytes {lo}..{hi}): the file is corrupt")
            checked, k, crc = checked + 1, k + 1, 0
            if k == len(block_crcs):
                return checked
            lo, hi = hi, min(hi + block_bytes, shard_end)
        pos = end
    return checked
