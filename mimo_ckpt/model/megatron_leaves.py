"""Conversion between megatron-core's ShardedTensor / ShardedObject and our shards.

megatron-core is never imported here: objects are recognised by class name and module, so
checkpoints can be handled on machines (and in CLI start-up) without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mimo_ckpt.model.box import flat_range_boxes
from mimo_ckpt.errors import ShardError

__all__ = ["kind", "to_shards", "flat_state_shards", "to_sharded_tensor", "to_sharded_object"]

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


def to_shards(value: Any, *, module: str) -> list[Any]:
    """Our TensorShards / ObjectShard for a megatron-core ShardedTensor or ShardedObject (none
    for a LocalNonpersistentObject). A ShardedTensor with a `flattened_range` (a flat slice of its
    box, as DistributedOptimizer keeps state) becomes the boxes that slice covers, each a view of
    its data: loads fill the slice in place, saves write it without a copy."""
    from mimo_ckpt.model.shard import ObjectShard, TensorShard

    name = kind(value)
    if name == "ShardedTensor":
        where = f"module {module!r}, tensor {value.key!r}"
        if value.data is None:
            raise ShardError(f"{where}: ShardedTensor has no data")
        ones, main = (1,) * value.prepend_axis_num, _is_main(value.replica_id)
        local = tuple(value.local_shape)
        if value.flattened_range is None:
            data = value.data.reshape(ones + tuple(value.data.shape)) if ones else value.data
            if tuple(data.shape) != ones + local:
                raise ShardError(f"{where}: data shape {tuple(value.data.shape)} != local_shape {local}")
            return [TensorShard(value.key, data, tuple(value.global_shape), tuple(value.global_offset), main,
                                bool(value.allow_shape_mismatch), exclusive_main=True)]
        start, stop = value.flattened_range.start or 0, value.flattened_range.stop
        if value.data.ndim != 1 or value.data.numel() != stop - start or value.flattened_range.step not in (None, 1):
            raise ShardError(f"{where}: flattened_range {start}..{stop} needs 1-D data of {stop - start} elements, "
                             f"got shape {tuple(value.data.shape)}")
        try:
            boxes = flat_range_boxes(local, start, stop)
        except ValueError as exc:
            raise ShardError(f"{where}: flattened_range: {exc}") from None
        offset = tuple(value.global_offset)
        p = value.prepend_axis_num
        return [
            TensorShard(value.key, value.data[lo - start : hi - start].view(ones + box.shape),
                        tuple(value.global_shape), offset[:p] + tuple(o + b for o, b in zip(offset[p:], box.offset)), main,
                        bool(value.allow_shape_mismatch), exclusive_main=True)
            for box, lo, hi in boxes
        ]
    if name == "ShardedObject":
        return [ObjectShard(value.key, value.data, tuple(value.global_shape), tuple(value.global_offset),
                            _is_main(value.replica_id))]
    if name == "LocalNonpersistentObject":
        return []
    raise ShardError(f"module {module!r}: megatron-core {name} entries are not supported")


def flat_state_shards(model_leaf: Any, key: str, flat: Any, start: int, *, replica_id: Any, module: str) -> list[Any]:
    """Optimizer state kept as a flat slice [start, start + flat.numel()) of one parameter's local
    tensor (a DistributedOptimizer rank's own part), as TensorShards of the model-space tensor
    `key`: the boxes the slice covers, each a view of `flat`, so a save writes it and a load fills
    it with no gather. `model_leaf` is the parameter's ShardedTensor, or the ShardedTensorFactory
    that cuts it (SwiGLU): that one is built over the local tensor's element indices, which shows
    where each local element lands in the stored tensors."""
    import copy

    import torch

    stop = start + flat.numel()
    name = kind(model_leaf)
    if name == "ShardedTensor":
        pieces = [(model_leaf, start, stop, 0)]
    elif name == "ShardedTensorFactory":
        index = torch.arange(model_leaf.data.numel()).reshape(model_leaf.data.shape)
        built = dataclasses.replace(model_leaf, key=key, data=index, replica_id=replica_id).build()
        pieces = []
        for part in _leaves(built):
            values = part.data.reshape(-1)
            lo = int(values[0]) if values.numel() else 0
            if not torch.equal(values, torch.arange(lo, lo + values.numel())):
                raise ShardError(f"module {module!r}, tensor {key!r}: factory {model_leaf.key!r} cuts the local "
                                 f"tensor into parts that are not contiguous; its flat slices cannot be boxes")
            a, b = max(lo, start), min(lo + values.numel(), stop)
            if a < b:
                pieces.append((part, a, b, lo))
    else:
        raise ShardError(f"module {module!r}, tensor {key!r}: megatron-core {name} cannot describe a parameter")
    out = []
    for leaf, a, b, lo in pieces:
        view = copy.copy(leaf)  # a dataclass copy: no validation, which refuses flattened_range since 0.19
        view.key = key if name == "ShardedTensor" else leaf.key
        view.data, view.flattened_range, view.replica_id = flat[a - start : b - start], slice(a - lo, b - lo), replica_id
        out += to_shards(view, module=module)
    return out


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def to_sharded_tensor(shard: Any, replica_id: Any = 0) -> Any:
    """A megatron-core ShardedTensor for one of our TensorShards (shares its data)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor(
        key=shard.key, data=shard.data, dtype=shard.data.dtype, local_shape=tuple(shard.data.shape),
        global_shape=shard.global_shape, global_offset=shard.global_offset,
        axis_fragmentations=None, replica_id=replica_id, allow_shape_mismatch=shard.allow_shape_mismatch,
    )


def to_sharded_object(shard: Any, replica_id: Any = 0) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(shard.key, shard.data, shard.global_shape, shard.global_offset, replica_id)
