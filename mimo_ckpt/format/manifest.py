"""The manifest: the JSON index of a checkpoint, and its commit marker (docs/format.md).

Pure data and parsing; no torch.
`Manifest.from_bytes` validates everything a reader relies on, so code past it can trust paths,
boxes, byte ranges and object encodings.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import crc32c

from mimo_ckpt.model.box import Box, first_overlap
from mimo_ckpt.model.dtypes import ITEMSIZE
from mimo_ckpt.errors import LayoutError, ManifestError, StorageError
from mimo_ckpt.model.layout import PARALLEL_DIMS, ModuleLayout
from mimo_ckpt.format.object_codec import check, check_json_value, decode, encode
from mimo_ckpt.format.paths import check_relpath

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_PATH",
    "StoredShard",
    "StoredTensor",
    "StoredObject",
    "ModuleEntry",
    "Manifest",
    "check_module_name",
    "check_json_value",
    "encode_manifest",
    "manifest_document",
    "loads_strict",
    "module_to_json",
    "read_manifest_bytes",
]

FORMAT_NAME = "mimo-ckpt"
FORMAT_VERSION = 3
KNOWN_VERSIONS = (1, 2, 3)
"""Versions 2 and 3 require `manifest_crc32c`; in version 1 it is optional (checked when present).
Version 3 object values are in the encoding of `object_codec`; earlier ones are plain JSON."""
MANIFEST_PATH = "manifest.json"
CRC_KEY = "manifest_crc32c"
_TRAILER = re.compile(rb',"manifest_crc32c":"([0-9a-f]{8})"\}')
_TRAILER_LEN = len(b',"manifest_crc32c":"00000000"}')
MAX_BYTES = MAX_ELEMENTS = 2**48
"""No shard file, byte offset or tensor is that large; larger numbers are corruption or hostile."""
READING_MARKER_PREFIX = ".reading-"
"""A load in progress: retention never deletes a checkpoint that holds one."""
_MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_RESERVED_NAMES = (".", "..", MANIFEST_PATH, "latest")
"""Module directories sit beside the manifest (and its temporary copies `manifest.json.*`), and
a checkpoint directory may be a run root, which holds `latest`."""


def check_module_name(name: str) -> str:
    if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
        raise ManifestError(
            f"module name {name!r} must match {_MODULE_NAME.pattern} (it names a directory)"
        )
    if name in _RESERVED_NAMES or name.startswith(MANIFEST_PATH + "."):
        raise ManifestError(
            f"module name {name!r} is reserved: it would collide with a file at the top of a "
            f"checkpoint or run directory"
        )
    return name


@dataclass(frozen=True, slots=True)
class StoredShard:
    box: Box
    file: str
    begin: int
    end: int
    crc32c: int
    block_bytes: int = 0
    block_crcs: tuple[int, ...] = ()
    """CRC-32C per `block_bytes` of [begin, end) (the last block shorter); empty for small shards."""


@dataclass(frozen=True, slots=True)
class StoredTensor:
    dtype: str
    global_shape: tuple[int, ...]
    shards: tuple[StoredShard, ...]
    split: tuple[tuple[str, ...], ...] | None = None
    """Parallel dims that cut each dimension under the saved layout (see sharding.py)."""

    @property
    def nbytes(self) -> int:
        return sum(s.end - s.begin for s in self.shards)


@dataclass(frozen=True, slots=True)
class StoredObject:
    global_shape: tuple[int, ...]
    values: Mapping[tuple[int, ...], Any]
    """Value per grid offset; `()` for plain objects. Encoded by `object_codec` whatever the
    manifest's version (`decode` gives the value back)."""


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    layout: ModuleLayout
    tensors: Mapping[str, StoredTensor]
    objects: Mapping[str, StoredObject]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True, slots=True)
class Manifest:
    world_size: int
    modules: Mapping[str, ModuleEntry]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        sections = {name: module_to_json(m, self.version) for name, m in self.modules.items()}
        return manifest_document(self.world_size, self.metadata, sections, self.version)

    def to_bytes(self) -> bytes:
        return encode_manifest(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "manifest") -> "Manifest":
        data = bytes(data)
        crc = _check_trailer(data, source)
        doc = loads_strict(data, source)
        _need(isinstance(doc, dict), source, "top level must be a JSON object")
        if CRC_KEY in doc or doc.get("version") in (2, 3):
            # The trailer check above saw the writer's exact bytes; anything else (a re-encoded
            # or hand-edited manifest, a checksum key elsewhere) cannot be trusted.
            _need(crc is not None and next(reversed(doc)) == CRC_KEY and doc[CRC_KEY] == crc, source,
                  f"manifest is corrupt: it must end with its {CRC_KEY} as written (compact JSON, last key)")
        return _parse(doc, source)


def manifest_document(world_size: int, metadata: Mapping[str, Any], sections: Mapping[str, Any],
                      version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The manifest as a JSON document, from each module's section (`module_to_json`): the one
    place its top level is spelled, for a Manifest and for a save that gathers the sections."""
    return {
        "format": FORMAT_NAME, "version": version, "world_size": world_size,
        "metadata": dict(metadata), "modules": dict(sorted(sections.items())),
    }


def encode_manifest(doc: dict[str, Any]) -> bytes:
    """The bytes of a manifest: compact JSON, ending with `"manifest_crc32c"`, the CRC-32C of the
    same bytes without that key (any such key already in `doc` is replaced)."""
    body = {k: v for k, v in doc.items() if k != CRC_KEY}
    if not body:
        raise ManifestError("manifest document is empty")
    blob = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return blob[:-1] + b',"%s":"%08x"}' % (CRC_KEY.encode(), crc32c.crc32c(blob))


def _check_trailer(data: bytes, source: str) -> str | None:
    """The checksum in the trailer `,"manifest_crc32c":"xxxxxxxx"}`, checked against the bytes
    before it (with the closing brace); None when `data` does not end with one."""
    match = _TRAILER.fullmatch(data, len(data) - _TRAILER_LEN) if len(data) > _TRAILER_LEN else None
    if match is None:
        return None
    want = match.group(1).decode()
    got = f"{crc32c.crc32c(data[: -_TRAILER_LEN] + b'}'):08x}"
    _need(got == want, source, f"manifest is corrupt: its bytes have crc32c {got}, its {CRC_KEY} says {want}")
    return want


def loads_strict(data: bytes, source: str) -> Any:
    """Strict JSON, or ManifestError naming `source`: UTF-8, no duplicate keys, finite numbers,
    nesting Python's parser survives, valid unicode."""
    try:
        text = data.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ManifestError(f"{source}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{source}: not valid JSON ({exc})") from None
    if "\\ud" in text or "\\uD" in text:  # only escapes can smuggle in a lone surrogate
        check_json_value(doc, source, max_depth=None)
    return doc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup[:80]!r}")
    return obj


def _finite(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"number {token[:40]} is out of range")  # 1e999 would read as infinity
    return value


def _not_json(token: str) -> None:
    raise ValueError(f"{token} is not a JSON number")  # Python's json would read it as a float


def module_to_json(m: ModuleEntry, version: int = FORMAT_VERSION) -> dict[str, Any]:
    tensors = {}
    for key, t in sorted(m.tensors.items()):
        tensors[key] = {
            "dtype": t.dtype,
            "shape": list(t.global_shape),
            **({"split": [list(dims) for dims in t.split]} if t.split is not None else {}),
            "shards": [
                {
                    "offset": list(s.box.offset), "shape": list(s.box.shape), "file": s.file,
                    "begin": s.begin, "end": s.end, "crc32c": f"{s.crc32c:08x}",
                    **({"blocks": {"bytes": s.block_bytes, "crc32c": "".join(f"{c:08x}" for c in s.block_crcs)}}
                       if s.block_crcs else {}),
                }
                for s in t.shards
            ],
        }
    objects = {}
    for key, o in sorted(m.objects.items()):
        objects[key] = {
            "grid": list(o.global_shape),
            # Held encoded whatever the version (StoredObject); versions 1 and 2 store them plain.
            "values": [{"offset": list(off), "value": v if version >= 3 else decode(v)}
                       for off, v in sorted(o.values.items())],
        }
    return {"layout": m.layout.to_json(), "tensors": tensors, "objects": objects}


# --- parsing -------------------------------------------------------------------------------------


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ManifestError(f"{where}: {what}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_MAX_NDIM, _MAX_DIM = 64, 2**62


def _dims(value: Any, where: str, name: str) -> tuple[int, ...]:
    _need(
        isinstance(value, list) and len(value) <= _MAX_NDIM and all(_int(v) and 0 <= v < _MAX_DIM for v in value),
        where, f"{name} must be a list of at most {_MAX_NDIM} ints in [0, 2^62), got {str(value)[:200]}",
    )
    return tuple(value)


def _parse(doc: Any, source: str) -> Manifest:
    _need(isinstance(doc, dict), source, "top level must be a JSON object")
    _need(doc.get("format") == FORMAT_NAME, source, f"format must be {FORMAT_NAME!r}, got {doc.get('format')!r}")
    version = doc.get("version")
    _need(_int(version) and version in KNOWN_VERSIONS, source,
          f"unsupported format version {version!r} (this reader knows {', '.join(map(str, KNOWN_VERSIONS))})")
    world_size = doc.get("world_size")
    _need(_int(world_size) and world_size >= 1, source, f"world_size must be an int >= 1, got {world_size!r}")
    metadata = doc.get("metadata", {})
    _need(isinstance(metadata, dict), source, "metadata must be an object")
    check_json_value(metadata, f"{source}: metadata")
    modules_doc = doc.get("modules")
    _need(isinstance(modules_doc, dict), source, "modules must be an object")
    modules = {}
    for name, mdoc in modules_doc.items():
        try:
            check_module_name(name)
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from None
        modules[name] = _parse_module(mdoc, f"{source}: module {name!r}", name, version)
    return Manifest(world_size=world_size, modules=modules, metadata=metadata, version=version)


def _parse_module(mdoc: Any, where: str, name: str, version: int) -> ModuleEntry:
    _need(isinstance(mdoc, dict), where, "must be an object")
    try:
        layout = ModuleLayout.from_json(mdoc.get("layout"))
    except LayoutError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    tensors_doc, objects_doc = mdoc.get("tensors", {}), mdoc.get("objects", {})
    _need(isinstance(tensors_doc, dict) and isinstance(objects_doc, dict), where,
          "tensors and objects must be objects")
    tensors = {k: _parse_tensor(v, f"{where}, tensor {k!r}", name) for k, v in tensors_doc.items()}
    objects = {k: _parse_object(v, f"{where}, object {k!r}", version) for k, v in objects_doc.items()}
    return ModuleEntry(layout=layout, tensors=tensors, objects=objects)


def _parse_tensor(tdoc: Any, where: str, module: str) -> StoredTensor:
    _need(isinstance(tdoc, dict), where, "must be an object")
    dtype = tdoc.get("dtype")
    _need(isinstance(dtype, str) and dtype in ITEMSIZE, where, f"unknown dtype {str(dtype)[:40]!r}")
    shape = _dims(tdoc.get("shape"), where, "shape")
    total = math.prod(shape)
    _need(total <= MAX_ELEMENTS, where, f"shape {list(shape)} has more than 2^48 elements")
    shards_doc = tdoc.get("shards")
    _need(isinstance(shards_doc, list), where, "shards must be a list")
    shards = []
    for i, sdoc in enumerate(shards_doc):
        swhere = f"{where}, shard {i}"
        _need(isinstance(sdoc, dict), swhere, "must be an object")
        box = Box(_dims(sdoc.get("offset"), swhere, "offset"), _dims(sdoc.get("shape"), swhere, "shape"))
        _need(len(box.offset) == len(box.shape) == len(shape), swhere,
              f"offset and shape must have the tensor's {len(shape)} dimensions")
        _need(box.fits_in(shape), swhere, f"box {box} outside global shape {list(shape)}")
        file = sdoc.get("file")
        try:
            check_relpath(file if isinstance(file, str) else "")
        except StorageError as exc:
            raise ManifestError(f"{swhere}: {exc}") from None
        _need(file.startswith(module + "/"), swhere, f"file {file!r} is outside module directory {module + '/'!r}")
        begin, end = sdoc.get("begin"), sdoc.get("end")
        _need(_int(begin) and _int(end) and 0 <= begin <= end <= MAX_BYTES, swhere,
              f"bad byte range {str(begin)[:40]}..{str(end)[:40]} (must be within [0, 2^48])")
        _need(end - begin == box.volume * ITEMSIZE[dtype], swhere,
              f"byte range {begin}..{end} does not hold {box.volume} {dtype} elements")
        crc = sdoc.get("crc32c")
        _need(isinstance(crc, str) and re.fullmatch(r"[0-9a-f]{8}", crc) is not None, swhere,
              f"crc32c must be 8 lowercase hex digits, got {crc!r}")
        shards.append(StoredShard(box, file, begin, end, int(crc, 16), *_parse_blocks(sdoc.get("blocks"), begin, end, swhere)))
    # Volumes first: a cheap sum that rejects most bad tilings before the overlap search.
    boxes = [sh.box for sh in shards]
    covered = sum(b.volume for b in boxes)
    _need(covered == total, where, f"shards hold {covered} of the tensor's {total} elements")
    overlap = first_overlap(boxes)
    if overlap is not None:
        i, j = overlap
        _need(False, where, f"shards {i} and {j} overlap ({boxes[i]} and {boxes[j]})")
    split = tdoc.get("split")
    if split is not None:
        _need(
            isinstance(split, list) and len(split) == len(shape)
            and all(isinstance(d, list) and all(p in PARALLEL_DIMS for p in d) and len(set(d)) == len(d) for d in split),
            where, f"split must list, per dimension, distinct names of {list(PARALLEL_DIMS)}; got {split!r}",
        )
        split = tuple(tuple(d) for d in split)
    return StoredTensor(dtype, shape, tuple(shards), split)


def _parse_blocks(bdoc: Any, begin: int, end: int, where: str) -> tuple[int, tuple[int, ...]]:
    if bdoc is None:
        return 0, ()
    _need(isinstance(bdoc, dict), where, "blocks must be an object")
    size, hexes = bdoc.get("bytes"), bdoc.get("crc32c")
    _need(_int(size) and 4096 <= size <= 1 << 30 and size & (size - 1) == 0, where,
          f"blocks.bytes must be a power of two in [4096, 2^30], got {str(size)[:40]}")
    count = -(-(end - begin) // size)
    _need(isinstance(hexes, str) and len(hexes) == 8 * count and re.fullmatch(r"[0-9a-f]*", hexes) is not None,
          where, f"blocks.crc32c must be {count} checksums of 8 lowercase hex digits")
    return size, tuple(int(hexes[i : i + 8], 16) for i in range(0, len(hexes), 8))


def _parse_object(odoc: Any, where: str, version: int) -> StoredObject:
    _need(isinstance(odoc, dict), where, "must be an object")
    grid = _dims(odoc.get("grid"), where, "grid")
    values_doc = odoc.get("values")
    _need(isinstance(values_doc, list), where, "values must be a list")
    values: dict[tuple[int, ...], Any] = {}
    for vdoc in values_doc:
        _need(isinstance(vdoc, dict) and "value" in vdoc, where, "each value must be {offset, value}")
        offset = _dims(vdoc.get("offset"), where, "offset")
        _need(len(offset) == len(grid), where, f"offset {list(offset)} must have the grid's {len(grid)} dimensions")
        _need(Box(offset, (1,) * len(offset)).fits_in(grid), where, f"offset {list(offset)} outside grid {list(grid)}")
        _need(offset not in values, where, f"offset {list(offset)} appears twice")
        value = vdoc["value"]
        check_json_value(value, f"{where}, offset {list(offset)}")
        if version >= 3:
            check(value, f"{where}, offset {list(offset)}")  # a bad encoding is a bad manifest
        else:  # plain JSON, where a "__mimo__" key is data: escaped, so it decodes as itself
            value = encode(value)
        values[offset] = value
    return StoredObject(grid, values)
