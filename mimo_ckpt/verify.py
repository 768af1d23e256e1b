"""Recompute every checksum of a checkpoint and check its files against the manifest."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import crc32c
import numpy as np

from .errors import StorageError
from .manifest import Manifest, StoredShard
from .progress import Progress
from .save_plan import tensor_name
from .storage import Storage

__all__ = ["BadShard", "verify_checkpoint"]


@dataclass(frozen=True, slots=True)
class BadShard:
    module: str
    key: str
    shard: StoredShard
    problem: str

    def __str__(self) -> str:
        return (f"module {self.module!r}, tensor {self.key!r}, box {self.shard.box}, "
                f"file {self.shard.file} bytes {self.shard.begin}..{self.shard.end}: {self.problem}")


def _header(storage: Storage, path: str, size: int) -> dict | None:
    if size < 8:
        return None
    head = bytearray(8)
    storage.read_into(path, 0, memoryview(head))
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 << 20:
        return None
    text = bytearray(n)
    storage.read_into(path, 8, memoryview(text))
    try:
        doc = json.loads(bytes(text))
    except ValueError:
        return None
    doc["__base__"] = 8 + n
    return doc


def verify_checkpoint(storage: Storage, manifest: Manifest, *, chunk_bytes: int = 16 << 20,
                      progress: bool = True, modules: list[str] | None = None) -> list[BadShard]:
    """Every shard whose file is missing, short, mislabelled or fails its crc32c."""
    selected = {n: m for n, m in manifest.modules.items() if modules is None or n in modules}
    total = sum(m.nbytes for m in selected.values())
    bar = Progress("verify", total) if progress else None
    bad: list[BadShard] = []
    sizes: dict[str, int | None] = {}
    headers: dict[str, dict | None] = {}
    buf = np.empty(chunk_bytes, dtype=np.uint8)
    for name, entry in sorted(selected.items()):
        for key, tensor in sorted(entry.tensors.items()):
            for shard in tensor.shards:
                if shard.file not in sizes:
                    sizes[shard.file] = storage.size(shard.file)
                    headers[shard.file] = _header(storage, shard.file, sizes[shard.file] or 0)
                size = sizes[shard.file]
                if size is None:
                    bad.append(BadShard(name, key, shard, "file is missing"))
                    continue
                if size < shard.end:
                    bad.append(BadShard(name, key, shard, f"file has {size} bytes, shard ends at {shard.end}"))
                    continue
                header = headers[shard.file]
                meta = header.get(tensor_name(key, shard.box)) if header else None
                base = header["__base__"] if header else 0
                if not isinstance(meta, dict) or meta.get("data_offsets") != [shard.begin - base, shard.end - base]:
                    bad.append(BadShard(name, key, shard, "safetensors header does not describe this shard"))
                    continue
                crc = 0
                for start in range(shard.begin, shard.end, chunk_bytes):
                    view = buf[: min(chunk_bytes, shard.end - start)]
                    try:
                        storage.read_into(shard.file, start, memoryview(view))
                    except StorageError as exc:
                        bad.append(BadShard(name, key, shard, str(exc)))
                        break
                    crc = crc32c.crc32c(view, crc)
                    if bar:
                        bar.advance(len(view))
                else:
                    if crc != shard.crc32c:
                        bad.append(BadShard(name, key, shard, f"checksum {crc:08x} != manifest {shard.crc32c:08x}"))
    if bar:
        bar.close()
    return bad
