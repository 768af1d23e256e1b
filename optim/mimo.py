"""MimoOptimizer: per-module optimizers on per-module grids, stepped as one.

Every rank of the world calls `step()`. Each module optimizer reduces [non-finite grads, squared
norm, zero grads] over its module's ranks (each box counted once); one world all-reduce (MAX) of
the per-module vectors then gives every rank every module's numbers, whether modules are disjoint
or colocated. The overflow decision is taken from that vector before the norm is used, so an
overflow in one module skips the step everywhere with no rank left in a collective.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Protocol

import torch
import torch.distributed as dist

from mimo_ckpt.errors import LayoutError, ShardError
from mimo_ckpt.model.shard import ObjectShard

from .groups import as_layout
from .loss_scale import ConstantLossScaler, DynamicLossScaler
from .native import STATE_PREFIX

__all__ = ["MimoOptimizer", "ModuleOptimizer", "StepResult"]

StepResult = tuple[bool, float | None, int | None]
_SCALER_KEY = f"{STATE_PREFIX}loss_scaler"


class ModuleOptimizer(Protocol):
    """What MimoOptimizer drives; `optim.NativeModuleOptimizer` is one."""

    main_rank: int

    def prepare(self, inv_scale: float) -> torch.Tensor:
        """Unscaled main grads ready; [non-finite, squared norm, zeros] reduced over the module."""
    def clip(self, coef: float) -> None: ...
    def step(self) -> bool: ...
    def step_scheduler(self) -> None: ...
    def zero_grad(self, set_to_none: bool = True) -> None: ...
    def reload_model_params(self) -> None: ...
    @property
    def param_groups(self) -> list[dict[str, Any]]: ...
    def sharded_state_dict(self, is_loading: bool = False) -> dict[str, Any]: ...
    def load_sharded_state_dict(self, loaded: Mapping[str, Any]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None: ...


def _in_grid(rank: int, layout_or_grid: Any, layout: Any) -> bool:
    check = getattr(layout_or_grid, "is_current_rank_in_grid", None)  # megatron-core HyperCommGrid
    return bool(check()) if callable(check) else layout.contains(rank)


def _collective_device(group: Any) -> torch.device:
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class MimoOptimizer:
    """One optimizer over modules with their own layouts.

    `modules`: this rank's module optimizers, by module name (only modules whose grid holds this
    rank). `layouts`: every module's ModuleLayout or HyperCommGrid, identical on all ranks.
    `max_grad_norm` > 0 clips every module with the global norm. One `loss_scaler` serves all
    modules (gradients of all modules come from one scaled loss) and updates from the global
    overflow decision.
    """

    def __init__(
        self,
        modules: Mapping[str, ModuleOptimizer],
        layouts: Mapping[str, Any],
        *,
        max_grad_norm: float = 0.0,
        loss_scaler: ConstantLossScaler | DynamicLossScaler | None = None,
        log_num_zeros_in_grad: bool = False,
        group: Any = None,
    ) -> None:
        self.group = group
        self.rank = dist.get_rank()  # layouts number global ranks
        self.layouts = {name: as_layout(name, layouts[name]) for name in sorted(layouts)}
        for name in modules:
            if name not in self.layouts:
                raise LayoutError(f"optimizer given for module {name!r}, which has no layout")
        for name, layout in self.layouts.items():
            member = _in_grid(self.rank, layouts[name], layout)
            if member and name not in modules:
                raise LayoutError(f"rank {self.rank} is in module {name!r}'s grid {layout.describe()} but has no optimizer for it")
            if not member and name in modules:
                raise LayoutError(f"rank {self.rank} has an optimizer for module {name!r} but is outside its grid {layout.describe()}")
        self.modules = {name: modules[name] for name in self.layouts if name in modules}
        self.max_grad_norm = float(max_grad_norm)
        self.loss_scaler = loss_scaler or ConstantLossScaler()
        self.log_num_zeros_in_grad = log_num_zeros_in_grad
        self.device = _collective_device(group)
        self._num_zeros = 0

    @torch.no_grad()
    def step(self) -> StepResult:
        """(update successful, global grad norm, zero grads or None); (False, None, None) on overflow."""
        names = list(self.layouts)
        stats = torch.zeros(3 * len(names), dtype=torch.float64, device=self.device)
        inv_scale = 1.0 / self.loss_scaler.scale
        for i, name in enumerate(names):
            opt = self.modules.get(name)
            if opt is None:
                continue
            stats[3 * i : 3 * i + 3] = opt.prepare(inv_scale).to(self.device, torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=self.group)
        per_module = stats.reshape(len(names), 3).cpu()
        self._num_zeros = int(per_module[:, 2].sum().item())

        if per_module[:, 0].sum().item() > 0:
            self.loss_scaler.update(True)
            return False, None, None
        grad_norm = math.sqrt(per_module[:, 1].sum().item())
        if self.max_grad_norm > 0:
            coef = self.max_grad_norm / (grad_norm + 1e-6)
            if coef < 1.0:
                for opt in self.modules.values():
                    opt.clip(coef)
        success = all([opt.step() for opt in self.modules.values()])
        flag = torch.tensor([int(success)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        success = bool(flag.item())
        self.loss_scaler.update(False)
        if success:
            for opt in self.modules.values():
                opt.step_scheduler()
        return success, grad_norm, self._num_zeros if self.log_num_zeros_in_grad else None

    def count_zeros(self) -> int:
        """Zero gradient elements across all modules at the last step (each box counted once)."""
        return self._num_zeros

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.modules.values():
            opt.zero_grad(set_to_none)

    def reload_model_params(self, state_dict: Any = None) -> None:
        """Refresh the fp32 main params from the model weights, after those were set from outside
        (`state_dict`: accepted as megatron's optimizers accept it, and unused)."""
        for opt in self.modules.values():
            opt.reload_model_params()

    # What megatron's training loop calls on a MegatronOptimizer, besides step, zero_grad,
    # param_groups and reload_model_params: `config.grad_scale_func = optimizer.scale_loss`.

    def get_loss_scale(self) -> torch.Tensor:
        """The scale to multiply the loss by before backward: a one-element float32 tensor on the
        collective device, as megatron's optimizers return it."""
        return torch.tensor([self.loss_scaler.scale], dtype=torch.float32, device=self.device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scaler.scale

    @property
    def is_stub_optimizer(self) -> bool:
        """True on a rank that holds no module (megatron's name for an optimizer with no params)."""
        return not self.modules

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """This rank's param groups of all its modules, in module-name order."""
        return [g for opt in self.modules.values() for g in opt.param_groups]

    # -- state ----------------------------------------------------------------------------------

    def sharded_state_dict(self, model_sharded_state_dict: Any = None, is_loading: bool = False,
                           **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Per module of this rank, its optimizer state as shards: pass it to mimo_ckpt.save, or
        (with `is_loading`) to mimo_ckpt.load and then its result to `load_sharded_state_dict`.
        Megatron's signature: each module optimizer knows its params' shards, so the model's
        `model_sharded_state_dict` (and megatron's other keywords) are not needed."""
        out = {}
        for name, opt in self.modules.items():
            state = opt.sharded_state_dict(is_loading)
            state["loss_scaler"] = ObjectShard(
                _SCALER_KEY, self.loss_scaler.state_dict(), is_main_replica=self.rank == opt.main_rank
            )
            out[name] = state
        return out

    def load_sharded_state_dict(self, loaded: Mapping[str, Mapping[str, Any]]) -> None:
        """Apply per-module state returned by mimo_ckpt.load; collective (checks the loss scale)."""
        for name, opt in self.modules.items():
            if name not in loaded:
                raise ShardError(f"no loaded optimizer state for module {name!r}")
            opt.load_sharded_state_dict(loaded[name])
        self._load_scaler({name: loaded[name].get("loss_scaler") for name in self.modules})

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: opt.state_dict() for name, opt in self.modules.items()}
        for state in out.values():
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for name, opt in self.modules.items():
            if name not in state_dict:
                raise ShardError(f"state_dict has no entry for module {name!r}")
            opt.load_state_dict(state_dict[name])
        self._load_scaler({name: state_dict[name].get("loss_scaler") for name in self.modules})

    def _load_scaler(self, by_module: Mapping[str, Any]) -> None:
        """Every module must carry the same scaler state; a disagreement anywhere fails everywhere."""
        states = {name: s for name, s in by_module.items() if s is not None}
        local_ok = len({repr(sorted(s.items())) for s in states.values()}) <= 1
        if states and local_ok:
            self.loss_scaler.load_state_dict(next(iter(states.values())))
        scale = self.loss_scaler.scale
        probe = torch.tensor([scale, -scale, 0.0 if local_ok else 1.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=self.group)
        if probe[2].item() > 0 or probe[0].item() != -probe[1].item():
            raise ShardError(
                f"modules disagree on the loss scaler state (rank {self.rank}: "
                f"{ {n: s for n, s in states.items()} }; scales across ranks range "
                f"{-probe[1].item()}..{probe[0].item()})"
            )
