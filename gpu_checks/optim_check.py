"""MimoOptimizer on one GPU with NCCL: the same code that the CPU tests run with gloo.

One process, world size 1, both toy modules colocated on the GPU. Trains with and without ZeRO-1
state and compares with the CPU single-process reference; then saves CUDA state with mimo_ckpt,
loads it into a fresh run and continues. Prints one JSON document (and writes it to --out).

Run: python gpu_checks/optim_check.py --out $OUT/gpu_optim.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, RESUME_AT = 6, 3


def _max_weight_diff(run, reference) -> float:
    worst = 0.0
    for module, params in run.model.params.items():
        for key, p in params.items():
            worst = max(worst, (p.detach().cpu() - reference["weights"][module][key]).abs().max().item())
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the JSON result here too")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same run with gloo")
    opts = parser.parse_args()

    import torch
    import torch.distributed as dist

    from mimo_ckpt import ModuleLayout
    from tests.harness.local_world import free_port
    from bench.report import write_json
    from tests.fixtures.toy_mimo import reference_run
    from tests.fixtures.toy_training import MAX_GRAD_NORM, ToyRun

    device = opts.device
    if device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device", file=sys.stderr)
            return 2
        torch.cuda.set_device(0)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    layouts = {"vision": ModuleLayout(), "language": ModuleLayout()}
    reference = reference_run(STEPS, MAX_GRAD_NORM)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    out: dict = {"device": name, "backend": backend, "torch": torch.__version__, "runs": {}}

    for shard_state in (False, True):
        run = ToyRun(layouts, shard_state, device=device)
        t0 = time.perf_counter()
        for step in range(STEPS):
            run.step(step)
        if device == "cuda":
            torch.cuda.synchronize()
        out["runs"][f"train_shard_state={shard_state}"] = {
            "param_device": str(next(iter(run.model.params["vision"].values())).device),
            "seconds": time.perf_counter() - t0,
            "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(run.log["loss"], reference["loss"], strict=True)),
            "max_norm_rel_diff": max(abs(a - b) / b for a, b in zip(run.log["grad_norm"], reference["grad_norm"], strict=True)),
            "max_weight_abs_diff": _max_weight_diff(run, reference),
            "ok": run.log["ok"],
        }

    with tempfile.TemporaryDirectory() as tmp:
        first = ToyRun(layouts, shard_state=True, device=device)
        for step in range(RESUME_AT):
            first.step(step)
        path = os.path.join(tmp, "ckpt")
        first.save(path, RESUME_AT)
        resumed = ToyRun(layouts, shard_state=True, seed=99, device=device)
        resumed.load(path)
        for step in range(RESUME_AT, STEPS):
            resumed.step(step)
        out["runs"]["resume"] = {
            "losses": first.log["loss"] + resumed.log["loss"],
            "reference_losses": reference["loss"],
            "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(
                first.log["loss"] + resumed.log["loss"], reference["loss"], strict=True)),
            "max_weight_abs_diff": _max_weight_diff(resumed, reference),
        }

    ok = all(r["max_loss_rel_diff"] < 1e-4 and r.get("max_weight_abs_diff", 0) < 1e-4 for r in out["runs"].values())
    out["ok"] = ok
    write_json(out, opts.out, echo=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
