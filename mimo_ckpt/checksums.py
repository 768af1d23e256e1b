"""CRC-32C of whole shards and of fixed-size blocks within them.

The whole-shard checksum verifies a read of a whole shard. Block checksums (one per `BLOCK_BYTES`
of a shard's byte range, the last block shorter) verify partial reads, as resharded loads do:
every block that a contiguous read covers completely is checked.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

import crc32c
import numpy as np

from .errors import CorruptShardError

__all__ = ["BLOCK_BYTES", "crc_of", "crc32c_combine", "shard_checksums", "check_blocks"]

BLOCK_BYTES = 1 << 20


def crc_of(buffers: Iterable[memoryview | np.ndarray]) -> int:
    value = 0
    for b in buffers:
        value = crc32c.crc32c(b, value)
    return value


def shard_checksums(data: memoryview, block_bytes: int = BLOCK_BYTES) -> tuple[int, tuple[int, ...]]:
    """(crc of all bytes, crc per block); no blocks when the shard fits in one. One pass over the
    bytes: the whole-shard crc is combined from the block crcs."""
    if len(data) <= block_bytes:
        return crc32c.crc32c(data), ()
    blocks = tuple(crc32c.crc32c(data[i : i + block_bytes]) for i in range(0, len(data), block_bytes))
    whole = blocks[0]
    for i, crc in enumerate(blocks[1:], 1):
        whole = crc32c_combine(whole, crc, min(block_bytes, len(data) - i * block_bytes))
    return whole, blocks


# CRC combination as in zlib's crc32_combine: appending len2 bytes multiplies the first crc by
# x^(8 * len2) modulo the polynomial (in the bit-reflected representation), then adds the second.
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), bit-reflected
_X0 = 1 << 31  # the polynomial 1


def _multiply_mod_poly(a: int, b: int) -> int:
    product, bit = 0, _X0
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _powers_of_two() -> list[int]:
    out = [_X0 >> 1]  # x^(2^0)
    for _ in range(63):
        out.append(_multiply_mod_poly(out[-1], out[-1]))
    return out


_X_2N = _powers_of_two()  # x^(2^n) mod the polynomial


@lru_cache(maxsize=64)
def _shift_by_bytes(nbytes: int) -> int:
    """x^(8 * nbytes) mod the polynomial."""
    power, n, k = _X0, nbytes, 3
    while n:
        if n & 1:
            power = _multiply_mod_poly(_X_2N[k], power)
        n >>= 1
        k += 1
    return power


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The crc32c of A + B from crc32c(A), crc32c(B) and len(B)."""
    return _multiply_mod_poly(_shift_by_bytes(len2), crc1) ^ crc2


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
