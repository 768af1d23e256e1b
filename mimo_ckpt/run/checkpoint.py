"""`save` and `load`: collective over all ranks of a comm, each module planned on its own ranks.

save: rank 0 takes the path (save id, `.saving` marker) -> flatten state -> per module, all-gather
shard metadata over the module's ranks -> plan (pure, identical on every module rank) [that much is
`start_save`] -> each rank writes its own files, all at once -> module leaders send their manifest section to
rank 0 -> rank 0 commits the manifest and cleans up -> everyone learns the outcome [`finish_save`].
Async saves run the two halves in different threads (see background_save.py).

load: rank 0 reads the manifest and broadcasts it -> per module, the union of requested keys is
checked against it -> each rank plans and reads exactly the bytes its boxes need -> everyone
learns the outcome.

A failure on one rank never leaves the others waiting: every rank walks the same collectives,
carrying an error instead of data, and all raise at the end.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Literal, Mapping

import torch

from mimo_ckpt.io import commit
from mimo_ckpt.format.checksums import ShardSums
from mimo_ckpt.run.comm import Comm, TorchComm
from mimo_ckpt.errors import (
    CheckpointExistsError, CheckpointNotFoundError, KeyMismatchError, LayoutError, ManifestError,
    MimoCkptError, RemoteRankError, ShardError, StorageError,
)
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.model.dtypes import to_torch
from mimo_ckpt.plan.load import KeyReport, check_keys, padded_region, plan_module_load
from mimo_ckpt.format.manifest import (
    FORMAT_NAME, FORMAT_VERSION, MANIFEST_PATH, Manifest, ModuleEntry, check_module_name, encode_manifest,
    module_to_json, read_manifest_bytes,
)
from mimo_ckpt.interop.megatron_leaves import kind as megatron_kind
from mimo_ckpt.format.object_codec import decode
from mimo_ckpt.model.rank_state import LayoutChangedWarning, is_layout_bound, same_grid
from mimo_ckpt.plan.save import FilePlan, ModuleSavePlan, plan_module_save
from mimo_ckpt.model.shard import (
    FactoryLeaf, Leaves, ModuleShards, ObjectMeta, TensorMeta, TensorShard, check_json, flatten_module_state,
    rebuild,
)
from mimo_ckpt.io.storage import IO_THREADS, Storage, open_storage
from mimo_ckpt.io.tensors import all_at_once, fill_tensors, write_shard_file

__all__ = ["save", "load", "LoadResult", "SaveJob", "start_save", "finish_save"]

log = logging.getLogger("mimo_ckpt")


@dataclass(frozen=True, slots=True)
class LoadResult:
    state: dict[str, Any]
    """Per module, the state with tensors (filled in place) and loaded objects at its leaves."""
    report: KeyReport
    """Key differences found for the modules of this rank (empty under strict=True)."""
    not_loaded: dict[str, list[str]] = field(default_factory=dict)
    """Per module, this rank's optional object keys the checkpoint could not give, left as they
    were: layout-bound state saved under another layout, `_extra_state` it does not hold."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The save's `metadata` (rank 0's), the same on every rank."""


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _check_layouts(layouts: Mapping[str, ModuleLayout], world: int) -> None:
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


def _flatten(state: Mapping[str, Any], layouts: Mapping[str, ModuleLayout], rank: int) -> dict[str, ModuleShards]:
    out = {}
    for name, module_state in state.items():
        if name not in layouts:
            raise ShardError(f"state has module {name!r} but no layout was given for it (layouts: {sorted(layouts)})")
        if not layouts[name].contains(rank):
            raise LayoutError(f"rank {rank} holds state for module {name!r} but is outside its layout {layouts[name].describe()}")
        out[name] = flatten_module_state(name, module_state)
    return out


class _Collective:
    """Tracks this rank's first failure while it keeps joining collectives."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.failure: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc

    def payload(self, ok: Any) -> bytes:
        if self.failure is not None:
            return _encode({"error": f"rank {self.comm.rank}: {self.failure}"})
        return _encode({"ok": ok})

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


def save(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    layouts: Mapping[str, ModuleLayout],
    comm: Comm | None = None,
    storage: Storage | None = None,
    metadata: Mapping[str, Any] | None = None,
    replicas: Literal["main", "spread"] = "main",
) -> None:
    """Save module-keyed state as one checkpoint; every rank of `comm` calls it.

    `state[module]` holds this rank's shards of that module (see `mimo_ckpt.model.shard`); `layouts`
    gives every module's layout and is the same on all ranks. Returns once the manifest is
    committed; raises on every rank if any rank failed, and then commits nothing. A box several
    ranks hold is written by its main replica (`replicas="main"`, as megatron's save does), or by
    any of them, balancing the bytes each rank writes (`"spread"`, as megatron's fully parallel
    save does: only for replicas known to be equal).

    Nothing is a checkpoint until its manifest exists: data files are durable first, the manifest
    is published atomically and never over an existing one (`mimo_ckpt.io.commit`). Each save names
    its files and a `.saving-<id>` marker with its own id; a save that starts on the same path
    first removes what saves that died there created, and takes their markers over, so an earlier
    save still running there fails at commit. After a failure, this save's own files are removed.
    """
    job = start_save(state, path, layouts=layouts, comm=comm, storage=storage, metadata=metadata, replicas=replicas)
    crcs: dict[str, dict[str, list[ShardSums]]] = {}
    if job.run.failure is None:
        data = job.tensors_by_module()
        try:
            crcs = job.write_files(lambda name, plan: write_shard_file(job.storage, plan, data[name], job.comm.rank))
        except (MimoCkptError, OSError) as exc:
            job.run.fail(exc)
    finish_save(job, crcs)


@dataclass
class SaveJob:
    """A save between planning (collective, in the caller's thread) and writing + commit."""

    comm: Comm
    storage: Storage
    path: str
    layouts: Mapping[str, ModuleLayout]
    metadata: Mapping[str, Any]
    save_id: str
    run: "_Collective"
    local: dict[str, ModuleShards]
    plans: dict[str, ModuleSavePlan]
    module_comms: dict[str, Comm]

    def my_files(self) -> list[tuple[str, FilePlan]]:
        """(module, file plan) of each file this rank writes."""
        return [(name, f) for name, plan in self.plans.items() for f in plan.files_of(self.comm.rank)]

    def tensors_by_module(self) -> dict[str, dict[tuple[str, Any], Any]]:
        """module -> (key, box) -> this rank's tensor."""
        return {name: {(t.key, t.box): t.data for t in shards.tensors} for name, shards in self.local.items()}

    def write_files(self, write: Callable[[str, FilePlan], list[ShardSums]]) -> dict[str, dict[str, list[ShardSums]]]:
        """`write(module, plan)` for every file of this rank, all at once (each file's fsync runs
        in parallel); returns module -> file path -> the checksums it returned."""
        files = self.my_files()
        out: dict[str, dict[str, list[ShardSums]]] = {}
        for (name, plan), crcs in zip(files, all_at_once([partial(write, name, plan) for name, plan in files])):
            out.setdefault(name, {})[plan.path] = crcs
        return out


def start_save(
    state: Mapping[str, Any], path: str | os.PathLike[str], *, layouts: Mapping[str, ModuleLayout],
    comm: Comm | None = None, storage: Storage | None = None, metadata: Mapping[str, Any] | None = None,
    replicas: Literal["main", "spread"] = "main",
) -> SaveJob:
    """The collective first half of a save: agree on a save id, flatten, plan every module."""
    comm = comm or TorchComm()
    storage = storage or open_storage(path)
    _check_layouts(layouts, comm.size)
    save_id = _begin_save(comm, storage, os.fspath(path))
    fault_point("save.start", comm.rank)

    run = _Collective(comm)
    local: dict[str, ModuleShards] = {}
    try:
        check_json("save metadata", dict(metadata or {}))
        local = _flatten(state, layouts, comm.rank)
    except MimoCkptError as exc:
        run.fail(exc)

    plans: dict[str, ModuleSavePlan] = {}
    module_comms: dict[str, Comm] = {}
    for name in sorted(layouts):
        mc = comm.subgroup(list(layouts[name].ranks))
        if mc is None:
            continue
        module_comms[name] = mc
        shards = local.get(name, ModuleShards([], [], []))
        metas = {
            "tensors": [t.meta().to_wire() for t in shards.tensors],
            "objects": [o.meta(shards.encoded[id(o)] if o.is_main_replica else None).to_wire()
                        for o in shards.objects],
        }
        gathered = run.unpack(mc.all_gather_bytes(run.payload(metas)))
        if gathered is None:
            continue
        ranks = layouts[name].ranks
        try:
            plans[name] = plan_module_save(
                name, layouts[name],
                {ranks[i]: [TensorMeta.from_wire(w) for w in g["tensors"]] for i, g in enumerate(gathered)},
                {ranks[i]: [ObjectMeta.from_wire(w) for w in g["objects"]] for i, g in enumerate(gathered)},
                file_tag=save_id, replicas=replicas,
            )
        except MimoCkptError as exc:
            run.fail(exc)
    return SaveJob(comm, storage, os.fspath(path), layouts, dict(metadata or {}), save_id, run, local, plans, module_comms)


def finish_save(job: SaveJob, crcs: Mapping[str, Mapping[str, list[ShardSums]]]) -> None:
    """The collective second half, after each rank wrote its files (`crcs`: module -> file -> checksums):
    gather checksums, commit the manifest on rank 0, and raise everywhere if anything failed."""
    comm, run = job.comm, job.run
    fault_point("save.written", comm.rank)
    sections: dict[str, Any] = {}
    for name, mc in job.module_comms.items():
        wire = {path: [s.to_wire() for s in sums] for path, sums in crcs.get(name, {}).items()}
        got = mc.gather_bytes(run.payload(wire), root=0)
        if got is None:
            continue
        per_rank = run.unpack(got)
        if per_rank is not None:
            try:
                entry = job.plans[name].module_entry(job.layouts[name], {p: c for by_file in per_rank for p, c in by_file.items()})
                sections[name] = module_to_json(entry)
            except MimoCkptError as exc:
                run.fail(exc)

    got = comm.gather_bytes(run.payload(sections), root=0)
    errors: list[str] = []
    if got is not None:
        docs = [json.loads(b) for b in got]
        errors = [d["error"] for d in docs if "error" in d]
        doc = None
        if not errors:
            modules = {k: v for d in docs for k, v in d["ok"].items()}
            doc = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "world_size": comm.size,
                "metadata": dict(job.metadata), "modules": dict(sorted(modules.items())),
            }
        errors += _commit(job.storage, doc, job.save_id, job.path)
    outcome = json.loads(comm.broadcast_bytes(_encode(errors), 0))
    run.finish(outcome)


def _begin_save(comm: Comm, storage: Storage, path: str) -> str:
    """Rank 0 refuses a committed path, takes dead saves there over, and shares the new save id."""
    reply = ""
    if comm.rank == 0:
        try:
            reply = "id:" + commit.begin(storage, MANIFEST_PATH, path)
        except CheckpointExistsError:
            reply = "exists"
        except Exception as exc:  # noqa: BLE001 - whatever it is, every rank must hear of it
            reply = f"error:{type(exc).__name__}: {exc}"
    reply = comm.broadcast_bytes(reply.encode(), 0).decode()
    if reply == "exists":
        raise CheckpointExistsError(f"{path} already holds a committed checkpoint")
    if not reply.startswith("id:"):
        raise StorageError(f"rank 0 could not start a save in {path}: {reply[len('error:'):]}")
    return reply[3:]


def _commit(storage: Storage, doc: dict[str, Any] | None, save_id: str, path: str) -> list[str]:
    """Rank 0: publish the manifest (`doc`; None when a rank failed), unless another save took
    this path over meanwhile; then remove the save's marker and, when nothing was committed, its
    files. Returns the errors."""
    errors: list[str] = []
    committed = False
    if doc is not None:
        try:
            blob = encode_manifest(doc)
            Manifest.from_bytes(blob, source="manifest being written")
            fault_point("save.commit", 0)
            commit.publish(storage, save_id, MANIFEST_PATH, blob, path)
            committed = True
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            errors.append(f"rank 0 committing the manifest: {exc}")
        fault_point("save.committed", 0)
    commit.finish(storage, save_id, committed)
    return errors


def load(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    layouts: Mapping[str, ModuleLayout],
    comm: Comm | None = None,
    storage: Storage | None = None,
    strict: bool | Literal["requested"] = True,
    verify: bool = True,
    io_threads: int = IO_THREADS,
) -> LoadResult:
    """Fill this rank's shards from a checkpoint saved under any layouts; every rank calls it.

    Each rank reads only the stored bytes that overlap its own boxes. With `strict=True`, any
    missing (requested, not stored), unexpected (stored, not requested) or mismatched key raises
    `KeyMismatchError` listing them per module on every rank; with "requested" (what megatron's
    loader does by default), only missing and mismatched keys do; otherwise matching keys load.
    The differences come back in `LoadResult.report`. With `verify`, every byte read is checked
    against its crc32c: a partial read widens to the whole blocks it touches, or to the whole
    shard when the shard has no blocks. Each rank reads up to `io_threads` files at once, each in
    file order. Floating-point tensors are cast from the stored dtype; see docs/megatron.md for
    factories, flat slices and padded vocabularies.
    """
    comm = comm or TorchComm()
    storage = storage or open_storage(path)
    _check_layouts(layouts, comm.size)
    source = os.fspath(path)

    blob = b""
    if comm.rank == 0:
        try:
            blob = read_manifest_bytes(storage, source)
            Manifest.from_bytes(blob, source=f"{source}/{MANIFEST_PATH}")
            blob = b"+" + blob
        except Exception as exc:  # noqa: BLE001 - whatever it is, every rank must hear of it
            blob = b"-" + f"{type(exc).__name__}: {exc}".encode()
    blob = comm.broadcast_bytes(blob, 0)
    if blob[:1] != b"+":
        message = blob[1:].decode()
        if message.startswith(CheckpointNotFoundError.__name__):
            raise CheckpointNotFoundError(message)
        raise ManifestError(message)
    manifest = Manifest.from_bytes(blob[1:], source=f"{source}/{MANIFEST_PATH}")

    run = _Collective(comm)
    local: dict[str, ModuleShards] = {}
    try:
        local = _flatten(state, layouts, comm.rank)
    except MimoCkptError as exc:
        run.fail(exc)

    report = KeyReport()
    not_loaded: dict[str, list[str]] = {}
    loaded_objects: dict[tuple[str, int], Any] = {}
    bytes_read = 0
    for name in sorted(layouts):
        mc = comm.subgroup(list(layouts[name].ranks))
        if mc is None:
            continue
        shards = local.get(name, ModuleShards([], [], []))
        entry = manifest.modules.get(name)
        unusable = _unusable_layout_bound(entry, layouts[name])
        if entry is not None:
            shards, bound, extra = _without_unusable_optional(shards, entry, unusable)
            if bound or extra:
                not_loaded[name] = bound + extra
            if bound and comm.rank == layouts[name].rank_offset:
                warnings.warn(
                    f"module {name!r}: layout-bound state {bound} was not loaded: it was saved "
                    f"under another layout than {layouts[name].describe()} (or dropped by a reshard)",
                    LayoutChangedWarning, stacklevel=2,
                )
        asked = {
            "tensors": sorted({(t.key, t.meta().dtype, t.global_shape, t.allow_shape_mismatch)
                               for t in shards.tensors}),
            "objects": sorted({(o.key, o.global_shape) for o in shards.objects}),
        }
        gathered = run.unpack(mc.all_gather_bytes(run.payload(asked)))
        if gathered is None:
            continue
        module_report, skipped = check_keys(
            name, entry,
            sorted({(k, d, tuple(s), flexible) for g in gathered for k, d, s, flexible in g["tensors"]}),
            sorted({(k, tuple(s)) for g in gathered for k, s in g["objects"]}),
            unused_ok=unusable,
        )
        report.merge(module_report)
        if module_report.fatal(strict):
            run.fail(KeyMismatchError(module_report))
        if run.failure is not None or entry is None:
            continue
        try:
            fault_point("load.read", comm.rank)
            bytes_read += _load_module(name, entry, shards, skipped, storage, verify, io_threads, loaded_objects)
        except (MimoCkptError, OSError) as exc:
            run.fail(exc)

    run.unpack(comm.all_gather_bytes(run.payload(None)))
    run.finish([])
    log.debug("rank %d read %d bytes", comm.rank, bytes_read)

    result = {name: _loaded_state(module_state, local[name].leaves, name, loaded_objects)
              for name, module_state in state.items()}
    return LoadResult(state=result, report=report, not_loaded=not_loaded, metadata=dict(manifest.metadata))


def _loaded_state(state: Any, leaves: Leaves, name: str, loaded_objects: dict[tuple[str, int], Any]) -> Any:
    """`state` with each leaf replaced by what was loaded for it: tensors were filled in place
    (megatron gets the tensor, not the mapping), objects come from the checkpoint, factories are
    merged from their loaded parts."""
    by_path = dict(leaves)

    def value_of(path: tuple[Any, ...], leaf: Any) -> Any:
        became = by_path[path]
        if isinstance(became, FactoryLeaf):
            return became.factory.merge_fn(_loaded_state(became.built, became.leaves, name, loaded_objects))
        kind = megatron_kind(leaf)
        if kind == "LocalNonpersistentObject":
            return leaf.unwrap()
        if isinstance(leaf, TensorShard) or kind == "ShardedTensor":  # even an empty flat slice's
            return leaf.data
        if not became or isinstance(became[0], TensorShard):  # a plain tensor, filled in place
            return leaf
        return loaded_objects.get((name, id(became[0])), became[0].data)

    return rebuild(state, value_of)


def _unusable_layout_bound(entry: ModuleEntry | None, layout: ModuleLayout) -> set[str]:
    """The module's stored layout-bound keys when its grid changed since the save."""
    if entry is None or same_grid(entry.layout, layout):
        return set()
    return {k for k in entry.objects if is_layout_bound(k)}


def _without_unusable_optional(
    shards: ModuleShards, entry: ModuleEntry, unusable: set[str],
) -> tuple[ModuleShards, list[str], list[str]]:
    """The shards minus optional objects the checkpoint cannot give this layout: layout-bound
    ones (the `unusable` ones stored for another grid, and those a reshard dropped), and
    `_extra_state` the checkpoint lacks (written by a model without Transformer Engine state)."""
    bound = sorted({o.key for o in shards.objects
                    if is_layout_bound(o.key) and (o.key in unusable or o.key not in entry.objects)})
    extra = sorted({o.key for o in shards.objects if o.key.endswith("_extra_state") and o.key not in entry.objects})
    kept = [o for o in shards.objects if o.key not in bound and o.key not in extra]
    return replace(shards, objects=kept), bound, extra


@torch.no_grad()  # the targets may be parameters (megatron's shards hold them, not their .data)
def _load_module(
    name: str, entry: ModuleEntry, shards: ModuleShards, bad: set[str], storage: Storage,
    verify: bool, io_threads: int, loaded_objects: dict[tuple[str, int], Any],
) -> int:
    metas, targets, casts = [], [], []
    for t in shards.tensors:
        if t.key in bad:
            continue
        stored = entry.tensors[t.key]
        box = t.box if stored.global_shape == t.global_shape else padded_region(t.box, stored.global_shape)
        if box != t.box:  # megatron's rule: what the checkpoint lacks is zero
            t.data.zero_()
        if box is None:
            continue
        meta = TensorMeta(t.key, stored.dtype, stored.global_shape, box, t.is_main_replica)
        if box == t.box and meta.dtype == t.meta().dtype:
            target = t.data
        else:  # read the stored dtype into a scratch tensor, then copy (casting) into place
            target = torch.empty(box.shape, dtype=to_torch(stored.dtype, key=t.key))
            casts.append((target, t.data[tuple(slice(o, o + n) for o, n in zip(box.relative_to(t.box), box.shape))]))
        metas.append(meta)
        targets.append((target, box))
    items = plan_module_load(name, entry, metas)
    nbytes = fill_tensors(storage, items, targets, verify=verify, threads=io_threads)
    for scratch, view in casts:
        view.copy_(scratch)
    for twin, loaded in shards.twins:
        if loaded.key not in bad:
            twin.data.copy_(loaded.data)
    for obj in shards.objects:
        if obj.key in bad:
            continue
        values = entry.objects[obj.key].values
        if obj.global_offset not in values:
            raise ManifestError(
                f"module {name!r}, object {obj.key!r}: no value stored for offset {list(obj.global_offset)}"
            )
        loaded_objects[(name, id(obj))] = decode(values[obj.global_offset], f"module {name!r}, object {obj.key!r}")
    return nbytes
