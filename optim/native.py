"""A torch.optim optimizer over one module's parameters, with optional ZeRO-1 sharded state.

Every parameter gets an fp32 main copy the torch optimizer updates: the parameter itself when it is
fp32 and unsharded, else a separate tensor. With `shard_state`, the ranks of the module's dp x cp
group each own a contiguous run of dimension-0 rows of every parameter (a box of the global
tensor), keep main params and optimizer state for those rows only, and all-gather the updated rows
after each step. Because state lives in boxes of global tensors, it reshards like the weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from mimo_ckpt.model.box import Box
from mimo_ckpt.run.comm import TorchComm
from mimo_ckpt.errors import ShardError
from mimo_ckpt.model.shard import ObjectShard, TensorShard

from .groups import ModuleGroups
from .params import ShardedParam, SliceRef, first_holders, first_key_holders, zero1_rows
from .state_init import SCALAR_STATE, materialise_state

__all__ = ["NativeModuleOptimizer", "STATE_PREFIX"]

STATE_PREFIX = "optimizer."


@dataclass(slots=True, eq=False)  # compared by identity
class _MainSlice:
    """The rows of one parameter this rank updates, and their fp32 main copy."""

    sp: ShardedParam
    rows: tuple[int, int] | None  # None: the whole local tensor
    main: torch.Tensor
    box: Box

    @property
    def is_copy(self) -> bool:
        return self.main is not self.sp.param

    @property
    def saves_main(self) -> bool:
        """fp32 main params are saved only when they carry more than the model param (its dtype is lower)."""
        return self.sp.param.dtype != torch.float32

    def model_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of `t` (the parameter, its grad or data) this slice updates: a view."""
        t = self.sp.part(t)
        if self.rows is None:
            return t
        return t.reshape(1) if t.dim() == 0 else t[self.rows[0] : self.rows[1]]


def _param_groups(params: Sequence[Any]) -> list[dict[str, Any]]:
    """torch-style groups of ShardedParams: a flat list is one group."""
    if params and all(isinstance(p, ShardedParam) for p in params):
        return [{"params": list(params)}]
    groups = [dict(g) for g in params]
    for g in groups:
        if not all(isinstance(p, ShardedParam) for p in g.get("params", ())):
            raise ShardError("each param group's 'params' must be a list of optim.ShardedParam")
    return groups


class NativeModuleOptimizer:
    """One module's optimizer on this rank: any torch.optim optimizer, AdamW by default.

    `params`: ShardedParams, or torch-style groups `[{"params": [...], "weight_decay": 0.0}, ...]`.
    `make_optimizer(groups)` builds the torch optimizer over main params; `make_scheduler(opt)` an
    optional learning-rate scheduler with a JSON-able `state_dict()`, stepped after each successful
    step. Gradients must already be reduced over the module's data-parallel ranks (as DDP does).
    """

    def __init__(
        self,
        params: Sequence[Any],
        groups: ModuleGroups,
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
        *,
        shard_state: bool = False,
        make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        self.name, self.groups = groups.name, groups
        self.shard_state = shard_state
        param_groups = _param_groups(params)
        self.params = [p for g in param_groups for p in g["params"]]
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            dup = sorted({k for k in names if names.count(k) > 1})
            raise ShardError(f"module {self.name!r}: parameters {dup} appear more than once")
        if not self.params:
            raise ShardError(f"module {self.name!r}: no parameters on rank {groups.rank}")
        self.device = self.params[0].param.device
        self._shard_members = groups.members["dp_cp"]
        self._shard_index = self._shard_members.index(groups.rank)

        self._slices: list[_MainSlice] = []
        torch_groups = []
        for g in param_groups:
            mains = []
            for sp in g["params"]:
                s = self._make_slice(sp)
                if s is not None:
                    self._slices.append(s)
                    mains.append(s.main)
            torch_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": mains})
        make_optimizer = make_optimizer or (lambda gs: torch.optim.AdamW(gs))
        self.optimizer = make_optimizer(torch_groups)
        self.scheduler = make_scheduler(self.optimizer) if make_scheduler else None

        # Who counts each box in the norm, and who saves each key's scalars: same answer on all ranks.
        comm = TorchComm(groups.group("module"))
        mine = [SliceRef(s.sp.key, s.box).to_wire() for s in self._slices]
        gathered = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(mine).encode())]
        members = groups.members["module"]
        refs = {members[i]: [SliceRef.from_wire(w) for w in g] for i, g in enumerate(gathered)}
        holders, key_holders = first_holders(refs), first_key_holders(refs)
        me = groups.rank
        self._counted = [holders[SliceRef(s.sp.key, s.box)] == me for s in self._slices]
        # Stacked keys hold several slices on a rank; their scalars (one value per key) go once.
        self._scalar_slices = {}
        for s in self._slices:
            self._scalar_slices.setdefault(s.sp.key, s)
        self._saves_scalars = {s.sp.key: key_holders[s.sp.key] == me for s in self._slices}
        self.main_rank = groups.layout.rank_of()  # all coordinates 0: saves module-wide objects

    def _make_slice(self, sp: ShardedParam) -> _MainSlice | None:
        p = sp.part(sp.param)
        if not self.shard_state:
            whole = p is sp.param and p.dtype == torch.float32
            main = p if whole else p.detach().float().clone()
            return _MainSlice(sp, None, main, sp.box)
        rows = 1 if p.dim() == 0 else p.shape[0]
        begin, end = zero1_rows(rows, self._shard_index, len(self._shard_members))
        if begin == end:
            return None
        s = _MainSlice(sp, (begin, end), torch.empty(0), sp.box)
        s.main = s.model_rows(sp.param.detach()).float().clone()
        if p.dim() > 0:
            k = sp.prepend_axes
            offset = (*sp.global_offset[:k], sp.global_offset[k] + begin, *sp.global_offset[k + 1 :])
            s.box = Box(offset, (1,) * k + (end - begin, *p.shape[1:]))
        else:
            s.main = s.main.reshape(())
        return s

    # -- the step, in the order MimoOptimizer drives it: prepare, clip, step --------------------

    @torch.no_grad()
    def prepare(self, inv_scale: float) -> torch.Tensor:
        """Move grads to the main params and unscale them; returns, reduced over the module,
        [non-finite grads, sum of squared grads, zero grads] with each box counted once."""
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        for s, counted in zip(self._slices, self._counted, strict=True):
            g = s.sp.param.grad
            if g is None:
                s.main.grad = None
                continue
            if s.is_copy:
                s.main.grad = s.model_rows(g).float().reshape(s.main.shape)
            if inv_scale != 1.0:
                s.main.grad.mul_(inv_scale)
            stats[0] += (~torch.isfinite(s.main.grad)).any()
            if counted:
                g = s.main.grad.double()
                stats[1] += g.square().sum()
                stats[2] += (g == 0).sum()
        dist.all_reduce(stats, group=self.groups.group("module"))
        return stats

    @torch.no_grad()
    def clip(self, coef: float) -> None:
        for s in self._slices:
            if s.main.grad is not None:
                s.main.grad.mul_(coef)

    @torch.no_grad()
    def step(self) -> bool:
        self.optimizer.step()
        for s in self._slices:
            if s.is_copy:
                rows = s.model_rows(s.sp.param.data)
                rows.copy_(s.main.reshape(rows.shape))
        if self.shard_state:
            self._gather_rows()
        return True

    def step_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def _gather_rows(self) -> None:
        """All-gather every parameter's updated rows over the dp x cp group."""
        group, n = self.groups.group("dp_cp"), len(self._shard_members)
        if n == 1:
            return
        for sp in self.params:
            flat = sp.param.data.reshape(1) if sp.param.dim() == 0 else sp.part(sp.param.data)
            rows = flat.shape[0]
            width = math.ceil(rows / n)
            begin, end = zero1_rows(rows, self._shard_index, n)
            send = torch.zeros((width, *flat.shape[1:]), dtype=flat.dtype, device=flat.device)
            send[: end - begin] = flat[begin:end]
            recv = [torch.empty_like(send) for _ in range(n)]
            dist.all_gather(recv, send, group=group)
            for i, chunk in enumerate(recv):
                b, e = zero1_rows(rows, i, n)
                flat[b:e] = chunk[: e - b]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for sp in self.params:
            if set_to_none:
                sp.param.grad = None
            elif sp.param.grad is not None:
                sp.param.grad.zero_()
        for s in self._slices:
            if s.is_copy:
                s.main.grad = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    # -- state ----------------------------------------------------------------------------------

    def _ensure_state(self) -> None:
        materialise_state(self.optimizer)

    def _entries(self, s: _MainSlice) -> dict[str, Any]:
        state = self.optimizer.state[s.main]
        key = s.sp.key
        out: dict[str, Any] = {}
        if s.saves_main:
            out["fp32_param"] = self._tensor_shard("fp32_param", s, s.main)
        for name, value in sorted(state.items()):
            if name in SCALAR_STATE or not torch.is_tensor(value):
                if self._scalar_slices[key] is not s:
                    continue
                out[name] = ObjectShard(
                    f"{STATE_PREFIX}state.{name}.{key}", _to_number(value, key, name),
                    is_main_replica=self._saves_scalars[key],
                )
            elif value.shape == s.main.shape:
                out[name] = self._tensor_shard(name, s, value)
            else:
                raise ShardError(
                    f"module {self.name!r}, parameter {key!r}: optimizer state {name!r} has shape "
                    f"{list(value.shape)}, not the parameter's {list(s.main.shape)}; only "
                    f"element-wise state can be saved as shards"
                )
        return out

    def _tensor_shard(self, name: str, s: _MainSlice, tensor: torch.Tensor) -> TensorShard:
        return TensorShard(f"{STATE_PREFIX}state.{name}.{s.sp.key}", tensor.reshape(s.box.shape),
                           s.sp.global_shape, s.box.offset, allow_shape_mismatch=s.sp.allow_shape_mismatch)

    def sharded_state_dict(self, is_loading: bool = False) -> dict[str, Any]:
        """This rank's optimizer state as shards of model-space keys, for mimo_ckpt.save / load
        (the same structure either way: missing state is created first)."""
        self._ensure_state()
        out: dict[str, Any] = {
            "param_groups": ObjectShard(
                f"{STATE_PREFIX}param_groups", _hyperparameters(self.optimizer),
                is_main_replica=self.groups.rank == self.main_rank,
            ),
        }
        if self._slices:  # a ZeRO-1 rank may own no rows: an empty dict would be saved as a value
            out["state"] = {s.sp.name: self._entries(s) for s in self._slices}
        if self.scheduler is not None:
            out["lr_scheduler"] = ObjectShard(
                f"{STATE_PREFIX}lr_scheduler", _scheduler_state(self.name, self.scheduler),
                is_main_replica=self.groups.rank == self.main_rank,
            )
        return out

    def load_sharded_state_dict(self, loaded: Mapping[str, Any]) -> None:
        """Apply what mimo_ckpt.load returned for `sharded_state_dict()` (tensors are already in place)."""
        for s in self._slices:
            state = self.optimizer.state[s.main]
            scalars = loaded["state"].get(self._scalar_slices[s.sp.key].sp.name, {})
            for name, value in scalars.items():
                if name in state and not torch.is_tensor(value):
                    state[name] = _scalar_like(state[name], value)
        self._refresh_unsaved_mains()
        _load_hyperparameters(self.name, self.optimizer, loaded["param_groups"])
        if self.scheduler is not None and "lr_scheduler" in loaded:
            self.scheduler.load_state_dict(loaded["lr_scheduler"])

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Set every main copy from the model weights (after the weights were changed outside)."""
        self._copy_model_to_main(only_unsaved=False)

    @torch.no_grad()
    def _copy_model_to_main(self, only_unsaved: bool) -> None:
        for s in self._slices:
            if s.is_copy and not (only_unsaved and s.saves_main):
                s.main.copy_(s.model_rows(s.sp.param.data).reshape(s.main.shape))

    def _refresh_unsaved_mains(self) -> None:
        """Main copies that are not saved equal the (loaded) model rows they came from."""
        self._copy_model_to_main(only_unsaved=True)

    def state_dict(self) -> dict[str, Any]:
        """Plain, module-keyed state of this rank (this rank's rows when sharded)."""
        self._ensure_state()
        out = {
            "state": {
                s.sp.name: {**self.optimizer.state[s.main], **({"fp32_param": s.main} if s.saves_main else {})}
                for s in self._slices
            },
            "param_groups": _hyperparameters(self.optimizer),
        }
        if self.scheduler is not None:
            out["lr_scheduler"] = _scheduler_state(self.name, self.scheduler)
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._ensure_state()
        for s in self._slices:
            saved = state_dict["state"].get(s.sp.name)
            if saved is None:
                raise ShardError(f"module {self.name!r}: state_dict has no state for {s.sp.name!r}")
            state = self.optimizer.state[s.main]
            for name, value in saved.items():
                if name == "fp32_param":
                    s.main.copy_(value)
                elif torch.is_tensor(value) and name not in SCALAR_STATE:
                    state[name].copy_(value)
                else:
                    state[name] = _scalar_like(state.get(name, value), value)
        self._refresh_unsaved_mains()
        _load_hyperparameters(self.name, self.optimizer, state_dict["param_groups"])
        if self.scheduler is not None and "lr_scheduler" in state_dict:
            self.scheduler.load_state_dict(state_dict["lr_scheduler"])


def _to_number(value: Any, key: str, name: str) -> float | int:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ShardError(f"parameter {key!r}: scalar state {name!r} has {value.numel()} elements")
        return value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise ShardError(f"parameter {key!r}: optimizer state {name!r} of type {type(value).__name__} cannot be saved")


def _scalar_like(current: Any, value: Any) -> Any:
    if torch.is_tensor(current):
        return torch.as_tensor(value).to(dtype=current.dtype, device=current.device, copy=True)
    return type(current)(value) if isinstance(current, (int, float)) else value


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    out = []
    for g in optimizer.param_groups:
        hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
        out.append({k: v for k, v in hyper.items() if _json_able(v)})
    return out


def _load_hyperparameters(module: str, optimizer: torch.optim.Optimizer, saved: Sequence[Mapping[str, Any]]) -> None:
    if len(saved) != len(optimizer.param_groups):
        raise ShardError(
            f"module {module!r}: checkpoint has {len(saved)} param groups, the optimizer has "
            f"{len(optimizer.param_groups)}"
        )
    for group, hyper in zip(optimizer.param_groups, saved):
        for k, v in hyper.items():
            group[k] = tuple(v) if isinstance(group.get(k), tuple) else v


def _scheduler_state(module: str, scheduler: Any) -> dict[str, Any]:
    state = scheduler.state_dict()
    try:
        json.dumps(state)
    except (TypeError, ValueError) as exc:
        raise ShardError(f"module {module!r}: lr scheduler state is not JSON-able ({exc})") from exc
    return state


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
