"""Checkpoints, hashes and forked writers for the commit-protocol and crash tests (ranks as threads)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
import traceback
from typing import Callable

import mimo_ckpt
from mimo_ckpt import ModuleLayout, ThreadWorld
from tests.conftest import run_threads
from examples.synthetic_state import check_rank_state, rank_state

WORLD = 2
LAYOUTS = {"images": ModuleLayout(tp=2), "language": ModuleLayout(tp=2)}
RESHARDED = {"images": ModuleLayout(dp=2), "language": ModuleLayout(tp=2)}


def states(layouts: dict, rank: int, fill: float | None = None) -> dict:
    return {m: rank_state(m, l, rank, fill=fill) for m, l in layouts.items() if l.contains(rank)}


def save_world(path, layouts=LAYOUTS, **kwargs) -> None:
    def fn(comm, rank):
        mimo_ckpt.save(states(layouts, rank), path, layouts=layouts, comm=comm, **kwargs)
    _, errors = run_threads(ThreadWorld(WORLD), fn)
    assert not errors, errors


def load_problems(path, layouts=LAYOUTS) -> list[str]:
    """Differences from the reference after a load under `layouts`; empty when bit-exact."""
    def fn(comm, rank):
        targets = states(layouts, rank, fill=float("nan"))
        result = mimo_ckpt.load(targets, path, layouts=layouts, comm=comm)
        return [p for m in targets for p in check_rank_state(m, layouts[m], rank, result.state[m])]
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert not errors, errors
    return [p for r in results for p in r]


def tree_hashes(root) -> dict[str, str]:
    """sha256 of every file under `root` (a symlink by its target, never followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = "link:" + os.readlink(full)
            else:
                with open(full, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_forked(fn: Callable[[], object], fault: str | None = None, timeout: float = 120.0) -> int | None:
    """Run `fn` in a forked child with `MIMO_CKPT_FAULT=fault`; its exit code (-9: killed,
    130: interrupted, 1: raised), or None when it ran past `timeout` (then it is killed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if fault:
                os.environ["MIMO_CKPT_FAULT"] = fault
            result = fn()
            code = result if isinstance(result, int) else 0
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # noqa: BLE001 - the parent reads the exit code
            traceback.print_exc()
        os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None
