"""The tunable sizes of a save and of a read, passed in (never module state a planner reads at
call time). The figures behind each default: docs/performance.md, "Machines and their measured
limits"."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Collection

from mimo_ckpt.errors import PlanError

__all__ = ["SaveOptions", "ReadOptions", "SHARE_BYTES"]

SHARE_BYTES = 64 << 20
"""Shared reads' message size where they are on by default."""


@dataclass(frozen=True, kw_only=True)
class SaveOptions:
    """How a save cuts files and checksums them. `part_bytes`, `max_parts` and `block_bytes`
    shape the bytes on disk, so every rank of a module must pass the same values: a save whose
    ranks disagree fails on every rank, naming the option and the ranks."""

    part_bytes: int = 128 << 20
    """A writer's boxes of a module go into up to `max_parts` files of at least this many bytes,
    written at once: one file written and fsynced is slower than several (probe_write_streams)."""
    max_parts: int = 4
    """The most files one writer writes for one module."""
    block_bytes: int = 1 << 20
    """Checksum block: a partial read verifies only the whole blocks it touches. Shards of at most
    this size get only their whole-shard crc."""

    def __post_init__(self) -> None:
        _check_sizes(self, lowest=1)

    def shaping(self) -> dict[str, int]:
        """The values that shape the bytes on disk (all of them), as ranks compare them."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How planned reads are issued; any values give the same bytes, only the speed differs."""

    min_run_bytes: int = 16 << 10
    """Runs at least this long are read straight into the target instead of through a span."""
    max_gap_bytes: int = 128 << 10
    """Runs at most this far apart in the file are read together, the gap into scratch: on a cold
    read, about what one more request to the disk costs."""
    max_gaps_bytes: int = 32 << 20
    """Scratch for the gaps of one read (and for the bytes a verified read reads only to hash them)."""
    max_iov: int = 1024
    """The most buffers one scattered read fills."""
    share_bytes: int | None = None
    """With a positive value, boxes that several ranks of a module load (DP replicas) are read from
    storage by one of them and broadcast to the others, in messages of up to this many bytes
    (plan.shared_reads), so each stored byte is read once; 0 turns it off. None (the default):
    `SHARE_BYTES` where reads cost (object stores), off on a filesystem, where one node's page
    cache already serves repeated reads and the broadcast is slower (docs/performance.md)."""
    checked_read_bytes: int = 1 << 20
    """Verified direct reads go in pieces of about this size (whole checksum blocks), each hashed
    right after its read while its bytes are still in the CPU's cache; 0: one read, then one pass
    (over the whole-shard crc when the read is the whole shard)."""

    def __post_init__(self) -> None:
        _check_sizes(self, lowest=0, exceptions={"max_iov": 1}, optional={"share_bytes"})

    def sharing(self, storage_is_local: bool) -> int:
        """The message size of shared reads from this storage (0: every rank reads its own)."""
        if self.share_bytes is None:
            return 0 if storage_is_local else SHARE_BYTES
        return self.share_bytes


def _check_sizes(options: SaveOptions | ReadOptions, *, lowest: int, exceptions: dict[str, int] | None = None,
                 optional: Collection[str] = ()) -> None:
    """Every field an integer (not a bool) of at least `lowest`, or its own bound in `exceptions`;
    the `optional` ones may be None."""
    for f in fields(options):
        value = getattr(options, f.name)
        if value is None and f.name in optional:
            continue
        low = (exceptions or {}).get(f.name, lowest)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise PlanError(f"{type(options).__name__}.{f.name} must be an integer >= {low}, got {value!r}")
