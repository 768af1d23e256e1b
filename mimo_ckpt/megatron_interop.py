"""Conversion between megatron-core's ShardedTensor / ShardedObject and our shards.

megatron-core is never imported here: objects are recognised by class name and module, so
checkpoints can be handled on machines (and in CLI start-up) without it.
"""

from __future__ import annotations

from typing import Any

from .errors import ShardError

__all__ = ["kind", "to_shard", "to_sharded_tensor", "to_sharded_object"]

_MAPPING_MODULE = "megatron.core.dist_checkpointing.mapping"


def kind(value: Any) -> str | None:
    """'ShardedTensor', 'ShardedObject', ... for megatron-core mapping objects, else None."""
    cls = type(value)
    if cls.__module__ == _MAPPING_MODULE:
        return cls.__name__
    return None


def _is_main(replica_id: Any) -> bool:
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


def to_shard(value: Any, *, module: str) -> Any:
    """Our TensorShard / ObjectShard for a megatron-core object; None if it is not persisted."""
    from .shard import ObjectShard, TensorShard

    name = kind(value)
    if name == "ShardedTensor":
        if value.flattened_range is not None:
            raise ShardError(
                f"module {module!r}, tensor {value.key!r}: flattened_range shards are not "
                f"supported; use model-space (fully_reshardable) optimizer state"
            )
        if value.data is None:
            raise ShardError(f"module {module!r}, tensor {value.key!r}: ShardedTensor has no data")
        data = value.data
        for _ in range(value.prepend_axis_num):
            data = data.unsqueeze(0)
        if tuple(data.shape) != (1,) * value.prepend_axis_num + tuple(value.local_shape):
            raise ShardError(
                f"module {module!r}, tensor {value.key!r}: data shape {tuple(value.data.shape)} "
                f"!= local_shape {tuple(value.local_shape)}"
            )
        return TensorShard(
            value.key, data, tuple(value.global_shape), tuple(value.global_offset),
            _is_main(value.replica_id),
        )
    if name == "ShardedObject":
        return ObjectShard(
            value.key, value.data, tuple(value.global_shape), tuple(value.global_offset),
            _is_main(value.replica_id),
        )
    if name == "LocalNonpersistentObject":
        return None
    raise ShardError(f"module {module!r}: megatron-core {name} entries are not supported")


def to_sharded_tensor(shard: Any, replica_id: Any = 0) -> Any:
    """A megatron-core ShardedTensor for one of our TensorShards (shares its data)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor(
        key=shard.key, data=shard.data, dtype=shard.data.dtype, local_shape=tuple(shard.data.shape),
        global_shape=shard.global_shape, global_offset=shard.global_offset,
        axis_fragmentations=None, replica_id=replica_id,
    )


def to_sharded_object(shard: Any, replica_id: Any = 0) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(shard.key, shard.data, shard.global_shape, shard.global_offset, replica_id)
