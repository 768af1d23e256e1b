"""Write a consolidated safetensors folder (Hugging Face style) planned by plan.export."""

from __future__ import annotations

import json
from typing import Iterator, Mapping, Sequence

import numpy as np

from mimo_ckpt.errors import MappingError
from mimo_ckpt.format.manifest import ModuleEntry, StoredTensor
from mimo_ckpt.io import commit
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.io.read import raw_dtype
from mimo_ckpt.io.storage import Storage
from mimo_ckpt.io.stream import Budget, iter_box, write_file_of_pieces
from mimo_ckpt.model.box import Box
from mimo_ckpt.model.dtypes import NUMPY_NAMES
from mimo_ckpt.plan.export import INDEX_NAME, ExportFile, ExportPart, ExportTensor, index_document

__all__ = ["run_export"]


def run_export(src: Storage, dst: Storage, entries: Mapping[str, ModuleEntry], files: list[ExportFile],
               budget: Budget, *, extras: Mapping[str, bytes] | None = None, side_files: Sequence[ExportFile] = (),
               progress: bool = True, where: str = "the export folder") -> dict:
    """Write `extras` (config.json), the side files (which the index does not list: optimizer
    state), the files, then their index, through the commit protocol: a folder that holds an
    index already is refused, and an export that died there is cleaned up first. Returns the
    index."""
    extras = dict(extras or {})
    every = [*side_files, *files]
    with commit.Write(dst, INDEX_NAME, where) as write:
        write.announce([*extras, *(f.name for f in every)])
        fault_point("offline.start", 0)
        for name, blob in extras.items():
            dst.write_file(name, [blob])
        bar = Progress("export", sum(f.nbytes - len(f.prefix) for f in every)) if progress else None
        buffer = np.empty(budget.chunk_bytes, dtype=np.uint8)
        for f in every:
            pieces = [_tensor_pieces(src, entries, t, budget, buffer) for t in f.tensors]
            write_file_of_pieces(dst, f.name, f.prefix, pieces, bar)
            fault_point("offline.write", 0)
        if bar:
            bar.close()
        index = index_document(files)
        fault_point("offline.commit", 0)
        write.publish(json.dumps(index, indent=2).encode())
    return index


def _part_box(part: ExportPart, stored: StoredTensor) -> Box:
    shape, lead = stored.global_shape, len(part.index)
    if part.run is None:
        return Box((*part.index, *(0 for _ in shape[lead:])), ((1,) * lead) + shape[lead:])
    rest = shape[lead + 1:]
    return Box((*part.index, part.run.start, *(0 for _ in rest)), ((1,) * lead) + (part.run.count, *rest))


def _tensor_pieces(src: Storage, entries: Mapping[str, ModuleEntry], t: ExportTensor, budget: Budget,
                   buffer: np.ndarray) -> Iterator[np.ndarray]:
    """The tensor's values in C order, read piece by piece under the budget (views into
    `buffer`); a transposed tensor is assembled whole first."""
    if t.fill is not None:
        yield np.full(t.shape, _fill_bits(t.dtype, t.fill), dtype=raw_dtype(t.dtype))
        return
    if not t.transpose:
        for part in t.parts:
            stored = entries[part.module].tensors[part.key]
            for _, values in iter_box(src, part.module, part.key, stored, _part_box(part, stored), budget, buffer):
                yield values
        return
    rows = np.empty(t.row_shape, dtype=raw_dtype(t.dtype))
    for part in t.parts:
        stored = entries[part.module].tensors[part.key]
        box = _part_box(part, stored)
        skip = len(part.index)
        first = part.run.file_start if part.run else 0
        for piece, values in iter_box(src, part.module, part.key, stored, box, budget, buffer):
            rel = [o - b for o, b in zip(piece.offset[skip:], box.offset[skip:])]
            shape = piece.shape[skip:]
            rows[first + rel[0]: first + rel[0] + shape[0], rel[1]: rel[1] + shape[1]] = values.reshape(shape)
    yield np.ascontiguousarray(rows.T)


def _fill_bits(dtype: str, value: float) -> int:
    """The bits of `value` in a floating-point dtype (exact for the 0 and 1 that tables use)."""
    if dtype == "BF16":
        return int(np.array(value, dtype=np.float32).view(np.uint32)) >> 16
    if dtype not in NUMPY_NAMES:
        raise MappingError(f"a constant tensor of dtype {dtype} cannot be written")
    return int(np.array(value, dtype=NUMPY_NAMES[dtype]).view(raw_dtype(dtype)))
