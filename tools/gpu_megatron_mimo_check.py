"""The megatron MimoModel example on GPUs with NCCL, one process per GPU (torchrun).

With 2 GPUs: layout A puts the vision encoder on rank 0 and the language model on rank 1
(non-colocated); layout B puts both, TP2, on ranks 0-1 (colocated). With 1 GPU both layouts are
the colocated single rank. For fp32 and bf16:
- the reference trains 2K steps under B;
- a run trains K steps under A and saves with mimo_ckpt's AsyncSaver (pinned host buffers; the
  time each rank is blocked is measured, for a first save and one with the buffers reused);
- `mimo-ckpt reshard` rewrites the checkpoint for B offline; a run under B loads it and trains
  K more steps, whose losses must match the reference's within the dtype's tolerance;
- megatron's dist_checkpointing saves and loads the same A state (timed), and `mimo-ckpt import`
  reads it.
Rank 0 writes one JSON document.

Run: torchrun --nproc-per-node N tools/gpu_megatron_mimo_check.py --out $OUT/gpu_megatron_mimo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

K = 10
DEVICE = "cuda"  # "cpu" (gloo) when the machine has no GPU: a dry run of the same steps


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mimo_ckpt.cli", *args, "-q"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"mimo-ckpt {args[0]} failed: {out.stderr[-2000:]}")
    return out.stdout


def _layouts(world: int) -> tuple[dict, dict, list[str]]:
    from mimo_ckpt import ModuleLayout
    from tools.megatron_mimo import IMAGES, LANGUAGE

    if world == 1:
        one = {IMAGES: ModuleLayout(), LANGUAGE: ModuleLayout()}
        return one, one, []
    a = {IMAGES: ModuleLayout(), LANGUAGE: ModuleLayout(rank_offset=1)}
    b = {IMAGES: ModuleLayout(tp=2), LANGUAGE: ModuleLayout(tp=2)}
    return a, b, ["--module", "images=tp2,offset=0", "--module", "language=tp2,offset=0"]


def _check(dtype_name: str, root: str) -> dict:
    import torch
    import torch.distributed as dist

    import mimo_ckpt
    from tools.megatron_mimo import MegatronMimoRun

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    layouts_a, layouts_b, reshard_args = _layouts(world)

    def run(layouts: dict) -> MegatronMimoRun:
        return MegatronMimoRun(layouts, backend=dist.get_backend(), device=DEVICE, dtype=dtype)

    reference = run(layouts_b)
    ref = [reference.train_step(s) for s in range(2 * K)]

    first = run(layouts_a)
    for s in range(K):
        first.train_step(s)
    saver = mimo_ckpt.AsyncSaver()
    blocking = []
    for name in ("warm-up", "a"):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        handle = saver.save(first.state(), os.path.join(root, dtype_name, name), layouts=layouts_a,
                            metadata={"step": K})
        blocking.append(time.perf_counter() - t0)
        handle.wait()
    state_bytes = sum(p.numel() * p.element_size() for p in first.model.parameters()) if first.model else 0

    path_b = os.path.join(root, dtype_name, "b")
    if reshard_args and rank == 0:
        _cli("reshard", os.path.join(root, dtype_name, "a"), path_b, *reshard_args)
    if not reshard_args:
        path_b = os.path.join(root, dtype_name, "a")
    dist.barrier()
    second = run(layouts_b)
    second.load(path_b)
    resumed = [second.train_step(s) for s in range(K, 2 * K)]

    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"blocking_s": blocking, "model_bytes": state_bytes})

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-30)

    return {
        "layout_a": {m: l.describe() for m, l in layouts_a.items()},
        "layout_b": {m: l.describe() for m, l in layouts_b.items()},
        "reference_losses": [loss for loss, _ in ref],
        "resumed_losses": [loss for loss, _ in resumed],
        "max_rel_diff_resumed_vs_reference": max(
            max(rel(a[0], b[0]), rel(a[1], b[1])) for a, b in zip(resumed, ref[K:])),
        "async_save_per_rank": per_rank,
        "megatron": _megatron_round(first, lambda: run(layouts_a), os.path.join(root, dtype_name)),
    }


def _megatron_round(trained: Any, make_run: Any, root: str) -> dict:
    """megatron's dist_checkpointing save and load of the same state, then `mimo-ckpt import`."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from tools.megatron_mimo import cpu_dist_checkpointing, megatron_state

    try:
        megatron_dir = os.path.join(root, "megatron")
        if dist.get_rank() == 0:
            os.makedirs(megatron_dir)
        dist.barrier()
        t0 = time.perf_counter()
        with cpu_dist_checkpointing():
            dist_checkpointing.save(megatron_state(trained), megatron_dir)
        save_s = time.perf_counter() - t0
        fresh = megatron_state(make_run())
        t0 = time.perf_counter()
        dist_checkpointing.load(fresh, megatron_dir)
        load_s = time.perf_counter() - t0
        out = {"save_s": save_s, "load_s": load_s}
        if dist.get_rank() == 0:
            out["import"] = _cli("import", megatron_dir, os.path.join(root, "imported"))[-300:]
        return out
    except Exception:  # noqa: BLE001 - reported; the resume result stands on its own
        return {"error": traceback.format_exc()[-2000:]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch
    import torch.distributed as dist

    global DEVICE
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        DEVICE = "cpu"
        dist.init_process_group("gloo")
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    out: dict = {"device": name, "ranks": dist.get_world_size(), "torch": torch.__version__}
    root = tempfile.mkdtemp(prefix="mimo-gpu-") if dist.get_rank() == 0 else ""
    shared = [root]
    dist.broadcast_object_list(shared, 0)
    for dtype_name in ("fp32", "bf16"):
        try:
            out[dtype_name] = _check(dtype_name, shared[0])
        except Exception:  # noqa: BLE001 - report and go on to the next variant
            out[dtype_name] = {"error": traceback.format_exc()[-3000:]}
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(json.dumps(out, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
