"""Async save: training stalls only while the state is taken; it is planned, copied out and
written while training goes on.

`AsyncSaver.save` flattens this rank's state, encodes its objects and copies its host tensors,
then returns. Device tensors are copied on a side stream into host buffers laid out exactly as
the files, ordered after what the caller's stream had queued at the call; those copies, and the
planning with the other ranks that decides the layout (small collectives), run in a background
thread during the next forward and backward passes. The handle is *staged* once the copies are
done and *committed* once the checkpoint is. The one rule for the training loop: nothing may
change the saved tensors before the save is staged; `AsyncSaver.before_optimizer_step()` (or
`attach(optimizer)`) makes the device's stream wait for the copies, and the host does not wait.
A state without device tensors is planned and copied before `save` returns.

The files are then written and checksummed by a writer process of the saver's own
(`io.writer_process`, fed through shared memory), or by the background thread
(`writer="thread"`), which then takes part in the commit. The saver runs its collectives on a
process group of its own (gloo, with a timeout), separate from the one training uses; it keeps its
buffers between saves, so memory does not grow, and a new save first waits for (or, with
`if_pending="raise"`, refuses) the one still running.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from dataclasses import replace
from typing import Any, Callable, Literal, Mapping

import torch

from mimo_ckpt.run.collective import check_layouts, check_storage_serves
from mimo_ckpt.run.save import SaveJob, Snapshot, finish_save, flatten_for_save, plan_save
from mimo_ckpt.format.checksums import ShardSums
from mimo_ckpt.run.comm import Comm, SoloComm, TorchComm, distributed
from mimo_ckpt.errors import MimoCkptError
from mimo_ckpt.io.copy_waves import CopyWaves
from mimo_ckpt.io.staging import SideCopies, staged_through_chunks
from mimo_ckpt.io.storage import LocalStorage, Storage, open_storage
from mimo_ckpt.io.tensors import write_file_images
from mimo_ckpt.io.writer_process import ProcessWriter, SharedImage, SharedMemoryFull
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt.plan.save import FilePlan

__all__ = ["AsyncSaver", "AsyncSave", "HostStager", "async_save"]

log = logging.getLogger("mimo_ckpt")

SLOW_WAIT_S = 0.05
"""A save that waits this long for the previous one says so (a training step notices 50 ms)."""

Writer = Literal["auto", "process", "thread"]


class HostStager:
    """Reusable host buffers, one per file this rank writes (by module and place among that
    module's files, which stay the same from save to save), each holding a whole file image.
    Pinned when CUDA is in use, so device copies run asynchronously at full speed; in shared
    memory when a writer process writes them."""

    def __init__(self, pin: bool | None = None, shared: bool = False) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.shared = shared
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._shared: dict[tuple[str, int], SharedImage] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def buffer(self, slot: tuple[str, int], size: int) -> torch.Tensor:
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < size:
            if self.shared:
                if slot in self._shared:
                    self._shared.pop(slot).close()
                self._shared[slot] = SharedImage(size, self.pin)
                buf = self._shared[slot].tensor
            else:
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[slot] = buf
        return buf[:size]

    def shared_image(self, slot: tuple[str, int]) -> SharedImage:
        return self._shared[slot]

    def stage(self, slot: tuple[str, int], plan: FilePlan, data: Mapping[tuple[str, Any], torch.Tensor]
              ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The slot's buffer (module, place among its files) as the file's image, its header
        written; and the copies that fill in its items: (place in the image, tensor)."""
        size = plan.items[-1].end if plan.items else len(plan.prefix)
        image = self.buffer(slot, size)
        image[: len(plan.prefix)] = torch.frombuffer(bytearray(plan.prefix), dtype=torch.uint8)
        return image, [(image[item.begin: item.end], data[(item.key, item.box)]) for item in plan.items]

    def close(self) -> None:
        for image in self._shared.values():
            image.close()
        self._shared.clear()
        self._buffers.clear()


class AsyncSave:
    """A save running in the background. `staged()`/`wait_staged()`: this rank's state has been
    copied out, so the optimizer may change it; `done()`/`wait()`: the checkpoint is committed
    (`wait` re-raises the save's error, the same on every rank)."""

    def __init__(self, path: str, called: float | None = None, spare_device_bytes: int = 0) -> None:
        self.path = path
        self.blocking_seconds = 0.0
        """How long the `save` call held the caller."""
        self.waited_seconds = 0.0
        """Of that, how long it waited for the previous save to commit."""
        self.planned_seconds: float | None = None
        """From the call to the copies planned (the background planning with the other ranks)."""
        self._called = time.perf_counter() if called is None else called
        self._spare_device_bytes = spare_device_bytes
        self._planned = threading.Event()  # the copies are known (or there are none)
        self._waves: CopyWaves | None = None
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.write_seconds: float | None = None
        """Background time to the outcome of the commit: the planning and copies of a save with
        device tensors, the writing, the commit."""

    def staged(self) -> bool:
        return self._planned.is_set() and (self._waves is None or self._waves.copied())

    def wait_staged(self) -> None:
        """Block until this rank's state is copied out (for device copies: the host waits)."""
        self._planned.wait()
        if self._waves is not None:
            self._waves.wait_copied()

    def stream_waits_staged(self) -> None:
        """Make the current device stream wait until the state may change: work queued after
        this (the optimizer step) runs once the copies that read the state are done. Copies not
        issued yet are issued now, those that fit the saver's `spare_device_bytes` from a clone on
        this stream, which the step need not wait for. The host waits only until the copies are
        planned, which the background does within the forward and backward pass."""
        self._planned.wait()
        if self._waves is not None:
            self._waves.release(self._spare_device_bytes)

    def _copies_planned(self, waves: CopyWaves | None) -> None:
        self._waves = waves
        self.planned_seconds = time.perf_counter() - self._called
        self._planned.set()

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

    def _run(self, prepare: Callable[[], tuple[SaveJob, Callable[[SaveJob], list[list[ShardSums]]]]],
             after_commit: Callable[[], None] | None) -> None:
        start = time.perf_counter()
        try:
            job, write = prepare()
            crcs: dict[str, dict[str, list[ShardSums]]] = {}  # module -> file -> its items' checksums
            if job.run.failure is None:
                try:
                    self.wait_staged()
                    crcs = job.checksums_by_module(write(job))
                except (MimoCkptError, OSError, RuntimeError) as exc:
                    job.run.fail(exc if isinstance(exc, (MimoCkptError, OSError)) else MimoCkptError(f"staging: {exc}"))
            finish_save(job, crcs)
            if after_commit is not None:
                after_commit()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self._error = exc
        finally:
            self._planned.set()  # a failure before the copies were planned must not hold the caller
            self.write_seconds = time.perf_counter() - start
            self._finished.set()


class AsyncSaver:
    """Runs saves in the background, one at a time, reusing host buffers. Collective to create:
    it makes a gloo group (with `timeout_s`) for its own collectives, unless `comm` is given (in a
    process without torch.distributed it needs none).

    `writer`: "process" writes and checksums the files in a process of the saver's own, fed
    through shared memory, so the training process's threads do none of it; "thread" in a
    background thread of this process; "auto" (the default) takes the process for a local
    directory when CUDA is in use, where the training loop's kernel launches would otherwise
    compete with the writer for the GIL, and the thread otherwise (and from then on, when /dev/shm
    cannot hold the state: containers often get 64 MiB). Call `close()` (or let the process exit)
    to stop the writer process.

    `spare_device_bytes`: device memory the optimizer step may use to clone what is not yet
    copied out when it comes (freed once copied), so the step need not wait for the link to the
    host. 0 by default, since only the training job knows what it can spare; on one H100 a loop
    saving 7.25 GB every 50 steps of 84 ms ran 1.66% slower without and 0.94% with 8 GiB."""

    def __init__(self, comm: Comm | None = None, *, timeout_s: float = 1800.0, pin: bool | None = None,
                 writer: Writer = "auto", spare_device_bytes: int = 0) -> None:
        if writer not in ("auto", "process", "thread"):
            raise ValueError(f"writer must be 'auto', 'process' or 'thread', got {writer!r}")
        if spare_device_bytes < 0:
            raise ValueError(f"spare_device_bytes must be >= 0, got {spare_device_bytes}")
        self.spare_device_bytes = spare_device_bytes
        self.comm = comm or (TorchComm.with_timeout(timeout_s) if distributed() else SoloComm())
        self.writer: Writer = writer
        self._pin = pin
        self._stagers: dict[bool, HostStager] = {}
        self._last_shared = False
        self._shared_memory_full = False
        self._process: ProcessWriter | None = None
        self.pending: AsyncSave | None = None
        atexit.register(_at_exit, weakref.ref(self))

    @property
    def stager(self) -> HostStager:
        """The buffers the last save staged into."""
        if self._last_shared not in self._stagers:
            self._stagers[self._last_shared] = HostStager(self._pin, shared=self._last_shared)
        return self._stagers[self._last_shared]

    def save(
        self, state: Mapping[str, Any], path: str, *, layouts: Mapping[str, ModuleLayout],
        storage: Storage | None = None, metadata: Mapping[str, Any] | None = None,
        if_pending: Literal["wait", "raise"] = "wait", replicas: Literal["main", "spread"] = "main",
        options: SaveOptions = SaveOptions(), after_commit: Callable[[], None] | None = None,
    ) -> AsyncSave:
        """Collective like `mimo_ckpt.save`. Returns once this rank's state is taken: flattened,
        its objects encoded, its host tensors copied. Device tensors are copied on a side stream
        after what the caller's stream has queued so far; the planning (collectives with the
        other ranks) and those copies happen in the background (see `AsyncSave.staged`), and a
        state without device tensors is planned and copied before this returns.
        `after_commit` runs on every rank in the background thread once the checkpoint is
        committed (it may use this saver's comm: CheckpointManager moves `latest` there)."""
        start = time.perf_counter()
        waited = self._settle_pending(if_pending)
        storage = storage or open_storage(path)
        check_layouts(layouts, self.comm.size)
        check_storage_serves(storage, self.comm, path)
        snapshot = flatten_for_save(state, layouts, self.comm.rank, metadata)
        on_device = [t for shards in snapshot.local.values() for t in shards.tensors if staged_through_chunks(t.data)]
        taken = None
        if on_device:  # host tensors are copied now; device ones after `taken`, in the background
            snapshot = _host_tensors_copied(snapshot)
            device = on_device[0].data.device
            if device.type == "cuda":
                taken = torch.cuda.Event()
                taken.record(torch.cuda.current_stream(device))
        handle = AsyncSave(path, called=start, spare_device_bytes=self.spare_device_bytes)

        def prepare() -> tuple[SaveJob, Callable[[SaveJob], list[list[ShardSums]]]]:
            return self._plan_and_stage(handle, snapshot, taken, path, layouts=layouts, storage=storage,
                                        metadata=metadata, replicas=replicas, options=options)

        if not on_device:
            prepared = prepare()
            prepare = lambda: prepared  # noqa: E731 - planned and copied in the caller
        handle.blocking_seconds = time.perf_counter() - start
        handle.waited_seconds = waited
        handle._thread = threading.Thread(target=handle._run, args=(prepare, after_commit),
                                          name="mimo-ckpt-async-save", daemon=True)
        handle._thread.start()
        self.pending = handle
        return handle

    def _plan_and_stage(
        self, handle: AsyncSave, snapshot: Snapshot, taken: "torch.cuda.Event | None", path: str, **how: Any,
    ) -> tuple[SaveJob, Callable[[SaveJob], list[list[ShardSums]]]]:
        """Plan with the other ranks, then copy every tensor this rank writes into its file's
        image, in waves (`CopyWaves`); the handle is told once the copies are planned."""
        waves = None
        try:
            job = plan_save(snapshot, path, comm=self.comm, **how)
            shared = self._uses_process(job.storage)
            images: dict[str, tuple[tuple[str, int], torch.Tensor]] = {}  # file path -> (slot, staged image)
            if job.run.failure is None:
                try:
                    try:
                        images, waves = self._stage(job, shared, taken)
                    except SharedMemoryFull as exc:
                        if self.writer != "auto":
                            raise
                        log.warning("rank %d: %s; this saver writes from a thread from now on", self.comm.rank, exc)
                        self._shared_memory_full = shared = False
                        images, waves = self._stage(job, shared, taken)
                    handle._copies_planned(waves)
                    waves.run()
                except (MimoCkptError, RuntimeError) as exc:
                    job.run.fail(exc if isinstance(exc, MimoCkptError) else MimoCkptError(f"staging: {exc}"))
            write = self._process_write(self.stager, images) if shared else self._thread_write(images)
            return job, write
        finally:
            if not handle._planned.is_set():
                handle._copies_planned(None)

    def _stage(self, job: SaveJob, shared: bool, taken: "torch.cuda.Event | None"
               ) -> tuple[dict[str, tuple[tuple[str, int], torch.Tensor]], CopyWaves]:
        """The image of every file this rank writes (in shared memory for the writer process),
        headers written: file path -> (slot, image); and the copies that fill in their items,
        device tensors on a side stream after `taken`."""
        self._last_shared = shared
        stager = self.stager
        data = job.tensors_by_module()
        device = next((t.device for d in data.values() for t in d.values() if t.device.type == "cuda"), None)
        images, place, pairs = {}, {}, []
        for name, plan in job.my_files():
            slot = (name, place.setdefault(name, 0))
            place[name] += 1
            image, fill = stager.stage(slot, plan, data[name])
            images[plan.path] = (slot, image)
            pairs += fill
        return images, CopyWaves(SideCopies(device, after=taken), pairs)

    def before_optimizer_step(self) -> None:
        """Call right before the optimizer changes parameters or its state: orders that after
        the pending save's device copies (see `AsyncSave.stream_waits_staged`)."""
        if self.pending is not None:
            self.pending.stream_waits_staged()

    def attach(self, optimizer: Any) -> Any:
        """Call `before_optimizer_step` at the start of every `optimizer.step()` (a torch
        optimizer's step pre-hook), so a loop cannot forget it; returns the hook's handle."""
        if not hasattr(optimizer, "register_step_pre_hook"):
            raise TypeError(f"{type(optimizer).__name__} has no step pre-hooks; call "
                            "AsyncSaver.before_optimizer_step() before each of its steps instead")
        return optimizer.register_step_pre_hook(lambda *_: self.before_optimizer_step())

    def _uses_process(self, storage: Storage) -> bool:
        if self.writer == "auto":
            return isinstance(storage, LocalStorage) and torch.cuda.is_available() and not self._shared_memory_full
        return self.writer == "process"

    @staticmethod
    def _thread_write(images: Mapping[str, tuple[tuple[str, int], torch.Tensor]]) -> Callable[[SaveJob], list[list[ShardSums]]]:
        def write(job: SaveJob) -> list[list[ShardSums]]:
            files = [(plan, images[plan.path][1]) for _, plan in job.my_files()]
            return write_file_images(job.storage, files, job.comm.rank, block_bytes=job.options.block_bytes)
        return write

    def _process_write(self, stager: HostStager, images: Mapping[str, tuple[tuple[str, int], torch.Tensor]]
                       ) -> Callable[[SaveJob], list[list[ShardSums]]]:
        if self._process is None:
            self._process = ProcessWriter()
        writer = self._process

        def write(job: SaveJob) -> list[list[ShardSums]]:
            files = [(plan.path, stager.shared_image(images[plan.path][0]), images[plan.path][1].numel(),
                      [(i.begin, i.end) for i in plan.items]) for _, plan in job.my_files()]
            return writer.write(job.storage, files, job.comm.rank, job.options.block_bytes)
        return write

    def close(self) -> None:
        """Wait for the pending save, stop the writer process and free the buffers."""
        self._settle_pending("wait")
        if self._process is not None:
            self._process.close()
            self._process = None
        for stager in self._stagers.values():
            stager.close()
        self._stagers.clear()

    def _settle_pending(self, if_pending: str) -> float:
        """A running save keeps the buffers: wait for it, or refuse on every rank alike. Returns
        the seconds waited, and says so when the wait is long enough to show in training."""
        pending = self.pending
        if pending is None:
            return 0.0
        if if_pending == "raise":
            busy = self.comm.all_gather_bytes(b"1" if not pending.done() else b"0")
            if b"1" in busy:
                raise MimoCkptError(f"an async save to {pending.path} is still running on some rank")
        start = time.perf_counter()
        try:
            pending.wait()
        except MimoCkptError as exc:  # reported here too, in case nobody waited on it
            log.warning("rank %d: the previous async save to %s failed: %s", self.comm.rank, pending.path, exc)
        self.pending = None
        waited = time.perf_counter() - start
        if waited >= SLOW_WAIT_S:
            log.warning("rank %d: this save waited %.2f s for the previous one, to %s, which was still being written "
                        "%.1f s after its call: saves come faster than this storage takes them; save less often, "
                        "or to faster storage", self.comm.rank, waited, pending.path, start - pending._called)
        return waited


def _host_tensors_copied(snapshot: Snapshot) -> Snapshot:
    """The snapshot with each host tensor replaced by a copy (the caller may change the original
    as soon as `save` returns); device tensors are copied later, ordered on their stream."""
    for shards in snapshot.local.values():
        shards.tensors = [t if staged_through_chunks(t.data) else replace(t, data=t.data.detach().clone())
                          for t in shards.tensors]
    return snapshot


def _at_exit(saver_ref: "weakref.ref[AsyncSaver]") -> None:
    """At interpreter exit: a save still writing dies with the process (its thread is a daemon), so
    say so; what it wrote is cleaned up by the next save to that path. The writer process and the
    shared buffers go too."""
    saver = saver_ref()
    if saver is None:
        return
    pending = saver.pending
    if pending is not None and not pending.done():
        log.warning("rank %d: the async save to %s was still running at exit and is not committed; "
                    "call wait() on its handle before exiting", saver.comm.rank, pending.path)
    else:
        saver.close()


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
