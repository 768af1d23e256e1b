"""The toy MIMO model's training loop with MimoOptimizer and mimo_ckpt, on one rank of a world.

Used by the optimizer tests (tests/optim_worlds.py) and the GPU check (tools/gpu_optim_check.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import mimo_ckpt
from mimo_ckpt import ModuleLayout
from optim import (
    DynamicLossScaler,
    MimoOptimizer,
    NativeModuleOptimizer,
    build_module_groups,
)
from tools import toy_mimo
from tools.toy_mimo import LR, LR_LAMBDAS, WEIGHT_DECAY, ToyMimo

MAX_GRAD_NORM = 0.5


class ToyRun:
    """The toy model and a MimoOptimizer for it on this rank."""

    def __init__(self, layouts: dict[str, ModuleLayout], shard_state: bool, seed: int = 0, device: str = "cpu") -> None:
        self.rank = dist.get_rank()
        self.layouts = layouts
        self.groups = build_module_groups(self.layouts)
        tp = self.groups["vision"].group("tp") if "vision" in self.groups else None
        self.model = ToyMimo(self.layouts, self.rank, tp, toy_mimo.full_weights(seed), device)
        modules = {
            m: NativeModuleOptimizer(
                self.model.sharded_params(m), self.groups[m],
                lambda gs, m=m: torch.optim.AdamW(gs, lr=LR[m], weight_decay=WEIGHT_DECAY),
                shard_state=shard_state,
                make_scheduler=lambda o, m=m: torch.optim.lr_scheduler.LambdaLR(o, LR_LAMBDAS[m]),
            )
            for m in self.model.params
        }
        scaler = DynamicLossScaler(scale=2.0**10, growth_interval=2, hysteresis=1)
        self.opt = MimoOptimizer(modules, self.layouts, max_grad_norm=MAX_GRAD_NORM,
                                 loss_scaler=scaler, log_num_zeros_in_grad=True)
        self.log: dict[str, list[Any]] = {"loss": [], "grad_norm": [], "ok": [], "scale": [], "lr": [], "zeros": []}

    def step(self, step: int, poison: bool = False, zero_row: bool = False) -> tuple[bool, float | None, int | None]:
        self.opt.zero_grad()
        self.log["scale"].append(self.opt.get_loss_scale().item())
        self.log["lr"].append({m: o.param_groups[0]["lr"] for m, o in self.opt.modules.items()})
        loss = self.model.forward_backward(step, float(self.opt.get_loss_scale()))
        self.model.sync_grads({m: g.group("dp_cp") for m, g in self.groups.items()})
        if poison:
            self.model.params["vision"]["encoder.fc1.weight"].grad[0, 0] = float("inf")
        if zero_row:
            self.model.params["vision"]["encoder.fc1.weight"].grad[0] = 0.0
        result = self.opt.step()
        for name, value in zip(("ok", "grad_norm", "zeros"), result):
            self.log[name].append(value)
        self.log["loss"].append(loss)
        return result

    def weights(self) -> dict[str, Any]:
        return {f"{m}/{k}": [list(self.model.boxes[m][k][0]), list(p.shape), p.detach().reshape(-1).tolist()]
                for m, ps in self.model.params.items() for k, p in ps.items()}

    def state(self, is_loading: bool = False) -> dict[str, Any]:
        opt = self.opt.sharded_state_dict(is_loading=is_loading)
        return {m: {"model": self.model.model_state(m), "optimizer": opt[m]} for m in self.model.params}

    def save(self, path: str, step: int) -> None:
        mimo_ckpt.save(self.state(), path, layouts=self.layouts, metadata={"step": step})

    def load(self, path: str) -> None:
        result = mimo_ckpt.load(self.state(is_loading=True), path, layouts=self.layouts)
        self.opt.load_sharded_state_dict({m: s["optimizer"] for m, s in result.state.items()})

    def adam_steps(self) -> list[float]:
        return sorted({float(st["step"]) for o in self.opt.modules.values() for st in o.optimizer.state.values()})
