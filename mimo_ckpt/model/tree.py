"""Nested module state <-> flat lists of shards: `flatten_module_state` on the way in (megatron's
leaves adapted, factories built), `rebuild` to put loaded values back in the caller's shape."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from mimo_ckpt.errors import ShardError
from mimo_ckpt.model import megatron_leaves
from mimo_ckpt.model.dtypes import from_torch
from mimo_ckpt.model.shard import FactoryLeaf, Leaves, ModuleShards, ObjectShard, TensorShard

__all__ = ["flatten_module_state", "rebuild"]


def _is_sharded(value: Any) -> bool:
    import torch

    return (
        isinstance(value, (TensorShard, ObjectShard, torch.Tensor))
        or megatron_leaves.kind(value) is not None
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
        kind = megatron_leaves.kind(leaf)
        if kind == "ShardedTensorFactory":
            built = leaf.build()
            leaves.append((path, FactoryLeaf(leaf, built, _flatten(module, built, out, seen))))
            continue
        if kind is not None:
            shards = megatron_leaves.to_shards(leaf, module=module)
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
