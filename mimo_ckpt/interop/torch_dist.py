"""megatron-core `torch_dist` checkpoints (PyTorch DCP files) in and out of our format.

Reading: the `.metadata` index is a pickle. It is read with an unpickler that builds only DCP's
own metadata dataclasses and enums, torch.Size and dtypes, and refuses anything else, so a
crafted index cannot run code. Tensors are `torch.save` records read with `weights_only=True`
(the same restriction). Objects (ShardedObjects, `common.pt`) may be arbitrary pickles: they are
read with `weights_only=True` too, and only `allow_pickle=True` lifts that, for checkpoints the
user trusts. What is kept must be storable: module objects as `object_codec` encodes them,
records of no module as plain JSON (they go to the manifest's metadata); the rest is listed as
dropped. Our format stores no pickles.

Writing: one process writes the consolidated tensors with DCP itself (`no_dist`), under
megatron's keys, plus megatron's `metadata.json`, so `dist_checkpointing.load` reads it under any
layout. Both directions hold a whole checkpoint's selected modules in memory.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from mimo_ckpt.model.box import Box
from mimo_ckpt.io import commit
from mimo_ckpt.errors import ManifestError, ShardError, StorageError, UnsafeCheckpointError
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.interop.megatron_keys import COMMON_METADATA, megatron_key, split_key
from mimo_ckpt.format.object_codec import decode
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.model.rank_state import is_layout_bound
from mimo_ckpt.io.storage import LocalStorage, read_small_file
from mimo_ckpt.format.paths import check_relpath

__all__ = ["DcpIndex", "read_index", "import_torch_dist", "export_torch_dist", "ImportReport"]

METADATA_FILE = ".metadata"
MEGATRON_CONFIG = "metadata.json"
COMMON_FILE = "common.pt"
COMMON_STATE = "common_state"  # megatron's ShardedObject holding its common state (0.19 and later)
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
TORCH_DIST_RECORDS = "torch_dist_records"  # manifest metadata: the source's records of no module
TORCH_DIST_COMMON = "torch_dist_common_pt"  # manifest metadata: the source's common.pt entries
_OBJECT_SHARD = re.compile(r"^(?P<key>.+)/shard_(?P<offset>[0-9.]+)_(?P<shape>[0-9.]+)$")


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes (dataclasses and enums), sizes, dtypes and paths: nothing
    whose construction can run code."""

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        elif (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        elif module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath"):
            import pathlib

            return getattr(pathlib, name)  # the checkpoint id DCP records
        raise UnsafeCheckpointError(
            f"{self.source}: the DCP index refers to {module}.{name}, which is not DCP metadata; "
            f"mimo-ckpt does not unpickle it"
        )


@dataclass(frozen=True, slots=True)
class DcpChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DcpIndex:
    tensors: dict[str, tuple[str, tuple[int, ...], list[DcpChunk]]]
    """fqn -> (torch dtype name, global shape, chunks)."""
    blobs: dict[str, tuple[str, int, int]]
    """fqn -> (file, offset, length) of a byte record (a torch.save'd object)."""


def read_index(path: str) -> DcpIndex:
    """The tensors and byte records of the DCP checkpoint in directory `path`."""
    source = os.path.join(path, METADATA_FILE)
    data = read_small_file(LocalStorage(path), METADATA_FILE)
    if data is None:
        raise ManifestError(f"{path}: not a torch_dist checkpoint (no {METADATA_FILE})")
    try:
        metadata = _IndexUnpickler(data, source).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise ManifestError(f"{source}: unreadable DCP index: {exc}") from exc
    storage = {}
    for index, info in metadata.storage_data.items():
        if getattr(info, "transform_descriptors", None):
            raise ManifestError(f"{source}: {index.fqn!r} is stored with transforms {info.transform_descriptors}, not supported")
        at = tuple(index.offset) if index.offset is not None else None
        try:  # a data path must stay inside the checkpoint
            check_relpath(str(info.relative_path))
        except StorageError as exc:
            raise ManifestError(f"{source}: {index.fqn!r}: {exc}") from None
        storage[(index.fqn, at)] = (str(info.relative_path), int(info.offset), int(info.length))
    tensors, blobs = {}, {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if hasattr(meta, "chunks"):
            chunks = []
            for c in meta.chunks:
                where = storage.get((fqn, tuple(c.offsets)))
                if where is None:
                    raise ManifestError(f"{source}: tensor {fqn!r} chunk at {list(c.offsets)} has no stored bytes")
                chunks.append(DcpChunk(tuple(c.offsets), tuple(c.sizes), *where))
            dtype = str(meta.properties.dtype).removeprefix("torch.")
            tensors[fqn] = (dtype, tuple(meta.size), chunks)
        else:
            where = storage.get((fqn, None)) or next((v for (f, _), v in storage.items() if f == fqn), None)
            if where is None:
                raise ManifestError(f"{source}: object {fqn!r} has no stored bytes")
            blobs[fqn] = where
    return DcpIndex(tensors, blobs)


def _read_record(src: LocalStorage, where: tuple[str, int, int]) -> bytes:
    file, offset, length = where
    size = src.size(file)
    if size is None or offset < 0 or length < 0 or offset + length > size:
        raise ManifestError(f"{os.path.join(src.root, file)}: record at {offset} of {length} bytes is outside "
                            f"the file ({'missing' if size is None else f'{size} bytes'})")
    data = bytearray(length)
    src.read_into(file, offset, memoryview(data))
    return bytes(data)


def _load_object(data: bytes, what: str, allow_pickle: bool) -> Any:
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{what} is a pickle of objects beyond plain data; mimo-ckpt does not unpickle it "
                f"unless told to (--allow-pickle, for checkpoints you trust): {str(exc).splitlines()[0]}"
            ) from exc
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _unwrap(record: Any, fqn: str, src: str) -> Any:
    """megatron stores a ShardedObject as the list of the saving rank's copies of its value."""
    if not isinstance(record, list) or not record:
        raise ManifestError(f"{src}: object {fqn!r} is not a megatron ShardedObject record (a non-empty list)")
    return record[0]


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


@dataclass(slots=True)
class ImportReport:
    tensors: int = 0
    objects: int = 0
    bytes: int = 0
    dropped: list[str] = field(default_factory=list)
    """Entries that could not be kept (not storable), with the reason."""


def import_torch_dist(src: str, dst: str, *, allow_pickle: bool = False, progress: bool = True) -> ImportReport:
    """Write our checkpoint at `dst` from megatron's torch_dist checkpoint at `src`.

    Modules come from the key prefixes (`language_model.`, `modality_submodules.<name>.`,
    `mimo.<name>.`); each gets a one-rank layout, as the source records none (loads reshard).
    """
    import torch

    from mimo_ckpt.run.save import save
    from mimo_ckpt.run.comm import ThreadWorld
    from mimo_ckpt.format.object_codec import encode_checked
    from mimo_ckpt.model.shard import ObjectShard, TensorShard

    index = read_index(src)
    source = LocalStorage(src)  # reads only regular files inside `src`, never through a link out
    report = ImportReport()
    state: dict[str, dict[str, Any]] = {}
    records: dict[str, Any] = {}  # DCP records of no module (megatron's common state)
    common: dict[str, Any] = {}  # common.pt, written by older megatron versions
    bar = Progress("import", sum(c.length for _, _, cs in index.tensors.values() for c in cs)) if progress else None
    for fqn, (dtype, shape, chunks) in sorted(index.tensors.items()):
        module, key = split_key(fqn)
        for c in chunks:
            t = torch.load(io.BytesIO(_read_record(source, (c.file, c.offset, c.length))), map_location="cpu", weights_only=True)
            if tuple(t.shape) != c.sizes or str(t.dtype).removeprefix("torch.") != dtype:
                raise ManifestError(f"{src}: tensor {fqn!r} chunk at {list(c.offsets)}: stored {tuple(t.shape)} "
                                    f"{t.dtype}, index says {c.sizes} {dtype}")
            state.setdefault(module, {})[f"{fqn}@{c.offsets}"] = TensorShard(key, t, shape, c.offsets)
            report.tensors += 1
            report.bytes += t.numel() * t.element_size()
            if bar:
                bar.advance(c.length)
    if bar:
        bar.close()

    for fqn, where in sorted(index.blobs.items()):
        m = _OBJECT_SHARD.match(fqn)
        key = m["key"] if m else fqn
        value = _unwrap(_load_object(_read_record(source, where), f"{src}: object {fqn!r}", allow_pickle), fqn, src)
        try:
            module, local = split_key(key)
        except ShardError:
            module = None
        if module is None:
            if _json_able(value):
                records[fqn] = value
            else:
                report.dropped.append(f"{fqn}: {type(value).__name__} is not JSON-able")
            continue
        try:
            encode_checked(fqn, value)  # as save will: better dropped here than failing the save
        except ShardError as exc:
            report.dropped.append(str(exc))
            continue
        offset = tuple(int(x) for x in m["offset"].split(".")) if m else ()
        grid = tuple(int(x) for x in m["shape"].split(".")) if m else ()
        state.setdefault(module, {})[fqn] = ObjectShard(local, value, grid, offset)
        report.objects += 1

    common_path = os.path.join(src, COMMON_FILE)
    common_bytes = read_small_file(source, COMMON_FILE)
    if common_bytes is not None:
        loaded = _load_object(common_bytes, common_path, allow_pickle)
        for k, v in (loaded.items() if isinstance(loaded, dict) else [("common", loaded)]):
            if _json_able(v):
                common[k] = v
            else:
                report.dropped.append(f"{COMMON_FILE}[{k!r}]: {type(v).__name__} is not JSON-able")

    if not state:
        raise ManifestError(f"{src}: no MIMO module keys found (expected 'language_model.' or 'modality_submodules.<name>.')")
    layouts = {name: ModuleLayout() for name in state}
    metadata = {"imported_from": "megatron torch_dist", TORCH_DIST_RECORDS: records, TORCH_DIST_COMMON: common}
    save(state, dst, layouts=layouts, comm=ThreadWorld(1).comm(0), metadata=metadata)
    return report


def _record(value: Any) -> list[Any]:
    """What DCP should store for a ShardedObject so megatron reads it: DCP torch.saves non-tensor
    values, and megatron's record of a ShardedObject is the list of the saving rank's copies."""
    return [value]


def export_torch_dist(src: str, dst: str, *, modules: list[str] | None = None,
                      main_param_name: str = "fp32_param", progress: bool = True) -> dict[str, int]:
    """Write megatron's torch_dist checkpoint at `dst` from our checkpoint at `src`."""
    import torch

    from mimo_ckpt.model.dtypes import to_torch
    from mimo_ckpt.plan.load import plan_module_load
    from mimo_ckpt.io.commit import read_manifest
    from mimo_ckpt.model.shard import TensorMeta
    from mimo_ckpt.io.storage import open_storage
    from mimo_ckpt.io.tensors import fill_tensors

    storage = open_storage(src)
    manifest = read_manifest(storage, src)
    names = modules or sorted(manifest.modules)
    for name in names:
        if name not in manifest.modules:
            raise ManifestError(f"module {name!r} is not in {src} (it has {sorted(manifest.modules)})")
    out: dict[str, Any] = {}
    counts = {"tensors": 0, "objects": 0, "bytes": 0, "skipped_layout_bound": 0}
    total = sum(t.nbytes for n in names for t in manifest.modules[n].tensors.values())
    bar = Progress("export", total) if progress else None
    for name in names:
        entry = manifest.modules[name]
        for key, stored in sorted(entry.tensors.items()):
            box = Box((0,) * len(stored.global_shape), stored.global_shape)
            tensor = torch.empty(stored.global_shape, dtype=to_torch(stored.dtype, key=key))
            items = plan_module_load(name, entry, [TensorMeta(key, stored.dtype, stored.global_shape, box, True)])
            fill_tensors(storage, items, [(tensor, box)], verify=True)
            out[megatron_key(name, key, main_param_name=main_param_name)] = tensor
            counts["tensors"] += 1
            counts["bytes"] += stored.nbytes
            if bar:
                bar.advance(stored.nbytes)
        for key, obj in sorted(entry.objects.items()):
            if is_layout_bound(key):
                counts["skipped_layout_bound"] += 1
                continue
            base = megatron_key(name, key, main_param_name=main_param_name)
            for offset, value in sorted(obj.values.items()):
                # megatron names every ShardedObject by its place in a grid; one object is 0 of (1,)
                grid, at = (obj.global_shape, offset) if obj.global_shape else ((1,), (0,))
                fqn = f"{base}/shard_{'.'.join(map(str, at))}_{'.'.join(map(str, grid))}"
                out[fqn] = _record(decode(value, f"{src}: module {name!r}, object {key!r}"))
                counts["objects"] += 1
    if bar:
        bar.close()
    if modules is None:  # the whole checkpoint: give back what an import kept of no module
        for fqn, value in (manifest.metadata.get(TORCH_DIST_RECORDS) or {}).items():
            out[fqn] = _record(value)
            counts["objects"] += 1
    common = manifest.metadata.get(TORCH_DIST_COMMON) if modules is None else None
    if not common and not any(fqn.startswith(f"{COMMON_STATE}/") for fqn in out):
        # megatron's loader needs its common state, a legacy common.pt or this record; a native
        # checkpoint keeps it (if the trainer gave it) as save metadata
        out[f"{COMMON_STATE}/shard_0_1"] = _record(dict(manifest.metadata.get(COMMON_METADATA) or {}))
    _write_torch_dist(dst, out, common)
    return counts


_DCP_FILES = (METADATA_FILE, f"{METADATA_FILE}.tmp", "__0_0.distcp", COMMON_FILE)
"""What a one-process DCP save (one file, one thread) and the common state put in a folder."""


def _write_torch_dist(dst: str, out: dict[str, Any], common: dict[str, Any] | None) -> None:
    """DCP's files, then megatron's `metadata.json` (its loader's sign of a whole checkpoint) as
    the index of the commit protocol: published exclusively, last."""
    import torch
    import torch.distributed.checkpoint as dcp

    os.makedirs(dst, exist_ok=True)
    folder = LocalStorage(dst)
    with commit.Write(folder, MEGATRON_CONFIG, dst) as write:
        write.announce(_DCP_FILES)  # DCP writes through names: they must be free
        fault_point("offline.start", 0)
        if common:
            blob = io.BytesIO()
            torch.save(common, blob)
            folder.write_file(COMMON_FILE, [blob.getbuffer()])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
            # Unflattened: every megatron key is one DCP item, tensor or torch.save'd record.
            planner = dcp.DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
            dcp.save(out, storage_writer=dcp.FileSystemWriter(dst), planner=planner, no_dist=True)
        fault_point("offline.write", 0)
        fault_point("offline.commit", 0)
        config = json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}).encode()
        write.publish(config)
