"""Process groups of each module's grid, created the same way on every rank.

`torch.distributed.new_group` is collective over the whole world, so every rank creates every group
of every module in one fixed order, members or not; each rank keeps the groups it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mimo_ckpt.errors import LayoutError
from mimo_ckpt.model.layout import PARALLEL_DIMS, ModuleLayout

__all__ = ["GROUP_DIMS", "peer_rank_lists", "ModuleGroups", "as_layout", "build_module_groups"]

# Groups a module needs, by name: ranks that differ only in these dimensions.
GROUP_DIMS: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "cp": ("cp",),
    "ep": ("ep",),
    "pp": ("pp",),
    "dp": ("dp",),
    "dp_cp": ("dp", "cp"),
    "module": PARALLEL_DIMS,
}


def peer_rank_lists(layout: ModuleLayout, dims: tuple[str, ...]) -> list[list[int]]:
    """Partition of the module's ranks into groups whose members differ only in `dims`, each sorted."""
    fixed = [d for d in PARALLEL_DIMS if d not in dims]
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in layout.ranks:
        coords = layout.coords(rank)
        groups.setdefault(tuple(coords[d] for d in fixed), []).append(rank)
    return sorted(groups.values())


@dataclass(slots=True)
class ModuleGroups:
    """One module's layout and this rank's process groups in it (None where the rank is outside)."""

    name: str
    layout: ModuleLayout
    rank: int
    groups: dict[str, Any] = field(default_factory=dict)
    members: dict[str, list[int]] = field(default_factory=dict)
    """Sorted global ranks of each of this rank's groups; group rank i is members[i]."""

    @property
    def is_member(self) -> bool:
        return self.layout.contains(self.rank)

    @property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)

    def group(self, name: str) -> Any:
        return self.groups[name]


def as_layout(name: str, layout_or_grid: Any) -> ModuleLayout:
    """A ModuleLayout from a ModuleLayout or a megatron-core HyperCommGrid."""
    if isinstance(layout_or_grid, ModuleLayout):
        return layout_or_grid
    if hasattr(layout_or_grid, "dim_names") and hasattr(layout_or_grid, "rank_offset"):
        return ModuleLayout.from_hyper_comm_grid(layout_or_grid)
    raise LayoutError(
        f"module {name!r}: expected a ModuleLayout or HyperCommGrid, got {type(layout_or_grid).__name__}"
    )


def build_module_groups(layouts: Mapping[str, Any], backend: str | None = None) -> dict[str, ModuleGroups]:
    """Groups of every module this rank belongs to; collective over the default world group."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, ModuleGroups] = {}
    for name in sorted(layouts):
        layout = as_layout(name, layouts[name])
        if layout.rank_offset + layout.size > world:
            raise LayoutError(
                f"module {name!r}: layout {layout.describe()} needs {layout.rank_offset + layout.size} "
                f"ranks but the world has {world}"
            )
        mine = ModuleGroups(name, layout, rank)
        for group_name, dims in GROUP_DIMS.items():
            for members in peer_rank_lists(layout, dims):
                group = dist.new_group(members, backend=backend)
                if rank in members:
                    mine.groups[group_name], mine.members[group_name] = group, members
        if mine.is_member:
            out[name] = mine
    return out

