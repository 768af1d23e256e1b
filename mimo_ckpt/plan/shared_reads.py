"""Reads shared by replicas: a box that several ranks of a module load (DP replicas of a weight)
is read from storage by one of them and broadcast to the rest (pure planning).

Every rank tells its module peers which boxes it loads; a box asked for by a set of ranks (the
same key, box and dtype) gets one owner in that set, chosen so that each rank of the set reads
about the same number of bytes; the owner's loaded tensors then go out in messages of up to
`chunk_bytes`, one owner after another, in an order every rank computes alike. The messages are
broadcast over the module's ranks, a group they all have (groups of just the members would have
to be created by every process of the job); ranks outside a message's members drop it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Request", "Message", "plan_shared_reads"]

Request = tuple[str, tuple[int, ...], tuple[int, ...], str, int]
"""(key, box offset, box shape, target dtype, bytes): one box a rank loads."""


@dataclass(frozen=True, slots=True)
class Message:
    """Boxes that `owner` reads and broadcasts to `members` (module ranks, ascending, owner included)."""

    members: tuple[int, ...]
    owner: int
    boxes: tuple[Request, ...]

    @property
    def nbytes(self) -> int:
        return sum(r[4] for r in self.boxes)


def plan_shared_reads(requests: Mapping[int, Sequence[Request]], chunk_bytes: int) -> list[Message]:
    """The broadcasts that replace reads of boxes asked for by more than one rank. A rank reads a
    box itself unless a message has it as a member but not as the owner."""
    askers: dict[Request, set[int]] = defaultdict(set)
    for rank, boxes in requests.items():
        for r in boxes:
            askers[r].add(rank)
    by_members: dict[tuple[int, ...], list[Request]] = defaultdict(list)
    for r, ranks in askers.items():
        if len(ranks) > 1:
            by_members[tuple(sorted(ranks))].append(r)
    out = []
    for members in sorted(by_members):
        load = dict.fromkeys(members, 0)
        owned: dict[int, list[Request]] = defaultdict(list)
        for r in sorted(by_members[members], key=lambda r: (-r[4], r[0], r[1])):  # largest first
            owner = min(members, key=lambda m: (load[m], m))
            load[owner] += r[4]
            owned[owner].append(r)
        for owner in members:
            chunk: list[Request] = []
            for r in sorted(owned[owner], key=lambda r: (r[0], r[1])):
                if chunk and sum(c[4] for c in chunk) + r[4] > chunk_bytes:
                    out.append(Message(members, owner, tuple(chunk)))
                    chunk = []
                chunk.append(r)
            if chunk:
                out.append(Message(members, owner, tuple(chunk)))
    return out
