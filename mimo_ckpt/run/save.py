"""`save`: collective over all ranks of a comm, each module planned on its own ranks.

rank 0 takes the path (save id, `.saving` marker) -> flatten state, encode objects -> per module,
all-gather shard metadata over the module's ranks -> plan (pure, identical on every module rank)
[that much is `start_save`] -> each rank writes its own files, all at once -> module leaders send
their manifest section to rank 0 -> rank 0 commits the manifest and cleans up -> everyone learns
the outcome [`finish_save`]. Async saves run the two halves in different threads (`run.async_save`).

A failure on one rank never leaves the others waiting: every rank walks the same collectives,
carrying an error instead of data, and all raise at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from mimo_ckpt.errors import MimoCkptError, PlanError, StorageError
from mimo_ckpt.format.checksums import ShardSums
from mimo_ckpt.format.manifest import MANIFEST_PATH, encode_manifest, manifest_document, module_to_json
from mimo_ckpt.format.object_codec import check_plain_json
from mimo_ckpt.io import commit
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.io.storage import Storage, open_storage
from mimo_ckpt.io.tensors import write_shard_files
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.model.shard import ModuleShards, ObjectMeta, TensorMeta
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt.plan.save import FilePlan, ModuleSavePlan, encode_objects, plan_module_save
from mimo_ckpt.run.collective import (
    Collective, check_layouts, check_storage_serves, flatten_state, json_bytes, root_decides,
)
from mimo_ckpt.run.comm import Comm, default_comm
from mimo_ckpt.run.gc_pause import collector_paused

__all__ = ["save", "SaveJob", "Snapshot", "start_save", "flatten_for_save", "plan_save", "finish_save"]


def save(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    layouts: Mapping[str, ModuleLayout],
    comm: Comm | None = None,
    storage: Storage | None = None,
    metadata: Mapping[str, Any] | None = None,
    replicas: Literal["main", "spread"] = "main",
    options: SaveOptions = SaveOptions(),
) -> None:
    """Save module-keyed state as one checkpoint; every rank of `comm` calls it.

    `state[module]` holds this rank's shards of that module (see `mimo_ckpt.model.shard`); `layouts`
    gives every module's layout and is the same on all ranks. Returns once the manifest is
    committed; raises on every rank if any rank failed, and then commits nothing. A box several
    ranks hold is written by its main replica (`replicas="main"`, as megatron's save does), or by
    any of them, balancing the bytes each rank writes (`"spread"`, as megatron's fully parallel
    save does: only for replicas known to be equal). `options` sets file and checksum-block sizes;
    every rank must pass the same.

    Nothing is a checkpoint until its manifest exists: data files are durable first, the manifest
    is published atomically and never over an existing one (`mimo_ckpt.io.commit`). Each save names
    its files and a `.saving-<id>` marker with its own id; a save that starts on the same path
    first removes what saves that died there created, and takes their markers over, so an earlier
    save still running there fails at commit. After a failure, this save's own files are removed.
    """
    job = start_save(state, path, layouts=layouts, comm=comm, storage=storage, metadata=metadata, replicas=replicas,
                     options=options)
    crcs: dict[str, dict[str, list[ShardSums]]] = {}
    if job.run.failure is None:
        data, files = job.tensors_by_module(), job.my_files()
        try:
            sums = write_shard_files(job.storage, [(plan, data[name]) for name, plan in files], job.comm.rank,
                                     block_bytes=job.options.block_bytes)
            crcs = job.checksums_by_module(sums)
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
    run: Collective
    local: dict[str, ModuleShards]
    plans: dict[str, ModuleSavePlan]
    module_comms: dict[str, Comm]
    options: SaveOptions

    def my_files(self) -> list[tuple[str, FilePlan]]:
        """(module, file plan) of each file this rank writes."""
        return [(name, f) for name, plan in self.plans.items() for f in plan.files_of(self.comm.rank)]

    def tensors_by_module(self) -> dict[str, dict[tuple[str, Any], Any]]:
        """module -> (key, box) -> this rank's tensor."""
        return {name: {(t.key, t.box): t.data for t in shards.tensors} for name, shards in self.local.items()}

    def checksums_by_module(self, sums: list[list[ShardSums]]) -> dict[str, dict[str, list[ShardSums]]]:
        """module -> file path -> its items' checksums, from the checksums of `my_files()` in order."""
        out: dict[str, dict[str, list[ShardSums]]] = {}
        for (name, plan), crcs in zip(self.my_files(), sums, strict=True):
            out.setdefault(name, {})[plan.path] = crcs
        return out


def start_save(
    state: Mapping[str, Any], path: str | os.PathLike[str], *, layouts: Mapping[str, ModuleLayout],
    comm: Comm | None = None, storage: Storage | None = None, metadata: Mapping[str, Any] | None = None,
    replicas: Literal["main", "spread"] = "main", options: SaveOptions = SaveOptions(),
) -> SaveJob:
    """The collective first half of a save: agree on a save id, flatten, plan every module."""
    comm = comm or default_comm()
    storage = storage or open_storage(path)
    check_layouts(layouts, comm.size)
    check_storage_serves(storage, comm, os.fspath(path))
    return plan_save(flatten_for_save(state, layouts, comm.rank, metadata), path, layouts=layouts, comm=comm,
                     storage=storage, metadata=metadata, replicas=replicas, options=options)


@dataclass
class Snapshot:
    """This rank's state flattened and its objects encoded (`local`), or why it could not be."""

    local: dict[str, ModuleShards]
    failure: MimoCkptError | None = None


def flatten_for_save(
    state: Mapping[str, Any], layouts: Mapping[str, ModuleLayout], rank: int, metadata: Mapping[str, Any] | None,
) -> Snapshot:
    """Local, no collectives: the state flattened and every object encoded (what an async save
    takes at call time)."""
    try:
        check_plain_json("save metadata", dict(metadata or {}))
        flat = flatten_state(state, layouts, rank)
        for name, shards in flat.items():
            shards.encoded = encode_objects(name, shards)
        return Snapshot(flat)  # only once every object is encoded: a failed rank sends empty metadata
    except MimoCkptError as exc:
        return Snapshot({}, exc)


def plan_save(
    snapshot: Snapshot, path: str | os.PathLike[str], *, layouts: Mapping[str, ModuleLayout], comm: Comm,
    storage: Storage, metadata: Mapping[str, Any] | None = None, replicas: Literal["main", "spread"] = "main",
    options: SaveOptions = SaveOptions(),
) -> SaveJob:
    """Collective: agree on a save id (rank 0 takes the path) and plan every module from the
    ranks' snapshots."""
    where = os.fspath(path)
    save_id = root_decides(comm, lambda: commit.begin(storage, MANIFEST_PATH, where).encode(),
                           otherwise=StorageError).decode()
    fault_point("save.start", comm.rank)
    run = Collective(comm)
    local = snapshot.local
    if snapshot.failure is not None:
        run.fail(snapshot.failure)

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
            "options": options.shaping(),
        }
        gathered = run.unpack(mc.all_gather_bytes(run.payload(metas)))
        if gathered is None:
            continue
        ranks = layouts[name].ranks
        try:
            _check_same_options(name, {ranks[i]: g["options"] for i, g in enumerate(gathered)})
            with collector_paused():  # the plan allocates many small objects
                plans[name] = plan_module_save(
                    name, layouts[name],
                    {ranks[i]: [TensorMeta.from_wire(w) for w in g["tensors"]] for i, g in enumerate(gathered)},
                    {ranks[i]: [ObjectMeta.from_wire(w) for w in g["objects"]] for i, g in enumerate(gathered)},
                    file_tag=save_id, replicas=replicas, options=options,
                )
        except MimoCkptError as exc:
            run.fail(exc)
    return SaveJob(comm, storage, os.fspath(path), layouts, dict(metadata or {}), save_id, run, local, plans, module_comms,
                   options)


def _sums_from_wire(wire: Any, module: str, path: str) -> ShardSums:
    try:
        return ShardSums.from_wire(wire)
    except PlanError as exc:
        raise PlanError(f"module {module!r}, file {path}: {exc}") from None


def _check_same_options(module: str, by_rank: Mapping[int, Mapping[str, int]]) -> None:
    """The options that shape the files must agree on every rank of the module, or each rank
    would plan other files."""
    first = min(by_rank)
    for rank, values in sorted(by_rank.items()):
        differ = sorted(k for k in values if values[k] != by_rank[first].get(k))
        if differ:
            raise PlanError(
                f"module {module!r}: ranks {first} and {rank} pass different save options "
                + ", ".join(f"{k}={by_rank[first].get(k)} vs {values[k]}" for k in differ)
                + "; every rank must pass the same SaveOptions"
            )


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
                sums = {p: [_sums_from_wire(w, name, p) for w in c] for by_file in per_rank for p, c in by_file.items()}
                entry = job.plans[name].module_entry(job.layouts[name], sums)
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
            all_sections = {k: v for d in docs for k, v in d["ok"].items()}
            doc = manifest_document(comm.size, job.metadata, all_sections)
        errors += _commit(job.storage, doc, job.save_id, job.path)
    outcome = json.loads(comm.broadcast_bytes(json_bytes(errors), 0))
    run.finish(outcome)




def _commit(storage: Storage, doc: dict[str, Any] | None, save_id: str, path: str) -> list[str]:
    """Rank 0: publish the manifest (`doc`; None when a rank failed), unless another save took
    this path over meanwhile; then remove the save's marker and, when nothing was committed, its
    files. Returns the errors."""
    errors: list[str] = []
    committed = False
    if doc is not None:
        try:
            blob = encode_manifest(doc)
            fault_point("save.commit", 0)
            commit.publish_manifest(storage, save_id, blob, path)
            committed = True
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            errors.append(f"rank 0 committing the manifest: {exc}")
        fault_point("save.committed", 0)
    commit.finish(storage, save_id, committed)
    return errors
