"""Run a function on N local CPU processes joined by gloo on 127.0.0.1.

`run_local_world(4, "pkg.mod:fn", {"x": 1})` starts 4 processes; each initialises
torch.distributed (gloo), calls `fn(args)` and sends back its JSON-able result. Used by the demo,
the benchmarks and the multi-process tests. Arguments and results travel as JSON files.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

__all__ = ["run_local_world", "free_port", "bytes_read"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_world(
    nranks: int, target: str, args: Any = None, *, timeout: float = 900.0, quiet: bool = True,
    extra_env: dict[str, str] | None = None, allow_failures: bool = False,
) -> list[Any]:
    """Results of `target(args)` on each of `nranks` gloo ranks, in rank order.

    With `quiet`, the ranks' output is kept and shown only if a rank fails; otherwise it goes to
    this process's stdout/stderr. Raises RuntimeError naming the failed rank. With
    `allow_failures` (for crash tests), every rank runs to its end and a rank that exits with an
    error gives `{"exit_code": code}` in place of a result.
    """
    with tempfile.TemporaryDirectory(prefix="mimo-world-") as tmp:
        args_file = os.path.join(tmp, "args.json")
        with open(args_file, "w") as f:
            json.dump(args, f)
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   WORLD_SIZE=str(nranks), **(extra_env or {}))
        env.setdefault("OMP_NUM_THREADS", "1")
        procs, logs = [], []
        for rank in range(nranks):
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+") if quiet else None
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.harness.local_world", target, args_file,
                 os.path.join(tmp, f"result{rank}.json")],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=log, stderr=subprocess.STDOUT if quiet else None,
            ))
        deadline = time.monotonic() + timeout
        failed: int | None = None
        while any(p.poll() is None for p in procs):
            bad = [] if allow_failures else [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad or time.monotonic() > deadline:
                failed = bad[0] if bad else -1
                break
            time.sleep(0.05)
        if failed is None and not allow_failures:
            failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
        if failed is not None:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            what = f"rank {failed} failed" if failed >= 0 else f"timed out after {timeout:.0f} s"
            detail = ""
            if quiet:
                shown = failed if failed >= 0 else 0
                logs[shown].seek(0)
                detail = f"\n--- rank {shown} output ---\n" + logs[shown].read()[-8000:]
            raise RuntimeError(f"local world running {target}: {what}{detail}")
        results = []
        for rank in range(nranks):
            if procs[rank].returncode != 0:
                results.append({"exit_code": procs[rank].returncode})
                continue
            with open(os.path.join(tmp, f"result{rank}.json")) as f:
                results.append(json.load(f))
        for log in logs:
            if log:
                log.close()
        return results


def _rank_main(target: str, args_file: str, result_file: str) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    module_name, func_name = target.split(":")
    with open(args_file) as f:
        args = json.load(f)
    try:
        result = getattr(importlib.import_module(module_name), func_name)(args)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # skip process-group teardown, which would wait for peers
    with open(result_file, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(*sys.argv[1:4]))


def bytes_read() -> int:
    """Bytes this process has read through read(2) and kin (`rchar` of /proc/self/io): files and
    pipes, not the sockets gloo uses."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])
