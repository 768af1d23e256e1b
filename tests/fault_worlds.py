"""Crash tests on a local gloo world: a rank is killed at a named point of a save or load."""

from __future__ import annotations

import os
import time

import torch.distributed as dist

import mimo_ckpt
from mimo_ckpt import ModuleLayout
from mimo_ckpt.run.manager import CheckpointManager
from examples.synthetic_state import rank_state

WORLD = 4
LAYOUTS = {"images": ModuleLayout(tp=2), "language": ModuleLayout(tp=2, rank_offset=2)}


def state_of(rank: int, fill: float | None = None) -> dict:
    return {m: rank_state(m, l, rank, fill=fill) for m, l in LAYOUTS.items() if l.contains(rank)}


def save_then_fault(args: dict) -> dict:
    """Commit step 1, then run step 2 (a save, or a load of step 1) with a fault armed."""
    rank = dist.get_rank()
    comm = mimo_ckpt.TorchComm.with_timeout(args["timeout"])
    manager = CheckpointManager(args["root"], comm=comm)
    manager.save(state_of(rank), 1, layouts=LAYOUTS)
    os.environ["MIMO_CKPT_FAULT"] = args["fault"]
    os.environ["MIMO_CKPT_HANG_S"] = str(args["timeout"] * 3)
    start = time.monotonic()
    try:
        if args["fault"].startswith("load."):
            manager.load_latest(state_of(rank, fill=0.0), layouts=LAYOUTS)
        else:
            manager.save(state_of(rank), 2, layouts=LAYOUTS)
    except mimo_ckpt.MimoCkptError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}
