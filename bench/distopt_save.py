"""Saving megatron DistributedOptimizer state on CPU: time and peak extra host memory per rank.

    python -m bench.distopt_save --dp 2 4 --out distopt_save.json

For each DP size (TP1), one gloo world of DP ranks builds a GPTModel (SwiGLU, no biases) with
megatron DDP + DistributedOptimizer (Adam) through examples/megatron_cpu.py, trains one step under
optim.MimoOptimizer (so every rank holds Adam state), and then saves model + optimizer state with:

- `mimo_flat_boxes`: mimo_ckpt.save, the optimizer through MegatronModuleOptimizer with FLAT_BOXES
  (each rank writes its own flat slices as boxes of the model-space tensors; no gather);
- `megatron_fully_reshardable`: megatron's dist_checkpointing.save (torch_dist) of
  `optimizer.sharded_state_dict(..., distrib_optim_sharding_type="fully_reshardable")`;
- `megatron_dp_reshardable`: the same with "dp_reshardable";
- `mimo_flat_boxes_spread`: as `mimo_flat_boxes` with `replicas="spread"`: the model weights, equal
  on every DP rank after a step, are written by all of them in balanced shares instead of by their
  main replica (rank 0), as megatron's fully parallel save wrapper does.

The variants run in turn in the same processes, each into a fresh directory under `--dir` (one
disk), which is deleted before the next. A first ("cold") save of each variant, in the order given
(`--order`), pays one-time costs (megatron's writer starts a multiprocessing Manager process on a
rank's first write, which then stays; imports; caches); then `--rounds` warm rounds save every
variant, each round in an order shuffled from its number. The table gives the best and median
warm save time and the largest warm peak; the JSON has every save. The page cache cannot be
dropped between variants without root; the same holds for every variant.

Memory: a sampler process (not a thread, so the rank's GIL cannot delay it) reads, every
`--interval-ms`, the resident set size (/proc/<pid>/statm) of the rank's process and its
descendants (megatron's writer keeps a spawned multiprocessing Manager process; it writes with
threads, forks nothing). "Extra" is the highest sample during the save (including building the
state to save) minus the value just before it, taken after a GC and `malloc_trim(0)`. glibc's mmap threshold is fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_) so freed large buffers go back to the OS at once and a variant cannot
reuse memory an earlier one left in the allocator. Spikes shorter than the interval can be missed.

The rank's own optimizer shard is the bytes of its fp32 main-param slices plus exp_avg and
exp_avg_sq: the table gives peak extra memory as a multiple of it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import shutil
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("mimo_flat_boxes", "mimo_flat_boxes_spread", "megatron_fully_reshardable", "megatron_dp_reshardable")


# -- memory sampling ------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int, exclude: int = -1) -> int:
    """Resident set size of a process and its descendants but `exclude` (/proc/<pid>/statm)."""
    total = 0
    for p in _descendants(pid):
        if p == exclude:
            continue
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except OSError:
            pass
    return total


def sample(pid: int, interval: float) -> None:
    """Sampler process: prints 'ready', then samples rss_bytes(pid) until stdin closes and prints
    the highest value seen. A process of its own, so the rank's GIL cannot delay a sample."""
    import select

    me = os.getpid()  # a child of the rank: not counted
    peak = rss_bytes(pid, me)
    print("ready", flush=True)
    samples = 1
    while not select.select([sys.stdin], [], [], interval)[0]:
        peak = max(peak, rss_bytes(pid, me))
        samples += 1
    peak = max(peak, rss_bytes(pid, me))
    print(peak, samples, flush=True)


class PeakSampler:
    """Highest rss_bytes() of this process (and its descendants) while open, from a sampler process."""

    def __init__(self, interval: float) -> None:
        self.interval, self.peak, self.samples = interval, 0, 0

    def __enter__(self) -> "PeakSampler":
        import subprocess

        code = f"import bench.distopt_save as b; b.sample({os.getpid()}, {self.interval})"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._proc.stdin.close()
        peak, samples = self._proc.stdout.readline().split()
        self._proc.wait()
        self.peak, self.samples = int(peak), int(samples)


def settle() -> int:
    """GC, return freed heap to the OS, and the resulting RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_bytes(os.getpid())


# -- the world ------------------------------------------------------------------------------------


def own_shard_bytes(optimizer: Any) -> int:
    """Bytes of this rank's fp32 main-param slices plus its exp_avg and exp_avg_sq."""
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                total += p.numel() * p.element_size()
                state = inner.optimizer.state.get(p, {})
                total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq") if k in state)
    return total


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def world(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import mimo_ckpt
    from mimo_ckpt import ModuleLayout
    from optim import MimoOptimizer, build_module_groups
    from optim.megatron import FLAT_BOXES, MegatronModuleOptimizer
    from examples.megatron_cpu import GptSize, build, cpu_dist_checkpointing, forward_backward, model_state

    torch.set_num_threads(1)
    rank, dp = dist.get_rank(), dist.get_world_size()
    size = GptSize(vocab=args["vocab"], seq=args["seq"], hidden=args["hidden"], heads=args["heads"],
                   layers=args["layers"], batch=args["batch"], dtype=getattr(torch, args["dtype"]))
    layout = ModuleLayout(dp=dp)
    layouts = {"language": layout}
    built = build(layout, size, lr=1e-4)
    groups = build_module_groups(layouts)
    module = MegatronModuleOptimizer(built.optimizer, groups["language"], lambda: model_state(built),
                                     zero_grad_buffer=built.ddp.zero_grad_buffer,
                                     metadata=dict(FLAT_BOXES, dp_cp_group=built.pgc.dp_cp))
    mimo = MimoOptimizer({"language": module}, layouts, max_grad_norm=1.0)
    t0 = time.perf_counter()
    mimo.zero_grad()
    loss = forward_backward(built, 0, size, 1.0)
    ok = mimo.step()[0]
    assert ok
    out: dict[str, Any] = {
        "rank": rank, "dp": dp, "loss": loss, "train_step_s": time.perf_counter() - t0,
        "params": sum(p.numel() for p in built.ddp.parameters()),
        "own_shard_bytes": own_shard_bytes(built.optimizer), "variants": {}, "cold": {},
    }

    from megatron.core import dist_checkpointing

    def save(variant: str, path: str) -> None:
        if variant.startswith("mimo_flat_boxes"):
            state = {"language": {"model": model_state(built), "optimizer": mimo.sharded_state_dict()["language"]}}
            mimo_ckpt.save(state, path, layouts=layouts, replicas="spread" if variant.endswith("spread") else "main")
            return
        msd = model_state(built)
        metadata = {"distrib_optim_sharding_type": variant[len("megatron_"):]}
        state = {"model": msd, "optimizer": built.optimizer.sharded_state_dict(msd, metadata=metadata)}
        with cpu_dist_checkpointing():
            dist_checkpointing.save(state, path)

    # a first ("cold") save of each variant pays one-time costs; then `rounds` warm saves of every
    # variant, each round in an order shuffled from the round number (the same on every rank)
    rounds = [("cold", v) for v in args["order"]]
    for i in range(args["rounds"]):
        rounds += [("warm", v) for v in random.Random(i).sample(args["order"], len(args["order"]))]
    for when, variant in rounds:
        path = os.path.join(args["dir"], f"dp{dp}_{variant}")
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
        dist.barrier()
        before = settle()
        dist.barrier()
        start = time.perf_counter()
        with PeakSampler(args["interval_ms"] / 1000) as sampler:
            save(variant, path)
        seconds = time.perf_counter() - start
        dist.barrier()
        total = time.perf_counter() - start
        result = {
            "seconds": seconds, "all_ranks_done_s": total, "rss_before": before, "peak": sampler.peak,
            "extra": max(0, sampler.peak - before), "samples": sampler.samples,
            "bytes_on_disk": _dir_bytes(path) if rank == 0 else None,
        }
        if when == "cold":
            out["cold"][variant] = result
        else:
            out["variants"].setdefault(variant, []).append(result)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
    return out


# -- driver ---------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Per DP size, variant and rank: save seconds (best / median of the warm rounds) and the
    largest peak extra memory of those rounds."""
    lines = ["dp  variant                      rank  save s best / median  extra MiB  own shard MiB  extra/shard",
             "--  ---------------------------  ----  ------------------  ---------  -------------  -----------"]
    for dp, ranks in results.items():
        for variant in VARIANTS:
            for r in ranks:
                runs = r["variants"].get(variant)
                if not runs:
                    continue
                secs = sorted(v["seconds"] for v in runs)
                extra = max(v["extra"] for v in runs)
                lines.append(f"{dp:>2}  {variant:<27}  {r['rank']:>4}  {secs[0]:>8.2f} / {statistics.median(secs):<7.2f}  "
                             f"{_mib(extra):>9}  {_mib(r['own_shard_bytes']):>13}  {extra / r['own_shard_bytes']:>11.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distopt_save", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="global batch (divisible by every DP size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model params; main params and Adam state are fp32 either way")
    p.add_argument("--order", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=3, help="warm saves of each variant, in shuffled order")
    p.add_argument("--interval-ms", type=float, default=2.0)
    p.add_argument("--dir", help="a directory for the checkpoints, deleted after each variant (default: a new "
                                 "temporary directory, removed at the end)")
    p.add_argument("--out", help="write the JSON result here")
    opts = p.parse_args(argv)

    import json
    import platform

    from tests.harness.local_world import run_local_world

    import tempfile

    made = opts.dir is None
    opts.dir = opts.dir or tempfile.mkdtemp(prefix="bench-distopt-save-")
    os.makedirs(opts.dir, exist_ok=True)
    args = {k: v for k, v in vars(opts).items() if k not in ("dp", "out")}
    results: dict[str, Any] = {}
    for dp in opts.dp:
        try:
            results[str(dp)] = run_local_world(dp, "bench.distopt_save:world", args, timeout=3600,
                                               extra_env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        except RuntimeError as exc:  # e.g. a rank killed for memory: say so, keep the other sizes
            print(f"dp {dp} failed: {str(exc)[:300]}", flush=True)
            results[str(dp)] = {"error": str(exc)[-3000:]}
    if made:
        shutil.rmtree(opts.dir, ignore_errors=True)
    done = {dp: r for dp, r in results.items() if isinstance(r, list)}
    if not done:
        return 1
    first = next(iter(done.values()))[0]
    print(f"model: {first['params'] / 1e6:.1f}M params ({opts.dtype}), hidden {opts.hidden}, {opts.layers} layers, "
          f"SwiGLU; CPU, gloo, {os.cpu_count()} cores; peak extra = RSS high-water mark of the rank (and its "
          f"children) during the save minus RSS just before")
    print(table(done))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump({"args": args, "machine": platform.platform(), "cpus": os.cpu_count(), "results": results},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
