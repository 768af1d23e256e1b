"""megatron-core MimoModel runs on a 4-rank gloo world (see tests/test_megatron_mimo.py).

Layout A: vision encoder TP2 on ranks 0-1, language model (SwiGLU, padded vocabulary) PP2 on
ranks 2-3. Train 3 steps under A and save; then for each case, reshard the checkpoint offline with
the `mimo-ckpt` CLI (or leave it to the load), rebuild the model under the new layout, load, train
3 more steps, and run the new layout uninterrupted from step 0 for the reference.

The same with the language model in megatron's DDP + DistributedOptimizer (`distributed_optimizer`):
saved under A (PP2), resumed with language DP2, at load and after an offline reshard.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist

import mimo_ckpt
from mimo_ckpt import LayoutChangedWarning, ModuleLayout
from mimo_ckpt.interop.megatron_keys import from_megatron, to_megatron
from examples.megatron_mimo import IMAGES, LANGUAGE, MegatronMimoRun, cpu_dist_checkpointing, megatron_state

WORLD = 4
SAVED = {IMAGES: ModuleLayout(tp=2), LANGUAGE: ModuleLayout(pp=2, rank_offset=2)}
CASES = {
    # name: (--module arguments of `mimo-ckpt reshard`, or None to reshard at load; the new layouts)
    "images_tp1_dp2": (["images=tp1,dp2"], {IMAGES: ModuleLayout(dp=2), LANGUAGE: SAVED[LANGUAGE]}),
    "language_pp1": (["language=pp1"], {IMAGES: SAVED[IMAGES], LANGUAGE: ModuleLayout(rank_offset=2)}),
    "language_dp2": (["language=dp2"], {IMAGES: SAVED[IMAGES], LANGUAGE: ModuleLayout(dp=2, rank_offset=2)}),
    # TP1 -> TP2: the vocabulary padding grows from 72 to 80 rows (TP1 stores no split hints, so
    # the offline reshard refuses to guess and the model's own shards place it at load)
    "language_tp2_at_load": (None, {IMAGES: SAVED[IMAGES], LANGUAGE: ModuleLayout(tp=2, rank_offset=2)}),
}


# name: (--module arguments of `mimo-ckpt reshard`, or None to reshard at load; the new layouts)
DISTOPT_CASES = {
    "language_pp2_to_dp2_at_load": (None, CASES["language_dp2"][1]),
    "language_pp2_to_dp2_offline": (["language=pp1,dp2"], CASES["language_dp2"][1]),
}


def _cli(*args: str) -> None:
    """`mimo-ckpt ARGS` on rank 0 while the others wait."""
    if dist.get_rank() == 0:
        subprocess.run([sys.executable, "-m", "mimo_ckpt.cli", *args, "--quiet"], check=True,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    dist.barrier()


def _reshard(src: str, dst: str, modules: list[str]) -> None:
    _cli("reshard", src, dst, *[arg for m in modules for arg in ("--module", m)])


def resume_cases(root: str, steps: int, resume_at: int) -> dict[str, Any]:
    saved = os.path.join(root, "saved")
    run = MegatronMimoRun(SAVED)
    out: dict[str, Any] = {"saved": [run.train_step(s) for s in range(resume_at)]}
    run.save(saved, resume_at)
    for name, (args, layouts) in CASES.items():
        resharded = os.path.join(root, name) if args else saved
        if args:
            _reshard(saved, resharded, args)
        run = MegatronMimoRun(layouts)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LayoutChangedWarning)
            result = run.load(resharded)
        resumed = [run.train_step(s) for s in range(resume_at, steps)]
        reference = MegatronMimoRun(layouts)
        out[name] = {
            "resumed": resumed,
            "reference": [reference.train_step(s) for s in range(steps)],
            "not_loaded": result.not_loaded,
            "warnings": [str(w.message) for w in caught if w.category is LayoutChangedWarning],
            "dir": resharded,
        }
    out["saved_dir"] = saved
    return out


def distopt_cases(root: str, steps: int, resume_at: int) -> dict[str, Any]:
    """resume_cases with the language model trained by megatron's DistributedOptimizer."""
    from mimo_ckpt.interop.megatron_keys import LANGUAGE_MODULE

    saved = os.path.join(root, "distopt_saved")
    run = MegatronMimoRun(SAVED, distributed_optimizer=True)
    out: dict[str, Any] = {"saved": [run.train_step(s) for s in range(resume_at)], "saved_dir": saved}
    if run.ddp is not None:
        optimizer = run.opt.modules[LANGUAGE_MODULE].optimizer
        out["wrapped"] = [type(run.model.language_model).__name__] + [
            type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    run.save(saved, resume_at)
    references: dict[str, Any] = {}
    for name, (args, layouts) in DISTOPT_CASES.items():
        resharded = os.path.join(root, "distopt_" + name) if args else saved
        if args:
            _reshard(saved, resharded, args)
        run = MegatronMimoRun(layouts, distributed_optimizer=True)
        run.load(resharded)
        case = {"resumed": [run.train_step(s) for s in range(resume_at, steps)], "dir": resharded}
        key = repr(sorted((m, layout.to_json()) for m, layout in layouts.items()))
        if key not in references:
            reference = MegatronMimoRun(layouts, distributed_optimizer=True)
            references[key] = [reference.train_step(s) for s in range(steps)]
        case["reference"] = references[key]
        out[name] = case
    return out


def _values(sd: dict[str, Any], loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """(key, offset) -> tensor, and key -> object, of a megatron-form state (or of what megatron's
    load returned for it)."""
    out = {}
    for name, entry in sd.items():
        value = (loaded or {}).get(name, entry.data)
        ident = f"{entry.key}@{list(entry.global_offset)}" if hasattr(entry, "local_shape") else entry.key
        out[ident] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _zeroed(layouts: dict[str, ModuleLayout]) -> tuple[MegatronMimoRun, dict[str, Any]]:
    run = MegatronMimoRun(layouts)
    sd = megatron_state(run)
    with torch.no_grad():
        for entry in sd.values():
            if hasattr(entry, "local_shape"):
                entry.data.zero_()
    return run, sd


def _mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        if not same:
            bad.append(k)
    return bad


def torch_dist_round_trip(root: str, steps: int) -> dict[str, Any]:
    """megatron save -> `mimo-ckpt import` -> `mimo-ckpt export --format torch_dist` -> megatron
    load, under the saved layout (bit-exact against the trained state) and under another one
    (equal to mimo_ckpt's own load of the imported checkpoint)."""
    from megatron.core import dist_checkpointing

    megatron_dir, ours, back = (os.path.join(root, n) for n in ("megatron", "imported", "exported"))
    run = MegatronMimoRun(SAVED)
    for step in range(steps):
        run.train_step(step)
    trained = megatron_state(run)
    original = _values(trained)
    if dist.get_rank() == 0:
        os.makedirs(megatron_dir)
    dist.barrier()
    with cpu_dist_checkpointing():
        dist_checkpointing.save(trained, megatron_dir)
    _cli("import", megatron_dir, ours)
    _cli("export", ours, "--format", "torch_dist", "--to", back)

    out: dict[str, Any] = {"tensors": sum(isinstance(v, torch.Tensor) for v in original.values()),
                           "objects": sum(not isinstance(v, torch.Tensor) for v in original.values()),
                           "params": len(list(run.model.parameters()))}
    _, template = _zeroed(SAVED)
    result = mimo_ckpt.load(from_megatron(template), ours, layouts=SAVED)
    out["ours_vs_trained"] = _mismatches(_values(template, to_megatron(template, result.state)), original)
    _, template = _zeroed(SAVED)
    loaded = dist_checkpointing.load(template, back)
    out["megatron_vs_trained"] = _mismatches(_values(template, loaded), original)
    # another layout: megatron's loader and ours read the same values
    other = CASES["language_dp2"][1]
    _, template = _zeroed(other)
    loaded = _values(template, dist_checkpointing.load(template, back))
    _, mine = _zeroed(other)
    result = mimo_ckpt.load(from_megatron(mine), ours, layouts=other)
    out["megatron_vs_ours_resharded"] = _mismatches(loaded, _values(mine, to_megatron(mine, result.state)))
    tensors = [v for v in loaded.values() if isinstance(v, torch.Tensor)]
    out["resharded"] = {"tensors": len(tensors), "nonzero": sum(bool(v.abs().sum() > 0) for v in tensors)}
    out["native_vs_trained"] = _native_export_read_by_megatron(root, run, original)
    return out


def _native_export_read_by_megatron(root: str, run: MegatronMimoRun, original: dict[str, Any]) -> list[str]:
    """The run saved by mimo_ckpt itself (not imported), exported as torch_dist: megatron's own
    load of the model and Adam state gives back the trained values; the mismatched keys."""
    from megatron.core import dist_checkpointing

    native, exported = os.path.join(root, "native"), os.path.join(root, "native_exported")
    run.save(native, 2)
    _cli("export", native, "--format", "torch_dist", "--to", exported)
    _, template = _zeroed(SAVED)
    with cpu_dist_checkpointing():
        loaded = dist_checkpointing.load(template, exported)
    return _mismatches(_values(template, loaded), original)


def suite(args: dict[str, Any]) -> dict[str, Any]:
    return {
        "resume": resume_cases(args["root"], args["steps"], args["resume_at"]),
        "torch_dist": torch_dist_round_trip(args["root"], 2),
        "distopt": distopt_cases(args["root"], args["steps"], args["resume_at"]),
    }

