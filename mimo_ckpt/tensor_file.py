"""Layout of one safetensors-encoded shard file, computed before any byte is written.

A file is `u64 little-endian header length N`, `N bytes of JSON header` (padded with spaces so the
data starts 8-byte aligned), then the tensors' bytes back to back in header order. Computing the
layout up front lets every rank of a module know every byte range without talking to the writer.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from .dtypes import ITEMSIZE

__all__ = ["FileEntry", "layout_file", "HEADER_ALIGN"]

HEADER_ALIGN = 8


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def layout_file(
    entries: list[FileEntry], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[int, int]]]:
    """The file's prefix (length + header) and each entry's absolute byte range [begin, end)."""
    header: dict[str, object] = {"__metadata__": metadata}
    relative: list[tuple[int, int]] = []
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        relative.append((pos, pos + e.nbytes))
        pos += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-(8 + len(text)) % HEADER_ALIGN)
    prefix = struct.pack("<Q", len(text)) + text
    base = len(prefix)
    return prefix, [(base + b, base + e) for b, e in relative]
