"""How long async save stalls training: mimo_ckpt vs a plain memcpy vs torch DCP's async_save.

Each rank holds `--gb-per-rank` of tensors (fp32 and bf16, its own TP boxes) on `--device`, and
measures, in one run:
* memcpy:  copying every tensor into preallocated host buffers (pinned on CUDA), first into fresh
           buffers, then again into the same buffers; the floor for any snapshot;
* mimo:    `AsyncSaver.save` blocking time (first call allocates its buffers, later ones reuse
           them) and the background time to the commit;
* dcp:     `torch.distributed.checkpoint.async_save` blocking time (its defaults) and completion.
Then a training loop (`--train-steps` steps of an MLP with AdamW, gradients all-reduced over the
ranks as data parallelism does) runs once without saving and once with an async save of model and
optimizer state every `--every` steps; the slowdown is the ratio of the two loop times.

CPU:  .venv/bin/python bench/async_save.py --ranks 2 --gb-per-rank 0.5
GPU:  python bench/async_save.py --device cuda --gb-per-rank 8   (one process, NCCL; bench/gpu.py
      measures this against a training loop, DCP's stagers and the disk)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(gb: float, rank: int, world: int, device: str):
    import torch

    from mimo_ckpt import ModuleLayout, TensorShard

    rows, cols = 4096, 8192
    per = rows * cols * 4  # bytes of one fp32 block
    n = max(1, int(gb * 1e9 // per))
    tensors = {}
    for i in range(n):
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        local = torch.full((rows, cols * (4 // dtype.itemsize)), float(i + rank), dtype=dtype, device=device)
        tensors[f"w{i}"] = TensorShard(f"w{i}", local, (rows * world, local.shape[1]), (rows * rank, 0))
    return {"m": tensors}, {"m": ModuleLayout(tp=world)}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _max(x: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_GLOO[0])
    return float(t.item())


_GLOO: list[Any] = [None]


def _memcpy(state, device: str, repeats: int) -> dict[str, float]:
    import torch

    srcs = [t.data for t in state["m"].values()]
    pin = device == "cuda"
    out = {}
    t0 = time.perf_counter()
    bufs = [torch.empty(s.shape, dtype=s.dtype, pin_memory=pin) for s in srcs]
    for b, s in zip(bufs, srcs, strict=True):
        b.copy_(s, non_blocking=pin)
    _sync(device)
    out["first_s"] = _max(time.perf_counter() - t0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b, s in zip(bufs, srcs, strict=True):
            b.copy_(s, non_blocking=pin)
        _sync(device)
        best = min(best, _max(time.perf_counter() - t0))
    out["reused_s"] = best
    return out


def _mimo(state, layouts, root: str, repeats: int) -> dict[str, Any]:
    from mimo_ckpt import AsyncSaver

    saver = AsyncSaver(timeout_s=600)  # its own group: the background thread must not share ours
    blocking, background = [], []
    for r in range(repeats + 1):
        path = os.path.join(root, f"mimo{r}")
        handle = saver.save(state, path, layouts=layouts)
        blocking.append(_max(handle.blocking_seconds))
        handle.wait()
        background.append(_max(handle.write_seconds or 0.0))
        _remove(path)
    return {"first_blocking_s": blocking[0], "blocking_s": min(blocking[1:]), "background_s": min(background[1:])}


def _dcp(state, root: str, repeats: int, rank: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    sd = {f"r{rank}.{k}": t.data for k, t in state["m"].items()}
    blocking, total = [], []
    for r in range(repeats + 1):
        path = os.path.join(root, f"dcp{r}")
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=path, process_group=_GLOO[0])
        blocking.append(_max(time.perf_counter() - t0))
        fut.result()
        total.append(_max(time.perf_counter() - t0))
        _remove(path)
    return {"first_blocking_s": blocking[0], "blocking_s": min(blocking[1:]), "total_s": min(total[1:])}


def _train(args: dict, device: str, root: str, rank: int, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from mimo_ckpt import AsyncSaver, ModuleLayout, TensorShard

    torch.manual_seed(0)
    width = args["width"]
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args["batch"], width, device=device)

    def step() -> None:
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()

    def state():
        out = {}
        for name, p in model.named_parameters():
            out[name] = TensorShard.whole(name, p.data)
            for k, v in opt.state[p].items():
                if v.dim():
                    out[f"optimizer.{k}.{name}"] = TensorShard.whole(f"optimizer.{k}.{name}", v)
        return {"m": out}

    layouts = {"m": ModuleLayout(dp=world)}
    for _ in range(3):
        step()
    _sync(device)
    saver = AsyncSaver(timeout_s=600)  # its own group: the background thread must not share ours
    times = {}
    for mode in [f"{kind}{r}" for r in range(args["rounds"]) for kind in ("plain", "saving")]:
        dist.barrier()
        t0 = time.perf_counter()
        handles = []
        for i in range(args["train_steps"]):
            step()
            if mode.startswith("saving") and i % args["every"] == 0:
                _sync(device)
                handles.append(saver.save(state(), os.path.join(root, f"{mode}{i}"), layouts=layouts))
        _sync(device)
        elapsed = _max(time.perf_counter() - t0)
        for h in handles:
            h.wait()
        times[mode] = elapsed
        for i in range(args["train_steps"]):
            _remove(os.path.join(root, f"{mode}{i}"))
    state_bytes = sum(t.data.numel() * t.data.element_size() for t in state()["m"].values())
    plain = min(v for k, v in times.items() if k.startswith("plain"))
    saving = min(v for k, v in times.items() if k.startswith("saving"))
    return {"times_s": times, "slowdown": saving / plain - 1.0, "state_mb": state_bytes / 1e6,
            "saves_per_round": len(range(0, args["train_steps"], args["every"]))}


def _remove(path: str) -> None:
    import torch.distributed as dist

    dist.barrier(group=_GLOO[0])
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier(group=_GLOO[0])


def rank_main(args: dict) -> dict:
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    _GLOO[0] = dist.new_group(backend="gloo", timeout=timedelta(seconds=600))
    device = args["device"]
    state, layouts = _state(args["gb_per_rank"], rank, world, device)
    out = {"memcpy": _memcpy(state, device, args["repeats"])}
    out["mimo"] = _mimo(state, layouts, args["dir"], args["repeats"])
    out["dcp"] = _dcp(state, args["dir"], args["repeats"], rank)
    del state
    out["train"] = _train(args, device, args["dir"], rank, world)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--gb-per-rank", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="training rounds with and without saving (best of each)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dir", help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--json", help="write results here")
    opts = parser.parse_args()
    from bench.report import write_json

    root = opts.dir or tempfile.mkdtemp(prefix="mimo-async-bench-")
    args = {"device": opts.device, "gb_per_rank": opts.gb_per_rank, "repeats": opts.repeats, "dir": root,
            "train_steps": opts.train_steps, "every": opts.every, "rounds": opts.rounds, "width": opts.width, "batch": opts.batch}
    if opts.device == "cuda":
        import torch
        import torch.distributed as dist

        from tests.harness.local_world import free_port

        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        results = [rank_main(args)]
        device_name = torch.cuda.get_device_name(0)
    else:
        from tests.harness.local_world import run_local_world

        results = run_local_world(opts.ranks, "bench.async_save:rank_main", args, timeout=1800)
        device_name = "cpu"
    r = results[0]
    m, mc, d, t = r["memcpy"], r["mimo"], r["dcp"], r["train"]
    print(f"device {device_name}, {len(results)} rank(s), {opts.gb_per_rank} GB per rank")
    print(f"memcpy      first {m['first_s']:.3f} s, into reused buffers {m['reused_s']:.3f} s")
    print(f"mimo_ckpt   blocking {mc['blocking_s']:.3f} s (first call {mc['first_blocking_s']:.3f} s) = "
          f"{mc['blocking_s'] / m['reused_s']:.2f}x memcpy; background to commit {mc['background_s']:.3f} s")
    print(f"dcp         blocking {d['blocking_s']:.3f} s (first call {d['first_blocking_s']:.3f} s) = "
          f"{d['blocking_s'] / m['reused_s']:.2f}x memcpy; to completion {d['total_s']:.3f} s")
    rounds = ", ".join(f"{k} {v:.2f}" for k, v in t["times_s"].items())
    print(f"training    {opts.train_steps} steps per round, seconds: {rounds}")
    print(f"            slowdown with a save every {opts.every} steps ({t['state_mb']:.0f} MB each), "
          f"best round vs best round: {100 * t['slowdown']:.1f}%")
    write_json({"args": args, "device": device_name, "ranks": len(results), "results": results}, opts.json)
    shutil.rmtree(root, ignore_errors=True) if not opts.dir else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
