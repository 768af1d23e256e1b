"""Offline reshard: rewrite some modules of a checkpoint for new layouts, share the rest.

`plan_reshard` is pure: from a manifest and new layouts it decides every new box, file and byte
range. `run_reshard` streams the bytes under a memory budget, links the untouched modules' files,
and commits the new manifest last.
"""

from __future__ import annotations

import ctypes
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from typing import Iterator, Mapping

from mimo_ckpt.io import commit
from mimo_ckpt.format.checksums import ShardSums
from mimo_ckpt.errors import LayoutError, StorageError
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.plan.load import plan_tensor_reads
from mimo_ckpt.format.manifest import MANIFEST_PATH, Manifest, ModuleEntry, StoredTensor
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.model.rank_state import is_layout_bound, same_grid
from mimo_ckpt.plan.save import FilePlan, ModuleSavePlan, plan_module_save
from mimo_ckpt.model.shard import ObjectMeta, TensorMeta
from mimo_ckpt.model.split import SplitSpec, box_for_rank, uneven_levels
from mimo_ckpt.io.storage import Storage, open_storage
from mimo_ckpt.io.stream import Budget, StreamItem, share_file, write_streamed_file

__all__ = ["ModuleReshard", "plan_reshard", "run_reshard"]


@dataclass(frozen=True, slots=True)
class ModuleReshard:
    module: str
    old: ModuleLayout
    new: ModuleLayout
    plan: ModuleSavePlan
    read_bytes: int
    """Bytes read from the source (spans of every planned read)."""
    write_bytes: int
    dropped_objects: tuple[str, ...]
    """Layout-bound (per-rank) objects that the new layout cannot use."""


def plan_reshard(manifest: Manifest, layouts: Mapping[str, ModuleLayout], *, file_tag: str = "",
                 allow_uneven: bool = False) -> dict[str, ModuleReshard]:
    """New boxes for each module in `layouts`, replayed from the stored split hints.

    Refused (LayoutError naming module, tensor and dimension) where the replay would silently
    not be what the new layout trains with:

    - a tp, ep or pp cut that leaves a remainder (megatron builds those parts from equal pieces),
      unless `allow_uneven`, which splits them with `sharding.balanced_part`. dp and cp cut only
      ZeRO optimizer state, balanced-uneven by design, and are never refused;
    - tp or pp growing from 1 while no tensor's hint names it. A dim of size 1 cuts nothing, so
      the hints cannot tell which tensors it must cut (the layer axis, the column or row of a
      linear): every tensor would land whole on every rank. Where the hints name the dim,
      tensors they do not name stay replicated, as megatron replicates layer norms. Growing dp,
      cp or ep from 1 replicates: weights are replicas along dp and cp, and along ep all but the
      expert weights, which stay whole (one stored copy, still read correctly by any layout).
    """
    out = {}
    for name, layout in sorted(layouts.items()):
        entry = manifest.modules.get(name)
        if entry is None:
            raise LayoutError(f"module {name!r} is not in the checkpoint (it has {sorted(manifest.modules)})")
        _check_placeable(name, entry, layout)
        if not allow_uneven:
            _check_even(name, entry, layout)
        metas: dict[int, list[TensorMeta]] = {rank: [] for rank in layout.ranks}
        for key, stored in entry.tensors.items():
            split = _split_of(stored)
            for rank in layout.ranks:
                box = box_for_rank(split, stored.global_shape, layout, rank)
                metas[rank].append(TensorMeta(key, stored.dtype, stored.global_shape, box, True))
        changed = not same_grid(entry.layout, layout)
        dropped = tuple(sorted(k for k in entry.objects if changed and is_layout_bound(k)))
        objects = {layout.rank_offset: [
            ObjectMeta(k, o.global_shape, offset, True, value)
            for k, o in entry.objects.items() if k not in dropped for offset, value in o.values.items()
        ]}
        plan = plan_module_save(name, layout, metas, objects, file_tag=file_tag)
        plan = replace(plan, tensors={k: (dtype, shape, _kept_hints(split, _split_of(entry.tensors[k]), layout))
                                      for k, (dtype, shape, split) in plan.tensors.items()})
        read_bytes = sum(
            r.end - r.begin
            for f in plan.files for item in f.items
            for r in plan_tensor_reads(name, item.key, entry.tensors[item.key], item.box)
        )
        write_bytes = sum(f.items[-1].end if f.items else len(f.prefix) for f in plan.files)
        out[name] = ModuleReshard(name, entry.layout, layout, plan, read_bytes, write_bytes, dropped)
    return out


# Dims that must cut some tensor once they are > 1; see plan_reshard.
_PLACED_BY_HINTS = ("tp", "pp")


def _split_of(stored: StoredTensor) -> SplitSpec:
    return stored.split or tuple(() for _ in stored.global_shape)


def _kept_hints(new: SplitSpec, old: SplitSpec, layout: ModuleLayout) -> SplitSpec:
    """The hints of the new boxes, plus the source's hints for dims of size 1 in the new layout
    (which cut nothing now, but say how to cut again: tp2 -> tp1 -> tp2 round-trips)."""
    out = []
    for now, before in zip(new, old):
        kept = {p for p in before if p in now or getattr(layout, p) == 1}
        out.append(tuple(p for p in before if p in kept) + tuple(p for p in now if p not in before))
    return tuple(out)


def _check_placeable(module: str, entry: ModuleEntry, layout: ModuleLayout) -> None:
    for p in _PLACED_BY_HINTS:
        old, new = getattr(entry.layout, p), getattr(layout, p)
        if new == 1 or old > 1 or not entry.tensors:
            continue
        if any(p in dims for t in entry.tensors.values() for dims in _split_of(t)):
            continue
        keys = sorted(entry.tensors)
        shown = ", ".join(repr(k) for k in keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        raise LayoutError(
            f"module {module!r}: {p} grows from 1 to {new}, but no stored split hint names {p} (a size-1 dim "
            f"cuts nothing when saving), so the hints cannot place it: tensors {shown} would be copied "
            f"whole to every {p} rank. Load the checkpoint with mimo_ckpt.load under the new layout instead, "
            f"where the model's own shards say how each tensor is cut"
        )


def _check_even(module: str, entry: ModuleEntry, layout: ModuleLayout) -> None:
    for key, stored in sorted(entry.tensors.items()):
        for axis, (size, dims) in enumerate(zip(stored.global_shape, _split_of(stored))):
            for p, extent, parts in uneven_levels(dims, size, layout):
                raise LayoutError(
                    f"module {module!r}, tensor {key!r}: dimension {axis} ({extent} of {size} elements at "
                    f"the {p} cut) does not split into {p}={parts} equal parts ({extent} % {parts} = "
                    f"{extent % parts}); allow uneven splits (allow_uneven=True; the CLI's --allow-uneven) to cut it remainder-first"
                )


def _write_file(src: Storage, dst: Storage, module: str, file_plan: FilePlan, entry: ModuleEntry,
                budget: Budget, bar: Progress | None = None) -> list[ShardSums]:
    items = [StreamItem(i.key, entry.tensors[i.key], i.box) for i in file_plan.items]
    return write_streamed_file(src, dst, module, file_plan.path, file_plan.prefix, items, budget, bar)


def _write_file_in_worker(src_url: str, dst_url: str, module: str, file_plan: FilePlan,
                          entry: ModuleEntry, budget: Budget) -> list[ShardSums]:
    return _write_file(open_storage(src_url), open_storage(dst_url), module, file_plan, entry, budget)


def _die_with_parent() -> None:
    """In a worker: be killed when the reshard that forked it dies (no orphan blocks forever)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers end when the pool's pipe closes
        return
    if os.getppid() == 1:  # the parent died before prctl took effect (under a subreaper: see below)
        os._exit(1)
    # PDEATHSIG follows the thread that forked the worker: the pool forks from the thread that
    # submits, the reshard's own. Should that thread end first, the pool's closed pipe ends the
    # worker at its next task.


_PR_SET_PDEATHSIG = 1


def run_reshard(
    src_url: str, dst_url: str, manifest: Manifest, plans: Mapping[str, ModuleReshard], *,
    budget: Budget, save_id: str, workers: int = 1, progress: bool = True,
) -> Manifest:
    """Write the resharded checkpoint at `dst_url` through the commit protocol; returns its
    (committed) manifest. New files carry `save_id` in their names (plan with
    `file_tag=save_id`); the untouched modules' files are shared under their source names."""
    src, dst = open_storage(src_url), open_storage(dst_url)
    with commit.Write(dst, MANIFEST_PATH, dst_url, save_id) as write:
        for name, rp in plans.items():
            untagged = [f.path for f in rp.plan.files if not commit.created_by(f.path, save_id)]
            if untagged:
                raise StorageError(f"module {name!r}: planned file {untagged[0]} does not carry the save id "
                                   f"{save_id} (plan with file_tag=save_id)")
        shared = sorted({s.file for name, entry in manifest.modules.items() if name not in plans
                         for t in entry.tensors.values() for s in t.shards})
        write.announce(shared)
        fault_point("offline.start", 0)
        for path in shared:
            share_file(src, dst, path, budget)
        modules = dict(manifest.modules)
        modules.update(_write_modules(src_url, dst_url, src, dst, manifest, plans, budget, workers, progress))
        world = max([manifest.world_size] + [m.layout.rank_offset + m.layout.size for m in modules.values()])
        result = Manifest(world_size=world, modules=modules, metadata=manifest.metadata)
        fault_point("offline.commit", 0)
        write.publish_manifest(result.to_bytes())
    return result


def _written_files(
    src_url: str, dst_url: str, src: Storage, dst: Storage, module: str, files: tuple[FilePlan, ...],
    entry: ModuleEntry, budget: Budget, workers: int, bar: Progress | None,
) -> Iterator[tuple[FilePlan, list[ShardSums]]]:
    """Each file of a module written, with its items' checksums, in plan order: in this process,
    or by `workers` forked ones."""
    if workers <= 1:
        for f in files:
            yield f, _write_file(src, dst, module, f, entry, budget, bar)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_die_with_parent) as pool:
        futures = [(f, pool.submit(_write_file_in_worker, src_url, dst_url, module, f, entry, budget)) for f in files]
        for f, fut in futures:
            sums = fut.result()
            if bar:
                bar.advance(sum(i.end - i.begin for i in f.items))
            yield f, sums


def _write_modules(
    src_url: str, dst_url: str, src: Storage, dst: Storage, manifest: Manifest, plans: Mapping[str, ModuleReshard],
    budget: Budget, workers: int, progress: bool,
) -> dict[str, ModuleEntry]:
    total = sum(i.end - i.begin for p in plans.values() for f in p.plan.files for i in f.items)  # as advanced
    bar = Progress("reshard", total) if progress else None
    out = {}
    written = 0
    for name, rp in plans.items():
        entry = manifest.modules[name]
        crcs: dict[str, list[ShardSums]] = {}  # file -> its items' checksums (streaming.write_streamed_file)
        for f, sums in _written_files(src_url, dst_url, src, dst, name, rp.plan.files, entry, budget, workers, bar):
            crcs[f.path] = sums
            written += 1
            if written == 1:
                fault_point("offline.write", 0)
        out[name] = rp.plan.module_entry(rp.new, crcs)
    if bar:
        bar.close()
    return out
