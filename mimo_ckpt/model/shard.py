"""Shards: one rank's boxes of global tensors, and small objects, per module.

A module's state is a nested mapping whose leaves are `TensorShard`, `ObjectShard`, megatron-core
`ShardedTensor` / `ShardedObject`, plain tensors (the whole tensor, replicated) or other values
(objects: JSON, tuples, sets, bytes, dtypes; see `object_codec`).
`model.tree` turns it into flat lists of these and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mimo_ckpt.errors import ShardError
from mimo_ckpt.model.box import Box
from mimo_ckpt.model.dtypes import from_torch

__all__ = [
    "TensorShard",
    "ObjectShard",
    "TensorMeta",
    "ObjectMeta",
    "ModuleShards",
    "FactoryLeaf",
]


@dataclass(frozen=True, slots=True)
class TensorShard:
    """One rank's box of a global tensor. `data` has the box's shape and is filled in place on load,
    cast from the stored floating-point dtype if it differs."""

    key: str
    data: Any  # torch.Tensor
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    is_main_replica: bool = True
    allow_shape_mismatch: bool = False
    """On load: the stored global shape may differ (a padded vocabulary); the part of the box the
    checkpoint holds is loaded, the rest is zero (`load_plan.padded_region`)."""
    exclusive_main: bool = False
    """The main replica by a replica id (megatron's): another rank that claims the same box as
    main too is an error, where plain replicated tensors (no replica id) share it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(s) for s in self.global_shape))
        object.__setattr__(self, "global_offset", tuple(int(o) for o in self.global_offset))
        if not self.box.fits_in(self.global_shape):
            raise ShardError(
                f"tensor {self.key!r}: box {self.box} (local shape {tuple(self.data.shape)}) "
                f"does not fit global shape {self.global_shape}"
            )

    @property
    def box(self) -> Box:
        return Box(self.global_offset, tuple(self.data.shape))

    @classmethod
    def whole(cls, key: str, tensor: Any) -> "TensorShard":
        """A rank's full copy of a global tensor."""
        return cls(key, tensor, tuple(tensor.shape), (0,) * tensor.dim())

    def meta(self) -> "TensorMeta":
        return TensorMeta(
            self.key, from_torch(self.data.dtype, key=self.key), self.global_shape, self.box,
            self.is_main_replica, self.is_main_replica and self.exclusive_main,
        )


@dataclass(frozen=True, slots=True)
class ObjectShard:
    """A value `object_codec` stores; `global_offset` in a `global_shape` grid tells sharded objects apart."""

    key: str
    data: Any
    global_shape: tuple[int, ...] = ()
    global_offset: tuple[int, ...] = ()
    is_main_replica: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(s) for s in self.global_shape))
        object.__setattr__(self, "global_offset", tuple(int(o) for o in self.global_offset))
        if not Box(self.global_offset, (1,) * len(self.global_offset)).fits_in(self.global_shape):
            raise ShardError(
                f"object {self.key!r}: offset {self.global_offset} outside grid {self.global_shape}"
            )

    def meta(self, encoded: Any = None) -> "ObjectMeta":
        """What peers learn of this object; `encoded`: its value as `object_codec.encode_checked` gave it, sent
        by the rank that saves it (None from the others)."""
        return ObjectMeta(self.key, self.global_shape, self.global_offset, self.is_main_replica, encoded)


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a rank tells its module peers about one of its tensor shards."""

    key: str
    dtype: str
    global_shape: tuple[int, ...]
    box: Box
    is_main_replica: bool
    exclusive_main: bool = False

    def to_wire(self) -> list[Any]:
        return [self.key, self.dtype, list(self.global_shape), list(self.box.offset),
                list(self.box.shape), self.is_main_replica, self.exclusive_main]

    @classmethod
    def from_wire(cls, w: list[Any]) -> "TensorMeta":
        return cls(w[0], w[1], tuple(w[2]), Box(tuple(w[3]), tuple(w[4])), bool(w[5]), bool(w[6]))


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """`value`: encoded (`object_codec`), as the wire and the manifest carry it."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    is_main_replica: bool
    value: Any

    def to_wire(self) -> list[Any]:
        return [self.key, list(self.global_shape), list(self.offset), self.is_main_replica, self.value]

    @classmethod
    def from_wire(cls, w: list[Any]) -> "ObjectMeta":
        return cls(w[0], tuple(w[1]), tuple(w[2]), bool(w[3]), w[4])


Leaves = list[tuple[tuple[Any, ...], Any]]
"""(path, what the leaf became) for every leaf of a state: a list of shards (none for a value
megatron does not persist, several for a flat slice), or a `FactoryLeaf`."""


@dataclass(frozen=True, slots=True)
class FactoryLeaf:
    """A megatron-core ShardedTensorFactory: what its `build` made (saved and loaded as any other
    state), merged back by its `merge_fn` after a load, as megatron's own loader does."""

    factory: Any
    built: Any
    leaves: Leaves


@dataclass(slots=True)
class ModuleShards:
    """A module's state on one rank, flattened."""

    tensors: list[TensorShard]
    objects: list[ObjectShard]
    leaves: Leaves
    """To rebuild the nested structure after load."""
    encoded: dict[int, Any] = field(default_factory=dict)
    """id() of each shard in `objects` -> its value as the manifest stores it (encoded once, by the save: `plan.save.encode_objects`)."""
    twins: list[tuple[TensorShard, TensorShard]] = field(default_factory=list)
    """(copy, shard in `tensors`): a box this rank holds twice, as a main replica and a copy (a
    tied output layer beside its embedding). Only the shard in `tensors` is saved; a load fills
    it, then the copy from it."""
