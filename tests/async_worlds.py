"""Async saves while the toy model trains on the same ranks (see tests/test_async_save.py)."""

from __future__ import annotations

import os

from mimo_ckpt import AsyncSaver
from tests.optim_worlds import layouts
from tests.fixtures.toy_training import ToyRun


def train_while_saving(args: dict) -> dict:
    """Save every `every` steps in the background; training collectives run meanwhile on the
    default group, the saver's on its own. Then each checkpoint loads into a fresh run and must
    equal the weights at the moment its save was called."""
    lay = layouts("disjoint")
    run = ToyRun(lay, shard_state=True)
    saver = AsyncSaver(timeout_s=60)
    saved, handles = {}, []
    for step in range(args["steps"]):
        run.step(step)
        if step % args["every"] == 0:
            path = os.path.join(args["root"], f"step{step}")
            handles.append(saver.save(run.state(), path, layouts=lay, metadata={"step": step}))
            saved[path] = run.weights()
    for h in handles:
        h.wait()
    out = {"blocking": [h.blocking_seconds for h in handles], "match": {}}
    for path, weights in saved.items():
        fresh = ToyRun(lay, shard_state=True, seed=99)
        fresh.load(path)
        out["match"][os.path.basename(path)] = fresh.weights() == weights
    return out
