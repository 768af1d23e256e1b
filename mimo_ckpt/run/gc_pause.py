"""Pausing Python's cyclic garbage collector while a planner builds a large result."""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["collector_paused"]

_lock = threading.Lock()
_depth = 0
_enable_on_exit = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """No collector passes inside (usable as a decorator).

    At scale a planner allocates 10^5 to 10^6 objects that all outlive the call and form no
    cycles. The passes their allocation triggers walk them and the rest of the heap and free
    nothing (docs/performance.md, "Planning at 16,384 simulated ranks"). Uses nest
    and overlap across threads (ranks run as threads in tests): the collector comes back when
    the last one ends, and only if it was on when the first began.
    """
    global _depth, _enable_on_exit
    with _lock:
        if _depth == 0:
            _enable_on_exit = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _enable_on_exit:
                gc.enable()
