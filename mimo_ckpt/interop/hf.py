"""Hugging Face folders in and out, mapped by the tables of interop.hf_table (docs/huggingface.md).

`export_hf` writes a module's weights (or, through a composite table such as llava, several
modules' as one model) as a folder `from_pretrained` loads: config.json, safetensors files, their
index last, through the commit protocol. `import_hf` writes a Hugging Face folder as modules of a
new checkpoint, each under any layout: every rank's file is cut straight from the folder's
tensors, so no per-layout conversion exists and no GPU is used. Both stream under a memory
budget: an export holds one piece at a time (a whole tensor only where it must transpose), an
import one row block of one Hugging Face tensor (a whole one where it transposes).

The config an import read is kept in the checkpoint's metadata (`hf.<module>`) together with
the table's name, so the modules export back without being told either; compose and split carry
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
    MegatronPart, MegatronTensor, check_all_taken, check_layout_fits, composite_export_config, export_config,
    merge_config, optimizer_states, plan_hf_export, plan_hf_import,
)
from mimo_ckpt.interop.hf_table import CompositeTable, Table, load_table, table_names
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
from mimo_ckpt.plan.export import INDEX_NAME, index_document, plan_export_files
from mimo_ckpt.plan.save import plan_module_save

__all__ = ["HF_METADATA", "export_hf", "import_hf", "read_folder", "HfFolder", "guess_table"]

HF_METADATA = "hf"
"""Manifest metadata: module -> {"table": name, "config": the imported config.json}."""
CONFIG_NAME = "config.json"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"


def export_hf(src_url: str, dst_url: str, modules: list[str] | None = None, *, table: str | None = None,
              config: Mapping[str, Any] | None = None, optimizer: bool = False, max_shard_bytes: int = 5 << 30,
              budget: Budget, progress: bool = True) -> dict[str, Any]:
    """Export the weights of `modules` as a Hugging Face folder at `dst_url`; returns the config
    written. `table` (a name or a file) defaults to the one the modules were imported with; a
    composite table (llava) exports its modules as one model. `config` fields override what the
    checkpoint records and what its shapes say. With `optimizer`, each optimizer state per weight
    (exp_avg, ...) goes beside the model, mapped like the weights, as
    `optimizer-*.safetensors` indexed by `optimizer.safetensors.index.json`."""
    src = open_storage(src_url)
    manifest = read_manifest(src, src_url)
    records = manifest.metadata.get(HF_METADATA) if isinstance(manifest.metadata, dict) else None
    records = records if isinstance(records, dict) else {}
    mapping, modules = _export_table(src_url, manifest, records, modules, table)
    entries = {m: manifest.modules[m] for m in modules}
    recorded = [r["config"] for m in modules if isinstance(r := records.get(m), dict)
                and r.get("table") == mapping.name and isinstance(r.get("config"), dict)][:1]
    if isinstance(mapping, CompositeTable):
        full = composite_export_config(mapping, entries, *recorded, dict(config or {}))
        parts = [(part.table, m, full[part.config_field]) for m, part in mapping.modules.items()]
    else:
        [m] = modules
        full = export_config(mapping, m, entries[m], *recorded, dict(config or {}))
        parts = [(mapping, m, full)]
    tensors = [t for sub, m, c in parts for t in plan_hf_export(sub, m, entries[m], c)]
    extras = {CONFIG_NAME: (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()}
    side: list[Any] = []
    if optimizer:
        states = [t for sub, m, c in parts for s in optimizer_states(entries[m])
                  for t in plan_hf_export(sub, m, entries[m], c, state=s)]
        if not states:
            raise MappingError(f"{src_url}: modules {modules} store no optimizer state to export")
        side = plan_export_files(states, max_shard_bytes, stem="optimizer")
        extras[OPTIMIZER_INDEX] = json.dumps(index_document(side), indent=2).encode()
    run_export(src, open_storage(dst_url), entries, plan_export_files(tensors, max_shard_bytes), budget,
               extras=extras, side_files=side, progress=progress, where=dst_url)
    return full


def _export_table(src_url: str, manifest: Manifest, records: Mapping[str, Any], modules: list[str] | None,
                  table: str | None) -> tuple[Table | CompositeTable, list[str]]:
    """The table to export by (named, or the one the modules record) and the modules it takes."""
    named = sorted({records[m].get("table") for m in modules or records if isinstance(records.get(m), dict)} - {None})
    if table is None and len(named) != 1:
        raise MappingError(f"{src_url}: modules {modules or sorted(manifest.modules)} record "
                           f"{'no mapping table' if not named else f'several tables {named}'}: name one (--table, "
                           f"one of {table_names()} or a table file)")
    mapping = load_table(table or named[0])
    if isinstance(mapping, CompositeTable):
        modules = modules or list(mapping.modules)
        if sorted(modules) != sorted(mapping.modules):
            raise MappingError(f"table {mapping.name!r} exports modules {sorted(mapping.modules)} together, "
                               f"not {sorted(modules)}")
    elif not modules or len(modules) != 1:
        raise MappingError(f"table {mapping.name!r} maps one module: name it (the checkpoint has "
                           f"{sorted(manifest.modules)})")
    missing = [m for m in modules if m not in manifest.modules]
    if missing:
        raise LayoutError(f"module(s) {missing} not in {src_url} (it has {sorted(manifest.modules)})")
    return mapping, modules


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


def import_hf(src_url: str, dst_url: str, layouts: Mapping[str, ModuleLayout], *, table: str | None = None,
              vocab_multiple: int = 128, ignore: str | None = None, budget: Budget,
              progress: bool = True) -> Manifest:
    """Write the Hugging Face folder at `src_url` as a new checkpoint at `dst_url`: one module
    per layout of `layouts` (one for a module table, each of a composite table's), each laid out
    for its layout (padded vocabularies: a multiple of `vocab_multiple` x TP, Megatron-LM's
    `--make-vocab-size-divisible-by`). Folder tensors matching the regex `ignore` may go
    unmapped. Returns the committed manifest."""
    src = open_storage(src_url)
    folder = read_folder(src, src_url)
    mapping = load_table(table or guess_table(folder.config))
    headers = {n: (t.dtype, t.shape) for n, t in folder.tensors.items()}
    parts = _module_tables(mapping, layouts, folder.config)
    plans = {m: plan_hf_import(t, c, headers, tp=layouts[m].tp, vocab_multiple=vocab_multiple)
             for m, (t, c) in parts.items()}
    check_all_taken(headers, (n for p in plans.values() for n in p.taken), ignore, mapping.name)
    for m, plan in plans.items():
        check_layout_fits(plan.tensors, layouts[m].tp, layouts[m].pp)
    recorded = folder.config if isinstance(mapping, CompositeTable) else merge_config(mapping.config, folder.config)
    dst = open_storage(dst_url)
    with commit.Write(dst, MANIFEST_PATH, dst_url) as write:
        saves = {m: _module_save_plan(m, layouts[m], plan.tensors, write.save_id) for m, plan in plans.items()}
        fault_point("offline.start", 0)
        total = sum(i.end - i.begin for p in saves.values() for f in p.files for i in f.items)
        bar = Progress("import", total) if progress else None
        reader = _RowReader(src, folder.tensors, budget)
        entries, written = {}, 0
        for m, save in saves.items():
            sums = {}
            for f in save.files:
                pieces = [_megatron_pieces(reader, plans[m].tensors[item.key], item.box) for item in f.items]
                sums[f.path] = write_file_of_pieces(dst, f.path, f.prefix, pieces, bar)
                written += 1
                if written == 1:
                    fault_point("offline.write", 0)
            entries[m] = save.module_entry(layouts[m], sums)
        if bar:
            bar.close()
        manifest = Manifest(world_size=max(layout.rank_offset + layout.size for layout in layouts.values()),
                            modules=entries,
                            metadata={HF_METADATA: {m: {"table": mapping.name, "config": recorded} for m in entries}})
        fault_point("offline.commit", 0)
        write.publish_manifest(manifest.to_bytes())
    return manifest


def _module_tables(mapping: Table | CompositeTable, layouts: Mapping[str, ModuleLayout],
                   config: Mapping[str, Any]) -> dict[str, tuple[Table, Mapping[str, Any]]]:
    """Each module's table and config."""
    if isinstance(mapping, Table):
        if len(layouts) != 1:
            raise MappingError(f"table {mapping.name!r} maps one module; {len(layouts)} layouts were given")
        return {next(iter(layouts)): (mapping, config)}
    if sorted(layouts) != sorted(mapping.modules):
        raise MappingError(f"table {mapping.name!r} makes modules {sorted(mapping.modules)}: give a layout for "
                           f"each (got {sorted(layouts)})")
    out = {}
    for m, part in mapping.modules.items():
        sub = config.get(part.config_field)
        if not isinstance(sub, dict):
            raise MappingError(f"config.json has no {part.config_field!r} object (module {m!r} of table "
                               f"{mapping.name!r})")
        out[m] = (part.table, sub)
    return out


def _module_save_plan(module: str, layout: ModuleLayout, tensors: Mapping[str, MegatronTensor], save_id: str) -> Any:
    metas = {rank: [TensorMeta(k, t.dtype, t.shape, box_for_rank(t.split, t.shape, layout, rank), True)
                    for k, t in tensors.items()] for rank in layout.ranks}
    plan = plan_module_save(module, layout, metas, {}, file_tag=save_id)
    # the table's hints, also for dims of size 1 here, so a later reshard can cut them
    return replace(plan, tensors={k: (d, s, tensors[k].split) for k, (d, s, _) in plan.tensors.items()})


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
    lead = t.lead
    slots = range(box.offset[0], box.offset[0] + box.shape[0]) if t.stacked else range(1)
    first, count = box.offset[lead], box.shape[lead]
    rest = tuple(slice(o, o + n) for o, n in zip(box.offset[lead + 1:], box.shape[lead + 1:]))
    row_shape = t.shape[lead + 1:]
    step = reader.rows_per_block(math.prod(row_shape, start=ITEMSIZE[t.dtype]))
    for slot in slots:
        for start, n, part in _segments(t.slots[slot], first, count):
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

