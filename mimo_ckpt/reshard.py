"""Offline reshard: rewrite some modules of a checkpoint for new layouts, share the rest.

`plan_reshard` is pure: from a manifest and new layouts it decides every new box, file and byte
range. `run_reshard` streams the bytes under a memory budget, links the untouched modules' files,
and commits the new manifest last.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Mapping

from .errors import LayoutError, StorageError
from .layout import ModuleLayout
from .load_plan import plan_tensor_reads
from .manifest import MANIFEST_PATH, Manifest, ModuleEntry
from .progress import Progress
from .rank_state import is_layout_bound, same_grid
from .save_plan import FilePlan, ModuleSavePlan, plan_module_save
from .shard import ObjectMeta, TensorMeta
from .sharding import box_for_rank
from .storage import LocalStorage, Storage, open_storage
from .streaming import Budget, StreamItem, write_streamed_file

__all__ = ["ModuleReshard", "plan_reshard", "run_reshard", "parse_layout_arg"]


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


def parse_layout_arg(text: str, old: ModuleLayout | None) -> tuple[str, ModuleLayout]:
    """`images=tp1,dp2[,offset=0][,order=tp-cp-ep-pp-dp]` -> ("images", layout).

    Sizes not named are 1; offset and order default to the module's saved ones.
    """
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise LayoutError(f"--module {text!r}: expected NAME=tp1,dp2,...")
    sizes: dict[str, int] = {}
    offset = old.rank_offset if old else 0
    order = old.order if old else None
    for token in filter(None, spec.split(",")):
        if token.startswith(("offset=", "rank_offset=")):
            offset = _int_token(text, token.split("=", 1)[1])
        elif token.startswith("order="):
            order = tuple(token.split("=", 1)[1].split("-"))
        elif token[:2] in ("tp", "cp", "ep", "pp", "dp"):
            sizes[token[:2]] = _int_token(text, token[2:])
        else:
            raise LayoutError(f"--module {text!r}: unknown item {token!r} (use tpN, cpN, epN, ppN, dpN, offset=N, order=a-b-c-d-e)")
    kwargs = {"order": order} if order else {}
    return name, ModuleLayout(**sizes, rank_offset=offset, **kwargs)


def _int_token(text: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LayoutError(f"--module {text!r}: {value!r} is not an integer") from None


def plan_reshard(manifest: Manifest, layouts: Mapping[str, ModuleLayout]) -> dict[str, ModuleReshard]:
    out = {}
    for name, layout in sorted(layouts.items()):
        entry = manifest.modules.get(name)
        if entry is None:
            raise LayoutError(f"module {name!r} is not in the checkpoint (it has {sorted(manifest.modules)})")
        metas: dict[int, list[TensorMeta]] = {rank: [] for rank in layout.ranks}
        for key, stored in entry.tensors.items():
            split = stored.split or tuple(() for _ in stored.global_shape)
            for rank in layout.ranks:
                box = box_for_rank(split, stored.global_shape, layout, rank)
                metas[rank].append(TensorMeta(key, stored.dtype, stored.global_shape, box, True))
        changed = not same_grid(entry.layout, layout)
        dropped = tuple(sorted(k for k in entry.objects if changed and is_layout_bound(k)))
        objects = {layout.rank_offset: [
            ObjectMeta(k, o.global_shape, offset, True, value)
            for k, o in entry.objects.items() if k not in dropped for offset, value in o.values.items()
        ]}
        plan = plan_module_save(name, layout, metas, objects)
        read_bytes = sum(
            r.end - r.begin
            for f in plan.files for item in f.items
            for r in plan_tensor_reads(name, item.key, entry.tensors[item.key], item.box)
        )
        write_bytes = sum(f.items[-1].end if f.items else len(f.prefix) for f in plan.files)
        out[name] = ModuleReshard(name, entry.layout, layout, plan, read_bytes, write_bytes, dropped)
    return out


def _write_file(src: Storage, dst: Storage, module: str, file_plan: FilePlan, entry: ModuleEntry,
                budget: Budget, bar: Progress | None = None) -> list[int]:
    items = [StreamItem(i.key, entry.tensors[i.key], i.box) for i in file_plan.items]
    return write_streamed_file(src, dst, module, file_plan.path, file_plan.prefix, items, budget, bar)


def _write_file_in_worker(src_url: str, dst_url: str, module: str, file_plan: FilePlan,
                          entry: ModuleEntry, budget: Budget) -> list[int]:
    return _write_file(open_storage(src_url), open_storage(dst_url), module, file_plan, entry, budget)


def _share_file(src: Storage, dst: Storage, path: str, budget: Budget) -> None:
    if isinstance(src, LocalStorage) and isinstance(dst, LocalStorage):
        target = os.path.join(dst.root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(os.path.join(src.root, path), target)
        except OSError:
            shutil.copyfile(os.path.join(src.root, path), target)
        return
    size = src.size(path)
    if size is None:
        raise StorageError(f"{path}: missing in the source checkpoint")

    def chunks():
        buf = bytearray(budget.chunk_bytes)
        for start in range(0, size, len(buf)):
            view = memoryview(buf)[: min(len(buf), size - start)]
            src.read_into(path, start, view)
            yield view
    dst.write_file(path, chunks())


def run_reshard(
    src_url: str, dst_url: str, manifest: Manifest, plans: Mapping[str, ModuleReshard], *,
    budget: Budget, workers: int = 1, progress: bool = True,
) -> Manifest:
    """Write the resharded checkpoint at `dst_url`; returns its (committed) manifest."""
    src, dst = open_storage(src_url), open_storage(dst_url)
    if dst.size(MANIFEST_PATH) is not None:
        raise StorageError(f"{dst_url} already holds a committed checkpoint")
    modules = dict(manifest.modules)
    for name, entry in manifest.modules.items():
        if name in plans:
            continue
        for path in sorted({s.file for t in entry.tensors.values() for s in t.shards}):
            _share_file(src, dst, path, budget)

    total = sum(p.write_bytes for p in plans.values())
    bar = Progress("reshard", total) if progress else None
    for name, rp in plans.items():
        entry = manifest.modules[name]
        crcs: dict[str, list[int]] = {}
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                futures = [
                    (f, pool.submit(_write_file_in_worker, src_url, dst_url, name, f, entry, budget))
                    for f in rp.plan.files
                ]
                for f, fut in futures:
                    crcs[f.path] = fut.result()
                    if bar:
                        bar.advance(sum(i.end - i.begin for i in f.items))
        else:
            for f in rp.plan.files:
                crcs[f.path] = _write_file(src, dst, name, f, entry, budget, bar)
        modules[name] = rp.plan.module_entry(rp.new, crcs)
    if bar:
        bar.close()
    world = max([manifest.world_size] + [m.layout.rank_offset + m.layout.size for m in modules.values()])
    result = Manifest(world_size=world, modules=modules, metadata=manifest.metadata)
    blob = result.to_bytes()
    Manifest.from_bytes(blob, source="manifest being written")
    dst.commit_file(MANIFEST_PATH, blob, exclusive=True)
    return result
