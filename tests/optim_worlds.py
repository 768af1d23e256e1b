"""Training runs of the toy MIMO model on a local gloo world (see tests/test_optim_training.py)."""

from __future__ import annotations

import copy
import os
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

WORLD = 6
MAX_GRAD_NORM = 0.5

LAYOUTS = {
    # encoder TP2 on ranks 0-1, language DP2 x PP2 on ranks 2-5
    "disjoint": {"vision": dict(tp=2), "language": dict(dp=2, pp=2, rank_offset=2)},
    "colocated": {"vision": dict(tp=2, dp=3), "language": dict(dp=6)},
    # one module changed from "disjoint"
    "vision_tp1_dp2": {"vision": dict(dp=2), "language": dict(dp=2, pp=2, rank_offset=2)},
    "language_pp1_dp4": {"vision": dict(tp=2), "language": dict(dp=4, rank_offset=2)},
    "language_pp4": {"vision": dict(tp=2), "language": dict(pp=4, rank_offset=2)},
}


def layouts(name: str) -> dict[str, ModuleLayout]:
    return {m: ModuleLayout(**kw) for m, kw in LAYOUTS[name].items()}


class Run:
    """The toy model and a MimoOptimizer for it on this rank, under one named layout."""

    def __init__(self, layout_name: str, shard_state: bool, seed: int = 0) -> None:
        self.layout_name = layout_name
        self.rank = dist.get_rank()
        self.layouts = layouts(layout_name)
        self.groups = build_module_groups(self.layouts)
        tp = self.groups["vision"].group("tp") if "vision" in self.groups else None
        self.model = ToyMimo(self.layouts, self.rank, tp, toy_mimo.full_weights(seed))
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
        self.log["scale"].append(self.opt.get_loss_scale())
        self.log["lr"].append({m: o.param_groups[0]["lr"] for m, o in self.opt.modules.items()})
        loss = self.model.forward_backward(step, self.opt.get_loss_scale())
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

    def state(self) -> dict[str, Any]:
        opt = self.opt.sharded_state_dict()
        return {m: {"model": self.model.model_state(m), "optimizer": opt[m]} for m in self.model.params}

    def save(self, path: str, step: int) -> None:
        mimo_ckpt.save(self.state(), path, layouts=self.layouts, metadata={"step": step})

    def load(self, path: str) -> None:
        result = mimo_ckpt.load(self.state(), path, layouts=self.layouts)
        self.opt.load_sharded_state_dict({m: s["optimizer"] for m, s in result.state.items()})

    def adam_steps(self) -> list[float]:
        return sorted({float(st["step"]) for o in self.opt.modules.values() for st in o.optimizer.state.values()})


def training(args: dict) -> dict:
    """Plain runs: each layout/mode trains `steps` steps from the same weights."""
    out = {}
    for case in args["cases"]:
        run = Run(case["layout"], case["shard_state"])
        for step in range(args["steps"]):
            run.step(step)
        out[case["name"]] = {"log": run.log, "weights": run.weights()}
    return out


def overflow(args: dict) -> dict:
    """An inf in one vision rank's grad skips the step on every rank; training then goes on.
    Zeroed grads on one rank are counted once on every rank."""
    run = Run("disjoint", shard_state=args["shard_state"])
    run.step(0)
    before, scale_before = run.weights(), run.opt.get_loss_scale()
    poisoned = run.step(1, poison=run.rank == 1)
    after, scale_after = run.weights(), run.opt.get_loss_scale()
    recovered = run.step(2)
    zeroed = run.step(3, zero_row=run.rank == 0)  # a row of a box only rank 0 holds
    return {"poisoned": list(poisoned), "unchanged": before == after, "scales": [scale_before, scale_after],
            "recovered": list(recovered), "zeros": [zeroed[2], run.opt.count_zeros()]}


def resume(args: dict) -> dict:
    """Train k steps under one layout, save, load under another into fresh weights, train on."""
    k, total = args["k"], args["total"]
    first = Run(args["save_layout"], args["save_sharded"])
    for step in range(k):
        first.step(step)
    path = args["path"]
    first.save(path, k)
    saved_scaler = first.opt.loss_scaler.state_dict()
    out: dict[str, Any] = {"first": first.log}
    for name in args["load_layouts"]:
        run = Run(name, args["load_sharded"], seed=99)  # different weights: the load must restore all
        run.load(path)
        restored = {"scaler": run.opt.loss_scaler.state_dict() == saved_scaler, "adam_steps": run.adam_steps()}
        for step in range(k, total):
            run.step(step)
        out[name] = {"log": run.log, "weights": run.weights(), "restored": restored}
    return out


def plain_state(args: dict) -> dict:
    """state_dict / load_state_dict rewind a ZeRO-1 run by one step exactly; bad state fails everywhere."""
    run = Run("disjoint", shard_state=True)
    for step in range(2):
        run.step(step)
    weights = {m: {k: p.detach().clone() for k, p in ps.items()} for m, ps in run.model.params.items()}
    state = copy.deepcopy(run.opt.state_dict())
    run.step(2)
    expected = (run.weights(), run.log["loss"][-1], run.log["lr"][-1])
    run.step(3)
    with torch.no_grad():
        for m, ps in run.model.params.items():
            for k, p in ps.items():
                p.copy_(weights[m][k])
    run.opt.load_state_dict(state)
    run.step(2)
    out: dict[str, Any] = {"rewound": (run.weights(), run.log["loss"][-1], run.log["lr"][-1]) == expected}

    bad = copy.deepcopy(state)
    if run.rank == 0:
        bad["vision"]["loss_scaler"]["scale"] *= 2
    out["scaler_mismatch"] = _error_of(lambda: run.opt.load_state_dict(bad))
    fewer = copy.deepcopy(state)
    for module in fewer.values():
        module["param_groups"].append(dict(module["param_groups"][0]))
    out["param_groups"] = _error_of(lambda: run.opt.load_state_dict(fewer))
    out["no_optimizer"] = _error_of(lambda: MimoOptimizer({}, run.layouts))
    return out


def _error_of(fn: Any) -> list[str] | None:
    try:
        fn()
    except mimo_ckpt.MimoCkptError as exc:
        return [type(exc).__name__, str(exc)]
    return None


def suite(args: dict) -> dict:
    """Every scenario in one world, so ranks start once."""
    out = {"training": training(args["training"]), "overflow": overflow(args["overflow"]),
           "plain_state": plain_state({})}
    for i, case in enumerate(args["resume"]):
        out[f"resume{i}"] = resume(dict(case, path=os.path.join(args["root"], f"ckpt{i}")))
    return out
