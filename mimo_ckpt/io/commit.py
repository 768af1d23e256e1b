"""The commit protocol that every writer follows: save, async save, the manager, reshard, import
and both exports.

1. `begin`: refuse a target whose index exists (it is committed); take over the writes that died
   there (remove what their markers say they created, then the markers); place our own marker
   `.saving-<save id>`.
2. Every file is created fresh (never truncated, never written through an existing name or link,
   `Storage.write_file`), and either carries the save id in its name (`...-<id>.safetensors`) or
   is listed in the marker (`announce`, which refuses names already taken) before it is created.
3. `publish`: the index, exclusively and last, and only while our marker is still there (a newer
   writer that took the target over has removed it).
4. `finish`: remove the marker; when nothing was committed, first the files we created.

Nothing else is ever deleted: files of other programs, committed checkpoints, and the sources of
a reshard or export are only read. Re-running a writer after a kill at any point succeeds without
manual cleanup, because its `begin` takes the dead write over.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from typing import Iterable

from mimo_ckpt.errors import CheckpointExistsError, CheckpointNotFoundError, MimoCkptError, StorageError
from mimo_ckpt.format.manifest import MANIFEST_PATH, Manifest
from mimo_ckpt.format.paths import check_relpath
from mimo_ckpt.io.storage import Storage, read_small_file

__all__ = ["read_manifest", "read_manifest_bytes", "SAVING_MARKER_PREFIX", "new_save_id", "begin", "announce", "publish",
           "publish_manifest", "finish", "created_by", "Write"]

SAVING_MARKER_PREFIX = ".saving-"
"""A write in progress: `.saving-<save id>`, holding the files it creates that do not carry the id."""
_ID_LENGTH = 12
log = logging.getLogger("mimo_ckpt")


def new_save_id() -> str:
    return uuid.uuid4().hex[:_ID_LENGTH]


def marker(save_id: str) -> str:
    return f"{SAVING_MARKER_PREFIX}{save_id}"


def created_by(name: str, save_id: str) -> bool:
    """Whether a file's name carries the save id (`module/r00003-<id>.safetensors`)."""
    return f"-{save_id}." in posixpath.basename(name)


def begin(storage: Storage, index: str, where: str, save_id: str | None = None) -> str:
    """Take the target over for a new write; returns its save id. Raises CheckpointExistsError
    when `index` exists."""
    if storage.size(index) is not None:
        raise CheckpointExistsError(f"{where} already holds a committed checkpoint ({index})")
    _take_over(storage, where)
    save_id = save_id or new_save_id()
    storage.commit_file(marker(save_id), b"[]")
    return save_id


def announce(storage: Storage, save_id: str, names: Iterable[str], where: str) -> None:
    """Record, before creating them, the files this write makes whose names do not carry its id.
    A name that exists already is another program's (`begin` removed what dead writes left), so
    it is refused before it is recorded: a failed write never deletes it."""
    names = sorted({check_relpath(n) for n in names})
    taken = [n for n in names if storage.exists(n)]
    if taken:
        shown = ", ".join(taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
        raise StorageError(f"{where} already holds {shown}, not written by mimo-ckpt; write into a new folder")
    storage.commit_file(marker(save_id), json.dumps(names).encode())


def publish(storage: Storage, save_id: str, index: str, blob: bytes, where: str) -> None:
    """Commit: write the index exclusively, unless another write took the target over (checked
    before, and again after: a take-over between the two removed our files, so the index that
    names them is withdrawn)."""
    _need_marker(storage, save_id, where)
    storage.commit_file(index, blob, exclusive=True)
    try:
        _need_marker(storage, save_id, where)
    except StorageError:
        storage.remove(index)
        raise


def publish_manifest(storage: Storage, save_id: str, blob: bytes, where: str) -> None:
    """`publish` a checkpoint's manifest, once it parses as every reader will parse it: a writer
    never commits a manifest its own loader would refuse."""
    Manifest.from_bytes(blob, source="manifest being written")
    publish(storage, save_id, MANIFEST_PATH, blob, where)


class Write:
    """One single-process write from `begin` to `finish`, as a context: the offline writers'
    skeleton. `finish` runs on leaving, and removes what the write created unless it published.

        with commit.Write(dst, MANIFEST_PATH, url) as write:
            write.announce(names)
            ...                         # files named with write.save_id, or announced
            write.publish_manifest(blob)
    """

    def __init__(self, storage: Storage, index: str, where: str, save_id: str | None = None) -> None:
        self.storage, self.index, self.where = storage, index, where
        self.save_id = begin(storage, index, where, save_id)
        self.committed = False

    def __enter__(self) -> "Write":
        return self

    def __exit__(self, *exc: object) -> None:
        finish(self.storage, self.save_id, self.committed)

    def announce(self, names: Iterable[str]) -> None:
        announce(self.storage, self.save_id, names, self.where)

    def publish(self, blob: bytes) -> None:
        publish(self.storage, self.save_id, self.index, blob, self.where)
        self.committed = True

    def publish_manifest(self, blob: bytes) -> None:
        publish_manifest(self.storage, self.save_id, blob, self.where)
        self.committed = True


def _need_marker(storage: Storage, save_id: str, where: str) -> None:
    if storage.size(marker(save_id)) is None:
        raise StorageError(
            f"another write to {where} started while this one ran (it removed our marker); not committing {save_id}"
        )


def finish(storage: Storage, save_id: str, committed: bool) -> None:
    """Remove our marker; when nothing was committed, first every file this write created.
    Never raises: a failure here must not hide the error that ended the write, nor turn a
    commit into a failure; what is left, the next write's `begin` takes over."""
    try:
        if not committed:
            _remove_created(storage, save_id, storage.list_files())
        storage.remove(marker(save_id))
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("cleaning up after write %s: %s", save_id, exc)


def _take_over(storage: Storage, where: str) -> None:
    names = storage.list_files()
    for name in names:
        if "/" in name or not name.startswith(SAVING_MARKER_PREFIX):
            continue
        save_id = name[len(SAVING_MARKER_PREFIX):]
        log.warning("%s: taking over from write %s (died, or still running)", where, save_id)
        _remove_created(storage, save_id, names)
        storage.remove(name)


def _remove_created(storage: Storage, save_id: str, names: list[str]) -> None:
    for name in _announced(storage, save_id) + [n for n in names if created_by(n, save_id)]:
        storage.remove(name)


def _announced(storage: Storage, save_id: str) -> list[str]:
    """The names a marker lists; none when it is unreadable (then only id-carrying files go)."""
    try:
        names = json.loads(read_small_file(storage, marker(save_id)) or b"[]")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return [check_relpath(n) for n in names]
    except (ValueError, MimoCkptError):
        pass
    log.warning("marker of write %s is unreadable; removing only the files named after it", save_id)
    return []


def read_manifest_bytes(storage: Storage, source: str = "checkpoint") -> bytes:
    data = read_small_file(storage, MANIFEST_PATH)
    if data is None:
        raise CheckpointNotFoundError(f"{source}: no {MANIFEST_PATH}; not a committed checkpoint")
    return data


def read_manifest(storage: Storage, source: str = "checkpoint") -> Manifest:
    """The manifest of the checkpoint at `source` (a path, named in errors)."""
    return Manifest.from_bytes(read_manifest_bytes(storage, source), source=f"{source}/{MANIFEST_PATH}")
