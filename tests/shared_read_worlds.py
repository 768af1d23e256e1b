"""Loads in which DP replicas share reads, on a gloo world (tests/test_shared_reads.py).

A checkpoint of two modules, each a few MB of weights cut by TP on dim 0, is saved once, then
loaded under layouts with DP replicas, each load twice: every rank reading what it loads
(the default) and replicas sharing reads (`ReadOptions(share_bytes=64 MiB)`), in alternating order.
Per load and rank: bytes read by the process (`rchar` of /proc/self/io, all reads of files), the
time from a barrier to the last rank's return, and the differences from the full-tensor reference.
"""

from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist

import torch

import mimo_ckpt
from mimo_ckpt import ModuleLayout, ReadOptions, TensorShard
from tests.harness.local_world import bytes_read

SAVED = {"images": ModuleLayout(tp=2), "language": ModuleLayout(tp=2, pp=2)}
LOADS = {  # name: layouts on the 4 ranks
    "images_dp4_language_tp2dp2": {"images": ModuleLayout(dp=4), "language": ModuleLayout(tp=2, dp=2)},
    "images_tp2dp2_language_dp2pp2": {"images": ModuleLayout(tp=2, dp=2), "language": ModuleLayout(pp=2, dp=2)},
}

SHARE_BYTES = 64 << 20


SHAPES = {"images": (512, 1024), "language": (768, 1024)}  # 2 MiB and 3 MiB of fp32


def _global(module: str) -> torch.Tensor:
    return torch.randn(SHAPES[module], generator=torch.Generator().manual_seed(len(module)))


def _state(layouts: dict[str, ModuleLayout], rank: int, fill: float | None = None) -> dict[str, Any]:
    """This rank's rows of each module's weight (TP on dim 0; replicas along DP and PP)."""
    out = {}
    for module, layout in layouts.items():
        if layout.contains(rank):
            tp, rows = layout.coords(rank)["tp"], SHAPES[module][0] // layout.tp
            box = _global(module)[tp * rows: (tp + 1) * rows].clone()
            if fill is not None:
                box.fill_(fill)
            out[module] = {"weight": TensorShard("weight", box, SHAPES[module], (tp * rows, 0))}
    return out


def _problems(layouts: dict[str, ModuleLayout], rank: int, loaded: dict[str, Any]) -> list[str]:
    want = _state(layouts, rank)
    return [m for m in want if not torch.equal(loaded[m]["weight"].data, want[m]["weight"].data)]


def _load(path: str, layouts: dict[str, ModuleLayout], share: bool) -> dict[str, Any]:
    rank = dist.get_rank()
    targets = _state(layouts, rank, fill=float("nan"))
    options = ReadOptions(share_bytes=SHARE_BYTES if share else 0)
    dist.barrier()
    before, start = bytes_read(), time.perf_counter()
    mimo_ckpt.load(targets, path, layouts=layouts, read_options=options)
    dist.barrier()
    seconds, read = time.perf_counter() - start, bytes_read() - before
    problems = _problems(layouts, rank, targets)
    return {"read": read, "seconds": seconds, "problems": problems}


def loads(args: dict[str, Any]) -> dict[str, Any]:
    path, rank = args["path"], dist.get_rank()
    mimo_ckpt.save(_state(SAVED, rank), path, layouts=SAVED)
    out: dict[str, Any] = {}
    for name, layouts in LOADS.items():
        runs = []
        for round_ in range(args["rounds"]):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            runs.append({("shared" if share else "own"): _load(path, layouts, share) for share in order})
        out[name] = runs
    return out
