"""A process of its own that writes staged file images, so that none of an async save's writing
and hashing runs on the training process's threads (where it would compete for the GIL with the
training loop's kernel launches).

The training process stages each file image into a `SharedImage` (a file in /dev/shm, mapped by
both processes; pinned for CUDA copies) and sends the writer a request: where to write, which
images, the byte ranges of their items. The writer replies with the items' checksums, or with the
error that stopped it. Requests and replies are length-prefixed JSON frames over the writer's
stdin and stdout: nothing is pickled. The writer is started as `python -m` of this module, so it
never imports the training script; it exits when its stdin closes (its parent is gone), removing
the images it has seen.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any, BinaryIO, Sequence

from mimo_ckpt.errors import StorageError
from mimo_ckpt.format.checksums import ShardSums
from mimo_ckpt.io.images import write_images
from mimo_ckpt.io.storage import LocalStorage

__all__ = ["SharedImage", "SharedMemoryFull", "ProcessWriter", "SHM_DIR"]

SHM_DIR = "/dev/shm"


class SharedMemoryFull(StorageError):
    """Shared memory cannot hold a staged file image."""


class SharedImage:
    """`size` bytes of host memory that the writer process can map by `path`: `tensor` is the
    training process's view of them (pinned with cudaHostRegister when `pin`)."""

    def __init__(self, size: int, pin: bool) -> None:
        import torch

        if not os.path.isdir(SHM_DIR):
            raise StorageError(f"a writer process needs shared memory in {SHM_DIR}, which this machine lacks; "
                               "use AsyncSaver(writer='thread')")
        fd, self.path = tempfile.mkstemp(prefix="mimo-ckpt-image-", dir=SHM_DIR)
        try:
            try:  # reserved now: a full /dev/shm is an error here, not a SIGBUS at the first copy
                os.posix_fallocate(fd, 0, max(size, 1))
            except OSError as exc:
                os.unlink(self.path)
                free = os.statvfs(SHM_DIR)
                raise SharedMemoryFull(
                    f"{SHM_DIR} has {free.f_bavail * free.f_frsize >> 20} MiB free, a staged file image needs "
                    f"{size >> 20} MiB ({exc.strerror}); give the container more shared memory (--shm-size) "
                    "or use AsyncSaver(writer='thread')") from None
            self._map = mmap.mmap(fd, max(size, 1))
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)[:size]
        self._pinned = False
        if pin:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), max(size, 1), 0)
            if int(err) != 0:
                self.close()
                raise StorageError(f"pinning {size} bytes of shared memory for device copies failed (CUDA error {int(err)})")
            self._pinned = True

    def numel(self) -> int:
        return self.tensor.numel()

    def close(self) -> None:
        import torch

        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._pinned = False
        del self.tensor
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ProcessWriter:
    """The client side: starts the writer process at the first write, one request at a time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def write(
        self, storage: Any, files: Sequence[tuple[str, SharedImage, int, Sequence[tuple[int, int]]]], rank: int,
        block_bytes: int,
    ) -> list[list[ShardSums]]:
        """Write each (path, image, size, item ranges) to `storage` (a LocalStorage); each file's
        item checksums. Raises StorageError with the writer's error, or if it died."""
        if not isinstance(storage, LocalStorage):
            raise StorageError(f"the async writer process writes local directories, not {type(storage).__name__}; "
                               "use AsyncSaver(writer='thread')")
        request = {
            "root": storage.root, "io_threads": storage.io_threads, "write_piece_bytes": storage.write_piece_bytes,
            "rank": rank, "block_bytes": block_bytes,
            "files": [{"path": path, "image": image.path, "size": size, "items": [list(r) for r in items]}
                      for path, image, size, items in files],
        }
        with self._lock:
            proc = self._started()
            try:
                _write_frame(proc.stdin, json.dumps(request).encode())
                reply = _read_frame(proc.stdout)
            except (OSError, ValueError):
                reply = None
            if reply is None:
                code = proc.wait()
                self._proc = None
                raise StorageError(f"rank {rank}: the async writer process died (exit code {code}) while writing "
                                   f"{len(files)} file(s) under {storage.root}")
        answer = json.loads(reply)
        if "error" in answer:
            raise StorageError(answer["error"])
        return [[ShardSums.from_wire(w) for w in sums] for sums in answer["sums"]]

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
            self._proc = subprocess.Popen([sys.executable, "-m", "mimo_ckpt.io.writer_process"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return self._proc

    def close(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def _read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def _serve(requests: BinaryIO, replies: BinaryIO) -> None:
    maps: dict[str, mmap.mmap] = {}
    try:
        while (frame := _read_frame(requests)) is not None:
            request = json.loads(frame)
            try:
                reply = {"sums": [[s.to_wire() for s in sums] for sums in _write(request, maps)]}
            except Exception as exc:  # noqa: BLE001 - sent back to the training process
                reply = {"error": str(exc) if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"}
            _write_frame(replies, json.dumps(reply).encode())
    finally:
        for path, mapped in maps.items():
            mapped.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _write(request: dict[str, Any], maps: dict[str, mmap.mmap]) -> list[list[ShardSums]]:
    wanted = {f["image"] for f in request["files"]}
    for path in [p for p in maps if p not in wanted]:  # replaced by larger images since
        maps.pop(path).close()
    for path in wanted - maps.keys():
        with open(path, "rb") as f:
            maps[path] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    storage = LocalStorage(request["root"], request["io_threads"], write_piece_bytes=request["write_piece_bytes"])
    files = [(f["path"], memoryview(maps[f["image"]])[: f["size"]], [tuple(r) for r in f["items"]])
             for f in request["files"]]
    return write_images(storage, files, request["rank"], block_bytes=request["block_bytes"])


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints cannot corrupt the frames
    _serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
