"""What every collective of this layer shares: a rank's failure travels with its payload, so
no rank waits on one that gave up; rank 0 decides for all with one error contract; layouts and
state are checked the same way by save and load."""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from mimo_ckpt import errors as error_types
from mimo_ckpt.errors import LayoutError, MimoCkptError, RemoteRankError, ShardError, StorageError
from mimo_ckpt.format.manifest import check_module_name
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.model.shard import ModuleShards
from mimo_ckpt.model.tree import flatten_module_state
from mimo_ckpt.run.comm import Comm

__all__ = ["Collective", "root_decides", "json_bytes", "check_layouts", "check_storage_serves", "flatten_state"]


def json_bytes(obj: Any) -> bytes:
    """JSON as ranks exchange it."""
    return json.dumps(obj, separators=(",", ":")).encode()


class Collective:
    """Tracks this rank's first failure while it keeps joining collectives."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.failure: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc

    def payload(self, ok: Any) -> bytes:
        if self.failure is not None:
            return json_bytes({"error": f"rank {self.comm.rank}: {self.failure}"})
        return json_bytes({"ok": ok})

    def unpack(self, blobs: list[bytes]) -> list[Any] | None:
        """Payloads of all ranks, or None (recording a failure) when any carried an error."""
        docs = [json.loads(b) for b in blobs]
        errors = [d["error"] for d in docs if "error" in d]
        if errors:
            self.fail(RemoteRankError("; ".join(errors)))
            return None
        return [d["ok"] for d in docs]

    def finish(self, root_errors: list[str]) -> None:
        if self.failure is not None:
            raise self.failure
        if root_errors:
            raise RemoteRankError("; ".join(root_errors))


def root_decides(comm: Comm, decide: Callable[[], bytes], *, otherwise: type[MimoCkptError]) -> bytes:
    """Rank 0 runs `decide`; every rank returns its bytes, or raises the same error class with rank
    0's message: the library's own class, or `otherwise` for anything else (an OSError)."""
    reply = b""
    failure: BaseException | None = None
    if comm.rank == 0:
        try:
            reply = b"+" + decide()
        except Exception as exc:  # noqa: BLE001 - whatever it is, every rank must hear of it
            failure = exc
            known = isinstance(exc, MimoCkptError) and getattr(error_types, type(exc).__name__, None) is type(exc)
            name = type(exc).__name__ if known else otherwise.__name__
            text = str(exc) if known else f"{type(exc).__name__}: {exc}"
            reply = b"-" + json_bytes({"type": name, "message": text})
    reply = comm.broadcast_bytes(reply, 0)
    if reply[:1] == b"+":
        return reply[1:]
    doc = json.loads(reply[1:])
    if failure is not None and type(failure).__name__ == doc["type"]:
        raise failure
    raise getattr(error_types, doc["type"])(doc["message"]) from failure


def check_storage_serves(storage: Any, comm: Comm, where: str) -> None:
    """Refuse, on every rank alike, a store that lives in one process (`memory://`) for ranks
    that are processes: each would write and read a checkpoint of its own."""
    if comm.size > 1 and getattr(storage, "process_local", False) and getattr(comm, "spans_processes", False):
        raise StorageError(f"{where}: this store lives in one process's memory, and the {comm.size} ranks are "
                           f"processes, each of which would hold its own part of the checkpoint; use a "
                           f"filesystem path or a shared object store (or ranks as threads: ThreadWorld)")


def check_layouts(layouts: Mapping[str, ModuleLayout], world: int) -> None:
    if not layouts:
        raise LayoutError("no module layouts given")
    for name, layout in layouts.items():
        check_module_name(name)
        if not isinstance(layout, ModuleLayout):
            raise LayoutError(f"module {name!r}: layout must be a ModuleLayout, got {type(layout).__name__}")
        if layout.rank_offset + layout.size > world:
            raise LayoutError(
                f"module {name!r}: layout {layout.describe()} needs ranks up to "
                f"{layout.rank_offset + layout.size - 1} but the group has {world} ranks"
            )


def flatten_state(state: Mapping[str, Any], layouts: Mapping[str, ModuleLayout], rank: int) -> dict[str, ModuleShards]:
    """Each module's state on this rank, flattened (`model.tree`), after checking it belongs here."""
    out = {}
    for name, module_state in state.items():
        if name not in layouts:
            raise ShardError(f"state has module {name!r} but no layout was given for it (layouts: {sorted(layouts)})")
        if not layouts[name].contains(rank):
            raise LayoutError(f"rank {rank} holds state for module {name!r} but is outside its layout {layouts[name].describe()}")
        out[name] = flatten_module_state(name, module_state)
    return out
