"""Verified loads by the piece size of checked direct reads (`ReadOptions.checked_read_bytes`).

A/B in one process world per rank count: the state of bench/save_load.py is saved once,
then every round loads it under the same and the resharded layouts, cold and warm, with each
piece size, in a shuffled order (the same on all ranks). A piece size of 0 is the single read
followed by one checksum pass over the target. Warm loads follow an untimed load of the same
scenario; cold loads follow a drop of the page cache. Times are for the slowest rank.

    .venv/bin/python bench/checked_reads.py --rounds 6 --json results.json
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_main(args: dict[str, Any]) -> dict[str, list[float]]:
    from mimo_ckpt import ReadOptions
    from bench import save_load as bench

    w = bench.World(args)
    save, _ = bench._ours_ops(w)
    loads = {p: bench._ours_ops(w, read_options=ReadOptions(checked_read_bytes=p))[1] for p in args["pieces"]}
    path = os.path.join(args["dir"], f"checked-reads-w{w.size}")
    w.quiesce()
    save(path)
    times: dict[str, list[float]] = {}
    cases = [(p, sc, cold) for p in args["pieces"] for sc in ("same", "reshard") for cold in (True, False)]
    for rnd in range(args["rounds"]):
        for piece, scenario, cold in random.Random(rnd).sample(cases, len(cases)):
            load = loads[piece]
            if cold:
                w.drop_cache(path)
            else:
                load(path, scenario)
                w.quiesce()
            t = w.timed(lambda: load(path, scenario))
            if not w.verify(scenario):
                raise RuntimeError(f"wrong values after a {scenario} load with pieces of {piece} bytes")
            times.setdefault(f"{scenario} {'cold' if cold else 'warm'} {piece >> 10} KiB", []).append(t)
    w.dist.barrier()
    if w.rank == 0:
        shutil.rmtree(path)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--total-gb", type=float, default=2.0)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--pieces", type=int, nargs="+", default=[0, 1 << 20, 8 << 20], help="bytes; 0: one read")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--dir", default="/work/bench-tmp")
    p.add_argument("--json")
    opts = p.parse_args()
    sys.path.insert(0, REPO)
    from tests.harness.local_world import run_local_world
    from bench import save_load as bench
    from bench.report import write_json

    os.makedirs(opts.dir, exist_ok=True)
    info = bench.machine_info(opts.dir)
    results: dict[str, Any] = {"machine": info, "options": vars(opts), "worlds": {}}
    for world in opts.ranks:
        args = {"hidden": bench.hidden_for(opts.total_gb * 1e9), "warm": False, "dir": opts.dir,
                "rounds": opts.rounds, "pieces": opts.pieces, "device": info["disk_device"],
                "fs_type": info["fs_type"], "profile": False}
        times = run_local_world(world, "bench.checked_reads:rank_main", args, timeout=1800,
                                extra_env={"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})[0]
        results["worlds"][str(world)] = {k: {"times": v, "best_s": min(v), "median_s": statistics.median(v)}
                                         for k, v in sorted(times.items())}
        for case, r in results["worlds"][str(world)].items():
            print(f"{world} ranks  {case:<24} best {r['best_s']:.3f} s  median {r['median_s']:.3f} s", flush=True)
    write_json(results, opts.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
