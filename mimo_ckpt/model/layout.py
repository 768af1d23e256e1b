"""Module layouts: the parallel grid of one module, and how ranks map onto it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from mimo_ckpt.errors import LayoutError

__all__ = ["PARALLEL_DIMS", "ModuleLayout"]

# Megatron's parallel dimensions. `order` lists them fastest-varying first, as Megatron's
# `order="tp-cp-ep-pp-dp"` and HyperCommGrid's `dim_names` do.
PARALLEL_DIMS: tuple[str, ...] = ("tp", "cp", "ep", "pp", "dp")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleLayout:
    """The grid one module runs on: sizes of each parallel dimension, their order, first rank.

    The module owns ranks `rank_offset .. rank_offset + size - 1`. Within them, the dimension named
    first in `order` varies fastest.
    """

    tp: int = 1
    """Tensor-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    ep: int = 1
    """Expert-parallel size (an orthogonal grid dimension here)."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size."""
    order: tuple[str, ...] = field(default=PARALLEL_DIMS)
    """Permutation of PARALLEL_DIMS, fastest-varying first."""
    rank_offset: int = 0
    """First global rank of the module."""

    def __post_init__(self) -> None:
        for dim in PARALLEL_DIMS:
            size = getattr(self, dim)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise LayoutError(f"layout size {dim}={size!r} must be a positive int")
        order = tuple(self.order)
        if sorted(order) != sorted(PARALLEL_DIMS):
            raise LayoutError(
                f"layout order {list(order)} must be a permutation of {list(PARALLEL_DIMS)}"
            )
        object.__setattr__(self, "order", order)
        if not isinstance(self.rank_offset, int) or self.rank_offset < 0:
            raise LayoutError(f"layout rank_offset={self.rank_offset!r} must be an int >= 0")

    @property
    def size(self) -> int:
        return math.prod(getattr(self, dim) for dim in PARALLEL_DIMS)

    @property
    def ranks(self) -> range:
        return range(self.rank_offset, self.rank_offset + self.size)

    def contains(self, rank: int) -> bool:
        return self.rank_offset <= rank < self.rank_offset + self.size

    def coords(self, rank: int) -> dict[str, int]:
        """Grid coordinates of a global rank of this module."""
        if not self.contains(rank):
            raise LayoutError(f"rank {rank} is outside layout {self.describe()}")
        index = rank - self.rank_offset
        out: dict[str, int] = {}
        for dim in self.order:
            size = getattr(self, dim)
            out[dim] = index % size
            index //= size
        return out

    def rank_of(self, **coords: int) -> int:
        """Global rank at the given coordinates; coordinates not named are 0."""
        unknown = set(coords) - set(PARALLEL_DIMS)
        if unknown:
            raise LayoutError(f"unknown layout dimensions {sorted(unknown)}")
        index, stride = 0, 1
        for dim in self.order:
            size, coord = getattr(self, dim), coords.get(dim, 0)
            if not 0 <= coord < size:
                raise LayoutError(f"coordinate {dim}={coord} outside 0..{size - 1}")
            index += coord * stride
            stride *= size
        return self.rank_offset + index

    def describe(self) -> str:
        """`[tp2 pp2 @ranks 4-7]`: the sizes above 1 in order (fastest first), and the ranks."""
        sizes = " ".join(f"{dim}{getattr(self, dim)}" for dim in self.order if getattr(self, dim) > 1) or "tp1"
        last = self.rank_offset + self.size - 1
        ranks = f"rank {last}" if self.size == 1 else f"ranks {self.rank_offset}-{last}"
        return f"[{sizes} @{ranks}]"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {dim: getattr(self, dim) for dim in PARALLEL_DIMS}
        out["order"] = list(self.order)
        out["rank_offset"] = self.rank_offset
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModuleLayout":
        if not isinstance(data, Mapping):
            raise LayoutError(f"layout must be a JSON object, got {type(data).__name__}")
        allowed = set(PARALLEL_DIMS) | {"order", "rank_offset"}
        extra = set(data) - allowed
        if extra:
            raise LayoutError(f"unknown layout fields {sorted(extra)}")
        try:
            return cls(**{k: tuple(v) if k == "order" else v for k, v in data.items()})
        except TypeError as exc:
            raise LayoutError(f"invalid layout {dict(data)}: {exc}") from exc

    def to_hyper_comm_grid(self, backend: str | None = None) -> Any:
        """The equivalent megatron-core `HyperCommGrid` (needs WORLD_SIZE or an initialised group)."""
        from megatron.core.hyper_comm_grid import HyperCommGrid

        shape = [getattr(self, dim) for dim in self.order]
        return HyperCommGrid(shape, list(self.order), rank_offset=self.rank_offset, backend=backend)

    @classmethod
    def from_hyper_comm_grid(cls, grid: Any) -> "ModuleLayout":
        """Layout of a megatron-core `HyperCommGrid`; dimensions it lacks get size 1."""
        names = list(grid.dim_names)
        unknown = [n for n, s in zip(names, grid.shape) if n not in PARALLEL_DIMS and s != 1]
        if unknown:
            raise LayoutError(f"HyperCommGrid dimensions {unknown} have no ModuleLayout equivalent")
        sizes = {n: int(s) for n, s in zip(names, grid.shape) if n in PARALLEL_DIMS}
        order = [n for n in names if n in PARALLEL_DIMS]
        order += [d for d in PARALLEL_DIMS if d not in order]
        return cls(**sizes, order=tuple(order), rank_offset=int(grid.rank_offset))
