"""Export one module's consolidated weights as Hugging Face style safetensors files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mimo_ckpt.io import commit
from mimo_ckpt.model.box import Box
from mimo_ckpt.errors import ManifestError
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.format.manifest import ModuleEntry
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.io.storage import Storage
from mimo_ckpt.io.stream import Budget, StreamItem, write_streamed_file
from mimo_ckpt.format.safetensors import FileEntry, layout_file

__all__ = ["ExportFile", "plan_export", "run_export", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class ExportFile:
    name: str
    prefix: bytes
    tensors: tuple[tuple[str, str], ...]
    """(source key, exported name) in file order."""
    nbytes: int


def plan_export(module: str, entry: ModuleEntry, *, max_shard_bytes: int, rename: dict[str, str] | None = None,
                include: str | None = None, exclude: str | None = None) -> list[ExportFile]:
    """Group whole tensors into files of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    rename = rename or {}
    keys = [k for k in sorted(entry.tensors)
            if (include is None or re.search(include, k)) and (exclude is None or not re.search(exclude, k))]
    names = {k: rename.get(k, k) for k in keys}
    clash = sorted(n for n in set(names.values()) if list(names.values()).count(n) > 1)
    if clash:
        raise ManifestError(f"module {module!r}: the renaming map gives several tensors the name(s) {clash}")
    groups: list[list[str]] = []
    size = 0
    for k in keys:
        t = entry.tensors[k]
        nbytes = t.nbytes
        if not groups or (size + nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    files = []
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        entries = [FileEntry(names[k], entry.tensors[k].dtype, entry.tensors[k].global_shape) for k in group]
        prefix, ranges = layout_file(entries, {"format": "pt"})
        files.append(ExportFile(name, prefix, tuple((k, names[k]) for k in group), ranges[-1][1] if ranges else len(prefix)))
    return files


def run_export(src: Storage, dst: Storage, module: str, entry: ModuleEntry, files: list[ExportFile],
               budget: Budget, progress: bool = True, where: str = "the export folder") -> dict:
    """Write the files, then the index, through the commit protocol: a folder that holds an
    index already is refused, and an export that died there is cleaned up first."""
    save_id = commit.begin(dst, INDEX_NAME, where)
    committed = False
    try:
        commit.announce(dst, save_id, [f.name for f in files], where)
        fault_point("offline.start", 0)
        bar = Progress("export", sum(f.nbytes for f in files)) if progress else None
        weight_map: dict[str, str] = {}
        total = 0
        for f in files:
            items = [StreamItem(k, entry.tensors[k], Box((0,) * len(entry.tensors[k].global_shape),
                                                         entry.tensors[k].global_shape)) for k, _ in f.tensors]
            write_streamed_file(src, dst, module, f.name, f.prefix, items, budget, bar)
            fault_point("offline.write", 0)
            for k, name in f.tensors:
                weight_map[name] = f.name
                total += entry.tensors[k].nbytes
        if bar:
            bar.close()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        fault_point("offline.commit", 0)
        commit.publish(dst, save_id, INDEX_NAME, json.dumps(index, indent=2).encode(), where)
        committed = True
    finally:
        commit.finish(dst, save_id, committed)
    return index
