"""Save planning: from what every rank of a module holds to who writes which bytes where.

Pure: no torch.distributed, no I/O. Every rank of a module runs it on the same gathered metadata
and so arrives at the same plan, including every file's byte layout, without further talk.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .box import Box, first_overlap
from .dtypes import ITEMSIZE
from .errors import PlanError
from .layout import ModuleLayout
from .manifest import ModuleEntry, StoredObject, StoredShard, StoredTensor
from .shard import ObjectMeta, TensorMeta
from .sharding import SplitSpec, infer_split
from .tensor_file import FileEntry, layout_file

__all__ = ["WriteItem", "FilePlan", "ModuleSavePlan", "plan_module_save", "shard_file_path"]


@dataclass(frozen=True, slots=True)
class WriteItem:
    key: str
    box: Box
    dtype: str
    begin: int
    end: int


@dataclass(frozen=True, slots=True)
class FilePlan:
    path: str
    writer: int
    prefix: bytes
    """The file's first bytes: header length and safetensors header."""
    items: tuple[WriteItem, ...]


@dataclass(frozen=True, slots=True)
class ModuleSavePlan:
    module: str
    tensors: Mapping[str, tuple[str, tuple[int, ...], SplitSpec]]
    """key -> (dtype, global shape, how the layout cuts it)."""
    files: tuple[FilePlan, ...]
    objects: Mapping[str, tuple[tuple[int, ...], Mapping[tuple[int, ...], Any]]]
    """key -> (grid shape, value per offset)."""

    def file_of(self, rank: int) -> FilePlan | None:
        for f in self.files:
            if f.writer == rank:
                return f
        return None

    def module_entry(self, layout: ModuleLayout, crcs_by_writer: Mapping[int, Sequence[Any]]) -> ModuleEntry:
        """This module's manifest entry, given each writer's checksums in its file's item order:
        per item a crc, or `[crc, block_bytes, [block crcs]]`."""
        shards: dict[str, list[StoredShard]] = {key: [] for key in self.tensors}
        for f in self.files:
            crcs = crcs_by_writer.get(f.writer, [])
            if len(crcs) != len(f.items):
                raise PlanError(
                    f"module {self.module!r}: writer rank {f.writer} reported {len(crcs)} checksums "
                    f"for {len(f.items)} shards of {f.path}"
                )
            for item, crc in zip(f.items, crcs):
                whole, block_bytes, blocks = (crc, 0, ()) if isinstance(crc, int) else (crc[0], crc[1], tuple(crc[2]))
                shards[item.key].append(StoredShard(item.box, f.path, item.begin, item.end, whole, block_bytes, blocks))
        tensors = {
            key: StoredTensor(dtype, shape, tuple(sorted(shards[key], key=lambda s: s.box.offset)), split)
            for key, (dtype, shape, split) in self.tensors.items()
        }
        objects = {key: StoredObject(grid, values) for key, (grid, values) in self.objects.items()}
        return ModuleEntry(layout=layout, tensors=tensors, objects=objects)


def shard_file_path(module: str, rank: int, tag: str = "") -> str:
    """`<module>/r<rank>[-<tag>].safetensors`; the tag (a save id) keeps concurrent saves apart."""
    return f"{module}/r{rank:05d}{'-' + tag if tag else ''}.safetensors"


def tensor_name(key: str, box: Box) -> str:
    """Name of a box inside a shard file: unique per file, readable in safetensors tools."""
    return f"{key}@{','.join(map(str, box.offset))}"


def plan_module_save(
    module: str,
    layout: ModuleLayout,
    tensors_by_rank: Mapping[int, Sequence[TensorMeta]],
    objects_by_rank: Mapping[int, Sequence[ObjectMeta]],
    file_tag: str = "",
) -> ModuleSavePlan:
    """Dedupe boxes, check they tile each tensor, and spread writes of replicas by bytes."""
    by_key: dict[str, dict[Box, list[int]]] = defaultdict(dict)
    spec: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for rank in sorted(tensors_by_rank):
        for m in tensors_by_rank[rank]:
            seen = spec.setdefault(m.key, (m.dtype, m.global_shape, rank))
            if seen[:2] != (m.dtype, m.global_shape):
                raise PlanError(
                    f"module {module!r}, tensor {m.key!r}: rank {seen[2]} has {seen[0]} "
                    f"{list(seen[1])} but rank {rank} has {m.dtype} {list(m.global_shape)}"
                )
            by_key[m.key].setdefault(m.box, []).append(rank)

    items: list[tuple[int, str, Box, list[int]]] = []
    splits: dict[str, SplitSpec] = {}
    for key, holders in by_key.items():
        dtype, global_shape, _ = spec[key]
        boxes = list(holders)
        overlap = first_overlap(boxes)
        if overlap is not None:
            a, b = boxes[overlap[0]], boxes[overlap[1]]
            raise PlanError(
                f"module {module!r}, tensor {key!r}: box {a} (ranks {holders[a]}) overlaps box {b} "
                f"(ranks {holders[b]}); replicas must hold identical boxes"
            )
        covered, total = sum(b.volume for b in boxes), math.prod(global_shape)
        if covered != total:
            raise PlanError(
                f"module {module!r}, tensor {key!r}: the ranks' boxes cover {covered} of {total} "
                f"elements of global shape {list(global_shape)}"
            )
        for box in boxes:
            items.append((box.volume * ITEMSIZE[dtype], key, box, holders[box]))
        splits[key] = infer_split(layout, {r: b for b, ranks in holders.items() for r in ranks}, len(global_shape))

    # Largest first to the least-loaded holder: replicated bytes spread evenly over replicas.
    load: dict[int, int] = defaultdict(int)
    assigned: dict[int, list[tuple[str, Box]]] = defaultdict(list)
    # (Sort keys are plain tuples: comparing Box dataclasses dominates at 10^5 boxes.)
    for nbytes, key, box, ranks in sorted(items, key=lambda it: (-it[0], it[1], it[2].offset)):
        writer = ranks[0] if len(ranks) == 1 else min(ranks, key=lambda r: (load[r], r))
        load[writer] += nbytes
        assigned[writer].append((key, box))

    files = []
    for writer in sorted(assigned):
        entries = sorted(assigned[writer], key=lambda e: (e[0], e[1].offset))
        prefix, ranges = layout_file(
            [FileEntry(tensor_name(k, b), spec[k][0], b.shape) for k, b in entries],
            {"format": "mimo-ckpt", "module": module},
        )
        files.append(FilePlan(
            shard_file_path(module, writer, file_tag), writer, prefix,
            tuple(WriteItem(k, b, spec[k][0], lo, hi) for (k, b), (lo, hi) in zip(entries, ranges)),
        ))

    return ModuleSavePlan(
        module=module,
        tensors={k: (v[0], v[1], splits[k]) for k, v in spec.items()},
        files=tuple(files),
        objects=_plan_objects(module, objects_by_rank),
    )


def _plan_objects(
    module: str, objects_by_rank: Mapping[int, Sequence[ObjectMeta]]
) -> dict[str, tuple[tuple[int, ...], dict[tuple[int, ...], Any]]]:
    out: dict[str, tuple[tuple[int, ...], dict[tuple[int, ...], Any]]] = {}
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(list)
    for rank in sorted(objects_by_rank):
        for m in objects_by_rank[rank]:
            grid, values = out.setdefault(m.key, (m.global_shape, {}))
            if grid != m.global_shape:
                raise PlanError(
                    f"module {module!r}, object {m.key!r}: ranks disagree on its grid "
                    f"({list(grid)} vs {list(m.global_shape)} on rank {rank})"
                )
            holders[(m.key, m.offset)].append(rank)
            if m.is_main_replica and m.offset not in values:
                values[m.offset] = m.value
    for (key, offset), ranks in holders.items():
        if offset not in out[key][1]:
            raise PlanError(
                f"module {module!r}, object {key!r} at {list(offset)}: held by ranks {ranks} but "
                f"none is the main replica"
            )
    return out
