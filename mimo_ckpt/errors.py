"""The closed set of errors mimo-ckpt raises.

Every error derives from `MimoCkptError` and from the builtin that fits, so callers can catch
either. Messages name the module, key, box, file or layout at fault.
"""

from __future__ import annotations

__all__ = [
    "MimoCkptError",
    "LayoutError",
    "ShardError",
    "PlanError",
    "ManifestError",
    "StorageError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "KeyMismatchError",
    "CorruptShardError",
    "RemoteRankError",
    "UnsafeCheckpointError",
    "MappingError",
]


class MimoCkptError(Exception):
    """Base of every error raised by mimo-ckpt."""


class LayoutError(MimoCkptError, ValueError):
    """A module layout is invalid or does not fit the process group."""


class ShardError(MimoCkptError, ValueError):
    """A shard handed to save/load is malformed (bad box, unsupported type or dtype)."""


class PlanError(MimoCkptError, ValueError):
    """The shards of a module do not describe its tensors consistently (overlaps, gaps, clashes)."""


class ManifestError(MimoCkptError, ValueError):
    """A manifest is unreadable, of an unknown version, or inconsistent."""


class StorageError(MimoCkptError, OSError):
    """Reading or writing checkpoint bytes failed."""


class CheckpointExistsError(StorageError, FileExistsError):
    """A committed checkpoint already exists where a new one would be written."""


class CheckpointNotFoundError(MimoCkptError, FileNotFoundError):
    """No committed checkpoint (no manifest) at the given path."""


class KeyMismatchError(MimoCkptError, ValueError):
    """Strict load: keys missing, unexpected, or with another shape or dtype, listed per module."""

    def __init__(self, report: object) -> None:
        # a report (plan.load.KeyReport), or the message of one raised on another rank
        text = report if isinstance(report, str) else f"checkpoint keys do not match the state to load:\n{report.details()}"
        super().__init__(text)
        self.report = report


class CorruptShardError(MimoCkptError, ValueError):
    """Stored bytes do not match the manifest (checksum or size)."""


class RemoteRankError(MimoCkptError, RuntimeError):
    """Another rank failed during a collective save or load; its message is included."""


class UnsafeCheckpointError(MimoCkptError, ValueError):
    """Reading the data would mean unpickling arbitrary objects, which was not allowed."""


class MappingError(MimoCkptError, ValueError):
    """A Hugging Face mapping table, config or folder does not fit the tensors it should map."""
