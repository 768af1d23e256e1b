"""Run roots: `<root>/step_<9 digits>/` checkpoints and `<root>/latest` (docs/format.md).

Reading them needs no process group: the manager uses these to find steps, and the CLI to take a
run root or its `latest` where a checkpoint is asked for.
"""

from __future__ import annotations

import logging
import os
import re

from mimo_ckpt.errors import CheckpointNotFoundError, StorageError
from mimo_ckpt.format.manifest import MANIFEST_PATH
from mimo_ckpt.io.storage import open_storage

__all__ = ["LATEST_PATH", "step_name", "committed_steps", "resolve_checkpoint"]

LATEST_PATH = "latest"
_STEP_DIR = re.compile(r"step_(\d{9})")
log = logging.getLogger("mimo_ckpt")


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def committed_steps(root: str) -> list[int]:
    """Steps under `root` whose checkpoint is committed, ascending."""
    if "://" in root:
        names = {name.split("/", 1)[0] for name in open_storage(root).list_files()}
    else:
        names = set(os.listdir(root)) if os.path.isdir(root) else set()
    steps = []
    for name in names:
        m = _STEP_DIR.fullmatch(name)
        if m and _is_committed(f"{root}/{name}"):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _is_committed(path: str) -> bool:
    try:
        return open_storage(path).size(MANIFEST_PATH) is not None
    except StorageError as exc:  # a manifest that is a directory or a FIFO commits nothing
        log.warning("%s: %s", path, exc)
        return False


def resolve_checkpoint(path: str) -> str:
    """The checkpoint `path` names: itself; for `<root>/latest`, or a run root, the newest
    committed step (which `latest` names, unless a save died between its commit and moving it)."""
    path = path.rstrip("/") or "/"
    if "://" in path:
        if open_storage(path).size(MANIFEST_PATH) is not None:
            return path
        root = path
    elif os.path.isfile(path) and os.path.basename(path) == LATEST_PATH:
        root = os.path.dirname(path) or "."
    elif not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no {MANIFEST_PATH}; not a committed checkpoint (no such directory)")
    elif os.path.lexists(os.path.join(path, MANIFEST_PATH)):
        return path  # readers check what the manifest is
    else:
        root = path
    steps = committed_steps(root)
    if not steps:
        raise CheckpointNotFoundError(f"{path}: no {MANIFEST_PATH}; neither a committed checkpoint nor a run root "
                                      f"with a committed step_*")
    return f"{root}/{step_name(steps[-1])}"
