"""Portable keys for megatron-core MIMO state, so checkpoints move between trainers.

Megatron's keys depend on how a trainer wraps and names things: one `module.` per DDP or
Float16Module wrapper, the module prefix (`language_model.`, `modality_submodules.<name>.`), the
`mimo.<name>.` prefix megatron's MimoOptimizer adds, and the main-param name (`fp32_param` in
Float16Optimizer, `param` in DistributedOptimizer). A checkpoint stores one spelling per module:

    model weight      decoder.layers.mlp.linear_fc1.weight        (module prefix, wrappers gone)
    optimizer state   optimizer.state.exp_avg.<model weight key>  (`fp32_param` for main params)
    other objects     <key> with the prefixes above removed

`_extra_state` entries are kept as they are (None, for layers without Transformer Engine), and a
load tolerates their absence: a model with them loads a checkpoint written without. Tied output
embeddings need no rule of ours:
megatron keys the last stage's copy as the input embedding, a non-main replica, so it is never
saved twice and loads from the embedding's boxes.

Pure: megatron-core objects are recognised by class name (see model.megatron_leaves).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

from mimo_ckpt.errors import ShardError
from mimo_ckpt.model.megatron_leaves import kind, to_shards

__all__ = [
    "LANGUAGE_MODULE", "COMMON_METADATA", "OPTIMIZER_STATE", "split_key", "megatron_key", "from_megatron", "to_megatron", "split_common",
    "with_common", "iter_leaves",
]

LANGUAGE_MODULE = "language"  # megatron's MIMO_LANGUAGE_MODULE_KEY
_LANGUAGE_PREFIX = "language_model."
_MODALITY_PREFIX = "modality_submodules."
OPTIMIZER_STATE = "optimizer.state."
_MAIN_PARAM_NAMES = {"param": "fp32_param", "fp32_param": "fp32_param"}


def _strip_wrappers(key: str) -> str:
    parts = key.split(".")
    return ".".join(p for p in parts if p != "module")


def _split_model_key(key: str) -> tuple[str, str]:
    key = _strip_wrappers(key)
    if key.startswith(_LANGUAGE_PREFIX):
        return LANGUAGE_MODULE, key[len(_LANGUAGE_PREFIX):]
    if key.startswith(_MODALITY_PREFIX):
        name, _, rest = key[len(_MODALITY_PREFIX):].partition(".")
        if name and rest:
            return name, rest
    raise ShardError(
        f"key {key!r} names no MIMO module: expected 'language_model.' or 'modality_submodules.<name>.'"
    )


def split_key(key: str) -> tuple[str, str]:
    """(module, canonical key) for a megatron MIMO model or optimizer key."""
    stripped = _strip_wrappers(key)
    if stripped.startswith("mimo."):  # megatron MimoOptimizer: mimo.<name>.<optimizer key>
        module, _, rest = stripped[len("mimo."):].partition(".")
        if rest.startswith(OPTIMIZER_STATE):
            name, _, model_key = rest[len(OPTIMIZER_STATE):].partition(".")
            inner_module, local = _split_model_key(model_key)
            if inner_module != module:
                raise ShardError(f"key {key!r}: optimizer of module {module!r} holds state of module {inner_module!r}")
            return module, f"{OPTIMIZER_STATE}{_MAIN_PARAM_NAMES.get(name, name)}.{local}"
        for marker in (f"optimizer.mimo.{module}.", "optimizer.mimo."):
            if rest.startswith(marker):  # param_groups etc. moved into ShardedObjects
                return module, "optimizer." + rest[len(marker):]
        return module, rest
    if stripped.startswith(OPTIMIZER_STATE):
        name, _, model_key = stripped[len(OPTIMIZER_STATE):].partition(".")
        module, local = _split_model_key(model_key)
        return module, f"{OPTIMIZER_STATE}{_MAIN_PARAM_NAMES.get(name, name)}.{local}"
    return _split_model_key(stripped)


def megatron_key(module: str, key: str, *, main_param_name: str = "fp32_param", optimizer_prefix: bool = True) -> str:
    """The megatron MIMO key for one of our canonical keys (the inverse of `split_key`)."""
    prefix = _LANGUAGE_PREFIX if module == LANGUAGE_MODULE else f"{_MODALITY_PREFIX}{module}."
    if key.startswith(OPTIMIZER_STATE):
        name, _, local = key[len(OPTIMIZER_STATE):].partition(".")
        if name == "fp32_param":
            name = main_param_name
        out = f"{OPTIMIZER_STATE}{name}.{prefix}{local}"
        return f"mimo.{module}.{out}" if optimizer_prefix else out
    if key.startswith("optimizer."):
        rest = key[len("optimizer."):]
        return f"mimo.{module}.optimizer.mimo.{module}.{rest}" if optimizer_prefix else key
    return prefix + key


def iter_leaves(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, leaf) of nested dicts and lists, depth first in insertion order."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from iter_leaves(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from iter_leaves(v, (*path, i))
    else:
        yield path, tree


def from_megatron(sharded_state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Module-keyed state with canonical keys from a megatron MIMO `sharded_state_dict()` (model,
    optimizer or both), for `mimo_ckpt.save` and `mimo_ckpt.load`.

    Shards keep the megatron tensors as data, so a load fills the model in place. Each module's
    entries are keyed by their path in the input, joined with '/', which `to_megatron` uses.
    """
    out: dict[str, dict[str, Any]] = {}
    for path, value in iter_leaves(sharded_state_dict):
        name = kind(value)
        where = "/".join(map(str, path))
        if name == "LocalNonpersistentObject" or value is _TAKEN:
            continue  # not persisted by megatron either; or common state, saved as metadata
        if name is None:
            raise ShardError(
                f"entry {where!r} is a plain {type(value).__name__}, which names no module: megatron keeps such "
                f"values in rank 0's common state; take them out with split_common and save them as metadata"
            )
        if name not in ("ShardedTensor", "ShardedObject", "ShardedTensorFactory"):
            raise ShardError(f"entry {where!r}: megatron-core {name} is not supported")
        module, key = split_key(value.key)
        if name == "ShardedTensorFactory":  # built (under the canonical key) when it is saved or loaded
            out.setdefault(module, {})[where] = dataclasses.replace(value, key=key)
            continue
        shards = [dataclasses.replace(s, key=key) for s in to_shards(value, module=module)]
        if shards:  # several for a flat slice (its boxes), none for an empty one
            out.setdefault(module, {})[where] = shards[0] if len(shards) == 1 else shards
    return out


COMMON_METADATA = "megatron_common"
"""The save metadata key under which `split_common`'s values go (rank 0's are the ones stored)."""


def split_common(sharded_state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the state without its plain values, the plain values by '/'-joined path): megatron's
    common state, which it saves from rank 0 and gives back to every rank. Save the second as
    `metadata={COMMON_METADATA: common}` and pass `LoadResult.metadata[COMMON_METADATA]` to
    `to_megatron`, which puts rank 0's values back on every rank."""
    common: dict[str, Any] = {}

    def go(tree: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(tree, Mapping):
            kept = {k: go(v, (*path, k)) for k, v in tree.items()}
            return {k: v for k, v in kept.items() if v is not _TAKEN}
        if isinstance(tree, (list, tuple)) and any(kind(v) for _, v in iter_leaves(tree)):
            return type(tree)(go(v, (*path, i)) for i, v in enumerate(tree))  # positions kept
        if kind(tree) is None:
            common["/".join(map(str, path))] = tree
            return _TAKEN
        return tree

    return go(sharded_state_dict, ()), common


class _Taken:
    """Where `split_common` took a plain value out of a list (a dict just loses the key)."""


_TAKEN = _Taken()


def to_megatron(sharded_state_dict: dict[str, Any], loaded: Mapping[str, Mapping[str, Any]],
                common: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`sharded_state_dict` with each ShardedObject replaced by its loaded value (from `loaded`,
    what `mimo_ckpt.load` returned for `from_megatron(sharded_state_dict)`), each ShardedTensor
    by its tensor, filled in place, and each factory by its merged value; plus the `common`
    values (see `split_common`) at their paths: the structure megatron's own `load` returns."""
    values = {p: v for module in loaded.values() for p, v in module.items()}
    if common:
        sharded_state_dict = with_common(sharded_state_dict, common)

    def rebuild(tree: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(tree, dict):
            return {k: rebuild(v, (*path, k)) for k, v in tree.items()}
        if isinstance(tree, list):
            return [rebuild(v, (*path, i)) for i, v in enumerate(tree)]
        if kind(tree) == "ShardedTensor":
            return tree.data  # filled in place
        joined = "/".join(map(str, path))
        if joined in values:
            return values[joined]
        if kind(tree) == "ShardedObject":
            return tree.data
        if kind(tree) == "LocalNonpersistentObject":
            return tree.unwrap()
        return tree

    return rebuild(sharded_state_dict, ())


def with_common(tree: dict[str, Any], common: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested dicts and lists of `tree` with each common value (`split_common`) set
    at its path, dicts made on the way where missing: rank 0's common state on every rank."""
    out = _copy_dicts(tree)
    for joined, value in common.items():
        *parents, last = joined.split("/")
        node = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


def _copy_dicts(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_dicts(v) for v in tree]
    return tree
