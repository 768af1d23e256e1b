"""Planning of consolidated safetensors folders (Hugging Face style) made from stored tensors.

Each exported tensor is a stack of row runs taken from stored tensors (one layer of a tensor
stacked over layers, or all of it), possibly transposed: enough to unstack layers, split fused
QKV or gate/up projections, cut vocabulary padding, and rename. Pure: no bytes move here.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from mimo_ckpt.errors import ManifestError
from mimo_ckpt.format.manifest import ModuleEntry
from mimo_ckpt.format.safetensors import FileEntry, layout_file
from mimo_ckpt.model.dtypes import ITEMSIZE

__all__ = ["Run", "ExportPart", "ExportTensor", "ExportFile", "plain_tensors", "plan_export_files", "index_document",
           "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class Run:
    """`count` rows: the stored tensor's rows from `start` (within one layer) are the file
    tensor's rows from `file_start` (its columns where the file tensor is transposed)."""

    start: int
    file_start: int
    count: int


@dataclass(frozen=True, slots=True)
class ExportPart:
    """Rows of stored tensor `key` of `module`, below leading dims fixed at `index` (the layer
    of a tensor stacked over layers, or size-1 dims; none: the tensor itself); `run` None takes
    all of it (a scalar included)."""

    module: str
    key: str
    index: tuple[int, ...]
    run: Run | None


@dataclass(frozen=True, slots=True)
class ExportTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    transpose: bool
    parts: tuple[ExportPart, ...]
    """In the exported tensor's row order (column order where transposed)."""
    fill: float | None = None
    """A constant tensor (no parts): every element this value."""

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape the parts stack to: the tensor's shape before transposing."""
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape, start=ITEMSIZE[self.dtype])


@dataclass(frozen=True, slots=True)
class ExportFile:
    name: str
    prefix: bytes
    tensors: tuple[ExportTensor, ...]
    nbytes: int


def plain_tensors(module: str, entry: ModuleEntry, *, rename: Mapping[str, str] | None = None,
                  include: str | None = None, exclude: str | None = None) -> list[ExportTensor]:
    """Stored tensors as they are, selected by regexes and renamed by a map."""
    rename = rename or {}
    keys = [k for k in sorted(entry.tensors)
            if (include is None or re.search(include, k)) and (exclude is None or not re.search(exclude, k))]
    names = {k: rename.get(k, k) for k in keys}
    clash = sorted(n for n, c in Counter(names.values()).items() if c > 1)
    if clash:
        raise ManifestError(f"module {module!r}: the renaming map gives several tensors the name(s) {clash}")
    return [ExportTensor(names[k], entry.tensors[k].dtype, entry.tensors[k].global_shape, False,
                         (ExportPart(module, k, (), None),)) for k in keys]


def plan_export_files(tensors: Sequence[ExportTensor], max_shard_bytes: int, stem: str = "model") -> list[ExportFile]:
    """Group whole tensors, in order, into files `<stem>-0000i-of-0000n.safetensors` of at most
    `max_shard_bytes` (a bigger tensor gets its own)."""
    groups: list[list[ExportTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    files = []
    for i, group in enumerate(groups):
        name = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        prefix, ranges = layout_file([FileEntry(t.name, t.dtype, t.shape) for t in group], {"format": "pt"})
        files.append(ExportFile(name, prefix, tuple(group), ranges[-1][1] if ranges else len(prefix)))
    return files


def index_document(files: Sequence[ExportFile]) -> dict:
    """The `*.safetensors.index.json` of some files: total size and each tensor's file."""
    return {"metadata": {"total_size": sum(t.nbytes for f in files for t in f.tensors)},
            "weight_map": dict(sorted((t.name, f.name) for f in files for t in f.tensors))}
