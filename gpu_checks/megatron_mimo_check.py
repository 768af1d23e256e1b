"""The megatron MimoModel example on GPUs with NCCL, one process per GPU (torchrun).

With 2 GPUs: layout A puts the vision encoder on rank 0 and the language model on rank 1
(non-colocated); layout B puts both, TP2, on ranks 0-1 (colocated). With 1 GPU both layouts are
the colocated single rank. With 8 GPUs: A is megatron's own MIMO test layout (encoder TP2 on
ranks 0-1, language TP2 x PP3 on ranks 2-7), B the encoder at TP1 x DP2 and the language model at
TP2 x PP2 on ranks 2-5 (give `--layers 6`). `--a` / `--b` take any others. For each dtype:
- the reference trains 2K steps under B;
- a run trains K steps under A and saves with mimo_ckpt's AsyncSaver (pinned host buffers; the
  time each rank is blocked is measured, for a first save and one with the buffers reused);
- `mimo-ckpt reshard` rewrites the checkpoint for B offline; a run under B loads it and trains
  K more steps, whose losses must match the reference's within the dtype's tolerance;
- megatron's dist_checkpointing saves and loads the same A state (timed), and `mimo-ckpt import`
  reads it.
Rank 0 writes one JSON document.

Run: torchrun --nproc-per-node N gpu_checks/megatron_mimo_check.py --out $OUT/gpu_megatron_mimo.json
     [--size large --dtypes bf16 --steps 5]   (a 0.5B-parameter language model: timings mean something)
     8 GPUs: torchrun --nproc-per-node 8 gpu_checks/megatron_mimo_check.py --dtypes bf16 --layers 6 --out ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 10  # default steps before the save, and after the load


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mimo_ckpt.cli", *args, "-q"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"mimo-ckpt {args[0]} failed: {out.stderr[-2000:]}")
    return out.stdout


DEFAULT_LAYOUTS = {
    # ranks: (layout A, layout B), each "module=sizes[,offset=N];..." as `mimo-ckpt reshard` takes
    1: ("images=tp1;language=tp1", "images=tp1;language=tp1"),
    2: ("images=tp1;language=tp1,offset=1", "images=tp2;language=tp2,offset=0"),
    # megatron's own MIMO test layout, and the reshard of the 8-GPU issue (ranks 6-7 idle under B)
    8: ("images=tp2;language=tp2,pp3,offset=2", "images=dp2;language=tp2,pp2,offset=2"),
}


def _parse(text: str) -> dict:
    from mimo_ckpt.cli.args import parse_layout_arg

    return dict(parse_layout_arg(part, None) for part in text.split(";"))


def _spec(layout: Any) -> str:
    sizes = ",".join(f"{d}{getattr(layout, d)}" for d in ("tp", "cp", "ep", "pp", "dp"))
    return f"{sizes},offset={layout.rank_offset},order={'-'.join(layout.order)}"


def _reshard_args(a: dict, b: dict) -> list[str]:
    return [arg for m in sorted(b) if a[m] != b[m] for arg in ("--module", f"{m}={_spec(b[m])}")]


def _check(dtype_name: str, root: str, device: str, size: Any, k: int, layouts: tuple[str, str]) -> dict:
    import torch
    import torch.distributed as dist

    import mimo_ckpt
    from examples.megatron_mimo import MegatronMimoRun

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    layouts_a, layouts_b = _parse(layouts[0]), _parse(layouts[1])
    reshard_args = _reshard_args(layouts_a, layouts_b)

    def run(layouts: dict) -> MegatronMimoRun:
        return MegatronMimoRun(layouts, backend=dist.get_backend(), device=device, dtype=dtype, size=size)

    reference = run(layouts_b)
    ref = [reference.train_step(s) for s in range(2 * k)]

    first = run(layouts_a)
    for s in range(k):
        first.train_step(s)
    saver = mimo_ckpt.AsyncSaver()
    blocking = []
    for name in ("warm-up", "a"):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        handle = saver.save(first.state(), os.path.join(root, dtype_name, name), layouts=layouts_a,
                            metadata={"step": k})
        blocking.append(time.perf_counter() - t0)
        handle.wait()
    state_bytes, copy_s = _plain_copy(first.state(), device)

    path_b = os.path.join(root, dtype_name, "b")
    if reshard_args and rank == 0:
        _cli("reshard", os.path.join(root, dtype_name, "a"), path_b, *reshard_args)
    if not reshard_args:
        path_b = os.path.join(root, dtype_name, "a")
    dist.barrier()
    second = run(layouts_b)
    second.load(path_b)
    resumed = [second.train_step(s) for s in range(k, 2 * k)]

    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"blocking_s": blocking, "state_bytes": state_bytes,
                                      "plain_copy_to_pinned_s": copy_s})

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-30)

    return {
        "layout_a": {m: l.describe() for m, l in layouts_a.items()},
        "layout_b": {m: l.describe() for m, l in layouts_b.items()},
        "reference_losses": [loss for loss, _ in ref],
        "resumed_losses": [loss for loss, _ in resumed],
        "reference_grad_norms": [norm for _, norm in ref],
        "resumed_grad_norms": [norm for _, norm in resumed],
        "max_rel_diff_loss": max(rel(a[0], b[0]) for a, b in zip(resumed, ref[k:])),
        "max_rel_diff_grad_norm": max(rel(a[1], b[1]) for a, b in zip(resumed, ref[k:])),
        "async_save_per_rank": per_rank,
        "megatron": _megatron_round(first, lambda: run(layouts_a), os.path.join(root, dtype_name)),
    }


def _plain_copy(state: dict, device: str) -> tuple[int, float]:
    """Bytes of the rank's tensors in `state`, and the time to copy them once into pinned host
    buffers allocated beforehand: what an async save's blocking time is measured against."""
    import torch

    from mimo_ckpt.interop.megatron_keys import iter_leaves

    tensors = [leaf.data for _, leaf in iter_leaves(state) if hasattr(leaf, "box")]
    if device != "cuda" or not tensors:
        return sum(t.numel() * t.element_size() for t in tensors), 0.0
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for _ in range(2):  # the second pass is timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b, t in zip(buffers, tensors):
            b.copy_(t, non_blocking=True)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return sum(t.numel() * t.element_size() for t in tensors), elapsed


def _megatron_round(trained: Any, make_run: Any, root: str) -> dict:
    """megatron's dist_checkpointing save and load of the same state, then `mimo-ckpt import`."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from examples.megatron_mimo import cpu_dist_checkpointing, megatron_state

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
    p.add_argument("--size", choices=("tiny", "large"), default="tiny")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=STEPS, help="steps before the save and after the load")
    p.add_argument("--a", help="layout A, e.g. 'images=tp2;language=tp2,pp3,offset=2' (default by rank count)")
    p.add_argument("--b", help="layout B, the one resharded to")
    p.add_argument("--layers", type=int, help="language model layers (divisible by every PP size used)")
    args = p.parse_args()
    from examples.megatron_mimo import TINY, Size
    from bench.report import write_json

    size = TINY if args.size == "tiny" else Size(
        vocab=32000, seq=1024, hidden=2048, heads=16, layers=8, encoder_hidden=1024, encoder_layers=4,
        patch=14, grid=8, batch=8)
    if args.layers:
        size = dataclasses.replace(size, layers=args.layers)
    import torch
    import torch.distributed as dist

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a gloo dry run of the same steps
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    out: dict = {"device": name, "ranks": dist.get_world_size(), "torch": torch.__version__,
                 "size": args.size, "steps_each_side": args.steps}
    root = tempfile.mkdtemp(prefix="mimo-gpu-") if dist.get_rank() == 0 else ""
    shared = [root]
    dist.broadcast_object_list(shared, 0)
    default = DEFAULT_LAYOUTS.get(dist.get_world_size(), (None, None))
    layouts = (args.a or default[0], args.b or default[1])
    if None in layouts:
        raise SystemExit(f"give --a and --b for {dist.get_world_size()} ranks")
    out["layouts"] = layouts
    for dtype_name in args.dtypes.split(","):
        try:
            out[dtype_name] = _check(dtype_name, shared[0], device, size, args.steps, layouts)
        except Exception:  # noqa: BLE001 - report and go on to the next variant
            out[dtype_name] = {"error": traceback.format_exc()[-3000:]}
    if dist.get_rank() == 0:
        write_json(out, args.out, echo=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
