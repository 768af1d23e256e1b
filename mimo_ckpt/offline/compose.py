"""A MIMO checkpoint made of modules taken from other checkpoints, each as it is stored: its
files shared under their names (hard links where source and target share a filesystem, else
streamed copies), its manifest entry copied. `mimo-ckpt compose` and `mimo-ckpt split` (one
module into a checkpoint of its own). Nothing is re-encoded, and every source is only read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from mimo_ckpt.errors import LayoutError, ManifestError
from mimo_ckpt.format.manifest import MANIFEST_PATH, Manifest, ModuleEntry
from mimo_ckpt.io import commit
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.faults import fault_point
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.io.storage import open_storage
from mimo_ckpt.io.stream import Budget, share_file

__all__ = ["ModuleSource", "plan_compose", "run_compose", "COMPOSED_FROM"]

COMPOSED_FROM = "composed_from"
"""Manifest metadata of a composed checkpoint: module -> the checkpoint it came from."""
CARRIED_METADATA = ("hf",)
"""Source metadata keyed by module that moves with the module (interop.hf's imported configs)."""


@dataclass(frozen=True)
class ModuleSource:
    """Module `module` of the checkpoint at `url`."""

    module: str
    url: str


def plan_compose(sources: list[ModuleSource], manifests: Mapping[str, Manifest]) -> Manifest:
    """The composed manifest (pure): each source module's entry as stored. Refuses a module named
    twice or missing in its source."""
    modules: dict[str, ModuleEntry] = {}
    origin: dict[str, str] = {}
    for src in sources:
        if src.module in modules:
            raise LayoutError(f"module {src.module!r} is taken from both {origin[src.module]} and {src.url}")
        entry = manifests[src.url].modules.get(src.module)
        if entry is None:
            raise ManifestError(f"module {src.module!r} is not in {src.url} "
                                f"(it has {sorted(manifests[src.url].modules)})")
        modules[src.module], origin[src.module] = entry, src.url
    if not modules:
        raise LayoutError("no module to compose")
    world = max(m.layout.rank_offset + m.layout.size for m in modules.values())
    metadata: dict = {COMPOSED_FROM: origin}
    for field in CARRIED_METADATA:
        carried = {m: by_module[m] for m, url in origin.items()
                   if isinstance(by_module := manifests[url].metadata.get(field), dict) and m in by_module}
        if carried:
            metadata[field] = carried
    return Manifest(world_size=world, modules=modules, metadata=metadata)


def run_compose(sources: list[ModuleSource], dst_url: str, *, budget: Budget, progress: bool = True) -> Manifest:
    """Write the composed checkpoint at `dst_url` through the commit protocol; returns its manifest."""
    storages = {url: open_storage(url) for url in dict.fromkeys(s.url for s in sources)}
    manifests = {url: read_manifest(storage, url) for url, storage in storages.items()}
    result = plan_compose(sources, manifests)
    files = [(src.url, path) for src in sources
             for path in sorted({s.file for t in result.modules[src.module].tensors.values() for s in t.shards})]
    dst = open_storage(dst_url)
    with commit.Write(dst, MANIFEST_PATH, dst_url) as write:
        write.announce([path for _, path in files])  # source names, not ours
        fault_point("offline.start", 0)
        total = sum(m.nbytes for m in result.modules.values())
        bar = Progress("compose", total) if progress else None
        for i, (url, path) in enumerate(files):
            share_file(storages[url], dst, path, budget)
            if bar:
                bar.advance(storages[url].size(path) or 0)
            if i == 0:
                fault_point("offline.write", 0)
        if bar:
            bar.close()
        fault_point("offline.commit", 0)
        write.publish_manifest(result.to_bytes())
    return result
