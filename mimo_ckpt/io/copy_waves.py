"""An async save's device-to-host copies, issued in waves, so that the optimizer step need not
wait for all of them.

The background thread issues the copies a few waves ahead of the side stream. When the training
loop reaches its optimizer step (`release`) before the last wave is issued, the rest is taken at
once: its tail, up to `spare_bytes`, cloned on the training stream into one device buffer (device
memory is far faster than the link to the host) and copied to the host from there, its head issued
straight away. The training stream then waits only for the copies issued before its step, not for
those from the clone. With `spare_bytes=0` the step waits for every copy.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Sequence

import torch

from mimo_ckpt.io.staging import SideCopies, flat_bytes

__all__ = ["CopyWaves", "WAVE_BYTES", "AHEAD", "waves_of", "cloned_tail"]

WAVE_BYTES = 256 << 20
"""Bytes a wave copies: about 5 ms over a PCIe 5 link. The optimizer step waits for the waves in
flight, so less is better; the background thread, which shares the GIL with the training loop,
must issue the next wave before the side stream runs dry, so more is better."""
AHEAD = 2
"""Waves in flight on the side stream at once."""


def waves_of(lengths: Sequence[int], wave_bytes: int) -> list[tuple[int, int]]:
    """Consecutive index ranges [start, stop) of about `wave_bytes` each (a longer item alone)."""
    waves, start, size = [], 0, 0
    for i, n in enumerate(lengths):
        size += n
        if size >= wave_bytes:
            waves.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(lengths):
        waves.append((start, len(lengths)))
    return waves


def cloned_tail(lengths: Sequence[int], spare_bytes: int) -> int:
    """Where the longest tail of `lengths` that fits in `spare_bytes` starts."""
    start, size = len(lengths), 0
    while start > 0 and size + lengths[start - 1] <= spare_bytes:
        start -= 1
        size += lengths[start]
    return start


class CopyWaves:
    """Copies (host destination, device source) in order through `copies`, a wave at a time.
    `run` issues them from the background thread; `release` from the training thread takes the
    rest; `wait_copied` waits until every destination holds its bytes."""

    def __init__(self, copies: SideCopies, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                 wave_bytes: int = WAVE_BYTES, ahead: int = AHEAD) -> None:
        self._copies = copies
        self._pairs = list(pairs)
        self._lengths = [dst.numel() for dst, _ in self._pairs]
        self._waves = deque(waves_of(self._lengths, wave_bytes))
        self._ahead = ahead
        self._lock = threading.Lock()
        self._next = 0
        """The first pair not issued yet."""
        self._sources_read: torch.cuda.Event | None = None
        """After every copy that reads a source in place; set once all are issued."""
        self._copied: torch.cuda.Event | None = None
        """After every copy; set once all are issued."""
        self._all_issued = threading.Event()
        self._ordered = False
        if not self._pairs:
            self._all_issued.set()

    def issue_wave(self) -> torch.cuda.Event | None | bool:
        """Issue the next wave; an event after it (None off CUDA), or False when none is left."""
        with self._lock:
            if not self._waves or self._next == len(self._pairs):
                return False
            start, stop = self._waves.popleft()
            for dst, src in self._pairs[start:stop]:
                self._copies.copy(dst, src)
            self._next = stop
            mark = self._copies.mark()
            if stop == len(self._pairs):
                self._finish(mark, mark)
            return mark

    def run(self) -> None:
        """Issue every wave, `ahead` in flight, until all are issued or `release` took the rest."""
        in_flight: deque[torch.cuda.Event | None] = deque()
        try:
            while (mark := self.issue_wave()) is not False:
                in_flight.append(mark)
                if len(in_flight) >= self._ahead and (oldest := in_flight.popleft()) is not None:
                    oldest.synchronize()  # releases the GIL while the side stream catches up
        except BaseException:
            with self._lock:  # the save fails; nobody may wait for copies that will not come
                if not self._all_issued.is_set():
                    self._next = len(self._pairs)
                    self._finish(None, None)
            raise

    def release(self, spare_bytes: int) -> None:
        """The caller's stream is about to change the sources: take what is not issued yet (its
        tail, up to `spare_bytes`, through a device clone made on that stream) and make that stream
        wait for the copies that still read the sources. The host does not wait."""
        with self._lock:
            if self._next < len(self._pairs):
                rest = self._pairs[self._next:]
                split = cloned_tail(self._lengths[self._next:], spare_bytes)
                for dst, src in rest[:split]:
                    self._copies.copy(dst, src)
                sources_read = self._copies.mark()
                if split < len(rest):
                    self._copy_through_clone(rest[split:])
                self._next = len(self._pairs)
                self._waves.clear()
                self._finish(sources_read, self._copies.mark())
            if self._ordered:
                return
            self._ordered = True
        if self._sources_read is not None and not self._sources_read.query():
            torch.cuda.current_stream(self._sources_read.device).wait_event(self._sources_read)

    def _copy_through_clone(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Clone the sources on the caller's stream into one buffer, then copy from it on the side."""
        sources = [flat_bytes(src) for _, src in pairs]
        clone = torch.empty(sum(s.numel() for s in sources), dtype=torch.uint8, device=sources[0].device)
        pos, pieces = 0, []
        for s in sources:
            pieces.append(clone[pos: pos + s.numel()])
            pieces[-1].copy_(s)
            pos += s.numel()
        self._copies.after_caller()
        for (dst, _), piece in zip(pairs, pieces):
            self._copies.copy(dst, piece)
        self._copies.keep_until_copied(clone)

    def _finish(self, sources_read: torch.cuda.Event | None, copied: torch.cuda.Event | None) -> None:
        self._sources_read, self._copied = sources_read, copied
        self._all_issued.set()

    def issued(self) -> bool:
        return self._all_issued.is_set()

    def copied(self) -> bool:
        """Whether every destination holds its bytes (without waiting)."""
        return self._all_issued.is_set() and (self._copied is None or self._copied.query())

    def wait_copied(self) -> None:
        """Block until every copy is issued and done."""
        self._all_issued.wait()
        if self._copied is not None:
            self._copied.synchronize()
