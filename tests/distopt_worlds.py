"""megatron DDP + DistributedOptimizer on a 4-rank gloo world (see tests/test_megatron_distopt.py).

A GPTModel (SwiGLU) trains 3 steps at TP1 x DP2 (ranks 0-1) under optim.MimoOptimizer, its
DistributedOptimizer driven through MegatronModuleOptimizer with FLAT_BOXES, and is saved with
mimo_ckpt. For each case, a fresh model and optimizer (other weights) on the new layout load it,
directly or after an offline `mimo-ckpt reshard`, and train 3 more steps; the new layout's
uninterrupted 6-step run from the same global init and batches is the reference.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist

import mimo_ckpt
from mimo_ckpt import ModuleLayout
from examples.megatron_cpu import Built, GptSize, build, forward_backward, model_state

WORLD = 4
SIZE = GptSize(vocab=64, seq=16, hidden=32, heads=4, layers=2, batch=4)
SAVED = ModuleLayout(dp=2)
CASES = {
    # name: (--module argument of `mimo-ckpt reshard`, or None to reshard at load; the new layout)
    "dp4": (None, ModuleLayout(dp=4)),
    "dp1": (None, ModuleLayout()),
    "tp2_dp2": (None, ModuleLayout(tp=2, dp=2)),
    "dp4_offline_reshard": ("language=dp4", ModuleLayout(dp=4)),
}
MAX_GRAD_NORM = 1.0


class Run:
    """One model + DistributedOptimizer on `layout` under a MimoOptimizer (collective)."""

    def __init__(self, layout: ModuleLayout, perturb_seed: int | None = None) -> None:
        from optim import MimoOptimizer, build_module_groups
        from optim.megatron import FLAT_BOXES, MegatronModuleOptimizer

        self.layouts = {"language": layout}
        self.built: Built = build(layout, SIZE)
        groups = build_module_groups(self.layouts)
        modules = {}
        if self.built.ddp is not None:
            if perturb_seed is not None:  # other weights than the global init, which the load replaces
                g = torch.Generator().manual_seed(perturb_seed + dist.get_rank())
                with torch.no_grad():
                    for p in self.built.ddp.parameters():
                        p.copy_(torch.randn(p.shape, generator=g))
            modules["language"] = MegatronModuleOptimizer(
                self.built.optimizer, groups["language"], lambda: model_state(self.built),
                zero_grad_buffer=self.built.ddp.zero_grad_buffer,
                metadata=dict(FLAT_BOXES, dp_cp_group=self.built.pgc.dp_cp))
        self.mimo = MimoOptimizer(modules, self.layouts, max_grad_norm=MAX_GRAD_NORM)

    @property
    def member(self) -> bool:
        return self.built.ddp is not None

    def train(self, steps: range) -> list[list[float]]:
        """[loss, grad norm] per step on members, [] elsewhere."""
        out = []
        for step in steps:
            self.mimo.zero_grad()
            loss = forward_backward(self.built, step, SIZE, float(self.mimo.get_loss_scale())) if self.member else None
            ok, norm, _ = self.mimo.step()
            assert ok, f"step {step} skipped"
            if self.member:
                out.append([loss, float(norm)])
        return out

    def loss(self, step: int) -> float | None:
        """The loss of a step's batch under the current weights; nothing is updated."""
        self.mimo.zero_grad()
        loss = forward_backward(self.built, step, SIZE) if self.member else None
        self.mimo.zero_grad()
        return loss

    def state(self, is_loading: bool = False) -> dict[str, Any]:
        if not self.member:
            return {}
        optimizer = self.mimo.sharded_state_dict(is_loading=is_loading)["language"]
        return {"language": {"model": model_state(self.built), "optimizer": optimizer}}

    def save(self, path: str) -> None:
        mimo_ckpt.save(self.state(), path, layouts=self.layouts)

    def load(self, path: str) -> None:
        result = mimo_ckpt.load(self.state(is_loading=True), path, layouts=self.layouts)
        self.mimo.load_sharded_state_dict({m: s["optimizer"] for m, s in result.state.items()})  # collective


def _reshard(src: str, dst: str, module: str) -> None:
    """`mimo-ckpt reshard` on rank 0 while the others wait."""
    if dist.get_rank() == 0:
        subprocess.run([sys.executable, "-m", "mimo_ckpt.cli", "reshard", src, dst, "--module", module, "--quiet"],
                       check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    dist.barrier()


def _model_shapes(run: Run) -> dict[str, list[int]]:
    """Global shape of every model tensor, from the live model's own sharded_state_dict."""
    from mimo_ckpt.interop.megatron_keys import from_megatron
    from mimo_ckpt.model.tree import flatten_module_state

    state = from_megatron(run.built.ddp.module.sharded_state_dict(
        prefix="language_model.", metadata={"dp_cp_group": run.built.pgc.dp_cp}))
    return {s.key: list(s.global_shape) for s in flatten_module_state("language", state["language"]).tensors}


def _stored_tensors(path: str) -> dict[str, dict[str, Any]]:
    entry = mimo_ckpt.read_manifest(mimo_ckpt.open_storage(path)).modules["language"]
    return {key: {"global_shape": list(t.global_shape), "dtype": t.dtype,
                  "covered": sum(math.prod(s.box.shape) for s in t.shards)}
            for key, t in entry.tensors.items()}


def suite(args: dict[str, Any]) -> dict[str, Any]:
    root, steps, resume_at = args["root"], args["steps"], args["resume_at"]
    saved = os.path.join(root, "saved")
    run = Run(SAVED)
    out: dict[str, Any] = {"saved": run.train(range(resume_at))}
    run.save(saved)
    if dist.get_rank() == 0:
        out["model_shapes"] = _model_shapes(run)
        out["stored"] = _stored_tensors(saved)
    out["saved_continued"] = run.train(range(resume_at, steps))  # the saved layout, uninterrupted
    references: dict[ModuleLayout, list[list[float]]] = {}
    for name, (reshard, layout) in CASES.items():
        path = saved
        if reshard:
            path = os.path.join(root, name)
            _reshard(saved, path, reshard)
        resumed = Run(layout, perturb_seed=7)
        before = resumed.loss(resume_at)
        resumed.load(path)
        case = {"before_load": before, "resumed": resumed.train(range(resume_at, steps)), "dir": path}
        if dist.get_rank() == 0:
            case["stored_layout"] = mimo_ckpt.read_manifest(
                mimo_ckpt.open_storage(path)).modules["language"].layout.to_json()
        if layout not in references:
            references[layout] = Run(layout).train(range(steps))
        case["reference"] = references[layout]
        out[name] = case
    return out
