import os
import sys
import threading
import traceback

import pytest

from mimo_ckpt import MimoCkptError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_threads(world, fn):
    """Run fn(comm, rank) on every rank of a ThreadWorld; returns per-rank results or raises."""
    results, errors = [None] * world.size, {}

    def go(rank):
        try:
            results[rank] = fn(world.comm(rank), rank)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[rank] = exc
            errors[f"tb{rank}"] = traceback.format_exc()
            if not isinstance(exc, MimoCkptError):  # raised mid-collective: free the others
                world.abort()

    threads = [threading.Thread(target=go, args=(r,)) for r in range(world.size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, {k: v for k, v in errors.items() if isinstance(k, int)}


@pytest.fixture
def threads():
    return run_threads
