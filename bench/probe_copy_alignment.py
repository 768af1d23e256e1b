"""Page-cache read bandwidth into a torch buffer, by the file offset's alignment.

Why shard data starts on a 64-byte boundary (mimo_ckpt.format.safetensors.HEADER_ALIGN): a read served
from the page cache is a copy from the cached page into the caller's buffer, and the copy slows
down when file offset and buffer differ in their alignment within a cache line. torch's CPU
allocator hands out 64-byte aligned buffers, so a file offset that is a multiple of 64 lines up.
The file is read once first, so every timed read is a warm copy; medians over rounds are given.

    .venv/bin/python bench/probe_copy_alignment.py --dir /work/bench-tmp --mb 256 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OFFSETS = (0, 8, 16, 24, 32, 48, 64, 4096, 4096 + 24)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".")
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    from bench.report import write_json

    n = args.mb << 20
    path = os.path.join(args.dir, "probe-copy-alignment.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * (args.mb + 5))
    buf = torch.empty(n, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    fd = os.open(path, os.O_RDONLY)
    gbps: dict[int, list[float]] = {o: [] for o in OFFSETS}
    try:
        os.preadv(fd, [view], 0)  # into the page cache
        for _ in range(args.rounds):
            for offset in OFFSETS:
                t0 = time.perf_counter()
                os.preadv(fd, [view], offset)
                gbps[offset].append(n / (time.perf_counter() - t0) / 1e9)
    finally:
        os.close(fd)
        os.unlink(path)
    result = {
        "buffer_address_mod_4096": buf.data_ptr() % 4096,
        "median_gbps": {str(o): round(statistics.median(v), 2) for o, v in gbps.items()},
        "best_gbps": {str(o): round(max(v), 2) for o, v in gbps.items()},
        "options": vars(args),
    }
    print(f"buffer address mod 4096: {result['buffer_address_mod_4096']}")
    print(f"{'file offset':>12} {'median GB/s':>12} {'best GB/s':>10}")
    for o in OFFSETS:
        print(f"{o:>12} {result['median_gbps'][str(o)]:>12} {result['best_gbps'][str(o)]:>10}")
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
