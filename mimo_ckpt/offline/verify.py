"""Recompute every checksum of a checkpoint and check its files against the manifest."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from mimo_ckpt.format.checksums import BLOCK_BYTES, BlockHasher
from mimo_ckpt.errors import ManifestError, StorageError
from mimo_ckpt.format.manifest import Manifest, ModuleEntry, StoredShard, loads_strict
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.plan.save import tensor_name
from mimo_ckpt.io.storage import Storage

__all__ = ["BadShard", "verify_checkpoint"]

_MAX_HEADER = 100 << 20
"""Larger safetensors headers are refused (the safetensors library's own limit)."""


@dataclass(frozen=True, slots=True)
class BadShard:
    module: str
    key: str
    shard: StoredShard
    problem: str

    def __str__(self) -> str:
        return (f"module {self.module!r}, tensor {self.key!r}, box {self.shard.box}, "
                f"file {self.shard.file} bytes {self.shard.begin}..{self.shard.end}: {self.problem}")


@dataclass(frozen=True, slots=True)
class _Placed:
    """A shard where the manifest places it: module, tensor key, dtype."""

    module: str
    key: str
    dtype: str
    shard: StoredShard


def _by_file(modules: dict[str, ModuleEntry]) -> dict[str, list[_Placed]]:
    files: dict[str, list[_Placed]] = {}
    for name, entry in sorted(modules.items()):
        for key, tensor in sorted(entry.tensors.items()):
            for shard in tensor.shards:
                files.setdefault(shard.file, []).append(_Placed(name, key, tensor.dtype, shard))
    return files


def _bad(p: _Placed, problem: str) -> BadShard:
    return BadShard(p.module, p.key, p.shard, problem)


def _read_header(storage: Storage, path: str, size: int) -> tuple[int, dict]:
    """(data start, header) of a safetensors file, parsed strictly; ManifestError says why not."""
    if size < 8:
        raise ManifestError(f"{size} bytes, shorter than the 8-byte header length")
    head = bytearray(8)
    storage.read_into(path, 0, memoryview(head))
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > _MAX_HEADER:
        raise ManifestError(f"header length {n} does not fit in the file's {size} bytes (or exceeds {_MAX_HEADER})")
    text = bytearray(n)
    storage.read_into(path, 8, memoryview(text))
    header = loads_strict(bytes(text), f"{n}-byte header")
    if not isinstance(header, dict):
        raise ManifestError(f"{n}-byte header is not a JSON object")
    return 8 + n, header


def _canonical(value: object) -> str:
    """Equal only for identical JSON (2 != 2.0 != true), whatever the key order."""
    return json.dumps(value, sort_keys=True)


def _check_file(storage: Storage, path: str, placed: list[_Placed]) -> tuple[list[BadShard], set[int]]:
    """Checks one data file against the manifest: size, then the header's entry for each shard and
    nothing else. Returns the problems and the indexes (into `placed`) of shards whose bytes cannot
    be read as placed (their checksums are skipped)."""
    size = storage.size(path)
    if size is None:
        return [_bad(placed[0], "file is missing")], set(range(len(placed)))
    last = max(range(len(placed)), key=lambda i: placed[i].shard.end)
    bad, unreadable = [], set()
    for i, p in enumerate(placed):
        if size < p.shard.end:
            bad.append(_bad(p, f"file has {size} bytes, shard ends at {p.shard.end}"))
            unreadable.add(i)
    if size > placed[last].shard.end:
        bad.append(_bad(placed[last], f"file has {size} bytes but its last shard ends at "
                                      f"{placed[last].shard.end} (bytes appended)"))
    try:
        base, header = _read_header(storage, path, size)
    except (ManifestError, StorageError) as exc:
        return bad + [_bad(placed[0], f"safetensors header is unreadable: {exc}")], unreadable
    listed = set(header) - {"__metadata__"}
    for p in placed:
        name = tensor_name(p.key, p.shard.box)
        listed.discard(name)
        want = {"dtype": p.dtype, "shape": list(p.shard.box.shape),
                "data_offsets": [p.shard.begin - base, p.shard.end - base]}
        got = header.get(name)
        if p.shard.begin < base:
            bad.append(_bad(p, f"shard begins at byte {p.shard.begin}, inside the {base}-byte header"))
        elif got is None:
            bad.append(_bad(p, f"safetensors header has no entry {name!r}"))
        elif _canonical(got) != _canonical(want):
            bad.append(_bad(p, f"safetensors header entry {name!r} is {_canonical(got)[:200]}, "
                               f"the manifest says {_canonical(want)}"))
    if listed:
        names = sorted(listed)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        bad.append(_bad(placed[0], f"safetensors header lists {', '.join(map(repr, names[:5]))}{more}, "
                                   f"which the manifest does not place in this file"))
    return bad, unreadable


def _checksum(storage: Storage, p: _Placed, buf: np.ndarray, bar: Progress | None) -> BadShard | None:
    """The shard's bytes hashed as the writer did: the whole-shard crc and every block crc."""
    shard, chunk_bytes = p.shard, len(buf)
    hasher = BlockHasher(shard.block_bytes or BLOCK_BYTES)
    for start in range(shard.begin, shard.end, chunk_bytes):
        view = buf[: min(chunk_bytes, shard.end - start)]
        try:
            storage.read_into(shard.file, start, memoryview(view))
        except StorageError as exc:
            return _bad(p, str(exc))
        hasher.update(view)
        if bar:
            bar.advance(len(view))
    got = hasher.sums()
    if got.crc32c != shard.crc32c:
        return _bad(p, f"checksum {got.crc32c:08x} != manifest {shard.crc32c:08x}")
    if shard.block_crcs and got.block_crcs != shard.block_crcs:
        k = next(i for i, (a, b) in enumerate(zip(got.block_crcs, shard.block_crcs)) if a != b) \
            if len(got.block_crcs) == len(shard.block_crcs) else -1
        what = f"block {k} checksum {got.block_crcs[k]:08x} != manifest {shard.block_crcs[k]:08x}" if k >= 0 else \
            f"{len(got.block_crcs)} blocks of {shard.block_bytes} bytes, the manifest lists {len(shard.block_crcs)}"
        return _bad(p, what)
    return None


def verify_checkpoint(storage: Storage, manifest: Manifest, *, chunk_bytes: int = 16 << 20,
                      progress: bool = True, modules: list[str] | None = None) -> list[BadShard]:
    """Every problem of the data files of `modules` (all by default): a file missing, shorter or
    longer than the manifest's byte ranges in it, a safetensors header that does not list exactly
    the manifest's shards (dtype, shape, offsets), and every shard that fails its crc32c. Problems
    of a whole file are reported once, on one of its shards."""
    selected = {n: m for n, m in manifest.modules.items() if modules is None or n in modules}
    total = sum(m.nbytes for m in selected.values())
    bar = Progress("verify", total) if progress else None
    bad: list[BadShard] = []
    buf = np.empty(chunk_bytes, dtype=np.uint8)
    for path, placed in sorted(_by_file(selected).items()):
        problems, unreadable = _check_file(storage, path, placed)
        bad.extend(problems)
        for i, p in enumerate(placed):
            if i in unreadable:
                if bar:
                    bar.advance(p.shard.end - p.shard.begin)
                continue
            found = _checksum(storage, p, buf, bar)
            if found is not None:
                bad.append(found)
    if bar:
        bar.close()
    return bad
