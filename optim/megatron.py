"""A megatron-core optimizer (from `get_megatron_optimizer`) as one module of a MimoOptimizer.

It runs where the megatron optimizer runs: on GPUs, and on CPU with gloo once megatron-core's CUDA
literals are patched from outside (examples/megatron_cpu.py, docs/megatron.md); its own tensors
live on the device of the optimizer's parameters. What it changes:
- the loss scale: a megatron grad scaler updates from its own module's overflow flag; here it is
  replaced by a view of the MimoOptimizer's one scaler, which updates from the global decision;
- overflow detection: bf16 and fp32 optimizers without a scaler never look for non-finite grads,
  so the adapter checks the main grads itself;
- state: megatron's `sharded_state_dict` leaves (ShardedTensor keys such as
  `optimizer.state.exp_avg.<model key>`) go to mimo_ckpt as they are, and its plain values
  (param groups, step, sharding type) become objects saved by the module's rank with all
  coordinates 0, not by global rank 0.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from mimo_ckpt.model import megatron_leaves
from mimo_ckpt.errors import ShardError
from mimo_ckpt.model.shard import ObjectShard

from .groups import ModuleGroups
from .state_init import materialise_state

__all__ = ["MegatronModuleOptimizer", "FULLY_RESHARDABLE", "FLAT_BOXES"]

# DistributedOptimizer metadata for model-space state that reshards over TP, PP, DP and EP.
FULLY_RESHARDABLE = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": False,
    "chained_optim_avoid_prefix": True,
}


# DistributedOptimizer state as each rank's own flat slices, saved as boxes of the model-space
# tensors: no gather, no full-domain buffer; reshards over TP, PP and DP like any other box.
FLAT_BOXES = {"mimo_state_layout": "flat_boxes"}


class _SharedScale:
    """Stands in for a megatron grad scaler: the scale is set by MimoOptimizer before each step."""

    def __init__(self, device: torch.device) -> None:
        self.scale = torch.ones(1, dtype=torch.float32, device=device)
        self.inv_scale = torch.ones(1, dtype=torch.float32, device=device)

    def set(self, inv_scale: float) -> None:
        self.inv_scale.fill_(inv_scale)
        self.scale.fill_(1.0 / inv_scale)

    def update(self, found_inf: bool) -> None:
        """No-op: the shared scaler updates once, from the decision of all modules."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _inner(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


class MegatronModuleOptimizer:
    """Drives a megatron-core optimizer for one module.

    `model_sharded_state_dict()` returns the module's model `sharded_state_dict()` (unwrapped, so
    keys carry no `module.` segments); the optimizer maps its state onto those keys.
    `zero_grad_buffer` clears the DDP grad buffers. `scheduler` is an optional megatron
    `OptimizerParamScheduler`. `metadata` goes to megatron's `sharded_state_dict` (for a
    DistributedOptimizer pass FULLY_RESHARDABLE plus `dp_cp_group`), except FLAT_BOXES, which
    saves a DistributedOptimizer's state from each rank's own slices instead (`_flat_state`).
    """

    def __init__(
        self,
        optimizer: Any,
        groups: ModuleGroups,
        model_sharded_state_dict: Callable[[], Any],
        *,
        zero_grad_buffer: Callable[[], None] | None = None,
        scheduler: Any = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.name, self.groups, self.optimizer = groups.name, groups, optimizer
        self.model_sharded_state_dict = model_sharded_state_dict
        self.zero_grad_buffer, self.scheduler = zero_grad_buffer, scheduler
        self.metadata = dict(metadata or {})
        self.flat_boxes = self.metadata.pop("mimo_state_layout", None) == "flat_boxes"
        if self.flat_boxes and not all(hasattr(inner, "gbuf_ranges") for inner in _inner(optimizer)):
            raise ShardError(f"module {groups.name!r}: FLAT_BOXES state needs a DistributedOptimizer")
        self.main_rank = groups.layout.rank_of()
        self.device = _device(optimizer)
        self._shared = _SharedScale(self.device)
        self._scaled = []
        for inner in _inner(optimizer):
            if getattr(inner, "grad_scaler", None) is not None:
                inner.grad_scaler = self._shared
                self._scaled.append(inner)
            _skip_step_in_fully_reshardable_load(inner)

    def _main_grads(self) -> list[torch.Tensor]:
        out = []
        for inner in _inner(self.optimizer):
            decoupled = getattr(inner.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
            for p in inner.get_parameters():
                g = getattr(p, "decoupled_grad", None) if decoupled else p.grad
                if g is not None:
                    out.append(g)
        return out

    @torch.no_grad()
    def prepare(self, inv_scale: float) -> torch.Tensor:
        self._shared.set(inv_scale)
        self.optimizer.prepare_grads()  # copies to main grads; unscales where a scaler is installed
        grads = self._main_grads()
        if inv_scale != 1.0 and not self._scaled:
            torch._foreach_mul_(grads, inv_scale)
        bad = torch.zeros(3, dtype=torch.float64, device=self.device)
        for g in grads:
            bad[0] += (~torch.isfinite(g)).any()
        dist.all_reduce(bad, group=self.groups.group("module"))
        if bad[0].item() > 0:
            return bad
        norm = float(self.optimizer.get_grad_norm())  # reduced over the module's grad-stats group
        zeros = float(self.optimizer.count_zeros())
        return torch.tensor([0.0, norm * norm, zeros], dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def clip(self, coef: float) -> None:
        grads = self._main_grads()
        if grads:
            torch._foreach_mul_(grads, coef)

    def step(self) -> bool:
        return bool(self.optimizer.step_with_ready_grads())

    def step_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step(increment=1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.zero_grad_buffer is not None:
            self.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none)

    def reload_model_params(self) -> None:
        self.optimizer.reload_model_params()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    # -- state ----------------------------------------------------------------------------------

    def sharded_state_dict(self, is_loading: bool = False) -> dict[str, Any]:
        """The same structure for save and load: state is created first where there is none.

        (megatron's own `is_loading=True` form lacks the step counts that a save writes.)"""
        for inner in _inner(self.optimizer):
            # megatron lists the shared step only when it is non-zero; a fresh template gets 1,
            # which the load overwrites.
            materialise_state(inner.optimizer, step=1 if is_loading else 0)
        is_main = self.groups.rank == self.main_rank
        if self.flat_boxes:  # param groups and scaler as objects, the tensors as boxes of slices
            state = self.optimizer.state_dict()
            out = {"megatron": _objects_for_plain_leaves(state, "optimizer.megatron", is_main),
                   "flat": self._flat_state()}
        else:
            state = self.optimizer.sharded_state_dict(self.model_sharded_state_dict(), False, metadata=self.metadata)
            out = {"megatron": _objects_for_plain_leaves(state, "optimizer.megatron", is_main)}
        if self.scheduler is not None:
            out["lr_scheduler"] = ObjectShard("optimizer.lr_scheduler", self.scheduler.state_dict(), is_main_replica=is_main)
        return out

    def _flat_state(self) -> dict[str, Any]:
        """Every parameter's main copy and optimizer state as this rank keeps them (flat slices of
        the parameter's local tensor), as boxes of `optimizer.state.<name>.<model key>` that view
        the live tensors: a save writes them, a load fills them in place."""
        leaves = {id(leaf.data): leaf for leaf in _param_leaves(self.model_sharded_state_dict())}
        out: dict[str, Any] = {}
        for inner in _inner(self.optimizer):
            for gbuf_range_maps in inner.gbuf_ranges:
                for buckets in gbuf_range_maps.values():
                    for bucket in buckets:
                        for param, ranges in bucket["param_map"].items():
                            leaf = leaves.get(id(param))
                            if leaf is None:
                                raise ShardError(f"module {self.name!r}: a parameter of shape {tuple(param.shape)} "
                                                 f"is not in the model's sharded_state_dict")
                            # As megatron: the model's replica id, with the optimizer instance for DP.
                            replica = (*tuple(leaf.replica_id)[:2], inner.distributed_optimizer_instance_id) \
                                if isinstance(leaf.replica_id, tuple) else leaf.replica_id
                            tensors = inner._get_main_param_and_optimizer_states(param)
                            tensors["fp32_param"] = tensors.pop("param")
                            for name, flat in tensors.items():
                                if name == "step":  # restored from the param groups, as megatron does
                                    continue
                                key = f"optimizer.state.{name}.{leaf.key}"
                                for shard in megatron_leaves.flat_state_shards(
                                        leaf, key, flat.view(-1), ranges["param"].start, replica_id=replica,
                                        module=self.name):
                                    out[f"{key}@{shard.global_offset}"] = shard
        return out

    def load_sharded_state_dict(self, loaded: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(loaded["megatron"])  # FLAT_BOXES: the tensors were filled in place
        _unshare_steps(self.optimizer)
        if self.scheduler is not None and "lr_scheduler" in loaded:
            self.scheduler.load_state_dict(loaded["lr_scheduler"])

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        _unshare_steps(self.optimizer)


def _device(optimizer: Any) -> torch.device:
    """Where the optimizer's parameters live (the current CUDA device if it holds none)."""
    for inner in _inner(optimizer):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                return param.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _param_leaves(tree: Any) -> list[Any]:
    """The model's ShardedTensors and ShardedTensorFactories (what describes each parameter)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _param_leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _param_leaves(v)]
    return [tree] if megatron_leaves.kind(tree) in ("ShardedTensor", "ShardedTensorFactory") else []


def _unshare_steps(optimizer: Any) -> None:
    """Work around megatron-core 0.19.2: without TE/Apex, DistributedOptimizer.load_state_dict gives
    every parameter the same `step` tensor, which torch's AdamW then increments once per parameter
    and step. Each parameter gets its own copy."""
    for inner in _inner(optimizer):
        for state in inner.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _skip_step_in_fully_reshardable_load(inner: Any) -> None:
    """Work around megatron-core 0.19.2: loading `fully_reshardable` state copies every tensor of the
    torch optimizer's per-parameter state, `step` included (a tensor in torch's AdamW), from a
    source that never holds `step` (KeyError). A non-tensor `step` is skipped by that copy; the
    step itself is restored from the param groups, as megatron intends."""
    original = getattr(inner, "_set_main_param_and_optimizer_states", None)
    if callable(original):
        inner._set_main_param_and_optimizer_states = lambda param, tensors: original(param, {"step": None, **tensors})


def _objects_for_plain_leaves(value: Any, key: str, is_main: bool) -> Any:
    """Copy of megatron's state with every plain (JSON) leaf made an object saved by one rank."""
    if megatron_leaves.kind(value) is not None or torch.is_tensor(value):
        return value
    if isinstance(value, dict):
        return {k: _objects_for_plain_leaves(v, f"{key}.{k}", is_main) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_objects_for_plain_leaves(v, f"{key}.{i}", is_main) for i, v in enumerate(value))
    return ObjectShard(key, value, is_main_replica=is_main)
