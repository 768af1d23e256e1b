"""Write + fsync bandwidth of one process writing the same bytes as 1, 2 or 4 files at once.

Why a save splits a rank's share into several files (`SaveOptions.part_bytes`): on the
disks measured (docs/performance.md), one file written and fsynced reached about half the rate
of 4 files at once.
Also times one file written by 4 threads (pwrite of 16 MiB pieces), and 4 files with a crc32c of
every byte taken alongside (as a save does), to see what hashing costs when cores are few.
Each round runs every variant once, in a shuffled order, since the disk's speed drifts over
minutes; medians over rounds are what to compare.

    .venv/bin/python bench/probe_write_streams.py --dir /work/bench-tmp --gb 1 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import crc32c

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PIECE = 16 << 20


def _write(path: str, view: memoryview, threads: int = 1) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def piece(offset: int) -> None:
            part, pos = view[offset : offset + PIECE], offset
            while part:
                n = os.pwrite(fd, part, pos)
                part, pos = part[n:], pos + n
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(piece, range(0, len(view), PIECE)))
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: str, view: memoryview, count: int, hashed: bool = False) -> None:
    size = len(view) // count

    def one(i: int) -> None:
        part = view[i * size : (i + 1) * size]
        with ThreadPoolExecutor(1) as hasher:
            crcs = hasher.map(crc32c.crc32c, [part[p : p + PIECE] for p in range(0, size, PIECE)] if hashed else [])
            _write(f"{directory}/f{i}", part)
            list(crcs)
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/work/bench-tmp")
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    from bench.report import write_json

    directory = os.path.join(args.dir, "write-streams")
    os.makedirs(directory, exist_ok=True)
    nbytes = int(args.gb * 2**30) // PIECE * PIECE
    view = memoryview(bytearray(os.urandom(PIECE)) * (nbytes // PIECE))
    variants: dict[str, Callable[[], None]] = {
        "1 file": lambda: _write(f"{directory}/f", view),
        "1 file, 4 threads": lambda: _write(f"{directory}/f", view, threads=4),
        "2 files": lambda: _files(directory, view, 2),
        "4 files": lambda: _files(directory, view, 4),
        "4 files + crc32c": lambda: _files(directory, view, 4, hashed=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in random.Random(r).sample(list(variants), len(variants)):
            run = variants[name]
            os.sync()
            time.sleep(0.5)
            start = time.perf_counter()
            run()
            rates[name].append(round(nbytes / (time.perf_counter() - start) / 1e9, 2))
            for f in os.listdir(directory):
                os.unlink(os.path.join(directory, f))
    shutil.rmtree(directory)
    print(f"{'variant':<20} {'median GB/s':>11} {'best':>6}  rounds")
    for name, r in rates.items():
        print(f"{name:<20} {statistics.median(r):>11.2f} {max(r):>6.2f}  {r}")
    write_json({"bytes": nbytes, "rounds": args.rounds, "gb_per_s": rates}, args.json)


if __name__ == "__main__":
    main()
