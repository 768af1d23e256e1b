"""Moving device tensors to and from storage through a few reused host chunks.

A save copies a file's device tensors to the host a chunk at a time on a copy stream, running a
few chunks ahead of the writer, so the disk never waits for staging and host memory stays at the
chunks' size; each chunk is checksummed on another thread while it is written. A load reads into
chunks on several threads, each copying its chunk to the device while it reads the next.

Chunks are pinned when CUDA is in use (device copies then run asynchronously and at full speed;
torch's pinned-memory cache keeps them from one save to the next). Without CUDA the same code runs
with plain host chunks and synchronous copies, which is how it is tested on CPU. Sync save and
load synchronize the device first, so their side streams see everything the caller's streams
wrote; an async save orders its copies after an event recorded at its call.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from mimo_ckpt.format.checksums import BlockHasher, ShardSums
from mimo_ckpt.model.box import Box, span_in, split_for_span
from mimo_ckpt.model.dtypes import RAW_BY_ITEMSIZE

__all__ = ["CHUNK_BYTES", "DEPTH", "staged_through_chunks", "SideCopies", "flat_bytes", "StagedFile", "DevicePiece",
           "plan_device_pieces", "load_pieces"]

CHUNK_BYTES = 32 << 20
"""Host chunk size: large enough that each copy and write is efficient, small enough that a
few per file in flight cost little memory."""
DEPTH = 4
"""Chunks per file (a save) or per reading thread (a load) in flight at once."""


def staged_through_chunks(tensor: torch.Tensor) -> bool:
    """Whether a tensor's bytes move through host chunks: it lives on a device."""
    return tensor.device.type != "cpu"


class SideCopies:
    """Copies of tensor bytes on one side stream of `device`, ordered after `after` (by default,
    after what this thread's stream has queued); plain synchronous copies off CUDA. Also hands
    out host chunks, pinned on CUDA."""

    def __init__(self, device: torch.device | None, chunk_bytes: int = CHUNK_BYTES,
                 after: "torch.cuda.Event | None" = None) -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.chunk_bytes = chunk_bytes
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        if self.stream is not None:  # the copies read what the caller's stream left
            if after is not None:
                self.stream.wait_event(after)
            else:
                self.stream.wait_stream(torch.cuda.current_stream(device))

    def chunk(self, nbytes: int | None = None) -> torch.Tensor:
        return torch.empty(nbytes or self.chunk_bytes, dtype=torch.uint8, pin_memory=self.cuda)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """`dst` (bytes) <- `src`'s bytes in C order, made contiguous on the side stream too."""
        if self.stream is None:
            dst.copy_(flat_bytes(src))
            return
        with torch.cuda.stream(self.stream):
            dst.copy_(flat_bytes(src), non_blocking=True)

    def after_caller(self) -> None:
        """Order the copies issued from now on after what the calling thread's stream has queued."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    def keep_until_copied(self, tensor: torch.Tensor) -> None:
        """Keep the caching allocator from reusing `tensor`'s memory before the copies issued so
        far have read it (it was made on another stream)."""
        if self.stream is not None:
            tensor.record_stream(self.stream)

    def mark(self) -> torch.cuda.Event | None:
        """An event after the copies issued so far (None when they are synchronous)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in C order, as a flat uint8 tensor on its device (a view when contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


@dataclass(frozen=True, slots=True)
class _Part:
    """Bytes [lo, hi) of item `item`, at `at` in its chunk."""

    item: int
    lo: int
    hi: int
    at: int


def _chunk_parts(lengths: Sequence[int], chunk_bytes: int) -> list[list[_Part]]:
    """The items' bytes, back to back, cut into chunks of `chunk_bytes` (the last shorter)."""
    chunks: list[list[_Part]] = [[]]
    room = chunk_bytes
    for index, length in enumerate(lengths):
        lo = 0
        while lo < length:
            if room == 0:
                chunks.append([])
                room = chunk_bytes
            take = min(room, length - lo)
            chunks[-1].append(_Part(index, lo, lo + take, chunk_bytes - room))
            lo += take
            room -= take
    return [c for c in chunks if c]


class StagedFile:
    """A file's items, back to back, as host chunks: `chunks()` yields each once its device copy
    is done, with copies for the next `depth` chunks already issued; `sums()` then gives each
    item's checksums, computed on a thread of its own as the chunks go by. A yielded chunk may be
    reused once the next one is asked for (the `Storage.write_file` contract)."""

    def __init__(self, tensors: Sequence[torch.Tensor], *, block_bytes: int, chunk_bytes: int = CHUNK_BYTES,
                 depth: int = DEPTH) -> None:
        self._sources = [flat_bytes(t) for t in tensors]
        device = next((t.device for t in tensors if staged_through_chunks(t)), None)
        self._copies = SideCopies(device, chunk_bytes)
        self._plan = _chunk_parts([s.numel() for s in self._sources], chunk_bytes)
        self._hashers = [BlockHasher(block_bytes) for _ in tensors]
        self._depth = max(1, depth)

    @property
    def count(self) -> int:
        """How many chunks `chunks()` yields."""
        return len(self._plan)

    def chunks(self) -> Iterator[memoryview]:
        free: list[torch.Tensor] = []
        flight: deque[tuple[torch.Tensor, list[_Part], torch.cuda.Event | None]] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="mimo-ckpt-crc") as hasher:
            for parts in self._plan:
                flight.append(self._issue(parts, free))
                if len(flight) == self._depth:
                    yield from self._hand_on(flight.popleft(), free, hasher)
            while flight:
                yield from self._hand_on(flight.popleft(), free, hasher)

    def _issue(self, parts: list[_Part], free: list[torch.Tensor]) -> tuple[torch.Tensor, list[_Part], Any]:
        chunk = free.pop() if free else self._copies.chunk()
        for p in parts:
            self._copies.copy(chunk[p.at : p.at + p.hi - p.lo], self._sources[p.item][p.lo : p.hi])
        return chunk, parts, self._copies.mark()

    def _hand_on(self, flying: tuple[torch.Tensor, list[_Part], Any], free: list[torch.Tensor],
                 hasher: ThreadPoolExecutor) -> Iterator[memoryview]:
        """Yield a chunk once copied, hashing it while it is written; then it is free again."""
        chunk, parts, copied = flying
        if copied is not None:
            copied.synchronize()
        view = chunk[: parts[-1].at + parts[-1].hi - parts[-1].lo].numpy()
        hashed = hasher.submit(self._hash, view, parts)
        yield memoryview(view)
        hashed.result()
        free.append(chunk)

    def _hash(self, view: Any, parts: list[_Part]) -> None:
        for p in parts:
            self._hashers[p.item].update(view[p.at : p.at + p.hi - p.lo])

    def sums(self) -> list[ShardSums]:
        return [h.sums() for h in self._hashers]


@dataclass(frozen=True, slots=True)
class DevicePiece:
    """A piece of target `request`: its `box` fills bytes [lo, hi) of that contiguous tensor,
    read through a chunk at offset `at`."""

    request: int
    box: Box
    lo: int
    hi: int
    at: int


def plan_device_pieces(
    targets: Sequence[tuple[int, Box, int]], chunk_bytes: int,
) -> list[list[DevicePiece]]:
    """Cut each target (request index, box, itemsize) into pieces contiguous in it, packed into
    chunks of `chunk_bytes` in order (small targets share a chunk, each piece aligned to
    `ALIGN` bytes so it can be viewed as its dtype). Pure."""
    batches: list[list[DevicePiece]] = [[]]
    used = 0
    for request, box, itemsize in targets:
        for piece in split_for_span(box, box, max(1, chunk_bytes // itemsize)):
            lo, hi = span_in(piece, box)
            nbytes = (hi - lo) * itemsize
            at = -(-used // ALIGN) * ALIGN
            if at + nbytes > chunk_bytes and batches[-1]:
                batches.append([])
                at = 0
            batches[-1].append(DevicePiece(request, piece, lo * itemsize, hi * itemsize, at))
            used = at + nbytes
    return [b for b in batches if b]


ALIGN = 64
_RAW_TORCH = {size: getattr(torch, name) for size, name in RAW_BY_ITEMSIZE.items()}


Read = Callable[[Sequence[DevicePiece], Sequence[torch.Tensor]], int]


def load_pieces(
    batches: Sequence[Sequence[DevicePiece]], targets: Sequence[torch.Tensor],
    reader: Callable[[], AbstractContextManager[Read]], *, threads: int, chunk_bytes: int = CHUNK_BYTES,
    depth: int = DEPTH,
) -> int:
    """Fill each contiguous target from its pieces. Each of `threads` threads takes a run of
    batches in order and enters `reader()` for a `read(pieces, host_views)` that fills host views
    (one per piece, shaped as the piece, raw dtype) and returns the bytes it read; each chunk is
    then copied to its device on the thread's own stream while the thread reads its next chunk.
    Returns the bytes read, once every copy is done."""
    device = next((t.device for t in targets if staged_through_chunks(t)), None)
    flats = [t.detach().reshape(-1).view(torch.uint8) for t in targets]

    def worker(mine: Sequence[Sequence[DevicePiece]]) -> int:
        copies = SideCopies(device, chunk_bytes)
        ring: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        total = 0
        with reader() as read:
            for batch in mine:
                if len(ring) < depth:
                    chunk = copies.chunk(max(chunk_bytes, _span(batch)))
                else:
                    chunk, copied = ring.popleft()
                    if copied is not None:
                        copied.synchronize()
                    if chunk.numel() < _span(batch):
                        chunk = copies.chunk(_span(batch))
                views = [_piece_view(chunk, p, targets[p.request]) for p in batch]
                total += read(batch, views)
                for p in batch:
                    copies.copy(flats[p.request][p.lo : p.hi], chunk[p.at : p.at + p.hi - p.lo])
                ring.append((chunk, copies.mark()))
        for _, copied in ring:
            if copied is not None:
                copied.synchronize()
        return total

    n = max(1, min(threads, len(batches)))
    shares = [batches[len(batches) * i // n : len(batches) * (i + 1) // n] for i in range(n)]  # each in file order
    if len(shares) == 1:
        return worker(shares[0])
    with ThreadPoolExecutor(len(shares), thread_name_prefix="mimo-ckpt-load") as pool:
        futures = [pool.submit(worker, share) for share in shares]
    return sum(f.result() for f in futures)


def _span(batch: Sequence[DevicePiece]) -> int:
    return max(p.at + p.hi - p.lo for p in batch)


def _piece_view(chunk: torch.Tensor, piece: DevicePiece, target: torch.Tensor) -> torch.Tensor:
    raw = _RAW_TORCH[target.element_size()]
    return chunk[piece.at : piece.at + piece.hi - piece.lo].view(raw).view(piece.box.shape)
