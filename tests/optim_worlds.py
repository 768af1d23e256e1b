"""Training runs of the toy MIMO model on a local gloo world (see tests/test_optim_training.py)."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

import mimo_ckpt
from mimo_ckpt import ModuleLayout, TensorShard
from optim import MimoOptimizer
from tests.fixtures.toy_training import ToyRun

WORLD = 6

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


def training(args: dict) -> dict:
    """Plain runs: each layout/mode trains `steps` steps from the same weights."""
    out = {}
    for case in args["cases"]:
        run = ToyRun(layouts(case["layout"]), case["shard_state"])
        for step in range(args["steps"]):
            run.step(step)
        out[case["name"]] = {"log": run.log, "weights": run.weights()}
    return out


def overflow(args: dict) -> dict:
    """An inf in one vision rank's grad skips the step on every rank; training then goes on.
    Zeroed grads on one rank are counted once on every rank."""
    run = ToyRun(layouts("disjoint"), shard_state=args["shard_state"])
    run.step(0)
    before, scale_before = run.weights(), run.opt.get_loss_scale().item()
    poisoned = run.step(1, poison=run.rank == 1)
    after, scale_after = run.weights(), run.opt.get_loss_scale().item()
    recovered = run.step(2)
    zeroed = run.step(3, zero_row=run.rank == 0)  # a row of a box only rank 0 holds
    return {"poisoned": list(poisoned), "unchanged": before == after, "scales": [scale_before, scale_after],
            "recovered": list(recovered), "zeros": [zeroed[2], run.opt.count_zeros()]}


def resume(args: dict) -> dict:
    """Train k steps under one layout, save, load under another into fresh weights, train on."""
    k, total = args["k"], args["total"]
    first = ToyRun(layouts(args["save_layout"]), args["save_sharded"])
    for step in range(k):
        first.step(step)
    path = args["path"]
    first.save(path, k)
    saved_scaler = first.opt.loss_scaler.state_dict()
    out: dict[str, Any] = {"first": first.log}
    for name in args["load_layouts"]:
        run = ToyRun(layouts(name), args["load_sharded"], seed=99)  # different weights: the load must restore all
        run.load(path)
        restored = {"scaler": run.opt.loss_scaler.state_dict() == saved_scaler, "adam_steps": run.adam_steps()}
        for step in range(k, total):
            run.step(step)
        out[name] = {"log": run.log, "weights": run.weights(), "restored": restored}
    return out


def plain_state(args: dict) -> dict:
    """state_dict / load_state_dict rewind a ZeRO-1 run by one step exactly; bad state fails everywhere."""
    run = ToyRun(layouts("disjoint"), shard_state=True)
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


def _bf16_grad(w0: torch.Tensor, step: int) -> torch.Tensor:
    return torch.cos(w0 * (step + 1)).to(torch.bfloat16)


def mixed_precision(args: dict) -> dict:
    """bf16 weights, fp32 main params in ZeRO-1 rows over DP6; saved, loaded under DP2, stepped on."""
    from mimo_ckpt import TensorShard
    from optim import NativeModuleOptimizer, ShardedParam, build_module_groups

    def build(dp: int):
        lay = {"m": ModuleLayout(dp=dp)}
        groups = build_module_groups(lay)
        if "m" not in groups:
            return lay, None, MimoOptimizer({}, lay)
        param = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.bfloat16))
        module = NativeModuleOptimizer([ShardedParam.whole("w", param)], groups["m"],
                                       lambda gs: torch.optim.AdamW(gs, lr=0.1), shard_state=True)
        return lay, param, MimoOptimizer({"m": module}, lay)

    w0 = torch.linspace(-1, 1, 24).reshape(6, 4)
    lay, param, opt = build(6)
    with torch.no_grad():
        param.copy_(w0)
    opt.reload_model_params()
    for step in range(args["steps"]):
        param.grad = _bf16_grad(w0, step)
        opt.step()
    state = {"m": {"model": TensorShard.whole("w", param.data), "optimizer": opt.sharded_state_dict()["m"]}}
    mimo_ckpt.save(state, args["path"], layouts=lay)

    lay, param, opt = build(2)
    if param is None:  # ranks outside the new layout still take part in every collective
        mimo_ckpt.load({}, args["path"], layouts=lay)
        opt.load_sharded_state_dict({})
        opt.step()
        return {}
    state = {"m": {"model": TensorShard.whole("w", param.data), "optimizer": opt.sharded_state_dict(is_loading=True)["m"]}}
    result = mimo_ckpt.load(state, args["path"], layouts=lay)
    opt.load_sharded_state_dict({"m": result.state["m"]["optimizer"]})
    (main_slice,) = opt.modules["m"]._slices
    loaded_main = [list(main_slice.rows), main_slice.main.tolist()]
    param.grad = _bf16_grad(w0, args["steps"])
    opt.step()
    return {"main": loaded_main, "weights": param.float().tolist()}


def parts(args: dict) -> dict:
    """A parameter given as two parts whose boxes sit in swapped order in the stored tensor (as a
    GLU fc1's gate and up rows do), ZeRO-1 over DP6: trained, saved, then loaded under DP2 as one
    whole parameter of the stored order."""
    from optim import NativeModuleOptimizer, ShardedParam, build_module_groups

    w0 = torch.linspace(-1, 1, 12).reshape(4, 3)
    swap = [2, 3, 0, 1]

    def build(dp: int, whole: bool):
        lay = {"m": ModuleLayout(dp=dp)}
        groups = build_module_groups(lay)
        if "m" not in groups:
            return lay, None, MimoOptimizer({}, lay)
        param = torch.nn.Parameter(w0[swap].clone() if whole else w0.clone())
        sps = ([ShardedParam.whole("w", param)] if whole else
               [ShardedParam("w", param, (4, 3), (2, 0), rows=(0, 2)), ShardedParam("w", param, (4, 3), (0, 0), rows=(2, 4))])
        module = NativeModuleOptimizer(sps, groups["m"], lambda gs: torch.optim.AdamW(gs, lr=0.1), shard_state=True)
        return lay, param, MimoOptimizer({"m": module}, lay)

    lay, param, opt = build(6, whole=False)
    for step in range(args["steps"]):
        param.grad = torch.cos(w0 * (step + 1))
        opt.step()
    model = [TensorShard("w", param.data[:2], (4, 3), (2, 0)), TensorShard("w", param.data[2:], (4, 3), (0, 0))]
    mimo_ckpt.save({"m": {"model": model, "optimizer": opt.sharded_state_dict()["m"]}}, args["path"], layouts=lay)
    out: dict[str, Any] = {"trained": param.detach().tolist()}

    lay, param, opt = build(2, whole=True)
    if param is None:
        mimo_ckpt.load({}, args["path"], layouts=lay)
        opt.load_sharded_state_dict({})
        return out
    state = {"m": {"model": TensorShard.whole("w", param.data), "optimizer": opt.sharded_state_dict(is_loading=True)["m"]}}
    result = mimo_ckpt.load(state, args["path"], layouts=lay)
    opt.load_sharded_state_dict({"m": result.state["m"]["optimizer"]})
    (s,) = opt.modules["m"]._slices
    out["loaded"] = {"rows": list(s.rows), "weights": param.detach().tolist(),
                     "exp_avg": opt.modules["m"].optimizer.state[s.main]["exp_avg"].tolist()}
    return out


def megatron_loop(args: dict) -> dict:
    """MimoOptimizer driven as megatron's training loop drives a MegatronOptimizer: the loss scaled
    by `scale_loss` (megatron's `config.grad_scale_func`), the scale read as a tensor, state asked
    for with megatron's arguments. Module "m" lives on ranks 0-3; ranks 4-5 hold a stub."""
    from optim import NativeModuleOptimizer, ShardedParam, build_module_groups
    from optim.loss_scale import DynamicLossScaler

    lay = {"m": ModuleLayout(dp=4)}
    groups = build_module_groups(lay)
    x = torch.linspace(-2, 2, 24).reshape(6, 4)
    w0 = torch.linspace(1, -1, 24).reshape(6, 4)
    out: dict[str, Any] = {}
    if "m" in groups:
        param = torch.nn.Parameter(w0.clone())
        module = NativeModuleOptimizer([ShardedParam.whole("w", param)], groups["m"],
                                       lambda gs: torch.optim.SGD(gs, lr=0.01), shard_state=True)
        opt = MimoOptimizer({"m": module}, lay, loss_scaler=DynamicLossScaler(scale=16.0))
        opt.reload_model_params()
    else:
        opt = MimoOptimizer({}, lay, loss_scaler=DynamicLossScaler(scale=16.0))
    scale = opt.get_loss_scale()
    out["scale"] = [scale.dtype == torch.float32, list(scale.shape), scale.item()]
    out["stub"] = opt.is_stub_optimizer
    for _ in range(3):
        opt.zero_grad()
        if "m" in groups:
            opt.scale_loss(((param * x) ** 2).sum()).backward()  # each DP rank: the same batch
        success, norm, _ = opt.step()
    out["step"] = [success, norm]
    if "m" in groups:
        ref = torch.nn.Parameter(w0.clone())
        sgd = torch.optim.SGD([ref], lr=0.01)  # SGD: an update that forgot to unscale is 16x off
        for _ in range(3):  # the unscaled reference
            sgd.zero_grad()
            ((ref * x) ** 2).sum().backward()
            sgd.step()
        out["max_abs_diff"] = (param.detach() - ref.detach()).abs().max().item()
        state = opt.sharded_state_dict({"unused": "model state"}, is_loading=False, metadata={"any": 1})
        out["state_keys"] = sorted(state)
    return out


def suite(args: dict) -> dict:
    """Every scenario in one world, so ranks start once."""
    out = {"training": training(args["training"]), "overflow": overflow(args["overflow"]),
           "plain_state": plain_state({}), "megatron_loop": megatron_loop({}),
           "parts": parts({"steps": 3, "path": os.path.join(args["root"], "parts")}),
           "mixed_precision": mixed_precision(dict(args["mixed_precision"], path=os.path.join(args["root"], "bf16")))}
    for i, case in enumerate(args["resume"]):
        out[f"resume{i}"] = resume(dict(case, path=os.path.join(args["root"], f"ckpt{i}")))
    return out
