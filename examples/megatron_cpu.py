"""megatron-core's DistributedDataParallel + DistributedOptimizer on CPU with gloo.

megatron-core 0.19.2 writes `device='cuda'` and `torch.cuda.*` stream calls into the DDP and
optimizer code path. No megatron file is edited here; `patch_for_cpu()` (idempotent, a no-op
where CUDA is available) applies the patches below from outside, each with its reason:

- `use_cpu` (tools/megatron_mimo): attention's scratch buffer, the CUDA RNG tracker and the default
  causal mask are made on CUDA during a forward pass;
- `patch_megatron_torch_namespace`: four optimizer/buffer modules get a module-local `torch` whose
  factories turn `device='cuda'` into the CPU and whose `torch.cuda` streams are no-ops;
- `patch_clip_grads_type_assert`: the grad clip asserts `grad.type() == 'torch.cuda.FloatTensor'`;
- `patch_clip_grads_l2_norm`: the torch fallback of the multi-tensor L2 norm returns its norm on CUDA;
- `report_cuda_tensor_type` (around `get_megatron_optimizer`, see `build`): DistributedOptimizer
  dispatches on `param.type()` strings naming CUDA tensor types;
- `use_gloo_for_dp_zero_gather(optimizer)`: the `fully_reshardable` gather moves its buffers to
  CUDA for NCCL unless told to use its gloo branch; the DP group here is gloo already;
- `cpu_dist_checkpointing` (tools/megatron_mimo): `dist_checkpointing.save/load` synchronise and
  ask for the current CUDA device.

`build(layout, size)` makes a tiny-to-mid GPTModel (SwiGLU, no biases, fp32 or bf16 params)
on a ModuleLayout's HyperCommGrid, with layout-independent initial weights, wrapped in megatron DDP
with a DistributedOptimizer (Adam, fp32 main params).
"""

from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from examples.megatron_mimo import Size, _global_init, cpu_dist_checkpointing, use_cpu

__all__ = [
    "patch_for_cpu", "report_cuda_tensor_type", "use_gloo_for_dp_zero_gather", "cpu_dist_checkpointing",
    "GptSize", "Built", "build", "pg_collection", "grid_pg_collection", "global_batch", "forward_backward", "model_state",
]

# -- patches ----------------------------------------------------------------------------------------


class _NoStream:
    """A CUDA stream stand-in: CPU ops are synchronous, so every wait is a no-op."""

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _on_cpu(device: Any) -> Any:
    if isinstance(device, int) or (device is not None and str(device).startswith("cuda")):
        return "cpu"
    return device


def _cpu_factory(fn: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


class _CpuCuda(types.SimpleNamespace):
    """`torch.cuda` as the patched modules see it: current device 'cpu', no-op streams."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """A `torch` for selected megatron modules only: factories given a CUDA device allocate on
    the CPU and `torch.cuda` is _CpuCuda; everything else is torch."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like"):
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.cuda = _CpuCuda(
            current_device=lambda: "cpu", current_stream=lambda *a, **k: _NoStream(),
            Stream=lambda *a, **k: _NoStream(), stream=lambda *a, **k: contextlib.nullcontext(),
            synchronize=lambda *a, **k: None, empty_cache=lambda: None,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()

# megatron modules with CUDA literals on the DDP + DistributedOptimizer path.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.optimizer.optimizer",  # MixedPrecisionOptimizer: _dummy_overflow_buf, _scale_one
    "megatron.core.optimizer.clip_grads",  # grad norm / clip / count zeros: torch.zeros(device='cuda')
    "megatron.core.optimizer.distrib_optimizer",  # state gather/scatter: torch.cuda.current_device()
    "megatron.core.distributed.param_and_grad_buffer",  # finish_grad_sync: torch.cuda.current_stream()
)


def patch_megatron_torch_namespace() -> None:
    """The modules above hard-code device='cuda' and CUDA streams: give them _CpuTorch as `torch`."""
    for name in _MODULES_WITH_CUDA_LITERALS:
        importlib.import_module(name).torch = _CPU_TORCH


@contextlib.contextmanager
def report_cuda_tensor_type(tensors: Iterable[torch.Tensor | None]) -> Any:
    """While open, `t.type()` of the given CPU tensors names the CUDA type ('torch.cuda.FloatTensor'):
    DistributedOptimizer and the grad clip dispatch on or assert those strings."""
    patched = []
    for t in tensors:
        if t is None or "type" in t.__dict__:
            continue
        original = type(t).type

        def cuda_type(*args: Any, _t: torch.Tensor = t, _original: Any = original, **kwargs: Any) -> Any:
            name = _original(_t, *args, **kwargs)
            if not args and not kwargs and isinstance(name, str) and not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name

        t.type = cuda_type
        patched.append(t)
    try:
        yield
    finally:
        for t in patched:
            del t.__dict__["type"]


def _wrap_once(owner: Any, name: str, make: Any) -> None:
    original = getattr(owner, name)
    if not getattr(original, "_cpu_patch", False):
        wrapped = make(original)
        wrapped._cpu_patch = True
        setattr(owner, name, wrapped)


def patch_clip_grads_type_assert() -> None:
    """clip_grad_by_total_norm_fp32 asserts each grad's type() is 'torch.cuda.FloatTensor'."""
    from megatron.core.optimizer import optimizer as optimizer_module

    def make(original: Any) -> Any:
        def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            with report_cuda_tensor_type(getattr(p, "grad", None) for p in parameters):
                return original(parameters, *args, **kwargs)
        return clip

    _wrap_once(optimizer_module, "clip_grad_by_total_norm_fp32", make)


def patch_clip_grads_l2_norm() -> None:
    """The L2 norm without TE/apex (megatron.core.utils.local_multi_tensor_l2_norm) returns its
    result on device='cuda': run it with megatron.core.utils' `torch` swapped for _CpuTorch."""
    from megatron.core import utils as utils_module
    from megatron.core.optimizer import clip_grads

    def make(original: Any) -> Any:
        def l2_norm(*args: Any, **kwargs: Any) -> Any:
            saved, utils_module.torch = utils_module.torch, _CPU_TORCH
            try:
                return original(*args, **kwargs)
            finally:
                utils_module.torch = saved
        return l2_norm

    _wrap_once(clip_grads, "l2_norm_impl", make)


def patch_for_cpu() -> None:
    """Everything megatron's model forward, DDP and DistributedOptimizer need to run on CPU
    (idempotent; does nothing where CUDA is available)."""
    if torch.cuda.is_available():
        return
    use_cpu()
    patch_megatron_torch_namespace()
    patch_clip_grads_type_assert()
    patch_clip_grads_l2_norm()


def use_gloo_for_dp_zero_gather(optimizer: Any) -> None:
    """`get_parameter_state_dp_zero` (the `fully_reshardable` save and load) moves its buffers to
    CUDA for NCCL unless `use_gloo_comm`; on CPU the DP group is gloo already, so take that branch."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not isinstance(inner, DistributedOptimizer) or dist.get_backend(inner.data_parallel_group) != "gloo":
            continue
        inner.data_parallel_group_gloo = inner.data_parallel_group
        original = inner.get_parameter_state_dp_zero

        def with_gloo(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            return _original(*args, **{**kwargs, "use_gloo_comm": True})

        inner.get_parameter_state_dp_zero = with_gloo


@contextlib.contextmanager
def gather_objects_within(group: Any) -> Any:
    """While open, `all_gather_object` without a group gathers over `group`: get_megatron_optimizer
    aligns its param-group keys over the whole world (0.19.2), which hangs where the model's layout
    covers only some ranks; the model's own ranks are the ones that must agree."""
    from unittest import mock

    original = dist.all_gather_object

    def gather(object_list: list[Any], obj: Any, group: Any = None) -> None:
        if group is not None:
            return original(object_list, obj, group=group)
        out = [None] * dist.get_world_size(within)
        original(out, obj, group=within)
        object_list[:] = out

    within = group
    with mock.patch.object(dist, "all_gather_object", gather):
        yield


# -- model, DDP, optimizer --------------------------------------------------------------------------

# groups of a ModuleLayout's HyperCommGrid that megatron's model, DDP and optimizer ask for
_GROUPS = {
    "tp": ["tp"], "cp": ["cp"], "ep": ["ep"], "pp": ["pp"], "dp": ["dp"], "dp_cp": ["cp", "dp"],
    "mp": ["tp", "pp"], "tp_cp": ["tp", "cp"], "tp_dp_cp": ["tp", "cp", "dp"], "tp_ep": ["tp", "ep"],
    "tp_ep_pp": ["tp", "ep", "pp"], "all": ["tp", "cp", "ep", "pp", "dp"],
}


def pg_collection(layout: Any) -> tuple[Any, Any]:
    """(HyperCommGrid, ProcessGroupCollection) of a ModuleLayout; collective over the world (every
    rank calls it, members or not); the collection is None outside the layout."""
    grid = layout.to_hyper_comm_grid("gloo")
    return grid, grid_pg_collection(grid, layout.contains(dist.get_rank()))


def grid_pg_collection(grid: Any, member: bool) -> Any:
    """The ProcessGroupCollection megatron's model, DDP and optimizer ask for, from a HyperCommGrid's
    groups (those it lacks are created, collectively over the world); None where not `member`."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    def group(dims: list[str]) -> Any:
        try:
            return grid.get_pg(dims)
        except KeyError:
            return grid.create_pg(dims)

    pg = {name: group(dims) for name, dims in _GROUPS.items()}
    if not member:
        return None
    return ProcessGroupCollection(
        tp=pg["tp"], cp=pg["cp"], pp=pg["pp"], ep=pg["ep"], mp=pg["mp"], tp_cp=pg["tp_cp"], dp=pg["dp"],
        dp_cp=pg["dp_cp"], tp_dp_cp=pg["tp_dp_cp"], intra_dp_cp=pg["dp_cp"], expt_tp=pg["tp"],
        tp_ep=pg["tp_ep"], tp_ep_pp=pg["tp_ep_pp"], expt_dp=pg["dp"], intra_expt_dp=pg["dp"],
        intra_dist_opt=pg["all"], embd=None, pos_embd=None,
    )


@dataclass(frozen=True)
class GptSize:
    vocab: int = 64
    seq: int = 16
    hidden: int = 32
    heads: int = 4
    layers: int = 2
    batch: int = 4  # global batch
    dtype: torch.dtype = torch.float32  # model params; main params are fp32 either way


@dataclass
class Built:
    layout: Any
    pgc: Any  # ProcessGroupCollection, None outside the layout
    ddp: Any = None
    optimizer: Any = None


def _init_weights(model: Any, pgc: Any, size: GptSize) -> None:
    """Every weight from a seeded function of its key and global shape (tools/megatron_mimo), so
    all layouts start from the same global weights (megatron's own init depends on TP)."""
    from mimo_ckpt.interop.megatron_keys import from_megatron
    from mimo_ckpt.model.tree import flatten_module_state

    state = from_megatron(model.sharded_state_dict(prefix="language_model.", metadata={"dp_cp_group": pgc.dp_cp}))
    like = Size(vocab=size.vocab, vocab_multiple=1, seq=size.seq, hidden=size.hidden, heads=size.heads,
                layers=size.layers)
    with torch.no_grad():
        for module, shards in state.items():
            for s in flatten_module_state(module, shards).tensors:
                full = _global_init(module, s.key, s.global_shape, like)
                box = tuple(slice(o, o + n) for o, n in zip(s.box.offset, s.box.shape))
                s.data.copy_(full[box].to(s.data.dtype))


def build(layout: Any, size: GptSize = GptSize(), *, lr: float = 1e-2, weight_decay: float = 0.01) -> Built:
    """GPTModel (SwiGLU, no biases, local layer spec) + DDP + DistributedOptimizer on `layout`
    (collective over the world; ranks outside the layout get only the groups)."""
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    patch_for_cpu()
    _, pgc = pg_collection(layout)
    built = Built(layout, pgc)
    if pgc is None:
        return built
    bf16 = size.dtype == torch.bfloat16
    cfg = TransformerConfig(
        num_layers=size.layers, hidden_size=size.hidden, num_attention_heads=size.heads,
        ffn_hidden_size=2 * size.hidden, tensor_model_parallel_size=layout.tp, use_cpu_initialization=True,
        params_dtype=size.dtype, bf16=bf16, hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, normalization="LayerNorm",
    )
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=size.vocab, max_sequence_length=size.seq,
                     share_embeddings_and_output_weights=False, pg_collection=pgc)
    _init_weights(model, pgc, size)
    built.ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False,
                                           grad_reduce_in_fp32=True),
        model, pg_collection=pgc,
    )
    ocfg = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, bf16=bf16, params_dtype=size.dtype,
                           use_distributed_optimizer=True)
    with report_cuda_tensor_type(built.ddp.parameters()), gather_objects_within(pgc.tp_dp_cp):
        built.optimizer = get_megatron_optimizer(ocfg, [built.ddp], pg_collection=pgc, use_gloo_process_groups=False)
    use_gloo_for_dp_zero_gather(built.optimizer)
    return built


def global_batch(step: int, size: GptSize) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of the global batch of a step: the same on every layout."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, size.vocab, (size.batch, size.seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def forward_backward(built: Built, step: int, size: GptSize, scale: float = 1.0) -> float:
    """This DP rank's share of the global batch forward and backward, grads reduced by DDP; returns
    the mean loss over the global batch (the same on every rank of the layout)."""
    dp, dp_rank = built.pgc.dp.size(), built.pgc.dp.rank()
    per = size.batch // dp
    tokens, labels = (t[dp_rank * per:(dp_rank + 1) * per] for t in global_batch(step, size))
    positions = torch.arange(size.seq).expand_as(tokens)
    mask = torch.triu(torch.ones(size.seq, size.seq, dtype=torch.bool), diagonal=1).view(1, 1, size.seq, size.seq)
    loss = built.ddp(tokens, positions, mask, labels=labels).float().mean()
    (loss * scale).backward()
    built.ddp.finish_grad_sync()  # DDP averages over DP
    report = loss.detach().clone()
    dist.all_reduce(report, group=built.pgc.dp)
    return report.item() / dp


def model_state(built: Built) -> dict[str, Any]:
    """The unwrapped model's sharded_state_dict (megatron keys without `module.`), no _extra_state."""
    from megatron.core.utils import unwrap_model

    state = unwrap_model(built.ddp).sharded_state_dict(metadata={"dp_cp_group": built.pgc.dp_cp})
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}
