"""CRC-32C of whole shards and of fixed-size blocks within them.

The whole-shard checksum verifies a read of a whole shard. Block checksums (one per `BLOCK_BYTES`
of a shard's byte range, the last block shorter) verify partial reads, as resharded loads do: a
verified read is widened to whole blocks, and every block it touches is checked. Every writer
reports a shard's checksums as one `ShardSums`, computed by `BlockHasher` as the bytes go by.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import crc32c
import numpy as np

from mimo_ckpt.errors import PlanError

__all__ = ["BLOCK_BYTES", "ShardSums", "BlockHasher", "crc32c_combine", "shard_sums"]

BLOCK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ShardSums:
    """A writer's checksums of one shard: the CRC-32C of all its bytes and, for a shard larger
    than one block, the CRC-32C of each `block_bytes` of it (the last block shorter)."""

    crc32c: int
    block_bytes: int = 0
    block_crcs: tuple[int, ...] = ()

    def to_wire(self) -> list[Any]:
        """JSON form, for gathering between ranks: `[crc32c, block_bytes, [block crcs]]`."""
        return [self.crc32c, self.block_bytes, list(self.block_crcs)]

    @classmethod
    def from_wire(cls, wire: Any) -> "ShardSums":
        if (not isinstance(wire, (list, tuple)) or len(wire) != 3 or not isinstance(wire[2], (list, tuple))
                or not all(type(v) is int for v in (wire[0], wire[1], *wire[2]))):
            raise PlanError(f"shard checksums must be [crc32c, block_bytes, [block crcs]], got {str(wire)[:80]}")
        return cls(wire[0], wire[1], tuple(wire[2]))


class BlockHasher:
    """`shard_sums` of bytes fed in order, in buffers of any size (a shard streamed to a file)."""

    __slots__ = ("block_bytes", "nbytes", "blocks", "_crc", "_fill")

    def __init__(self, block_bytes: int = BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self.nbytes = 0
        self.blocks: list[int] = []
        """CRC-32C of each block completed so far."""
        self._crc = 0  # of the `_fill` bytes after the last completed block
        self._fill = 0

    def update(self, data: memoryview | np.ndarray | bytes) -> None:
        view = memoryview(data).cast("B")
        pos, size = 0, len(view)
        while pos < size:  # each byte is hashed once, whatever the buffer boundaries
            take = min(size - pos, self.block_bytes - self._fill)
            self._crc = crc32c.crc32c(view[pos : pos + take], self._crc)
            pos += take
            self._fill += take
            if self._fill == self.block_bytes:
                self.blocks.append(self._crc)
                self._crc, self._fill = 0, 0
        self.nbytes += size

    def flush(self) -> None:
        """Close the short last block; call after the last byte."""
        if self._fill:
            self.blocks.append(self._crc)
            self._crc, self._fill = 0, 0

    def sums(self) -> ShardSums:
        """The whole crc (combined from the blocks: no second pass) and, past one block, the blocks."""
        self.flush()
        if self.nbytes <= self.block_bytes:
            return ShardSums(self.blocks[0] if self.blocks else 0)
        whole = self.blocks[0]
        for crc in self.blocks[1:-1]:
            whole = crc32c_combine(whole, crc, self.block_bytes)
        whole = crc32c_combine(whole, self.blocks[-1], self.nbytes - (len(self.blocks) - 1) * self.block_bytes)
        return ShardSums(whole, self.block_bytes, tuple(self.blocks))


def shard_sums(data: memoryview, block_bytes: int = BLOCK_BYTES) -> ShardSums:
    """The checksums of one shard's bytes; no blocks when the shard fits in one."""
    hasher = BlockHasher(block_bytes)
    hasher.update(data)
    return hasher.sums()


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
