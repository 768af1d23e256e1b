"""Progress of long byte-moving work: bytes, rate and ETA on a terminal, silent when piped."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Call `advance(nbytes)` as work is done and `close()` once it is all done (the last line
    then reads 100%, whatever headers or rounding the advances left out)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0
        self.start = self._last = time.monotonic()
        self.interval = interval

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = min(100.0, 100.0 * self.done / self.total) if self.total else 100.0
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        self.stream.write(
            f"\r{self.label}: {human_bytes(self.done)}/{human_bytes(self.total)} ({pct:.0f}%) "
            f"{human_bytes(rate)}/s ETA {eta_text}   "
        )
        self.stream.flush()

    def close(self) -> None:
        self.done = self.total
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
