"""State bound to one rank of one layout, such as random number generator states.

It is an object sharded over the module's ranks, under a key that starts with `rank_state.`:
grid `(layout.size,)`, offset the rank's index in the module. It is saved like any object; when
the module's grid changes (a size, or the order of the dimensions larger than 1), `load` leaves
these targets as they were and warns, and `reshard` drops them: a TP rank's generator state means
nothing to a DP rank of another layout.
"""

from __future__ import annotations

import base64
from typing import Any, Mapping

from mimo_ckpt.errors import ShardError
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.model.shard import ObjectShard

__all__ = ["RANK_STATE_PREFIX", "LayoutChangedWarning", "is_layout_bound", "rng_state", "restore_rng_state", "same_grid"]

RANK_STATE_PREFIX = "rank_state."


def is_layout_bound(key: str) -> bool:
    return key.startswith(RANK_STATE_PREFIX)


class LayoutChangedWarning(UserWarning):
    """A module's layout changed since the save, so its layout-bound state was not loaded."""


def same_grid(a: ModuleLayout, b: ModuleLayout) -> bool:
    """Whether per-rank state of `a` still fits `b` (the grid may move to other ranks)."""
    def grid(layout: ModuleLayout) -> tuple[Any, ...]:
        return tuple((d, getattr(layout, d)) for d in layout.order if getattr(layout, d) > 1)

    return grid(a) == grid(b)


def _encode(t: Any) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _decode(text: str) -> Any:
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(layout: ModuleLayout, rank: int, trackers: Mapping[str, Any] | None = None,
              key: str = RANK_STATE_PREFIX + "rng") -> ObjectShard:
    """This rank's torch CPU (and current CUDA device's) generator states, bound to `layout`.
    `trackers`: more named generator states (uint8 tensors), e.g. megatron's CUDA RNG tracker's."""
    import torch

    if not is_layout_bound(key):
        raise ShardError(f"layout-bound key {key!r} must start with {RANK_STATE_PREFIX!r}")
    value: dict[str, Any] = {"cpu": _encode(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        value["cuda"] = _encode(torch.cuda.get_rng_state())
    value["trackers"] = {name: _encode(t) for name, t in sorted((trackers or {}).items())}
    return ObjectShard(key, value, (layout.size,), (rank - layout.rank_offset,))


def restore_rng_state(value: Any) -> dict[str, Any]:
    """Set the generators from what `load` returned for an `rng_state` shard; returns the
    tracker states it was given, as uint8 tensors."""
    import torch

    torch.set_rng_state(_decode(value["cpu"]))
    if "cuda" in value and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(value["cuda"]))
    return {name: _decode(text) for name, text in value.get("trackers", {}).items()}
