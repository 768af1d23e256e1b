"""Save planning: from what every rank of a module holds to who writes which bytes where.

Pure: no torch.distributed, no I/O. Every rank of a module runs it on the same gathered metadata
and so arrives at the same plan, including every file's byte layout, without further talk.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from mimo_ckpt.model.box import Box, first_overlap
from mimo_ckpt.format.checksums import ShardSums
from mimo_ckpt.model.dtypes import ITEMSIZE
from mimo_ckpt.errors import PlanError
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.format.manifest import ModuleEntry, StoredObject, StoredShard, StoredTensor
from mimo_ckpt.format.object_codec import encode_checked
from mimo_ckpt.model.shard import ModuleShards, ObjectMeta, TensorMeta
from mimo_ckpt.model.split import SplitSpec, infer_split
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt.format.safetensors import layout_files

__all__ = ["WriteItem", "FilePlan", "ModuleSavePlan", "plan_module_save", "shard_file_path", "encode_objects"]


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
    options: SaveOptions
    """The options the files were cut by; writers checksum with its `block_bytes`."""

    def files_of(self, rank: int) -> list[FilePlan]:
        return [f for f in self.files if f.writer == rank]

    def module_entry(
        self, layout: ModuleLayout, sums_by_file: Mapping[str, Sequence[ShardSums]],
    ) -> ModuleEntry:
        """This module's manifest entry, given each file's checksums in its item order."""
        shards: dict[str, list[StoredShard]] = {key: [] for key in self.tensors}
        for f in self.files:
            sums = sums_by_file.get(f.path, [])
            if len(sums) != len(f.items):
                raise PlanError(
                    f"module {self.module!r}: writer rank {f.writer} reported {len(sums)} checksums "
                    f"for {len(f.items)} shards of {f.path}"
                )
            path = f.path
            for item, s in zip(f.items, sums):
                shard = StoredShard(item.box, path, item.begin, item.end, s.crc32c, s.block_bytes, s.block_crcs)
                shards[item.key].append(shard)
        tensors = {
            key: StoredTensor(dtype, shape, tuple(sorted(shards[key], key=_shard_offset)), split)
            for key, (dtype, shape, split) in self.tensors.items()
        }
        objects = {key: StoredObject(grid, values) for key, (grid, values) in self.objects.items()}
        return ModuleEntry(layout=layout, tensors=tensors, objects=objects)


_shard_offset = operator.attrgetter("box.offset")


def shard_file_path(module: str, rank: int, tag: str = "", part: int = 0) -> str:
    """`<module>/r<rank>[.<part>][-<tag>].safetensors`; the tag (a save id) keeps concurrent
    saves apart."""
    return f"{module}/r{rank:05d}{f'.{part}' if part else ''}{'-' + tag if tag else ''}.safetensors"


_SHARD_FILE = re.compile(r"r(\d+)(?:\.\d+)?(?:-[^/]*)?\.safetensors")


def writer_of(path: str) -> int | None:
    """The rank that wrote a file named by `shard_file_path`; None for other names (files are
    found through the manifest, and other writers name theirs as they like)."""
    m = _SHARD_FILE.fullmatch(path.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def tensor_name(key: str, box: Box) -> str:
    """Name of a box inside a shard file: unique per file, readable in safetensors tools."""
    return f"{key}@{_offset_text(box.offset)}"


def _offset_text(offset: tuple[int, ...]) -> str:
    return ",".join(map(str, offset))


def _offset_texts(offsets: list[tuple[int, ...]]) -> list[str]:
    """`_offset_text` of each offset; when all have one length, through one format string (the
    same text: "{}" formats as str does), which is faster."""
    ndim = len(offsets[0]) if offsets else 0
    if set(map(len, offsets)) != {ndim}:
        return [_offset_text(o) for o in offsets]
    return list(itertools.starmap(",".join(["{}"] * ndim).format, offsets))


def plan_module_save(
    module: str,
    layout: ModuleLayout,
    tensors_by_rank: Mapping[int, Sequence[TensorMeta]],
    objects_by_rank: Mapping[int, Sequence[ObjectMeta]],
    file_tag: str = "",
    replicas: Literal["main", "spread"] = "main",
    options: SaveOptions = SaveOptions(),
) -> ModuleSavePlan:
    """Dedupe boxes, check they tile each tensor, and spread writes by bytes over the ranks that
    may write each box (`replicas`: see `_TensorGroup.writers`)."""
    groups = _group_by_tensor(module, tensors_by_rank)
    tilings: dict[str, _Tiling] = {}
    splits: dict[str, SplitSpec] = {}
    checked: dict[tuple, list[str]] = defaultdict(list)  # _TensorGroup.sketch() -> keys
    for key, g in groups.items():
        alike = next((k for k in checked[g.sketch()] if groups[k].cut_like(g)), None)
        if alike is None:
            tilings[key] = _check_tiling(module, key, g)
            splits[key] = infer_split(layout, _box_of_rank(g), len(g.global_shape))
            checked[g.sketch()].append(key)
        else:  # the same boxes and holders: the same checks pass, and find the same order and split
            tilings[key], splits[key] = tilings[alike], splits[alike]
        ITEMSIZE[g.dtype]  # an unknown dtype raises KeyError here, before later tensors are checked

    items = _Items.in_file_order(module, groups, tilings, replicas)
    parts = [
        (writer, part, indexes)
        for writer, all_indexes in sorted(_assign_writers(items).items())
        for part, indexes in enumerate(_split_parts(all_indexes, items.nbytes, options))
    ]
    layouts = layout_files(
        (items.header_entries(indexes) for _, _, indexes in parts), {"format": "mimo-ckpt", "module": module}
    )
    files = tuple(
        _file_plan(shard_file_path(module, writer, file_tag, part), writer, items, indexes, prefix, ranges)
        for (writer, part, indexes), (prefix, ranges) in zip(parts, layouts)
    )
    return ModuleSavePlan(
        module=module,
        tensors={k: (g.dtype, g.global_shape, splits[k]) for k, g in groups.items()},
        files=files,
        objects=_plan_objects(module, objects_by_rank),
        options=options,
    )


# Every rank plans over every shard of the module: 10^5 to 10^6 of them at scale. The helpers below
# keep the Python work per box to a few list and dict operations: boxes are numbered once, by first
# appearance, and looked up by number after that (hashing a Box runs Python code). They also avoid
# objects per box that outlive a step: each is more for the garbage collector to traverse.


@dataclass(slots=True)
class _TensorGroup:
    """One tensor's distinct boxes as gathered from every rank of the module, numbered in order of
    first appearance."""

    dtype: str
    global_shape: tuple[int, ...]
    first_rank: int
    """The rank whose metadata fixed dtype and shape (named when another rank disagrees)."""
    number: dict[tuple, int] = field(default_factory=dict)
    """Offset of each box -> its number; (offset, shape) for a box whose offset an earlier box of
    another shape has. (Tuples hash without running Python code, as a Box's hash does.)"""
    boxes: list[Box] = field(default_factory=list)
    holder: list[int] = field(default_factory=list)
    """Per box, the lowest rank that holds it."""
    replicas: dict[int, list[int]] = field(default_factory=dict)
    """Boxes that more than one rank holds -> all their holders, ascending."""
    not_main: dict[int, set[int]] = field(default_factory=dict)
    """Boxes -> the holders that are not their main replica (megatron: replica_id other than 0)."""
    exclusive: set[int] = field(default_factory=set)
    """Boxes that a holder claims as main by a replica id (`TensorMeta.exclusive_main`)."""

    def holders(self, i: int) -> list[int]:
        return self.replicas.get(i) or [self.holder[i]]

    def sketch(self) -> tuple:
        """What tensors cut and held alike have in common; cheap to compare."""
        return self.global_shape, len(self.boxes), len(self.replicas)

    def cut_like(self, other: _TensorGroup) -> bool:
        """Whether `other` has the same boxes, numbered alike, held by the same ranks. A weight's
        optimizer states (main copy, Adam moments) are: planning checks them once."""
        return (
            self.sketch() == other.sketch() and self.holder == other.holder
            and self.replicas == other.replicas and self.number == other.number and self.not_main == other.not_main
            and self.exclusive == other.exclusive
        )

    def writers(self, module: str, key: str, replicas: str) -> tuple[list[int], dict[int, list[int]]]:
        """`holder` and `replicas` as the ranks that may write each box. "main": its main replica
        (megatron: replica_id 0), as megatron's save writes; holders that all claim to be main
        (plain tensors carry no replica id) share the writes. "spread": any holder, balanced, as
        megatron's fully parallel save does, for replicas known to be equal. Either way a box
        none of whose holders is main is a PlanError: nobody vouches for its values; so is a box
        that several claim as main when one of them does so by a replica id (megatron's)."""
        for i in sorted(self.exclusive):
            mains = [r for r in self.holders(i) if r not in self.not_main.get(i, ())]
            if len(mains) > 1 and self.boxes[i].volume:  # an empty box holds nothing to disagree on
                raise PlanError(
                    f"module {module!r}, tensor {key!r}, box {self.boxes[i]}: ranks {mains} all claim to be its "
                    f"main replica (megatron: replica_id 0); exactly one may"
                )
        if not self.not_main:
            return self.holder, self.replicas
        holder, shared = list(self.holder), dict(self.replicas)
        for i, others in self.not_main.items():
            ranks = self.holders(i)
            mains = [r for r in ranks if r not in others]
            if not mains:
                raise PlanError(
                    f"module {module!r}, tensor {key!r}, box {self.boxes[i]}: held by ranks {ranks}, none of "
                    f"them the main replica (megatron: replica_id 0); one must be"
                )
            if replicas == "main":
                holder[i] = mains[0]
                if len(mains) > 1:
                    shared[i] = mains
                else:
                    shared.pop(i, None)
        return holder, shared

    def holdings(self) -> int:
        """(rank, box) pairs: one per shard."""
        return len(self.boxes) + sum(len(ranks) - 1 for ranks in self.replicas.values())


def _group_by_tensor(module: str, tensors_by_rank: Mapping[int, Sequence[TensorMeta]]) -> dict[str, _TensorGroup]:
    groups: dict[str, _TensorGroup] = {}
    for rank in sorted(tensors_by_rank):
        for m in tensors_by_rank[rank]:
            g = groups.get(m.key)
            if g is None:
                g = groups[m.key] = _TensorGroup(m.dtype, m.global_shape, rank)
            elif m.dtype != g.dtype or m.global_shape != g.global_shape:
                raise PlanError(
                    f"module {module!r}, tensor {m.key!r}: rank {g.first_rank} has {g.dtype} "
                    f"{list(g.global_shape)} but rank {rank} has {m.dtype} {list(m.global_shape)}"
                )
            box, new = m.box, len(g.boxes)
            i = g.number.setdefault(box.offset, new)  # the offset tuple exists already: no allocation
            if i != new and g.boxes[i].shape != box.shape:  # another box at this offset (an empty one)
                i = g.number.setdefault((box.offset, box.shape), new)
            if not m.is_main_replica:
                g.not_main.setdefault(i, set()).add(rank)
            elif m.exclusive_main:
                g.exclusive.add(i)
            if i == new:
                g.boxes.append(box)
                g.holder.append(rank)
            else:
                ranks = g.replicas.get(i)
                if ranks is None:
                    g.replicas[i] = [g.holder[i], rank]
                else:
                    ranks.append(rank)
    return groups


def _box_of_rank(g: _TensorGroup) -> dict[int, Box]:
    """Rank -> its box, for `infer_split`. A rank with several boxes keeps the one numbered last."""
    out = dict(zip(g.holder, g.boxes))
    for i, ranks in g.replicas.items():
        out.update(dict.fromkeys(ranks, g.boxes[i]))
    if len(out) < g.holdings():  # some rank holds several boxes: which one it keeps depends on order
        out = {r: box for i, box in enumerate(g.boxes) for r in g.holders(i)}
    return out


@dataclass(slots=True)
class _Tiling:
    """What checking a tensor's boxes found, for laying them out."""

    order: list[int]
    """Box numbers by offset, then by size (largest first), then by number."""
    volumes: list[int]
    """Elements per box, by box number."""
    offset_texts: list[str]
    """How `tensor_name` writes each box's offset, in that order."""


def _check_tiling(module: str, key: str, g: _TensorGroup) -> _Tiling:
    """The distinct boxes of a tensor must not overlap and must cover it; their order by offset
    and their volumes."""
    boxes = g.boxes
    table = _BoxTable.of(boxes)
    volumes = table.volumes() if table is not None else None
    if volumes is None:
        volumes = [math.prod(b.shape) for b in boxes]
    order = table.cell_order() if table is not None else None
    if order is None:
        overlap = first_overlap(boxes)
        if overlap is not None:
            i, j = overlap
            raise PlanError(
                f"module {module!r}, tensor {key!r}: box {boxes[i]} (ranks {g.holders(i)}) overlaps box "
                f"{boxes[j]} (ranks {g.holders(j)}); replicas must hold identical boxes"
            )
        # Equal offsets (an empty box beside another): larger first, then by number, as the
        # writer assignment meets them.
        order = sorted(range(len(boxes)), key=lambda i: (boxes[i].offset, -volumes[i]))
    covered, total = sum(volumes), math.prod(g.global_shape)
    if covered != total:
        raise PlanError(
            f"module {module!r}, tensor {key!r}: the ranks' boxes cover {covered} of {total} "
            f"elements of global shape {list(g.global_shape)}"
        )
    return _Tiling(order, volumes, _offset_texts([boxes[i].offset for i in order]))


@dataclass(slots=True)
class _BoxTable:
    """A tensor's boxes as int64 arrays, to check the usual layouts in bulk."""

    offsets: np.ndarray
    shapes: np.ndarray

    @classmethod
    def of(cls, boxes: list[Box]) -> _BoxTable | None:
        """None unless all boxes have the same ndim >= 1 and positive sizes, in int64 range."""
        ndim = boxes[0].ndim
        offsets = _int64_rows([b.offset for b in boxes], ndim)
        shapes = _int64_rows([b.shape for b in boxes], ndim)
        if ndim == 0 or offsets is None or shapes is None or not (shapes > 0).all():
            return None
        return cls(offsets, shapes)

    def cell_order(self) -> list[int] | None:
        """Box numbers by offset, when each box is exactly one cell of the grid that all their offsets
        and ends cut, and no two are the same cell: then no two overlap. None otherwise."""
        offsets, n = self.offsets, len(self.offsets)
        ends = offsets + self.shapes  # an overflow wraps below the offset, and fails the check below
        cell = np.zeros(n, dtype=np.int64)
        cells = 1
        for d in range(offsets.shape[1]):
            cuts = np.unique(np.concatenate((offsets[:, d], ends[:, d])))
            index = np.searchsorted(cuts, offsets[:, d])
            if not (np.searchsorted(cuts, ends[:, d]) == index + 1).all():
                return None  # a box spans several cells
            cells *= len(cuts) - 1
            if cells >= 2**62:
                return None
            cell = cell * (len(cuts) - 1) + index  # row-major: cells in the order of their offsets
        order = np.argsort(cell)
        if (cell[order[1:]] == cell[order[:-1]]).any():
            return None  # two boxes are the same cell
        return order.tolist()

    def volumes(self) -> list[int] | None:
        """Elements per box; None if some volume, or their sum, could pass int64."""
        if math.prod(self.shapes.max(axis=0).tolist()) * len(self.shapes) >= 2**63:
            return None
        return self.shapes.prod(axis=1).tolist()


def _int64_rows(rows: list[tuple[int, ...]], width: int) -> np.ndarray | None:
    """Tuples of ints as a (len(rows), width) array; None if one has another length or a number
    beyond int64. (np.fromiter over the flat numbers is faster than np.array over the tuples.)"""
    if set(map(len, rows)) != {width}:
        return None
    try:
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=len(rows) * width)
    except OverflowError:
        return None
    return flat.reshape(len(rows), width)


@dataclass(slots=True)
class _Items:
    """Every distinct box of a module in file order (tensor key, then box offset), as parallel
    lists indexed by position."""

    keys: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    offset_texts: list[str] = field(default_factory=list)
    """How `tensor_name` writes each box's offset."""
    nbytes: list[int] = field(default_factory=list)
    holder: list[int] = field(default_factory=list)
    replicas: list[list[int] | None] = field(default_factory=list)

    @classmethod
    def in_file_order(cls, module: str, groups: Mapping[str, _TensorGroup], tilings: Mapping[str, _Tiling],
                      replicas: str) -> _Items:
        items = cls()
        for key in sorted(groups):
            g, order, volumes = groups[key], tilings[key].order, tilings[key].volumes
            holder, shared = g.writers(module, key, replicas)
            itemsize = ITEMSIZE[g.dtype]
            boxes = [g.boxes[i] for i in order]
            items.keys.extend(itertools.repeat(key, len(boxes)))
            items.boxes.extend(boxes)
            items.dtypes.extend(itertools.repeat(g.dtype, len(boxes)))
            items.offset_texts.extend(tilings[key].offset_texts)
            items.nbytes.extend(volumes[i] * itemsize for i in order)
            items.holder.extend(map(holder.__getitem__, order))
            items.replicas.extend(map(shared.get, order))
        return items

    def header_entries(self, indexes: list[int]) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of these items, as a file's header lists them."""
        keys, texts, dtypes, boxes = self.keys, self.offset_texts, self.dtypes, self.boxes
        return [(f"{keys[i]}@{texts[i]}", dtypes[i], boxes[i].shape) for i in indexes]  # tensor_name


def _assign_writers(items: _Items) -> dict[int, list[int]]:
    """Writer rank -> indexes of the items it writes, in file order.

    Largest first to the least-loaded holder (the lowest rank on ties): replicated bytes spread
    evenly over replicas. The sort is stable, so equal sizes go in file order."""
    nbytes, replicas = items.nbytes, items.replicas
    load: dict[int, int] = defaultdict(int)
    writer_of = items.holder.copy()
    for i in sorted(range(len(nbytes)), key=nbytes.__getitem__, reverse=True):
        ranks = replicas[i]
        # Holders are ascending, and min() keeps the first of equals: the lowest least-loaded rank.
        writer = writer_of[i] if ranks is None else min(ranks, key=load.__getitem__)
        load[writer] += nbytes[i]
        writer_of[i] = writer
    by_writer: dict[int, list[int]] = defaultdict(list)
    for i, writer in enumerate(writer_of):
        by_writer[writer].append(i)
    return by_writer


def _split_parts(indexes: list[int], nbytes: list[int], options: SaveOptions) -> list[list[int]]:
    """A writer's items (in file order) cut into consecutive runs of about equal bytes, as many as
    `part_bytes` and `max_parts` allow; one part below 2 * `part_bytes`."""
    total = sum(map(nbytes.__getitem__, indexes))
    count = max(1, min(options.max_parts, total // options.part_bytes))
    if count == 1:
        return [indexes]
    parts: list[list[int]] = [[]]
    done = 0
    for i in indexes:
        if parts[-1] and len(parts) < count and done + nbytes[i] / 2 > total * len(parts) / count:
            parts.append([])  # this item's middle lies past the current part's share
        parts[-1].append(i)
        done += nbytes[i]
    return parts


def _file_plan(
    path: str, writer: int, items: _Items, indexes: list[int], prefix: bytes, ranges: list[tuple[int, int]]
) -> FilePlan:
    keys, boxes, dtypes = items.keys, items.boxes, items.dtypes
    return FilePlan(
        path, writer, prefix,
        tuple([WriteItem(keys[i], boxes[i], dtypes[i], lo, hi) for i, (lo, hi) in zip(indexes, ranges)]),
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


def encode_objects(module: str, shards: ModuleShards) -> dict[int, Any]:
    """id() of each object in `shards` -> its value as the manifest stores it: encoded once, where
    an error can name the module; the save sends and stores this form."""
    return {id(o): encode_checked(f"module {module!r}, object {o.key!r}", o.data) for o in shards.objects}
