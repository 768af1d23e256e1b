"""Where checkpoint bytes live: one small interface, a local-filesystem and a tensorstore backend.

Paths are relative POSIX paths inside the checkpoint (`images/r00000-3f2a9c1b7d40.safetensors`). Call order in
a save: every writer calls `write_file` for its own files; afterwards one rank calls
`commit_file` for the manifest. In a load, any rank calls `size`, `read_into` and `reader`.
"""

from __future__ import annotations

import os
import posixpath
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from mimo_ckpt.errors import CheckpointExistsError, StorageError
from mimo_ckpt.format.paths import check_relpath

IO_THREADS = 4
"""Default reads or writes a rank keeps in flight: files read at once, pieces of a file written at
once; one sequential stream may not reach the disk's rate (docs/performance.md, "Machines")."""

WRITE_PIECE_BYTES = 16 << 20
"""Default unit of parallel writing within a file."""

ReadInto = Callable[..., None]
"""`read(offset, *out)`: fill the buffers `out`, in order, with one file's bytes from `offset` on."""

__all__ = ["IO_THREADS", "ReadInto", "Storage", "KeptOpen", "LocalStorage", "TensorStoreStorage", "open_storage", "read_small_file", "open_regular"]


class Storage(Protocol):
    def size(self, path: str) -> int | None:
        """Byte size of the file, or None when it does not exist."""

    def exists(self, path: str) -> bool:
        """Whether anything is at `path`: a file, or a link, even one that leads nowhere."""

    def write_file(self, path: str, chunks: Iterable[Any]) -> None:
        """Create a new file from buffers, in order, durably (data is on disk when this returns).
        An existing file (or link) at `path` is an error: writers never write through a name.
        A buffer may be reused by the caller as soon as the next one is asked for."""

    def read_into(self, path: str, offset: int, *out: memoryview) -> None:
        """Fill the buffers `out`, in order, with the file's bytes from `offset` on (one
        scattered read where the backend can); short files are an error."""

    def reader(self, path: str) -> AbstractContextManager[ReadInto]:
        """`read_into` for many reads of one file in a row: a local file stays open in between,
        so the kernel's readahead follows the stream instead of starting again at every read."""

    def commit_file(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        """Atomically publish a small file: readers see the old state or the whole new file.
        With `exclusive`, fail with CheckpointExistsError if the file exists (checked atomically)."""

    def list_files(self) -> list[str]:
        """Every file in the checkpoint, as relative paths."""

    def remove(self, path: str) -> None:
        """Delete a file (a link: the link, never what it points to); a missing file is not an
        error, a path that leaves the checkpoint through a linked directory is."""


class KeptOpen:
    """A storage whose `reader(path)` stays open until this closes: a file read in many calls
    (a load's chunks) keeps one open file, so the kernel's readahead follows across them."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._stack = ExitStack()
        self._open: dict[str, ReadInto] = {}

    def reader(self, path: str) -> AbstractContextManager[ReadInto]:
        if path not in self._open:
            self._open[path] = self._stack.enter_context(self._storage.reader(path))
        return nullcontext(self._open[path])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def __enter__(self) -> "KeptOpen":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def read_small_file(storage: Storage, path: str) -> bytes | None:
    """A whole (small) file's bytes, or None when it does not exist."""
    size = storage.size(path)
    if size is None:
        return None
    buf = bytearray(size)
    storage.read_into(path, 0, memoryview(buf))
    return bytes(buf)


class LocalStorage:
    """A directory on a local or shared POSIX filesystem, written with plain write(2) and fsync."""

    process_local = False

    def __init__(self, root: str | os.PathLike[str], io_threads: int = IO_THREADS, *,
                 write_piece_bytes: int = WRITE_PIECE_BYTES) -> None:
        self.root = os.fspath(root)
        self.io_threads = io_threads
        self.write_piece_bytes = write_piece_bytes
        self._inside: set[str] = set()  # paths already checked (a load reads one file many times)

    def _abs(self, path: str) -> str:
        """The file's absolute path; refuses paths that leave the root through a symlink."""
        full = os.path.join(self.root, check_relpath(path))
        if path not in self._inside:
            real_root = os.path.realpath(self.root)
            real = os.path.realpath(full)
            if real != real_root and not real.startswith(real_root + os.sep):
                raise StorageError(f"{full} resolves to {real}, outside the checkpoint {real_root} (a symlink?)")
            if os.path.exists(full):
                self._inside.add(path)
        return full

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._abs(path))

    def size(self, path: str) -> int | None:
        full = self._abs(path)
        try:
            st = os.stat(full)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"{full}: {exc}") from exc
        _need_regular(st, full)
        return st.st_size

    def write_file(self, path: str, chunks: Iterable[Any]) -> None:
        """Writes up to `io_threads` pieces of each chunk at once (pwrite releases the GIL)."""
        full = self._abs(path)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            try:  # O_EXCL: never through an existing name, a hard link to a source, or a symlink
                fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                raise StorageError(f"{full} already exists; a writer only creates new files") from None
            try:
                with ThreadPoolExecutor(self.io_threads) as pool:
                    offset = 0
                    for chunk in chunks:  # a chunk's buffer may be reused once the next is asked for
                        view = memoryview(chunk).cast("B")
                        step = self.write_piece_bytes
                        for done in [pool.submit(_pwrite_exact, fd, view[p : p + step], offset + p)
                                     for p in range(0, len(view), step)]:
                            done.result()
                        offset += len(view)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(os.path.dirname(full))  # the new name is durable before any manifest names it
        except OSError as exc:
            raise StorageError(f"writing {full}: {exc}") from exc

    def read_into(self, path: str, offset: int, *out: memoryview) -> None:
        with self.reader(path) as read:
            read(offset, *out)

    @contextmanager
    def reader(self, path: str) -> Iterator[ReadInto]:
        full = self._abs(path)
        fd = open_regular(full)
        try:
            yield lambda offset, *out: _preadv_exact(fd, offset, [b.cast("B") for b in out if b.nbytes], full)
        finally:
            os.close(fd)

    def commit_file(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        full = self._abs(path)
        tmp = f"{full}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, full)  # atomic, and never replaces an existing file
                except FileExistsError:
                    raise CheckpointExistsError(f"{full} already exists: another save committed first") from None
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, full)
            _fsync_dir(os.path.dirname(full))
        except CheckpointExistsError:
            raise
        except OSError as exc:
            _unlink_quietly(tmp)
            raise StorageError(f"committing {full}: {exc}") from exc

    def list_files(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            rel = os.path.relpath(dirpath, self.root)
            out += [name if rel == "." else f"{rel}/{name}" for name in filenames]
        return sorted(out)

    def remove(self, path: str) -> None:
        rel = check_relpath(path)
        if "/" in rel:  # a directory on the way that links out of the root is refused
            self._abs(posixpath.dirname(rel))
        full = os.path.join(self.root, rel)  # a link as the last part: the link itself, never its target
        try:
            os.unlink(full)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"removing {full}: {exc}") from exc


def open_regular(full: str) -> int:
    """A read-only descriptor of a regular file. Opened non-blocking, so a FIFO or device in its
    place cannot block the open forever, then checked before any read."""
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"opening {full}: {exc}") from exc
    try:
        _need_regular(os.fstat(fd), full)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _need_regular(st: os.stat_result, full: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a file"
        raise StorageError(f"{full} is {kind}, not a regular file")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _pwrite_exact(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _preadv_exact(fd: int, offset: int, buffers: list[memoryview], name: str) -> None:
    pos = offset
    while buffers:
        n = os.preadv(fd, buffers, pos)
        if n == 0:
            missing = sum(len(b) for b in buffers)
            raise StorageError(f"{name}: file ends at byte {pos}, expected {missing} more bytes")
        pos += n
        while buffers and n >= len(buffers[0]):  # drop what is full, trim a partial buffer
            n -= len(buffers[0])
            buffers = buffers[1:]
        if n:
            buffers = [buffers[0][n:], *buffers[1:]]


class TensorStoreStorage:
    """Any tensorstore KvStore (`memory://`, `file://`, `s3://`, `gs://`, ...).

    The kvstore spec is the URL's, then the JSON object in `MIMO_CKPT_STORAGE_SPEC`, then `spec`
    (endpoint, region, credentials, context: any field of tensorstore's kvstore specs); the URL
    keeps its bucket and path. For `s3://`, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` and
    `AWS_REGION` / `AWS_DEFAULT_REGION` fill an endpoint and region the spec does not name, and the
    index is created with S3's own conditional write (io.s3_commit). Remote requests are retried
    a few times (`REMOTE_RETRIES`, unless the spec's context says otherwise), and every call gives
    up after `timeout_s` (`MIMO_CKPT_REMOTE_TIMEOUT_S`, default `REMOTE_TIMEOUT_S`) with an error
    naming the URL.

    `memory://` stores live in a tensorstore Context: pass the same `context` to share one between
    storages of the same process (a default one per process is used otherwise). They exist in one
    process only (`process_local`).
    """

    _default_context: Any = None

    def __init__(self, url: str, context: Any = None, *, spec: Mapping[str, Any] | None = None,
                 timeout_s: float | None = None) -> None:
        import tensorstore as ts

        if context is None:
            if TensorStoreStorage._default_context is None:
                TensorStoreStorage._default_context = ts.Context()
            context = TensorStoreStorage._default_context
        self.url = url if url.endswith("/") else url + "/"
        self.spec = kvstore_spec(self.url, spec)
        self.process_local = self.spec.get("driver") == "memory"
        self.timeout_s = timeout_s if timeout_s is not None else float(
            os.environ.get("MIMO_CKPT_REMOTE_TIMEOUT_S", REMOTE_TIMEOUT_S))
        if self.spec.get("driver") == "s3" and "aws_credentials" not in self.spec:
            _need_aws_credentials(self.url)
        self._kv = self._call(f"opening tensorstore kvstore {url!r}", ts.KvStore.open, self.spec, context=context)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return _call(what, fn, *args, timeout=None if self.process_local else self.timeout_s, **kwargs)

    def exists(self, path: str) -> bool:
        return self.size(path) is not None

    def size(self, path: str) -> int | None:
        result = self._call(f"reading {self.url}{path}", self._kv.read, check_relpath(path))
        return None if result.state == "missing" else len(result.value)

    def write_file(self, path: str, chunks: Iterable[Any]) -> None:
        data = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)
        if not self._create(path, data):
            raise StorageError(f"{self.url}{path} already exists; a writer only creates new files")

    def _create(self, path: str, data: bytes) -> bool:
        """Write `data` under a key that must not exist yet (a conditional write where the driver
        has them); False when it exists."""
        stamp = self._call(f"writing {self.url}{path}", self._kv.write, check_relpath(path), data, if_equal=_NO_VALUE)
        return stamp.generation != b""

    def read_into(self, path: str, offset: int, *out: memoryview) -> None:
        views = [b.cast("B") for b in out]
        size = sum(len(v) for v in views)
        result = self._call(f"reading {self.url}{path}", self._kv.read, check_relpath(path),
                            byte_range=slice(offset, offset + size))
        if result.state == "missing":
            raise StorageError(f"{self.url}{path}: file is missing")
        if len(result.value) != size:
            raise StorageError(
                f"{self.url}{path}: got {len(result.value)} bytes at offset {offset}, expected {size}"
            )
        pos = 0
        for v in views:
            v[:] = result.value[pos : pos + len(v)]
            pos += len(v)

    @contextmanager
    def reader(self, path: str) -> Iterator[ReadInto]:
        yield partial(self.read_into, path)

    def commit_file(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        if exclusive:
            if self.spec.get("driver") == "s3":
                from mimo_ckpt.io.s3_commit import put_if_absent

                created = put_if_absent(self.spec, check_relpath(path), data, self.timeout_s)
            else:
                created = self._create(path, data)
            if not created:
                raise CheckpointExistsError(f"{self.url}{path} already exists: another save committed first")
            return
        self._call(f"writing {self.url}{path}", self._kv.write, check_relpath(path), data)

    def list_files(self) -> list[str]:
        keys = self._call(f"listing {self.url}", self._kv.list)
        return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)

    def remove(self, path: str) -> None:
        self._call(f"removing {self.url}{path}", self._kv.delete_range, _key_range(check_relpath(path)))


def _need_aws_credentials(url: str) -> None:
    """Fail at once, naming the URL, where AWS's credential chain finds nothing (requests would
    be refused one by one, or sent unsigned). Checked with boto3 when it is installed."""
    try:
        import boto3
    except ImportError:
        return
    if boto3.session.Session().get_credentials() is None:
        raise StorageError(f"{url}: no AWS credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           f"AWS_PROFILE, ~/.aws/credentials); for a public bucket give "
                           f"'aws_credentials': {{'type': 'anonymous'}} in the storage spec")


REMOTE_TIMEOUT_S = 120.0
"""How long one remote storage call may take before it fails (MIMO_CKPT_REMOTE_TIMEOUT_S)."""
REMOTE_RETRIES = {"max_retries": 4, "initial_delay": "0.5s", "max_delay": "4s"}
"""tensorstore's retries of a failed S3 or GCS request, unless the spec's context sets its own
(its default, 32 with backoff, holds an unreachable store for many minutes)."""


def kvstore_spec(url: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The tensorstore kvstore spec for `url` (see TensorStoreStorage)."""
    import json

    import tensorstore as ts

    try:
        base = ts.KvStore.Spec(url).to_json()
    except ValueError as exc:
        raise StorageError(f"{url}: not a tensorstore kvstore URL ({exc})") from None
    env = os.environ.get("MIMO_CKPT_STORAGE_SPEC")
    try:
        from_env = json.loads(env) if env else {}
    except ValueError as exc:
        raise StorageError(f"MIMO_CKPT_STORAGE_SPEC is not JSON: {exc}") from None
    own = {k: base[k] for k in ("driver", "bucket", "path") if k in base}
    spec = {**base, **from_env, **(overrides or {}), **own}
    driver = spec.get("driver")
    if driver == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint and "endpoint" not in spec:
            spec["endpoint"] = endpoint
        if region and "aws_region" not in spec:
            spec["aws_region"] = region
        keys = os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
        if keys and "aws_credentials" not in spec:  # tensorstore's default chain logs each file it lacks
            spec["aws_credentials"] = {"type": "environment"}
    if driver in ("s3", "gcs"):
        context = dict(spec.get("context") or {})
        context.setdefault(f"{driver}_request_retries", dict(REMOTE_RETRIES))
        spec["context"] = context
    return spec


def _call(what: str, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs).result()`: a tensorstore call and its wait (at most `timeout` seconds),
    with the ValueError and RuntimeError variants tensorstore raises turned into StorageError
    naming `what`."""
    try:
        return fn(*args, **kwargs).result(timeout=timeout)
    except TimeoutError:
        raise StorageError(f"{what}: no answer within {timeout:g} s (MIMO_CKPT_REMOTE_TIMEOUT_S)") from None
    except Exception as exc:  # noqa: BLE001 - tensorstore's error types are not one family
        raise StorageError(f"{what}: {exc}") from exc


_NO_VALUE = b"\x02"
"""tensorstore's storage generation of a missing key: `if_equal=_NO_VALUE` writes only a new key."""


def _key_range(key: str) -> object:
    import tensorstore as ts

    return ts.KvStore.KeyRange(key, key + "\x00")


def open_storage(path: str | os.PathLike[str]) -> Storage:
    """LocalStorage for plain paths, TensorStoreStorage for URLs with a scheme (its spec from the
    URL and the environment: see TensorStoreStorage)."""
    text = os.fspath(path)
    if "://" in text:
        return TensorStoreStorage(text)
    return LocalStorage(text)
