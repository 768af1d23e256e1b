"""Layout of one safetensors-encoded shard file, computed before any byte is written.

A file is `u64 little-endian header length N`, `N bytes of JSON header` (padded with spaces so the
data starts at a multiple of `HEADER_ALIGN`), then the tensors' bytes back to back in header order. Computing the
layout up front lets every rank of a module know every byte range without talking to the writer.
"""

from __future__ import annotations

import json
import math
import operator
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from mimo_ckpt.errors import CorruptShardError
from mimo_ckpt.model.dtypes import ITEMSIZE

__all__ = ["FileEntry", "FileTensor", "layout_file", "layout_files", "parse_header", "HEADER_ALIGN", "MAX_HEADER_BYTES"]

HEADER_ALIGN = 64
"""Data starts on a cache line. A read from the page cache is a copy into the caller's buffer,
and buffers from torch's allocator are 64-byte aligned; aligned offsets copy faster
(docs/performance.md, "Machines and their measured limits": page-cache copy by file offset)."""

_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
"""What `json.dumps(header, separators=(",", ":"), ensure_ascii=True)` builds on every call; a
module may have 10^4 files. It holds no state between calls."""
_json_string = json.encoder.encode_basestring_ascii
"""How that encoder writes a string (a dict key included)."""


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
    return _with_prefix(_HEADER_ENCODER.encode(header), relative)


def layout_files(
    files: Iterable[Sequence[tuple[str, str, tuple[int, ...]]]], metadata: dict[str, str]
) -> Iterator[tuple[bytes, list[tuple[int, int]]]]:
    """`layout_file` for many files that share metadata, each given as (name, dtype, shape) per
    tensor: the same bytes, built faster, yielded file by file.

    The save planner lays out every file of a module at once, 10^5 tensors and more. Rather than
    a dict per tensor for json to encode, each tensor's header entry is formatted as text: its
    json-encoded name, then the encoding of its dtype and shape (made by json once per distinct
    pair), then its byte offsets. Shapes hold ints, as boxes' shapes do."""
    opening = _HEADER_ENCODER.encode({"__metadata__": metadata})[:-1]  # '{"__metadata__":{...}'
    # (dtype, shape) -> '{"dtype":"F32","shape":[2,3],"data_offsets":[', and the size in bytes
    by_dtype_shape: dict[tuple[str, tuple[int, ...]], tuple[str, int]] = {}
    for tensors in files:
        names = set(map(_first, tensors))
        if len(names) < len(tensors) or "__metadata__" in names:
            # A header is a dict: a repeated name keeps one entry, with the last value. Let
            # layout_file build that dict.
            yield layout_file([FileEntry(*t) for t in tensors], metadata)
            continue
        entries = [opening]
        relative: list[tuple[int, int]] = []
        pos = 0
        for name, dtype, shape in tensors:
            known = by_dtype_shape.get((dtype, shape))
            if known is None:
                text = _HEADER_ENCODER.encode({"dtype": dtype, "shape": shape})[:-1] + ',"data_offsets":['
                known = by_dtype_shape[dtype, shape] = (text, math.prod(shape, start=ITEMSIZE[dtype]))
            value, nbytes = known
            end = pos + nbytes
            entries.append(f"{_json_string(name)}:{value}{pos},{end}]}}")
            relative.append((pos, end))
            pos = end
        yield _with_prefix(",".join(entries) + "}", relative)


_first = operator.itemgetter(0)


def _with_prefix(header: str, relative: list[tuple[int, int]]) -> tuple[bytes, list[tuple[int, int]]]:
    """The length-prefixed, padded header, and the entries' ranges made absolute."""
    text = header.encode()
    text += b" " * (-(8 + len(text)) % HEADER_ALIGN)
    prefix = struct.pack("<Q", len(text)) + text
    base = len(prefix)
    return prefix, [(base + b, base + e) for b, e in relative]


MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on a header's length."""


@dataclass(frozen=True, slots=True)
class FileTensor:
    """A tensor of a safetensors file read by another program: its bytes are [begin, end)."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(file: str, length_bytes: bytes, header: bytes, file_size: int, where: str = "") -> dict[str, FileTensor]:
    """The tensors of safetensors file `file` (of folder `where`, for messages) from its first 8
    bytes and its header, every field checked against the file's size."""
    def bad(what: str) -> CorruptShardError:
        return CorruptShardError(f"{where + '/' if where else ''}{file}: not a readable safetensors file: {what}")

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise bad("a name appears twice in the header")
        return out

    try:
        doc = json.loads(header, object_pairs_hook=unique)
    except ValueError as exc:
        raise bad(f"header: {exc}") from None
    if not isinstance(doc, dict):
        raise bad("the header is not a JSON object")
    base = len(length_bytes) + len(header)
    out = {}
    for name, t in doc.items():
        if name == "__metadata__":
            continue
        if (not isinstance(t, dict) or t.get("dtype") not in ITEMSIZE or not isinstance(t.get("shape"), list)
                or not all(type(d) is int and d >= 0 for d in t["shape"]) or not isinstance(t.get("data_offsets"), list)
                or len(t["data_offsets"]) != 2 or not all(type(o) is int for o in t["data_offsets"])):
            raise bad(f"tensor {name!r}: needs dtype (one of {sorted(ITEMSIZE)}), shape and data_offsets")
        begin, end = (base + o for o in t["data_offsets"])
        nbytes = math.prod(t["shape"], start=ITEMSIZE[t["dtype"]])
        if end - begin != nbytes or begin < base or end > file_size:
            raise bad(f"tensor {name!r}: bytes {begin}..{end} do not hold {t['dtype']} {t['shape']} "
                      f"within the file's {file_size} bytes")
        out[name] = FileTensor(file, t["dtype"], tuple(t["shape"]), begin, end)
    return out
