"""Load planning: which stored bytes fill which part of each requested box. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from mimo_ckpt.model.box import Box, span_in
from mimo_ckpt.model.dtypes import ITEMSIZE, castable
from mimo_ckpt.errors import ManifestError
from mimo_ckpt.format.manifest import ModuleEntry, StoredShard, StoredTensor
from mimo_ckpt.model.shard import TensorMeta

__all__ = ["ReadItem", "KeyReport", "plan_module_load", "plan_tensor_reads", "check_keys", "stored_object_value"]


@dataclass(frozen=True, slots=True)
class ReadItem:
    """Read bytes [begin, end) of `shard.file`; they hold `overlap`, laid out with `shard.box`'s
    strides, starting at the overlap's first element."""

    request: int
    """Index of the requested shard this fills."""
    shard: StoredShard
    overlap: Box
    begin: int
    end: int
    what: str = ""
    """Which module and tensor this fills, for error messages."""

    @property
    def whole_shard(self) -> bool:
        return self.begin == self.shard.begin and self.end == self.shard.end

    @property
    def contiguous(self) -> bool:
        """The byte span holds exactly the overlap (no bytes of other rows in between)."""
        itemsize = (self.shard.end - self.shard.begin) // max(self.shard.box.volume, 1)
        return self.end - self.begin == self.overlap.volume * itemsize


@dataclass(slots=True)
class KeyReport:
    """Differences between what a module's ranks ask for and what the checkpoint holds, named as
    torch's `load_state_dict` names them: `missing` is requested but not in the checkpoint,
    `unexpected` is in the checkpoint but not requested (megatron's StrictHandling uses the two
    words the other way round)."""

    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    mismatched: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def fatal(self, strict: bool | str) -> bool:
        """Whether a load under `strict` fails on this report: True, any difference; "requested"
        (megatron's default), only what was requested and cannot load; False, nothing."""
        if strict == "requested":
            return bool(self.missing or self.mismatched)
        return bool(strict) and bool(self)

    def merge(self, other: "KeyReport") -> None:
        for mine, theirs in ((self.missing, other.missing), (self.unexpected, other.unexpected),
                             (self.mismatched, other.mismatched)):
            for module, keys in theirs.items():
                mine.setdefault(module, []).extend(k for k in keys if k not in mine.get(module, []))

    def __str__(self) -> str:
        if not self:
            return "the checkpoint's keys match the state"
        return "key differences between the checkpoint and the state:\n" + self.details()

    def details(self) -> str:
        """The differences, per module, one a line."""
        lines = []
        modules = sorted(set(self.missing) | set(self.unexpected) | set(self.mismatched))
        for module in modules:
            lines.append(f"  module {module!r}:")
            for label, table in (("missing", self.missing), ("unexpected", self.unexpected),
                                 ("mismatched", self.mismatched)):
                for key in table.get(module, []):
                    lines.append(f"    {label}: {key}")
        lines.append("  (missing: requested, not in the checkpoint; unexpected: in it, not requested. "
                     "strict=\"requested\" loads despite unexpected keys, strict=False whatever matches)")
        return "\n".join(lines)


def check_keys(
    module: str,
    entry: ModuleEntry | None,
    tensors: Sequence[tuple[str, str, tuple[int, ...], bool]],
    objects: Sequence[tuple[str, tuple[int, ...]]],
    unused_ok: Collection[str] = (),
) -> tuple[KeyReport, set[str]]:
    """Compare the union of a module's requests (key, dtype, global shape, whether the shape may
    differ) with its stored keys. Stored keys in `unused_ok` may go unrequested (layout-bound
    state of another layout). A floating-point dtype other than the stored one is cast on load;
    a global shape other than the stored one loads only where every request allows it
    (megatron's `allow_shape_mismatch`, on padded vocabularies): see `padded_region`.

    Returns the report and the requested keys that cannot be loaded (missing or mismatched).
    """
    report = KeyReport()
    stored_t = entry.tensors if entry else {}
    stored_o = entry.objects if entry else {}
    asked_t: dict[str, tuple[str, tuple[int, ...], bool]] = {}
    for k, d, s, flexible in tensors:
        _, _, all_flexible = asked_t.get(k, (d, s, True))
        asked_t[k] = (d, s, all_flexible and flexible)
    asked_o = {k: g for k, g in objects}
    missing = [f"tensor {k!r}" for k in sorted(asked_t) if k not in stored_t]
    missing += [f"object {k!r}" for k in sorted(asked_o) if k not in stored_o]
    unexpected = [f"tensor {k!r}" for k in sorted(stored_t) if k not in asked_t]
    unexpected += [f"object {k!r}" for k in sorted(stored_o) if k not in asked_o and k not in unused_ok]
    skipped = {k for k in asked_t if k not in stored_t} | {k for k in asked_o if k not in stored_o}
    mismatched = []
    for k, (dtype, shape, flexible) in sorted(asked_t.items()):
        if k in stored_t:
            st = stored_t[k]
            if st.global_shape != shape and not (flexible and len(shape) == len(st.global_shape)):
                mismatched.append(f"tensor {k!r}: shape {list(shape)} requested, {list(st.global_shape)} stored")
                skipped.add(k)
            if not castable(st.dtype, dtype):
                mismatched.append(f"tensor {k!r}: dtype {dtype} requested, {st.dtype} stored")
                skipped.add(k)
    for k, grid in sorted(asked_o.items()):
        if k in stored_o and _one_object(stored_o[k].global_shape) != _one_object(grid):
            mismatched.append(f"object {k!r}: grid {list(grid)} requested, {list(stored_o[k].global_shape)} stored")
            skipped.add(k)
    if missing:
        report.missing[module] = missing
    if unexpected:
        report.unexpected[module] = unexpected
    if mismatched:
        report.mismatched[module] = mismatched
    return report, skipped


def padded_region(box: Box, stored_shape: tuple[int, ...]) -> Box | None:
    """The part of a requested box that a stored tensor of another global shape holds, when the
    shapes may differ (a vocabulary padded to another multiple): megatron's rule, which this
    follows, is to load that part and leave zeros elsewhere (truncating what lies beyond)."""
    return box.intersect(Box((0,) * len(stored_shape), tuple(stored_shape)))


def plan_tensor_reads(module: str, key: str, stored: StoredTensor, box: Box, request: int = 0) -> list[ReadItem]:
    """Reads that fill `box` of one stored tensor from the shards it overlaps."""
    itemsize = ITEMSIZE[stored.dtype]
    items, covered = [], 0
    for shard in _candidates(stored.shards, box):
        overlap = box.intersect(shard.box)
        if overlap is None:
            continue
        covered += overlap.volume
        lo, hi = span_in(overlap, shard.box)
        items.append(ReadItem(request, shard, overlap, shard.begin + lo * itemsize, shard.begin + hi * itemsize,
                              f"module {module!r}, tensor {key!r}"))
    if covered != box.volume:
        raise ManifestError(
            f"module {module!r}, tensor {key!r}: the checkpoint covers {covered} of "
            f"{box.volume} elements of requested box {box}"
        )
    return items


def _candidates(shards: Sequence[StoredShard], box: Box) -> Sequence[StoredShard]:
    """Shards that may meet `box`: a vectorised prefilter, for tensors stored in many boxes (one
    rank's load then costs array work per tensor, not a Python loop over every shard)."""
    if len(shards) < 64 or box.ndim == 0:
        return shards
    offsets = np.array([s.box.offset for s in shards], dtype=np.int64)
    ends = offsets + np.array([s.box.shape for s in shards], dtype=np.int64)
    meets = ((offsets < np.array(box.end)) & (ends > np.array(box.offset))).all(axis=1)
    return [shards[i] for i in np.flatnonzero(meets)]


def plan_module_load(module: str, entry: ModuleEntry, requests: Sequence[TensorMeta]) -> list[ReadItem]:
    """Reads that fill each requested box from the stored shards it overlaps, in file order."""
    items = [
        item
        for index, req in enumerate(requests)
        for item in plan_tensor_reads(module, req.key, entry.tensors[req.key], req.box, index)
    ]
    items.sort(key=lambda it: (it.shard.file, it.begin))
    return items


def _one_object(grid: tuple[int, ...]) -> tuple[int, ...]:
    """A grid, with the two spellings of one object made one: none (a plain value) and (1,) (how
    megatron names every ShardedObject, and how torch_dist export writes a plain one)."""
    return (1,) if tuple(grid) == () else tuple(grid)


def stored_object_value(values: Mapping[tuple[int, ...], Any], offset: tuple[int, ...]) -> Any:
    """The stored value at `offset` (KeyError if none); a single object is found at either
    spelling of its place, () or (0,)."""
    if offset in values:
        return values[offset]
    if offset in ((), (0,)) and len(values) == 1:
        (only,) = values
        if only in ((), (0,)):
            return values[only]
    raise KeyError(offset)
