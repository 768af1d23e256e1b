"""The few collectives save and load need, over torch.distributed or over threads.

Only bytes travel (JSON-encoded metadata), never pickles. Every rank of a comm calls each
collective in the same order. `subgroup` is collective over the parent comm (all its ranks call it,
members or not) and is cached, so repeated saves reuse the same groups.
"""

from __future__ import annotations

import atexit
import threading
from datetime import timedelta
from typing import Any, Protocol, Sequence

from mimo_ckpt.errors import RemoteRankError

__all__ = ["Comm", "TorchComm", "ThreadWorld", "SoloComm", "default_comm", "distributed"]


class Comm(Protocol):
    rank: int
    size: int

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order, on every rank."""

    def gather_bytes(self, data: bytes, root: int) -> list[bytes] | None:
        """Every rank's bytes on `root` (None elsewhere)."""

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        """`root`'s bytes on every rank."""

    def subgroup(self, ranks: Sequence[int]) -> "Comm | None":
        """A comm over `ranks` (ranks of this comm), or None on ranks outside it."""

    def broadcast_tensor(self, tensor: Any, root: int) -> None:
        """Overwrite `tensor` (contiguous, the same size on every rank) with `root`'s."""


_DEFAULT_COMMS: dict[int, tuple[Any, "TorchComm"]] = {}
"""id(default process group) -> (it, its comm): see `TorchComm.default`. Emptied at exit, before
the interpreter tears modules down: a gloo process group destroyed during that teardown can abort
the process ("terminate called without an active exception")."""


class TorchComm:
    """A torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    spans_processes = True
    """Its ranks are processes: storage that lives in one process's memory cannot serve them."""

    def __init__(self, group: Any = None, timeout: float | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
        self._dist = dist
        self.group = group
        self.timeout = timeout
        """Seconds a collective may wait for a peer (the group's own timeout); None: torch's default."""
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._subgroups: dict[tuple[int, ...], Any] = {}
        backend = dist.get_backend(group)
        import torch

        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @classmethod
    def default(cls) -> "TorchComm":
        """The comm over the default process group that save and load use when given none: one
        per process group, so module subgroups (collective to create, kept by torch for the
        process's life) are made once, not on every call."""
        import torch.distributed as dist

        world = dist.group.WORLD
        held = _DEFAULT_COMMS.get(id(world))
        if held is None or held[0] is not world:  # a new process group after destroy + init
            if not _DEFAULT_COMMS:
                atexit.register(_DEFAULT_COMMS.clear)
            held = _DEFAULT_COMMS[id(world)] = (world, cls())
        return held[1]

    @classmethod
    def with_timeout(cls, seconds: float) -> "TorchComm":
        """A comm over all ranks on its own gloo group whose collectives give up after `seconds`
        (a rank that died or hangs then fails the others with RemoteRankError). Collective."""
        import torch.distributed as dist

        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
        return cls(group, timeout=seconds)

    def _failed(self, what: str, exc: Exception) -> RemoteRankError:
        limit = f"{self.timeout:g} s" if self.timeout is not None else "the process group's timeout"
        return RemoteRankError(
            f"{what} over {self.size} ranks failed on rank {self.rank} (waited up to {limit}): "
            f"a peer rank died, hung or left ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        )

    def _tensor(self, data: bytes, length: int) -> Any:
        import torch

        buf = torch.zeros(length, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return buf.to(self._device)

    def _sizes(self, n: int) -> list[int]:
        import torch

        mine = torch.tensor([n], dtype=torch.int64, device=self._device)
        out = [torch.zeros_like(mine) for _ in range(self.size)]
        self._dist.all_gather(out, mine, group=self.group)
        return [int(t.item()) for t in out]

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        try:
            return self._all_gather_bytes(data)
        except RuntimeError as exc:  # gloo/NCCL errors (DistBackendError is one)
            raise self._failed("all_gather", exc) from exc

    def gather_bytes(self, data: bytes, root: int) -> list[bytes] | None:
        try:
            return self._gather_bytes(data, root)
        except RuntimeError as exc:
            raise self._failed("gather", exc) from exc

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        try:
            return self._broadcast_bytes(data, root)
        except RuntimeError as exc:
            raise self._failed("broadcast", exc) from exc

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        sizes = self._sizes(len(data))
        width = max(max(sizes), 1)
        out = [self._tensor(b"", width) for _ in range(self.size)]
        self._dist.all_gather(out, self._tensor(data, width), group=self.group)
        return [bytes(t.cpu().numpy()[:n]) for t, n in zip(out, sizes)]

    def _gather_bytes(self, data: bytes, root: int) -> list[bytes] | None:
        sizes = self._sizes(len(data))
        width = max(max(sizes), 1)
        out = [self._tensor(b"", width) for _ in range(self.size)] if self.rank == root else None
        self._dist.gather(
            self._tensor(data, width), out, dst=self._dist.get_global_rank(self.group, root)
            if self.group is not None else root, group=self.group,
        )
        if out is None:
            return None
        return [bytes(t.cpu().numpy()[:n]) for t, n in zip(out, sizes)]

    def _broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        import torch

        n = torch.tensor([len(data) if self.rank == root and data else 0], dtype=torch.int64, device=self._device)
        src = self._dist.get_global_rank(self.group, root) if self.group is not None else root
        self._dist.broadcast(n, src=src, group=self.group)
        buf = self._tensor(data if self.rank == root and data else b"", max(int(n.item()), 1))
        self._dist.broadcast(buf, src=src, group=self.group)
        return bytes(buf.cpu().numpy()[: int(n.item())])

    def broadcast_tensor(self, tensor: Any, root: int) -> None:
        src = self._dist.get_global_rank(self.group, root) if self.group is not None else root
        moved = tensor if tensor.device == self._device else tensor.to(self._device)
        try:
            self._dist.broadcast(moved, src=src, group=self.group)
        except RuntimeError as exc:
            raise self._failed("broadcast", exc) from exc
        if moved is not tensor:
            tensor.copy_(moved)

    def subgroup(self, ranks: Sequence[int]) -> "TorchComm | None":
        ranks = tuple(ranks)
        if ranks == tuple(range(self.size)):
            return self
        if ranks not in self._subgroups:
            global_ranks = [
                self._dist.get_global_rank(self.group, r) if self.group is not None else r
                for r in ranks
            ]
            same_timeout = {} if self.timeout is None else {
                "backend": self._dist.get_backend(self.group), "timeout": timedelta(seconds=self.timeout)}
            group = self._dist.new_group(global_ranks, **same_timeout)
            self._subgroups[ranks] = TorchComm(group, self.timeout) if self.rank in ranks else None
        return self._subgroups[ranks]


class SoloComm:
    """The only rank of a process that runs without torch.distributed: every collective hands
    back what it was given. Saves and loads need no process group in one process (the layouts
    must then fit one rank)."""

    rank = 0
    size = 1

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return [data]

    def gather_bytes(self, data: bytes, root: int) -> list[bytes] | None:
        return [data]

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        return data or b""

    def subgroup(self, ranks: Sequence[int]) -> "SoloComm | None":
        return self if tuple(ranks) == (0,) else None

    def broadcast_tensor(self, tensor: Any, root: int) -> None:
        return None


def distributed() -> bool:
    """Whether this process runs in a torch.distributed process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def default_comm() -> Comm:
    """What save, load and the manager use when given no comm: the default process group's, or,
    in a process without one, `SoloComm`."""
    return TorchComm.default() if distributed() else SoloComm()


class _Rendezvous:
    def __init__(self, n: int, timeout: float) -> None:
        self.barrier = threading.Barrier(n, timeout=timeout)
        self.slots: list[Any] = [None] * n

    def exchange(self, index: int, value: Any) -> list[Any]:
        self.slots[index] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ThreadWorld:
    """Ranks as threads of one process: `ThreadWorld(n).comm(rank)` per thread.

    Runs the same save/load code as processes do; used for in-process stores (`memory://`) and for
    simulating many ranks on one machine.
    """

    def __init__(self, size: int, timeout: float = 120.0) -> None:
        self.size = size
        self.timeout = timeout
        self._lock = threading.Lock()
        self._groups: dict[tuple[int, ...], _Rendezvous] = {}

    def _rendezvous(self, ranks: tuple[int, ...]) -> _Rendezvous:
        with self._lock:
            if ranks not in self._groups:
                self._groups[ranks] = _Rendezvous(len(ranks), self.timeout)
            return self._groups[ranks]

    def abort(self) -> None:
        """Break every pending collective (threading.BrokenBarrierError), e.g. after a rank died."""
        with self._lock:
            for rv in self._groups.values():
                rv.barrier.abort()

    def comm(self, rank: int) -> "_ThreadComm":
        return _ThreadComm(self, tuple(range(self.size)), rank)


class _ThreadComm:
    def __init__(self, world: ThreadWorld, members: tuple[int, ...], world_rank: int) -> None:
        self._world = world
        self._members = members
        self._world_rank = world_rank
        self._rv = world._rendezvous(members)
        self.rank = members.index(world_rank)
        self.size = len(members)

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return self._rv.exchange(self.rank, bytes(data))

    def gather_bytes(self, data: bytes, root: int) -> list[bytes] | None:
        out = self._rv.exchange(self.rank, bytes(data))
        return out if self.rank == root else None

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        return self._rv.exchange(self.rank, bytes(data or b""))[root]

    def broadcast_tensor(self, tensor: Any, root: int) -> None:
        source = self._rv.exchange(self.rank, tensor if self.rank == root else None)[root]
        if self.rank != root:
            tensor.copy_(source)
        self._rv.exchange(self.rank, None)  # the root's tensor may change once every copy is made

    def subgroup(self, ranks: Sequence[int]) -> "_ThreadComm | None":
        members = tuple(self._members[r] for r in ranks)
        if self.rank not in ranks:
            return None
        return _ThreadComm(self._world, members, self._world_rank)
