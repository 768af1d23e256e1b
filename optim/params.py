"""Parameters as boxes of global tensors, and the pure rules built on them.

A `ShardedParam` names a model parameter by its model-space key and places its local tensor (or a
run of its rows, see `rows`) in the global tensor. Everything the optimizer needs to know about replication follows from the boxes:
ranks holding the same (key, box) are replicas, the lowest of them counts the box in the grad
norm, and the lowest rank holding any part of a key saves that key's scalar state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from mimo_ckpt.model.box import Box
from mimo_ckpt.errors import ShardError
from mimo_ckpt.model.split import balanced_part

__all__ = ["ShardedParam", "SliceRef", "first_holders", "first_key_holders", "zero1_rows"]


@dataclass(frozen=True, slots=True)
class ShardedParam:
    """A model parameter (`param`, a torch Parameter) and where its data sits in the global tensor."""

    key: str
    param: Any
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    prepend_axes: int = 0
    """Leading global axes the parameter spans with extent 1: megatron stacks a module's layers
    under one key this way (a ShardedTensor's `prepend_axis_num`)."""
    rows: tuple[int, int] | None = None
    """Only rows [begin, end) of the local tensor's dimension 0 sit at `global_offset`: a parameter
    whose local tensor holds several boxes is given as one ShardedParam per part. megatron's
    gated-linear-unit `linear_fc1` is one: its upper rows are a box of the gate half W of the
    stored tensor, its lower rows a box of the up half V."""
    allow_shape_mismatch: bool = False
    """The stored tensor may be larger or smaller along a dimension (megatron's padded vocabulary,
    whose padding changes with TP): the optimizer state loads as the weights do
    (mimo_ckpt `TensorShard.allow_shape_mismatch`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(s) for s in self.global_shape))
        object.__setattr__(self, "global_offset", tuple(int(o) for o in self.global_offset))
        if self.rows is not None:
            begin, end = (int(r) for r in self.rows)
            if self.param.dim() == 0 or not 0 <= begin < end <= self.param.shape[0]:
                raise ShardError(f"parameter {self.key!r}: rows {list(self.rows)} are not a part of its local "
                                 f"shape {list(self.param.shape)}")
            object.__setattr__(self, "rows", (begin, end))
        if not self.key or not isinstance(self.key, str):
            raise ShardError(f"parameter key must be a non-empty string, got {self.key!r}")
        if not self.box.fits_in(self.global_shape):
            raise ShardError(
                f"parameter {self.key!r}: box {self.box} does not fit global shape {list(self.global_shape)}"
            )

    def part(self, t: Any) -> Any:
        """The rows of `t` (the parameter, its grad, or its data) this ShardedParam places: a view."""
        return t if self.rows is None else t[self.rows[0] : self.rows[1]]

    @property
    def box(self) -> Box:
        return Box(self.global_offset, (1,) * self.prepend_axes + tuple(self.part(self.param).shape))

    @property
    def name(self) -> str:
        """Unique on a rank: the key, plus the prepended offsets (the layer) for stacked keys and
        the rows for a part."""
        name = self.key
        if self.prepend_axes:
            name += f"[{','.join(str(o) for o in self.global_offset[: self.prepend_axes])}]"
        if self.rows is not None:
            name += f"[rows {self.rows[0]}:{self.rows[1]}]"
        return name

    @classmethod
    def whole(cls, key: str, param: Any) -> "ShardedParam":
        """A parameter every rank of the module holds in full."""
        return cls(key, param, tuple(param.shape), (0,) * param.dim())


@dataclass(frozen=True, slots=True)
class SliceRef:
    """A box of one key, as ranks exchange them (JSON lists on the wire)."""

    key: str
    box: Box

    def to_wire(self) -> list[Any]:
        return [self.key, list(self.box.offset), list(self.box.shape)]

    @classmethod
    def from_wire(cls, w: Sequence[Any]) -> "SliceRef":
        return cls(str(w[0]), Box(tuple(w[1]), tuple(w[2])))


def first_holders(refs_by_rank: Mapping[int, Iterable[SliceRef]]) -> dict[SliceRef, int]:
    """For each (key, box), the lowest rank holding it: the one replica that counts it once."""
    out: dict[SliceRef, int] = {}
    for rank in sorted(refs_by_rank):
        for ref in refs_by_rank[rank]:
            out.setdefault(ref, rank)
    return out


def first_key_holders(refs_by_rank: Mapping[int, Iterable[SliceRef]]) -> dict[str, int]:
    """For each key, the lowest rank holding any box of it."""
    out: dict[str, int] = {}
    for rank in sorted(refs_by_rank):
        for ref in refs_by_rank[rank]:
            out.setdefault(ref.key, rank)
    return out


def zero1_rows(rows: int, index: int, count: int) -> tuple[int, int]:
    """Rows [begin, end) of dimension 0 that member `index` of `count` owns; balanced, in order.

    The same rule offline reshard replays (`mimo_ckpt.model.split.balanced_part`), so resharded
    state boxes are exactly the rows each rank of the new layout asks for."""
    begin, size = balanced_part(rows, count, index)
    return begin, begin + size
