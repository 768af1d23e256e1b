"""`load`: collective over all ranks of a comm, each module read on its own ranks.

rank 0 reads the manifest and shares it -> flatten the requested state -> per module, the union
of requested keys is checked against the manifest -> each rank plans and reads exactly the bytes
its boxes need -> everyone learns the outcome. A failing rank carries its error through the same
collectives, so all raise together.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Collection, Literal, Mapping, Sequence

import torch

from mimo_ckpt.errors import KeyMismatchError, ManifestError, MimoCkptError
from mimo_ckpt.format.manifest import MANIFEST_PATH, Manifest, ModuleEntry
from mimo_ckpt.format.object_codec import decode
from mimo_ckpt.io.commit import read_manifest_bytes
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.io.staging import staged_through_chunks
from mimo_ckpt.io.storage import IO_THREADS, LocalStorage, Storage, open_storage
from mimo_ckpt.io.tensors import fill_device_tensors, fill_tensors
from mimo_ckpt.model.box import Box
from mimo_ckpt.model.dtypes import to_torch
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.model.megatron_leaves import kind as megatron_kind
from mimo_ckpt.model.rank_state import LayoutChangedWarning, is_layout_bound, same_grid
from mimo_ckpt.model.shard import FactoryLeaf, Leaves, ModuleShards, TensorMeta, TensorShard
from mimo_ckpt.model.tree import rebuild
from mimo_ckpt.plan.load import KeyReport, ReadItem, check_keys, padded_region, plan_module_load, stored_object_value
from mimo_ckpt.plan.options import ReadOptions
from mimo_ckpt.plan.shared_reads import Message, Request, plan_shared_reads
from mimo_ckpt.run.collective import Collective, check_layouts, check_storage_serves, flatten_state, root_decides
from mimo_ckpt.run.comm import Comm, default_comm

__all__ = ["load", "LoadResult"]

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




@dataclass
class _Reading:
    """What a load gathers across modules on this rank."""

    storage: Storage
    verify: bool
    io_threads: int
    read_options: ReadOptions
    strict: bool | Literal["requested"]
    report: KeyReport = field(default_factory=KeyReport)
    not_loaded: dict[str, list[str]] = field(default_factory=dict)
    objects: dict[tuple[str, int], Any] = field(default_factory=dict)
    bytes_read: int = 0


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
    read_options: ReadOptions = ReadOptions(),
) -> LoadResult:
    """Fill this rank's shards from a checkpoint saved under any layouts; every rank calls it.

    Each rank reads only the stored bytes that overlap its own boxes. With `strict=True`, any
    missing (requested, not stored), unexpected (stored, not requested) or mismatched key raises
    `KeyMismatchError` listing them per module on every rank; with "requested" (what megatron's
    loader does by default), only missing and mismatched keys do; otherwise matching keys load.
    The differences come back in `LoadResult.report`. With `verify`, every byte read is checked
    against its crc32c: a partial read widens to the whole blocks it touches, or to the whole
    shard when the shard has no blocks. Each rank reads up to `io_threads` files at once, each in
    file order, issuing reads as `read_options` say. Floating-point tensors are cast from the
    stored dtype; see docs/megatron.md for factories, flat slices and padded vocabularies.
    """
    comm = comm or default_comm()
    storage = storage or open_storage(path)
    check_layouts(layouts, comm.size)
    check_storage_serves(storage, comm, os.fspath(path))
    source = f"{os.fspath(path)}/{MANIFEST_PATH}"
    blob = root_decides(comm, lambda: _checked_manifest(storage, os.fspath(path)), otherwise=ManifestError)
    manifest = Manifest.from_bytes(blob, source=source)

    run = Collective(comm)
    local: dict[str, ModuleShards] = {}
    try:
        local = flatten_state(state, layouts, comm.rank)
    except MimoCkptError as exc:
        run.fail(exc)
    reading = _Reading(storage, verify, io_threads, read_options, strict)
    for name in sorted(layouts):
        mc = comm.subgroup(list(layouts[name].ranks))
        if mc is not None:
            _load_module(run, mc, name, layouts[name], manifest.modules.get(name),
                         local.get(name, ModuleShards([], [], [])), reading)
    run.unpack(comm.all_gather_bytes(run.payload(None)))
    run.finish([])
    log.debug("rank %d read %d bytes", comm.rank, reading.bytes_read)

    result = {name: _loaded_state(module_state, local[name].leaves, name, reading.objects)
              for name, module_state in state.items()}
    return LoadResult(state=result, report=reading.report, not_loaded=reading.not_loaded,
                      metadata=dict(manifest.metadata))


def _checked_manifest(storage: Storage, source: str) -> bytes:
    blob = read_manifest_bytes(storage, source)
    Manifest.from_bytes(blob, source=f"{source}/{MANIFEST_PATH}")
    return blob


def _load_module(run: Collective, mc: Comm, name: str, layout: ModuleLayout, entry: ModuleEntry | None,
                 shards: ModuleShards, reading: _Reading) -> None:
    """One module, collective over its ranks: agree on the keys, then read this rank's boxes."""
    unusable = _unusable_layout_bound(entry, layout)
    if entry is not None:
        shards, bound, extra = _without_unusable_optional(shards, entry, unusable)
        if bound or extra:
            reading.not_loaded[name] = bound + extra
        if bound and mc.rank == 0:
            warnings.warn(
                f"module {name!r}: layout-bound state {bound} was not loaded: it was saved "
                f"under another layout than {layout.describe()} (or dropped by a reshard)",
                LayoutChangedWarning, stacklevel=3,
            )
    share_bytes = reading.read_options.sharing(isinstance(reading.storage, LocalStorage))
    sharing = share_bytes > 0 and mc.size > 1
    asked = {
        "tensors": sorted({(t.key, t.meta().dtype, t.global_shape, t.allow_shape_mismatch) for t in shards.tensors}),
        "objects": sorted({(o.key, o.global_shape) for o in shards.objects}),
        "boxes": sorted({_request(t) for t in shards.tensors}) if sharing else [],
    }
    gathered = run.unpack(mc.all_gather_bytes(run.payload(asked)))
    if gathered is None:
        return
    module_report, skipped = check_keys(
        name, entry,
        sorted({(k, d, tuple(s), flexible) for g in gathered for k, d, s, flexible in g["tensors"]}),
        sorted({(k, tuple(s)) for g in gathered for k, s in g["objects"]}),
        unused_ok=unusable,
    )
    reading.report.merge(module_report)
    if module_report.fatal(reading.strict):
        run.fail(KeyMismatchError(module_report))
    if run.failure is not None or entry is None:
        return
    requests = {r: [(k, tuple(o), tuple(s), d, n) for k, o, s, d, n in g["boxes"] if k not in skipped]
                for r, g in enumerate(gathered)}
    messages = plan_shared_reads(requests, share_bytes) if sharing else []
    received = {box for m in messages if mc.rank in m.members and m.owner != mc.rank for box in m.boxes}
    try:
        fault_point("load.read", run.comm.rank)
        reading.bytes_read += _read_module(name, entry, shards, skipped, reading, received)
    except (MimoCkptError, OSError) as exc:
        run.fail(exc)
    if messages and run.unpack(mc.all_gather_bytes(run.payload(None))) is not None:  # every owner read its part
        _share(mc, messages, shards)
    with torch.no_grad():
        for twin, loaded in shards.twins:
            if loaded.key not in skipped:
                twin.data.copy_(loaded.data)


def _request(t: TensorShard) -> Request:
    """What identifies a box a rank loads, among its module's ranks."""
    return (t.key, tuple(t.box.offset), tuple(t.box.shape), str(t.data.dtype), t.data.numel() * t.data.element_size())


@torch.no_grad()
def _share(mc: Comm, messages: list[Message], shards: ModuleShards) -> None:
    """Each message's boxes, packed by its owner and broadcast over the module's ranks (a group
    every one of them has; ranks outside the message's members take no copy), unpacked into place."""
    mine: dict[Request, list[TensorShard]] = {}
    for t in shards.tensors:
        mine.setdefault(_request(t), []).append(t)
    device = next((t.data.device for t in shards.tensors), torch.device("cpu"))
    for m in messages:
        buf = torch.empty(m.nbytes, dtype=torch.uint8, device=device)
        if mc.rank == m.owner:
            pos = 0
            for box in m.boxes:
                buf[pos: pos + box[4]].copy_(mine[box][0].data.contiguous().reshape(-1).view(torch.uint8))
                pos += box[4]
        mc.broadcast_tensor(buf, m.owner)
        if mc.rank == m.owner or mc.rank not in m.members:
            continue
        pos = 0
        for box in m.boxes:
            for t in mine[box]:
                t.data.copy_(buf[pos: pos + box[4]].view(t.data.dtype).view(t.data.shape))
            pos += box[4]


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
def _read_module(name: str, entry: ModuleEntry, shards: ModuleShards, bad: set[str], reading: _Reading,
                 received: Collection[Request] = ()) -> int:
    """Fill this rank's boxes of one module (but those another rank reads and sends: `received`)
    and its objects; returns the bytes read."""
    storage, verify, io_threads, loaded_objects = reading.storage, reading.verify, reading.io_threads, reading.objects
    metas, targets, casts = [], [], []
    for t in shards.tensors:
        if t.key in bad or (received and _request(t) in received):
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
            target = torch.empty(box.shape, dtype=to_torch(stored.dtype, key=t.key), device=t.data.device)
            casts.append((target, t.data[tuple(slice(o, o + n) for o, n in zip(box.relative_to(t.box), box.shape))]))
        metas.append(meta)
        targets.append((target, box))
    on_host = [i for i, (target, _) in enumerate(targets) if not staged_through_chunks(target)]
    on_device = [i for i, (target, _) in enumerate(targets) if staged_through_chunks(target)]
    items = plan_module_load(name, entry, [metas[i] for i in on_host])
    nbytes = fill_tensors(storage, items, [targets[i] for i in on_host], verify=verify, threads=io_threads,
                          options=reading.read_options)
    if on_device:
        def plan(requests: Sequence[tuple[int, Box]]) -> list[ReadItem]:
            return plan_module_load(name, entry, [replace(metas[on_device[k]], box=box) for k, box in requests])
        nbytes += fill_device_tensors(storage, plan, [targets[i] for i in on_device], verify=verify,
                                      threads=io_threads, options=reading.read_options)
    for scratch, view in casts:
        view.copy_(scratch)
    for obj in shards.objects:
        if obj.key in bad:
            continue
        try:
            value = stored_object_value(entry.objects[obj.key].values, obj.global_offset)
        except KeyError:
            raise ManifestError(
                f"module {name!r}, object {obj.key!r}: no value stored for offset {list(obj.global_offset)}"
            ) from None
        loaded_objects[(name, id(obj))] = decode(value, f"module {name!r}, object {obj.key!r}")
    return nbytes
