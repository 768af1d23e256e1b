"""Paths inside a checkpoint: plain relative paths that cannot leave its root."""

from __future__ import annotations

import posixpath

from mimo_ckpt.errors import StorageError

__all__ = ["check_relpath"]


def check_relpath(path: str) -> str:
    """`path`, or StorageError if it is absolute, not normalised, or climbs out of the root."""
    norm = posixpath.normpath(path)
    if (
        not path or path.startswith("/") or norm != path or norm == ".."
        or norm.startswith("../") or "\\" in path or "\x00" in path
    ):
        raise StorageError(f"path {path!r} is not a plain relative path inside the checkpoint")
    return path
