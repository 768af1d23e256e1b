"""mimo-ckpt: sharded, reshardable checkpoints for multimodal Megatron-Core models.

Importing the package is cheap: torch is imported only when save/load or shards are used.
"""

from __future__ import annotations

from typing import Any

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _error_names
from .layout import PARALLEL_DIMS, ModuleLayout

__version__ = "0.1.0"

_LAZY = {
    "save": "checkpoint",
    "load": "checkpoint",
    "LoadResult": "checkpoint",
    "TensorShard": "shard",
    "ObjectShard": "shard",
    "KeyReport": "load_plan",
    "Manifest": "manifest",
    "read_manifest": "manifest",
    "Storage": "storage",
    "LocalStorage": "storage",
    "TensorStoreStorage": "storage",
    "open_storage": "storage",
    "Comm": "comm",
    "TorchComm": "comm",
    "ThreadWorld": "comm",
    "CheckpointManager": "manager",
    "AsyncSaver": "background_save",
    "AsyncSave": "background_save",
    "async_save": "background_save",
    "rng_state": "rank_state",
    "restore_rng_state": "rank_state",
    "LayoutChangedWarning": "rank_state",
}

__all__ = ["ModuleLayout", "PARALLEL_DIMS", "__version__", *_LAZY, *_error_names]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mimo_ckpt' has no attribute {name!r}")
