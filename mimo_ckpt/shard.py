"""Shards: one rank's boxes of global tensors, and small JSON-able objects, per module.

A module's state is a nested mapping whose leaves are `TensorShard`, `ObjectShard`, megatron-core
`ShardedTensor` / `ShardedObject`, plain tensors (the whole tensor, replicated) or JSON-able values.
`flatten_module_state` turns it into flat lists; `rebuild` puts loaded values back in its shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from . import megatron_interop
from .box import Box
from .dtypes import from_torch
from .errors import ManifestError, ShardError
from .manifest import check_json_value

__all__ = [
    "TensorShard",
    "ObjectShard",
    "TensorMeta",
    "ObjectMeta",
    "ModuleShards",
    "flatten_module_state",
    "rebuild",
]


@dataclass(frozen=True, slots=True)
class TensorShard:
    """One rank's box of a global tensor. `data` has the box's shape and is filled in place on load."""

    key: str
    data: Any  # torch.Tensor
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    is_main_replica: bool = True

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
            self.is_main_replica,
        )


@dataclass(frozen=True, slots=True)
class ObjectShard:
    """A JSON-able value; `global_offset` in a `global_shape` grid tells sharded objects apart."""

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

    def meta(self, with_value: bool) -> "ObjectMeta":
        return ObjectMeta(
            self.key, self.global_shape, self.global_offset, self.is_main_replica,
            self.data if with_value else None,
        )


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a rank tells its module peers about one of its tensor shards."""

    key: str
    dtype: str
    global_shape: tuple[int, ...]
    box: Box
    is_main_replica: bool

    def to_wire(self) -> list[Any]:
        return [self.key, self.dtype, list(self.global_shape), list(self.box.offset),
                list(self.box.shape), self.is_main_replica]

    @classmethod
    def from_wire(cls, w: list[Any]) -> "TensorMeta":
        return cls(w[0], w[1], tuple(w[2]), Box(tuple(w[3]), tuple(w[4])), bool(w[5]))


@dataclass(frozen=True, slots=True)
class ObjectMeta:
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


@dataclass(slots=True)
class ModuleShards:
    """A module's state on one rank, flattened."""

    tensors: list[TensorShard]
    objects: list[ObjectShard]
    leaves: list[tuple[tuple[Any, ...], Any]]
    """(path, shard or None) for every leaf, to rebuild the nested structure after load."""


def _is_sharded(value: Any) -> bool:
    import torch

    return (
        isinstance(value, (TensorShard, ObjectShard, torch.Tensor))
        or megatron_interop.kind(value) is not None
    )


def _has_sharded(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_sharded(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_sharded(v) for v in value)
    return _is_sharded(value)


def _walk(value: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(value, dict) and _has_sharded(value):
        for k, v in value.items():
            yield from _walk(v, path + (k,))
    elif isinstance(value, (list, tuple)) and _has_sharded(value):
        for i, v in enumerate(value):
            yield from _walk(v, path + (i,))
    else:
        yield path, value


def _path_key(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def check_json(what: str, value: Any) -> None:
    """Raises ShardError naming `what` unless `value` is plain JSON that every reader takes: no NaN
    or infinity, no lone surrogate in a string or key, at most MAX_JSON_DEPTH levels deep (the
    checks `Manifest.from_bytes` makes on load)."""
    try:
        check_json_value(value, what)
    except ManifestError as exc:
        raise ShardError(str(exc)) from None
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ShardError(
            f"{what}: value of type {type(value).__name__} is not JSON-serialisable ({exc}); store "
            f"tensors as shards, and NaN or infinity in a tensor or as a string"
        ) from exc


def flatten_module_state(module: str, state: Any) -> ModuleShards:
    """Flatten one module's nested state into tensor and object shards; validates keys and types."""
    import torch

    out = ModuleShards([], [], [])
    seen: set[tuple[str, str, tuple[int, ...]]] = set()
    for path, leaf in _walk(state, ()):
        kind = megatron_interop.kind(leaf)
        if kind is not None:
            shard = megatron_interop.to_shard(leaf, module=module)
        elif isinstance(leaf, (TensorShard, ObjectShard)):
            shard = leaf
        elif isinstance(leaf, torch.Tensor):
            shard = TensorShard.whole(_path_key(path), leaf)
        else:
            shard = ObjectShard(_path_key(path), leaf)
        if shard is None:  # not persisted (megatron LocalNonpersistentObject)
            out.leaves.append((path, None))
            continue
        if not isinstance(shard.key, str) or not shard.key:
            raise ShardError(f"module {module!r}: shard at {_path_key(path)!r} has no key")
        is_tensor = isinstance(shard, TensorShard)
        ident = ("tensor" if is_tensor else "object", shard.key, shard.global_offset)
        if ident in seen:
            raise ShardError(
                f"module {module!r}: {ident[0]} {shard.key!r} at offset {shard.global_offset} "
                f"appears twice in this rank's state"
            )
        seen.add(ident)
        if is_tensor:
            from_torch(shard.data.dtype, key=shard.key)
            out.tensors.append(shard)
        else:
            check_json(f"module {module!r}, object {shard.key!r}", shard.data)
            out.objects.append(shard)
        out.leaves.append((path, shard))
    return out


def rebuild(state: Any, value_of: Callable[[tuple[Any, ...], Any], Any]) -> Any:
    """Copy of `state` with each leaf replaced by `value_of(path, leaf)`."""

    def go(value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, dict) and _has_sharded(value):
            return {k: go(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and _has_sharded(value):
            return type(value)(go(v, path + (i,)) for i, v in enumerate(value))
        return value_of(path, value)

    return go(state, ())
