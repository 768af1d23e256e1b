"""Loads with DP replicas: every rank reading what it loads, against replicas sharing reads.

    python -m bench.shared_reads --ranks 4 --mb 256 --rounds 3 --out docs/results/shared_reads.json

One module of `--mb` MiB of fp32 weights (TP on dim 0) is saved under TP2 and loaded under
TP1 x DP`ranks` (every rank loads the whole module) and under TP2 x DP`ranks/2`, each load with
the default ("own": each rank reads its boxes) and with `ReadOptions(share_bytes=64 MiB)` ("shared":
one rank of each replica group reads, gloo broadcasts), in alternating order per round. Before
each load: `sync` and, with root, `drop_caches`, so reads are cold. Reported per load: the slowest
rank's time from a barrier, and the bytes all ranks read as a multiple of the module's stored
bytes: from the filesystem (`rchar` of /proc/self/io), and from storage as mimo_ckpt counts them.

With `--s3` the checkpoint lives on an S3 server started on 127.0.0.1 (moto's, as the tests use),
where every read is a request to the server: the case sharing is for.

    python -m bench.shared_reads --ranks 4 --mb 64 --rounds 3 --s3
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
import uuid
from typing import Any

from bench.report import write_json
from tests.harness.local_world import bytes_read

LAYOUTS = {"tp1_dpN": lambda n: {"tp": 1, "dp": n}, "tp2_dpN/2": lambda n: {"tp": 2, "dp": n // 2}}

SHARE_BYTES = 64 << 20


def _holds_saved(shard: Any, rows: int) -> bool:
    """Saved values: 0 in the first half of the rows, 1 in the second (the TP2 ranks' boxes)."""
    import torch

    first = shard.global_offset[0]
    expected = (torch.arange(first, first + shard.data.shape[0]) >= rows // 2).float()[:, None]
    return torch.equal(shard.data, expected.expand_as(shard.data))


def world(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import mimo_ckpt
    from mimo_ckpt import ModuleLayout, ReadOptions, TensorShard

    from bench.save_load import BytesRead

    logger = logging.getLogger("mimo_ckpt")
    counted = BytesRead()
    logger.addHandler(counted)
    logger.setLevel(logging.DEBUG)
    rank, size = dist.get_rank(), dist.get_world_size()
    shape = (args["mb"] * 256, 1024)  # fp32 rows of 4 KiB

    def state(layout: ModuleLayout, empty: bool = False) -> dict[str, Any]:
        if not layout.contains(rank):
            return {}
        tp, rows = layout.coords(rank)["tp"], shape[0] // layout.tp
        box = torch.empty(rows, shape[1]) if empty else torch.full((rows, shape[1]), float(tp))
        return {"m": {"weight": TensorShard("weight", box, shape, (tp * rows, 0))}}

    path = args["path"]
    saved = ModuleLayout(tp=2)
    mimo_ckpt.save(state(saved), path, layouts={"m": saved})
    out: dict[str, list[dict[str, Any]]] = {}
    for name, make in LAYOUTS.items():
        layout = ModuleLayout(**make(size))
        for round_ in range(args["rounds"]):
            for share in ((False, True) if round_ % 2 == 0 else (True, False)):
                targets = state(layout, empty=True)
                if rank == 0:
                    os.sync()
                    if os.geteuid() == 0:
                        with open("/proc/sys/vm/drop_caches", "w") as f:
                            f.write("3\n")
                dist.barrier()
                counted.take()
                before, start = bytes_read(), time.perf_counter()
                mimo_ckpt.load(targets, path, layouts={"m": layout},
                               read_options=ReadOptions(share_bytes=SHARE_BYTES if share else 0))
                dist.barrier()
                seconds, read = time.perf_counter() - start, bytes_read() - before
                ok = all(_holds_saved(s["weight"], shape[0]) for s in targets.values())
                out.setdefault(f"{name} {'shared' if share else 'own'}", []).append(
                    {"seconds": seconds, "read": read, "storage_read": counted.take(), "ok": ok})
    return out


def main() -> None:
    from tests.harness.local_world import run_local_world

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None)
    p.add_argument("--s3", action="store_true", help="on a local S3 server instead of a directory")
    p.add_argument("--out")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        if args.s3:
            from tests.harness.s3_server import BUCKET, s3_server

            stack.enter_context(s3_server())
            path = f"s3://{BUCKET}/shared-reads-{uuid.uuid4().hex[:8]}/ckpt"
        else:
            path = os.path.join(tempfile.mkdtemp(dir=args.dir), "ckpt")
        results = run_local_world(args.ranks, "bench.shared_reads:world",
                                  {"path": path, "mb": args.mb, "rounds": args.rounds}, timeout=1800)
    stored = args.mb << 20
    summary = {}
    for case in results[0]:
        runs = [[r[case][i] for r in results] for i in range(args.rounds)]
        seconds = [max(x["seconds"] for x in run) for run in runs]
        read = [sum(x["read"] for x in run) / stored for run in runs]
        from_storage = [sum(x["storage_read"] for x in run) / stored for run in runs]
        summary[case] = {"best_s": min(seconds), "median_s": statistics.median(seconds),
                         "read_over_stored": statistics.median(read),
                         "storage_read_over_stored": statistics.median(from_storage),
                         "ok": all(x["ok"] for run in runs for x in run)}
        print(f"{case:22s} best {min(seconds):6.3f} s  median {statistics.median(seconds):6.3f} s  "
              f"read {statistics.median(read):4.2f}x stored (storage {statistics.median(from_storage):4.2f}x)  "
              f"ok {summary[case]['ok']}")
    write_json({"ranks": args.ranks, "mb": args.mb, "rounds": args.rounds, "s3": args.s3, "summary": summary,
                "runs": results}, args.out)


if __name__ == "__main__":
    main()
