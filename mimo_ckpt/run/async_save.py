"""Async save: training stalls only while this rank's state is copied into host buffers.

`AsyncSaver.save` plans the save with its peers (small collectives), copies every tensor this rank
writes into host buffers laid out exactly as its files (pinned memory when CUDA is in use, so
device-to-host copies run at full speed and need no second copy), and returns a handle. A
background thread then writes the file images, checksums them, and takes part in the commit. The
saver keeps its buffers between saves, so memory does not grow, and a new save first waits for
(or, with `if_pending="raise"`, refuses) the one still running.

The background thread runs collectives, so the saver has a process group of its own (gloo, with a
timeout), separate from the one training uses.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
import time
from typing import Any, Callable, Literal, Mapping

import torch

from mimo_ckpt.run.save import SaveJob, finish_save, start_save
from mimo_ckpt.format.checksums import ShardSums
from mimo_ckpt.run.comm import Comm, SoloComm, TorchComm, distributed
from mimo_ckpt.errors import MimoCkptError
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt.plan.save import FilePlan
from mimo_ckpt.io.storage import Storage
from mimo_ckpt.io.tensors import write_file_images

__all__ = ["AsyncSaver", "AsyncSave", "HostStager", "async_save"]

log = logging.getLogger("mimo_ckpt")


class HostStager:
    """Reusable host buffers, one per file this rank writes (by module and place among that
    module's files, which stay the same from save to save), each holding a whole file image."""

    def __init__(self, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def buffer(self, slot: tuple[str, int], size: int) -> torch.Tensor:
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[slot] = buf
        return buf[:size]

    def stage(self, slot: tuple[str, int], plan: FilePlan, data: Mapping[tuple[str, Any], torch.Tensor]) -> torch.Tensor:
        """Copy the file's header and every item's bytes into the slot's buffer (module, place
        among its files); returns the image. Device copies are asynchronous: call
        `synchronize()` before the image is read."""
        size = plan.items[-1].end if plan.items else len(plan.prefix)
        image = self.buffer(slot, size)
        image[: len(plan.prefix)] = torch.frombuffer(bytearray(plan.prefix), dtype=torch.uint8)
        for item in plan.items:
            src = data[(item.key, item.box)].detach()
            src = src.contiguous().reshape(-1).view(torch.uint8)
            image[item.begin : item.end].copy_(src, non_blocking=src.device.type == "cuda")
        return image

    @staticmethod
    def synchronize() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


class AsyncSave:
    """A save running in the background: poll with `done()`, wait (and see its error) with `wait()`."""

    def __init__(self, path: str, blocking_seconds: float) -> None:
        self.path = path
        self.blocking_seconds = blocking_seconds
        """How long the `save` call held the caller (planning + staging)."""
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.write_seconds: float | None = None
        """Background time from the end of staging to the outcome of the commit."""

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until committed; re-raises the save's error (the same on every rank)."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"async save to {self.path} still running after {timeout} s")
        if self._thread is not None:  # it has finished: gone too, so an exit right after is clean
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self, job: SaveJob, images: Mapping[str, torch.Tensor], after_commit: Callable[[], None] | None) -> None:
        start = time.perf_counter()
        try:
            crcs: dict[str, dict[str, list[ShardSums]]] = {}  # module -> file -> its items' checksums
            if job.run.failure is None:
                try:
                    files = [(plan, images[plan.path]) for _, plan in job.my_files()]
                    sums = write_file_images(job.storage, files, job.comm.rank, block_bytes=job.options.block_bytes)
                    crcs = job.checksums_by_module(sums)
                except (MimoCkptError, OSError) as exc:
                    job.run.fail(exc)
            finish_save(job, crcs)
            if after_commit is not None:
                after_commit()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self._error = exc
        finally:
            self.write_seconds = time.perf_counter() - start
            self._finished.set()


class AsyncSaver:
    """Runs saves in the background, one at a time, reusing host buffers. Collective to create:
    it makes a gloo group (with `timeout_s`) for its own collectives, unless `comm` is given (in a
    process without torch.distributed it needs none)."""

    def __init__(self, comm: Comm | None = None, *, timeout_s: float = 1800.0, pin: bool | None = None) -> None:
        self.comm = comm or (TorchComm.with_timeout(timeout_s) if distributed() else SoloComm())
        self.stager = HostStager(pin)
        self.pending: AsyncSave | None = None
        atexit.register(_warn_if_pending, weakref.ref(self))

    def save(
        self, state: Mapping[str, Any], path: str, *, layouts: Mapping[str, ModuleLayout],
        storage: Storage | None = None, metadata: Mapping[str, Any] | None = None,
        if_pending: Literal["wait", "raise"] = "wait", replicas: Literal["main", "spread"] = "main",
        options: SaveOptions = SaveOptions(), after_commit: Callable[[], None] | None = None,
    ) -> AsyncSave:
        """Collective like `mimo_ckpt.save`; returns once this rank's state sits in host buffers.
        `after_commit` runs on every rank in the background thread once the checkpoint is
        committed (it may use this saver's comm: CheckpointManager moves `latest` there)."""
        start = time.perf_counter()
        self._settle_pending(if_pending)
        job = start_save(state, path, layouts=layouts, comm=self.comm, storage=storage, metadata=metadata,
                         replicas=replicas, options=options)
        images: dict[str, torch.Tensor] = {}  # file path -> its staged image
        if job.run.failure is None:
            try:
                data = job.tensors_by_module()
                place: dict[str, int] = {}
                for name, plan in job.my_files():
                    slot = (name, place.setdefault(name, 0))
                    place[name] += 1
                    images[plan.path] = self.stager.stage(slot, plan, data[name])
                self.stager.synchronize()
            except (MimoCkptError, RuntimeError) as exc:
                job.run.fail(exc if isinstance(exc, MimoCkptError) else MimoCkptError(f"staging: {exc}"))
        handle = AsyncSave(job.path, time.perf_counter() - start)
        handle._thread = threading.Thread(target=handle._run, args=(job, images, after_commit),
                                          name="mimo-ckpt-async-save", daemon=True)
        handle._thread.start()
        self.pending = handle
        return handle

    def _settle_pending(self, if_pending: str) -> None:
        """A running save keeps the buffers: wait for it, or refuse on every rank alike."""
        pending = self.pending
        if pending is None:
            return
        if if_pending == "raise":
            busy = self.comm.all_gather_bytes(b"1" if not pending.done() else b"0")
            if b"1" in busy:
                raise MimoCkptError(f"an async save to {pending.path} is still running on some rank")
        try:
            pending.wait()
        except MimoCkptError as exc:  # reported here too, in case nobody waited on it
            log.warning("rank %d: the previous async save to %s failed: %s", self.comm.rank, pending.path, exc)
        self.pending = None


def _warn_if_pending(saver_ref: "weakref.ref[AsyncSaver]") -> None:
    """At interpreter exit: a save still writing dies with the process (its thread is a daemon), so
    say so; what it wrote is cleaned up by the next save to that path."""
    saver = saver_ref()
    pending = saver.pending if saver is not None else None
    if pending is not None and not pending.done():
        log.warning("rank %d: the async save to %s was still running at exit and is not committed; "
                    "call wait() on its handle before exiting", saver.comm.rank, pending.path)


_default_saver: AsyncSaver | None = None


def async_save(
    state: Mapping[str, Any], path: str, *, layouts: Mapping[str, ModuleLayout], saver: AsyncSaver | None = None,
    **kwargs: Any,
) -> AsyncSave:
    """`AsyncSaver.save` on `saver`, or on one saver per process made at the first call (collective)."""
    global _default_saver
    if saver is None:
        if _default_saver is None:
            _default_saver = AsyncSaver()
        saver = _default_saver
    return saver.save(state, path, layouts=layouts, **kwargs)
