"""Hugging Face folders in and out, per module, mapped by the tables of interop.hf_map.

`export_hf` writes one module's weights as a folder `from_pretrained` loads (config.json,
safetensors files, their index last, through the commit protocol). `import_hf` writes a Hugging
Face folder as one module of a mimo checkpoint under any layout: every rank's file is cut
straight from the folder's tensors, so no per-layout conversion exists and no GPU is used. Both
stream under a memory budget: an export holds one piece at a time (a whole tensor only where it
must transpose), an import one row block of one Hugging Face tensor (a whole one where it
transposes).

The config an import read is kept in the checkpoint's metadata (`hf.<module>`) together with
the table's name, so the module exports back without being told either; compose and split carry
it with the module.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping

import numpy as np

from mimo_ckpt.errors import CheckpointNotFoundError, LayoutError, MappingError
from mimo_ckpt.format.manifest import MANIFEST_PATH, Manifest
from mimo_ckpt.format.safetensors import MAX_HEADER_BYTES, FileTensor, parse_header
from mimo_ckpt.interop.hf_map import (
    MegatronPart, MegatronTensor, check_layout_fits, export_config, load_table, plan_hf_export,
    plan_hf_import, table_names,
)
from mimo_ckpt.io import commit
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.io.read import raw_dtype
from mimo_ckpt.io.storage import Storage, open_storage, read_small_file
from mimo_ckpt.io.stream import Budget, write_file_of_pieces
from mimo_ckpt.model.box import Box
from mimo_ckpt.model.dtypes import ITEMSIZE
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.model.shard import TensorMeta
from mimo_ckpt.model.split import box_for_rank
from mimo_ckpt.offline.export import run_export
from mimo_ckpt.plan.export import INDEX_NAME, plan_export_files
from mimo_ckpt.plan.save import plan_module_save

__all__ = ["HF_METADATA", "export_hf", "import_hf", "read_folder", "HfFolder", "guess_table"]

HF_METADATA = "hf"
"""Manifest metadata: module -> {"table": name, "config": the imported config.json}."""
CONFIG_NAME = "config.json"


def export_hf(src_url: str, dst_url: str, module: str, *, table: str | None = None,
              config: Mapping[str, Any] | None = None, max_shard_bytes: int = 5 << 30, budget: Budget,
              progress: bool = True) -> dict[str, Any]:
    """Export `module`'s weights as a Hugging Face folder at `dst_url`; returns the config written.
    `table` (a name or a file) defaults to the one the module was imported with; `config` fields
    override what the checkpoint records and what its shapes say."""
    src = open_storage(src_url)
    manifest = read_manifest(src, src_url)
    entry = manifest.modules.get(module)
    if entry is None:
        raise LayoutError(f"module {module!r} is not in {src_url} (it has {sorted(manifest.modules)})")
    recorded = manifest.metadata.get(HF_METADATA, {}).get(module, {}) if isinstance(manifest.metadata, dict) else {}
    name = table or recorded.get("table")
    if name is None:
        raise MappingError(f"module {module!r} of {src_url} records no mapping table: name one "
                           f"(--table, one of {table_names()} or a table file)")
    mapping = load_table(name)
    full = export_config(mapping, module, entry, recorded.get("config", {}), dict(config or {}))
    plan = plan_hf_export(mapping, module, entry, full)
    files = plan_export_files(plan.tensors, max_shard_bytes)
    blob = (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
    run_export(src, open_storage(dst_url), module, entry, files, budget, extras={CONFIG_NAME: blob},
               progress=progress, where=dst_url)
    return full


# -- reading a Hugging Face folder ---------------------------------------------------------------


@dataclass(frozen=True)
class HfFolder:
    config: dict[str, Any]
    tensors: dict[str, FileTensor]


def read_folder(storage: Storage, where: str) -> HfFolder:
    """config.json and every tensor's place, from the index (or the one model.safetensors)."""
    config = _json_file(storage, CONFIG_NAME, where)
    if not isinstance(config, dict):
        raise MappingError(f"{where}/{CONFIG_NAME}: not a JSON object")
    index = _json_file(storage, INDEX_NAME, where, missing_ok=True)
    if index is None:
        if storage.size("model.safetensors") is None:
            raise CheckpointNotFoundError(f"{where}: no {INDEX_NAME} and no model.safetensors (a pytorch_model.bin "
                                          f"is a pickle and is never read)")
        files = {"model.safetensors"}
    elif not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise MappingError(f"{where}/{INDEX_NAME}: has no weight_map object")
    else:
        files = set(index["weight_map"].values())
    tensors: dict[str, FileTensor] = {}
    for file in sorted(files):
        for name, t in _read_header(storage, file, where).items():
            if name in tensors:
                raise MappingError(f"{where}: tensor {name!r} is in both {tensors[name].file} and {file}")
            tensors[name] = t
    if index is not None:
        wrong = sorted(n for n, f in index["weight_map"].items() if n not in tensors or tensors[n].file != f)
        if wrong:
            raise MappingError(f"{where}/{INDEX_NAME}: tensors {wrong[:4]} are not in the files it names")
    return HfFolder(config, tensors)


def _json_file(storage: Storage, name: str, where: str, missing_ok: bool = False) -> Any:
    blob = read_small_file(storage, name)
    if blob is None:
        if missing_ok:
            return None
        raise CheckpointNotFoundError(f"{where}: no {name}")
    try:
        return json.loads(blob)
    except ValueError as exc:
        raise MappingError(f"{where}/{name}: {exc}") from None


def _read_header(storage: Storage, file: str, where: str) -> dict[str, FileTensor]:
    size = storage.size(file)
    if size is None:
        raise CheckpointNotFoundError(f"{where}: {file} is missing")
    length = bytearray(8)
    if size < 8:
        raise MappingError(f"{where}/{file}: {size} bytes is too short for safetensors")
    storage.read_into(file, 0, memoryview(length))
    (n,) = struct.unpack("<Q", length)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise MappingError(f"{where}/{file}: header length {n} does not fit the file's {size} bytes")
    header = bytearray(n)
    storage.read_into(file, 8, memoryview(header))
    return parse_header(file, bytes(length), bytes(header), size, where)


# -- import ---------------------------------------------------------------------------------------


def guess_table(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    for name in table_names():
        if load_table(name).config.get("model_type") == model_type:
            return name
    raise MappingError(f"no built-in mapping table for model_type {model_type!r}: name one (--table, one of "
                       f"{table_names()} or a table file)")


def import_hf(src_url: str, dst_url: str, module: str, layout: ModuleLayout, *, table: str | None = None,
              vocab_multiple: int = 128, ignore: str | None = None, budget: Budget,
              progress: bool = True) -> Manifest:
    """Write the Hugging Face folder at `src_url` as module `module` of a new checkpoint at
    `dst_url`, laid out for `layout` (padded vocabularies: a multiple of `vocab_multiple` x TP,
    Megatron-LM's `--make-vocab-size-divisible-by`). Folder tensors matching the regex `ignore`
    may go unmapped. Returns the committed manifest."""
    src = open_storage(src_url)
    folder = read_folder(src, src_url)
    mapping = load_table(table or guess_table(folder.config))
    headers = {n: (t.dtype, t.shape) for n, t in folder.tensors.items()}
    tensors = plan_hf_import(mapping, folder.config, headers, tp=layout.tp, vocab_multiple=vocab_multiple,
                             ignore=ignore)
    check_layout_fits(tensors, layout.tp, layout.pp)
    metas = {rank: [TensorMeta(k, t.dtype, t.shape, box_for_rank(t.split, t.shape, layout, rank), True)
                    for k, t in tensors.items()] for rank in layout.ranks}
    dst = open_storage(dst_url)
    save_id = commit.begin(dst, MANIFEST_PATH, dst_url)
    committed = False
    try:
        plan = plan_module_save(module, layout, metas, {}, file_tag=save_id)
        # the table's hints, also for dims of size 1 here, so a later reshard can cut them
        plan = replace(plan, tensors={k: (d, s, tensors[k].split) for k, (d, s, _) in plan.tensors.items()})
        commit.announce(dst, save_id, [], dst_url)
        fault_point("offline.start", 0)
        total = sum(i.end - i.begin for f in plan.files for i in f.items)
        bar = Progress("import", total) if progress else None
        reader = _RowReader(src, folder.tensors, budget)
        sums = {}
        for i, f in enumerate(plan.files):
            pieces = [_megatron_pieces(reader, tensors[item.key], item.box) for item in f.items]
            sums[f.path] = write_file_of_pieces(dst, f.path, f.prefix, pieces, bar)
            if i == 0:
                fault_point("offline.write", 0)
        if bar:
            bar.close()
        config = {**mapping.config, **folder.config}
        manifest = Manifest(world_size=layout.rank_offset + layout.size,
                            modules={module: plan.module_entry(layout, sums)},
                            metadata={HF_METADATA: {module: {"table": mapping.name, "config": config}}})
        fault_point("offline.commit", 0)
        commit.publish_manifest(dst, save_id, manifest.to_bytes(), dst_url)
        committed = True
    finally:
        commit.finish(dst, save_id, committed)
    return manifest


class _RowReader:
    """Row blocks of a folder's tensors; a transposed tensor is read whole, once, and kept until
    another one is asked for (its layer's parts are consecutive)."""

    def __init__(self, storage: Storage, tensors: Mapping[str, FileTensor], budget: Budget) -> None:
        self.storage, self.tensors, self.budget = storage, tensors, budget
        self._whole: tuple[str, np.ndarray] | None = None

    def rows(self, part: MegatronPart, first: int, count: int) -> np.ndarray:
        """Rows `first..` (file rows; columns where `part` transposes) as megatron rows."""
        t = self.tensors[part.hf]
        if part.transpose:
            if self._whole is None or self._whole[0] != part.hf:
                self._whole = (part.hf, self._read(t, t.begin, t.end - t.begin).reshape(t.shape))
            return self._whole[1][:, first: first + count].T
        row_bytes = math.prod(t.shape[1:], start=ITEMSIZE[t.dtype])
        return self._read(t, t.begin + first * row_bytes, count * row_bytes).reshape(count, *t.shape[1:])

    def _read(self, t: FileTensor, offset: int, nbytes: int) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8)
        self.storage.read_into(t.file, offset, memoryview(buf))
        return buf.view(raw_dtype(t.dtype))

    def rows_per_block(self, row_bytes: int) -> int:
        return max(1, self.budget.chunk_bytes // max(row_bytes, 1))


def _megatron_pieces(reader: _RowReader, t: MegatronTensor, box: Box) -> Iterator[np.ndarray]:
    """Box `box` of megatron tensor `t`, in C order, built from the folder's rows."""
    skip = 1 if t.stacked else 0
    layers = range(box.offset[0], box.offset[0] + box.shape[0]) if t.stacked else range(1)
    first, count = box.offset[skip], box.shape[skip]
    rest = tuple(slice(o, o + n) for o, n in zip(box.offset[skip + 1:], box.shape[skip + 1:]))
    row_shape = t.shape[skip + 1:]
    step = reader.rows_per_block(math.prod(row_shape, start=ITEMSIZE[t.dtype]))
    for layer in layers:
        for start, n, part in _segments(t.layers[layer], first, count):
            for a in range(start, start + n, step):
                m = min(step, start + n - a)
                if part is None:  # vocabulary padding
                    block = np.zeros((m, *row_shape), dtype=raw_dtype(t.dtype))
                else:
                    block = reader.rows(part, a - part.run.start + part.run.file_start, m)
                yield block[(slice(None), *rest)]


def _segments(parts: tuple[MegatronPart, ...], first: int, count: int) -> Iterator[tuple[int, int, MegatronPart | None]]:
    """Rows first..first+count as (start, count, the part holding them or None for padding)."""
    pos, end = first, first + count
    for p in parts:
        lo, hi = max(pos, p.run.start), min(end, p.run.start + p.run.count)
        if hi <= lo:
            continue
        if lo > pos:
            yield pos, lo - pos, None
        yield lo, hi - lo, p
        pos = hi
    if pos < end:
        yield pos, end - pos, None

