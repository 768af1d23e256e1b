"""Shards: one rank's boxes of global tensors, and small objects, per module.

A module's state is a nested mapping whose leaves are `TensorShard`, `ObjectShard`, megatron-core
`ShardedTensor` / `ShardedObject`, plain tensors (the whole tensor, replicated) or other values
(objects: JSON, tuples, sets, bytes, dtypes; see `object_codec`).
`flatten_module_state` turns it into flat lists; `rebuild` puts loaded values back in its shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from mimo_ckpt.interop import megatron_leaves as megatron_interop

from mimo_ckpt.format import object_codec
from mimo_ckpt.model.box import Box
from mimo_ckpt.model.dtypes import from_torch
from mimo_ckpt.errors import ManifestError, ShardError
from mimo_ckpt.format.manifest import check_json_value

__all__ = [
    "TensorShard",
    "ObjectShard",
    "TensorMeta",
    "ObjectMeta",
    "ModuleShards",
    "FactoryLeaf",
    "flatten_module_state",
    "rebuild",
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
        """What peers learn of this object; `encoded`: its value as `encode_object` gave it, sent
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
    """id() of each shard in `objects` -> its value as the manifest stores it (encoded once, here)."""
    twins: list[tuple[TensorShard, TensorShard]] = field(default_factory=list)
    """(copy, shard in `tensors`): a box this rank holds twice, as a main replica and a copy (a
    tied output layer beside its embedding). Only the shard in `tensors` is saved; a load fills
    it, then the copy from it."""


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
    """Leaves, with their paths. A container without sharded values is one leaf (one object),
    except the module's own mapping: its plain entries are objects of their own."""
    if isinstance(value, dict) and (not path or _has_sharded(value)):
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


def encode_object(what: str, value: Any) -> Any:
    """`value` as the manifest stores it (`object_codec.encode`), with the checks `check_json`
    makes, on the encoded form: the limits a reader holds the manifest to apply to it."""
    doc = object_codec.encode(value, what)
    check_json(what, doc)
    return doc


def flatten_module_state(module: str, state: Any) -> ModuleShards:
    """Flatten one module's nested state into tensor and object shards; validates keys and types.
    Megatron factories are built here (and merged back after a load, see `FactoryLeaf`)."""
    out = ModuleShards([], [], [])
    out.leaves = _flatten(module, state, out, {})
    return out


def _flatten(module: str, state: Any, out: ModuleShards, seen: dict[tuple[str, str, tuple[int, ...]], Any]) -> Leaves:
    import torch

    leaves: Leaves = []
    for path, leaf in _walk(state, ()):
        kind = megatron_interop.kind(leaf)
        if kind == "ShardedTensorFactory":
            built = leaf.build()
            leaves.append((path, FactoryLeaf(leaf, built, _flatten(module, built, out, seen))))
            continue
        if kind is not None:
            shards = megatron_interop.to_shards(leaf, module=module)
        elif isinstance(leaf, (TensorShard, ObjectShard)):
            shards = [leaf]
        elif isinstance(leaf, torch.Tensor):
            shards = [TensorShard.whole(_path_key(path), leaf)]
        else:
            shards = [ObjectShard(_path_key(path), leaf)]
        for shard in shards:
            if not isinstance(shard.key, str) or not shard.key:
                raise ShardError(f"module {module!r}: shard at {_path_key(path)!r} has no key")
            is_tensor = isinstance(shard, TensorShard)
            ident = ("tensor" if is_tensor else "object", shard.key, shard.global_offset)
            first = seen.get(ident)
            if first is not None:
                if not (is_tensor and first.box == shard.box and not (first.is_main_replica and shard.is_main_replica)):
                    raise ShardError(
                        f"module {module!r}: {ident[0]} {shard.key!r} at offset {shard.global_offset} appears "
                        f"twice in this rank's state (a tensor may, once as a main replica and once not)"
                    )
                if shard.is_main_replica:  # the main one is saved, and loaded first
                    at = next(i for i, t in enumerate(out.tensors) if t is first)
                    out.tensors[at] = seen[ident] = shard
                    first, shard = shard, first
                out.twins.append((shard, first))
                continue
            seen[ident] = shard
            if is_tensor:
                from_torch(shard.data.dtype, key=shard.key)
                out.tensors.append(shard)
            else:
                # Encoded here, where an error can name the module; the save sends this form.
                out.encoded[id(shard)] = encode_object(f"module {module!r}, object {shard.key!r}", shard.data)
                out.objects.append(shard)
        leaves.append((path, shards))
    return leaves


def rebuild(state: Any, value_of: Callable[[tuple[Any, ...], Any], Any]) -> Any:
    """Copy of `state` with each leaf replaced by `value_of(path, leaf)`."""

    def go(value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, dict) and (not path or _has_sharded(value)):  # as `_walk` goes
            return {k: go(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and _has_sharded(value):
            return type(value)(go(v, path + (i,)) for i, v in enumerate(value))
        return value_of(path, value)

    return go(state, ())
