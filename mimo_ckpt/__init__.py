"""mimo-ckpt: sharded, reshardable checkpoints for multimodal Megatron-Core models.

Importing the package is cheap: torch is imported only when save/load or shards are used.
"""

from __future__ import annotations

from typing import Any

from mimo_ckpt.errors import *  # noqa: F401,F403
from mimo_ckpt.errors import __all__ as _error_names
from mimo_ckpt.model.layout import PARALLEL_DIMS, ModuleLayout

__version__ = "0.1.0"

_LAZY = {
    "save": "run.save",
    "load": "run.load",
    "LoadResult": "run.load",
    "TensorShard": "model.shard",
    "ObjectShard": "model.shard",
    "KeyReport": "plan.load",
    "SaveOptions": "plan.options",
    "ReadOptions": "plan.options",
    "Manifest": "format.manifest",
    "read_manifest": "io.commit",
    "Storage": "io.storage",
    "LocalStorage": "io.storage",
    "TensorStoreStorage": "io.storage",
    "open_storage": "io.storage",
    "Comm": "run.comm",
    "TorchComm": "run.comm",
    "ThreadWorld": "run.comm",
    "SoloComm": "run.comm",
    "CheckpointManager": "run.manager",
    "AsyncSaver": "run.async_save",
    "AsyncSave": "run.async_save",
    "async_save": "run.async_save",
    "rng_state": "model.rank_state",
    "restore_rng_state": "model.rank_state",
    "LayoutChangedWarning": "model.rank_state",
}

__all__ = ["ModuleLayout", "PARALLEL_DIMS", "__version__", *_LAZY, *_error_names]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mimo_ckpt' has no attribute {name!r}")
