"""Named points where a save or load can be made to die, for crash testing.

`MIMO_CKPT_FAULT="save.write@1,save.commit@0"` kills rank 1 with SIGKILL in the middle of writing its
data and rank 0 just before it commits the manifest. `save.write@1:hang` makes rank 1 hang there
instead (for `MIMO_CKPT_HANG_S` seconds, 60 by default) before it dies, and `save.write@1:int` sends it
SIGINT (the KeyboardInterrupt of a Ctrl-C). Offline writers (reshard, exports) are rank 0. Unset, a
point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["POINTS", "fault_point"]

POINTS = (
    "save.start",      # after the save id is agreed, before any data is written
    "save.write",      # halfway through this rank's data file
    "save.written",    # after this rank's data is durable, before checksums are gathered
    "save.commit",     # rank 0, before the manifest is written
    "save.committed",  # rank 0, after the manifest is written, before the ranks hear of it
    "load.read",       # before this rank reads its data
    "offline.start",   # reshard and exports: after the write began, before any data file
    "offline.write",   # after the first data file is written (torch_dist export: all of DCP's)
    "offline.commit",  # before the index is published
)


def fault_point(name: str, rank: int) -> None:
    spec = os.environ.get("MIMO_CKPT_FAULT")
    if not spec:
        return
    armed = spec.split(",")
    if f"{name}@{rank}:hang" in armed:
        time.sleep(float(os.environ.get("MIMO_CKPT_HANG_S", "60")))
        os.kill(os.getpid(), signal.SIGKILL)
    if f"{name}@{rank}:int" in armed:
        os.kill(os.getpid(), signal.SIGINT)
    if f"{name}@{rank}" in armed:
        os.kill(os.getpid(), signal.SIGKILL)
