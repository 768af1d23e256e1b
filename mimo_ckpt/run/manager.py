"""Step checkpoints under one root: a `latest` pointer and retention of the last N.

Layout: `<root>/step_<N>/` per checkpoint (each committed by its manifest) and `<root>/latest`
holding the name of the newest committed one, replaced atomically after each commit. A step whose
save died has no manifest and is never taken as latest; saving that step again cleans it up.
Retention deletes the oldest committed steps beyond `keep_last`, never the latest one, never
one that a load holds (a `.reading-*` marker younger than `reader_timeout_s`), never a step that is
a symlink to a checkpoint elsewhere, and of a step only the files its manifest names.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal, Mapping

from mimo_ckpt.run.collective import root_decides
from mimo_ckpt.run.load import LoadResult, load
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt.run.save import save
from mimo_ckpt.io.commit import SAVING_MARKER_PREFIX
from mimo_ckpt.run.comm import Comm, default_comm
from mimo_ckpt.errors import ManifestError, MimoCkptError, StorageError
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.format.manifest import MANIFEST_PATH, READING_MARKER_PREFIX
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.runs import LATEST_PATH, committed_steps, step_name
from mimo_ckpt.io.storage import LocalStorage, Storage, open_storage, read_small_file

if TYPE_CHECKING:
    from mimo_ckpt.run.async_save import AsyncSave, AsyncSaver

__all__ = ["CheckpointManager", "LATEST_PATH"]

log = logging.getLogger("mimo_ckpt")


class CheckpointManager:
    """Saves and loads numbered checkpoints under `root`; collective like `save` and `load`."""

    def __init__(
        self, root: str | os.PathLike[str], *, keep_last: int | None = None, comm: Comm | None = None,
        reader_timeout_s: float = 3600.0,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root = os.fspath(root).rstrip("/")
        self.keep_last, self.reader_timeout_s = keep_last, reader_timeout_s
        self._comm = comm

    @property
    def comm(self) -> Comm:
        if self._comm is None:
            self._comm = default_comm()
        return self._comm

    def path_for(self, step: int) -> str:
        return f"{self.root}/{step_name(step)}"

    def _storage(self, path: str) -> Storage:
        return open_storage(path)

    # -- pure-ish queries, on one process ---------------------------------------------------

    def committed_steps(self) -> list[int]:
        """Steps whose checkpoint is committed, ascending."""
        return committed_steps(self.root)

    def latest_step(self) -> int | None:
        """The newest committed step. `latest` names it too, except when a save died between its
        commit and moving `latest`: the checkpoint is whole then, and the next save goes on from it."""
        steps = self.committed_steps()
        return steps[-1] if steps else None

    # -- collective operations ----------------------------------------------------------------

    def save(
        self, state: Mapping[str, Any], step: int, *, layouts: Mapping[str, ModuleLayout],
        metadata: Mapping[str, Any] | None = None, replicas: Literal["main", "spread"] = "main",
        options: SaveOptions = SaveOptions(),
    ) -> str:
        """Save `step` (see `mimo_ckpt.save`), then (rank 0) point `latest` at it and apply
        retention. Returns the path."""
        path = self.path_for(step)
        save(state, path, layouts=layouts, comm=self.comm, metadata={**(metadata or {}), "step": step},
             replicas=replicas, options=options)
        self._after_commit(step, self.comm)
        return path

    def async_save(
        self, state: Mapping[str, Any], step: int, *, layouts: Mapping[str, ModuleLayout], saver: "AsyncSaver",
        metadata: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> "AsyncSave":
        """`save` in the background through `saver` (see `AsyncSaver.save`): returns once this
        rank's state is staged; `latest` and retention move when the commit lands, in the
        saver's thread, on its comm. A save that dies before its commit leaves both as they
        were. Wait on the handle (or save again, which waits) before reading `latest`."""
        return saver.save(state, self.path_for(step), layouts=layouts, metadata={**(metadata or {}), "step": step},
                          after_commit=lambda: self._after_commit(step, saver.comm), **kwargs)

    def _after_commit(self, step: int, comm: Comm) -> None:
        """Rank 0 points `latest` at the committed `step` and applies retention; every rank of
        `comm` hears how that went."""
        def point_latest() -> bytes:
            try:
                self._storage(self.root).commit_file(LATEST_PATH, f"{step_name(step)}\n".encode())
                self._apply_retention(step)
            except (MimoCkptError, OSError) as exc:
                raise StorageError(f"rank 0 after committing {self.path_for(step)}: {exc}") from exc
            return b""

        root_decides(comm, point_latest, otherwise=StorageError)

    def load_latest(
        self, state: Mapping[str, Any], *, layouts: Mapping[str, ModuleLayout], **kwargs: Any,
    ) -> tuple[int, LoadResult] | None:
        """Load the latest committed checkpoint (None when there is none), holding it against
        retention while reading."""
        marker = f"{READING_MARKER_PREFIX}{uuid.uuid4().hex[:12]}"

        def find_and_hold() -> bytes:
            try:
                step = self.latest_step()
                marked = step is not None and self._mark_reading(self.path_for(step), marker)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it
                raise StorageError(f"finding the latest checkpoint in {self.root}: {exc}") from exc
            return json.dumps({"step": step, "marked": marked}).encode()

        reply = json.loads(root_decides(self.comm, find_and_hold, otherwise=StorageError))
        if reply["step"] is None:
            return None
        path = self.path_for(reply["step"])
        try:
            result = load(state, path, layouts=layouts, comm=self.comm, **kwargs)
        finally:
            if self.comm.rank == 0 and reply["marked"]:
                self._storage(path).remove(marker)
        return reply["step"], result

    def _mark_reading(self, path: str, marker: str) -> bool:
        """Hold a checkpoint against retention while it is read; False where this process may not
        write there (a read-only mount, or a checkpoint of another user: retention run by that
        user does not see this load then)."""
        try:
            self._storage(path).commit_file(marker, str(time.time()).encode())
        except OSError as exc:
            if exc.__cause__ is not None and getattr(exc.__cause__, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM):
                log.info("rank %d: %s is read-only; loading it without a reading marker", self.comm.rank, path)
                return False
            raise
        return True

    def _apply_retention(self, newest: int) -> None:
        if self.keep_last is None:
            return
        steps = [s for s in self.committed_steps() if s != newest]
        for step in steps[: max(0, len(steps) - (self.keep_last - 1))]:
            path = self.path_for(step)
            if "://" not in path and os.path.islink(path):
                log.info("rank %d: retention: keeping %s, a link to a checkpoint elsewhere", self.comm.rank, path)
                continue
            storage = self._storage(path)
            if self._being_read(storage):
                log.info("rank %d: retention: keeping %s, a load holds it", self.comm.rank, path)
                continue
            try:
                self._delete_checkpoint(storage)
            except ManifestError as exc:
                log.warning("rank %d: retention: keeping %s, its manifest is unreadable: %s", self.comm.rank, path, exc)
                continue
            except StorageError as exc:
                log.warning("rank %d: retention: %s kept in part: %s", self.comm.rank, path, exc)
            if isinstance(storage, LocalStorage):
                _remove_empty_dirs(path)

    @staticmethod
    def _delete_checkpoint(storage: Storage) -> None:
        """The manifest first (a crash below leaves no half checkpoint), then the files it names;
        anything else in the directory is not ours to delete. A file that cannot be removed (one
        behind a directory linked out of the checkpoint) is kept; the first such error is raised
        after the rest are gone."""
        manifest = read_manifest(storage)
        storage.remove(MANIFEST_PATH)
        names = sorted({s.file for m in manifest.modules.values() for t in m.tensors.values() for s in t.shards})
        names += [n for n in storage.list_files() if n.startswith((READING_MARKER_PREFIX, SAVING_MARKER_PREFIX))]
        first: StorageError | None = None
        for name in names:  # and the markers of loads, or of a save that died committed
            try:
                storage.remove(name)
            except StorageError as exc:
                first = first or exc
        if first is not None:
            raise first

    def _being_read(self, storage: Storage) -> bool:
        now = time.time()
        for name in storage.list_files():
            if name.startswith(READING_MARKER_PREFIX):
                try:
                    if now - float(read_small_file(storage, name) or b"") < self.reader_timeout_s:
                        return True
                except ValueError:
                    return True
        return False


def _remove_empty_dirs(path: str) -> None:
    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
