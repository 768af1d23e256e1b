"""Cold-read time of the same files by what happened between dropping the page cache and reading.

Why the save/load benchmark shuffles the order of the loads within a round and reports the best
of several rounds: on this VM a cold read of the same bytes takes one of two times, about 2x apart,
depending on what ran before it. The balloon device reports free memory to the host (virtio-balloon
free page reporting, a pass about 2 s after large frees) and fresh memory is slow to fault in (the
`touch` case), so page cache refilled from reported memory runs at the speed of those faults
rather than the disk's; the host's own caching may add to it. Cases, in shuffled order:

- drop,read: drop caches, read at once;
- pause,drop,read: wait `--pause` s first, then drop and read at once;
- drop,pause,read: the freed page cache is reported before the read;
- touch: first-touch bandwidth of fresh anonymous memory after a pause.

Each case starts by freeing a buffer of random size, as a benchmark's checks between steps do.
The order run and every time are kept (`sequence`): a case's time depends on the one before.
Needs root (it writes /proc/sys/vm/drop_caches):

    .venv/bin/python bench/probe_cold_read_state.py --dir /work/bench-tmp --json probe.json
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHUNK = 8 << 20


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_all(paths: list[str]) -> float:
    """Read the files concurrently, one thread each; returns the seconds taken."""
    def read(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        view = memoryview(bytearray(CHUNK))
        try:
            while os.readv(fd, [view]) > 0:
                pass
        finally:
            os.close(fd)
    threads = [threading.Thread(target=read, args=(p,)) for p in paths]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def touch_gbps(nbytes: int) -> float:
    t0 = time.perf_counter()
    m = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        m[offset] = 1
    seconds = time.perf_counter() - t0
    m.close()
    return nbytes / seconds / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".")
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--gb-per-file", type=float, default=1.0)
    p.add_argument("--pause", type=float, default=2.5)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json")
    args = p.parse_args()
    from bench.report import write_json

    paths = [os.path.join(args.dir, f"probe-cold-read-{i}.bin") for i in range(args.files)]
    block = os.urandom(CHUNK)
    for path in paths:
        with open(path, "wb") as f:
            for _ in range(int(args.gb_per_file * (1 << 30)) // CHUNK):
                f.write(block)
            os.fsync(f.fileno())
    cases = ["drop,read", "pause,drop,read", "drop,pause,read", "touch"] * args.rounds
    random.Random(0).shuffle(cases)
    seconds: dict[str, list[float]] = {}
    sequence: list[tuple[str, float]] = []  # in the order run: the state a case leaves matters to the next
    try:
        for case in cases:
            junk = bytearray(random.randint(50, 400) << 20)
            del junk
            if case == "touch":
                time.sleep(args.pause)
                seconds.setdefault(case, []).append(touch_gbps(1 << 30))
                sequence.append((case, round(seconds[case][-1], 2)))
                continue
            if case.startswith("pause"):
                time.sleep(args.pause)
            drop_caches()
            if case == "drop,pause,read":
                time.sleep(args.pause)
            seconds.setdefault(case, []).append(read_all(paths))
            sequence.append((case, round(seconds[case][-1], 3)))
    finally:
        for path in paths:
            os.unlink(path)
    gb = args.files * args.gb_per_file * (1 << 30) / 1e9
    result = {
        "read_gb": round(gb, 3),
        "seconds": {c: sorted(round(s, 3) for s in v) for c, v in seconds.items() if c != "touch"},
        "touch_gbps": sorted(round(g, 2) for g in seconds["touch"]),
        "sequence": sequence,
        "options": vars(args),
    }
    print(f"{'case':>16} {'median s':>9} {'best s':>7} {'worst s':>8}   ({gb:.2f} GB from {args.files} files)")
    for case, v in result["seconds"].items():
        print(f"{case:>16} {statistics.median(v):>9.2f} {v[0]:>7.2f} {v[-1]:>8.2f}")
    print("in order:", ", ".join(f"{c} {v}" for c, v in sequence))
    print(f"first touch of fresh memory after a pause: {statistics.median(result['touch_gbps']):.2f} GB/s median")
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
