"""A small megatron-core `MimoModel` on per-module `HyperCommGrid`s, trained with
optim.MimoOptimizer and checkpointed with mimo_ckpt: the example to copy.

The model, LLaVA-style: a vision module ("images": megatron-core's CLIP ViT and an MLP projector,
TP over its own grid) and a Llama-class GPTModel language model ("language": rotary positions,
SwiGLU MLP, RMSNorm, no biases, a vocabulary padded as Megatron-LM pads it, local
non-Transformer-Engine layer spec, TP/PP/DP over its own grid), on disjoint ranks (megatron's non-colocated mode) or on the same ranks
(colocated, PP 1).

    torchrun --nproc-per-node 4 -m examples.megatron_mimo --images tp2 --language pp2 --steps 3 --save /ckpt/a
    mimo-ckpt reshard /ckpt/a /ckpt/b --module images=dp2
    torchrun --nproc-per-node 4 -m examples.megatron_mimo --images dp2 --language pp2 --steps 3 --load /ckpt/b

With `--distributed-optimizer` (`MegatronMimoRun(..., distributed_optimizer=True)`) the language
model is wrapped in megatron's DistributedDataParallel and trained by megatron's
DistributedOptimizer (AdamW, the native path's hyperparameters and schedule) through
optim.megatron.MegatronModuleOptimizer; its state is saved as boxes of the model's tensors
(FLAT_BOXES: `optimizer.state.<name>.<model key>`), so it reshards like the rest, and the
checkpoint's model keys are the native run's. On CPU this uses examples/megatron_cpu.py's patches.

megatron-core ships the model but not the glue between modules on different ranks, and some of
its code paths assume CUDA. What this file does in their place, so the same code runs on CPU with
gloo and on GPUs with NCCL (docs/megatron.md):
- weights are built with `use_cpu_initialization` and then set from a seeded function of each
  tensor's global key and shape, so every layout starts from the same global weights;
- the vocabulary is padded to a multiple of `vocab_multiple` x TP (Megatron-LM's
  `--make-vocab-size-divisible-by`), so the embedding and output layer change size with TP; the
  padding rows start at zero and the loss is taken over the real vocabulary only, so they get no
  gradient and stay zero, and a checkpoint loads under another TP (megatron's
  `allow_shape_mismatch`: rows cut or zero-filled) onto the same trajectory;
- encoder outputs travel to the language model's first stage, hidden states between its pipeline
  stages, and gradients back, as point-to-point messages between the ranks that need them;
- gradients are summed over each module's data-parallel group (megatron's DDP needs CUDA; with
  `distributed_optimizer` the language model's go through megatron's DDP, patched for CPU);
- the attention mask is passed explicitly where megatron lets us, and on CPU megatron's default
  causal mask (made on CUDA; the colocated path asks for it) is made on the CPU;
- megatron's CUDA RNG tracker, which attention forks around dropout, is replaced on CPU by one
  whose fork does nothing (dropout then draws from the CPU generator; the model uses none);
- attention's scratch buffer (parallel_state's global memory buffer, allocated on the current
  CUDA device) is replaced on CPU by one that allocates there;
- megatron's `dist_checkpointing.save` synchronises and queries the current CUDA device; on CPU
  `cpu_dist_checkpointing()` stands in for both (the tests write megatron checkpoints with it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any

# megatron-core warns, on import and while building, about optional accelerations this example
# does not use (Transformer Engine, Apex, absl), an API it uses on purpose (MimoModel is
# experimental) and CUDA tuning; none of them asks anything of a reader of this example.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "absl.logging is not installed", "MimoModelConfig is experimental", "full scope is deprecated",
                 "When using async grad allreduce"):
    warnings.filterwarnings("ignore", message=_message)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.fusions import fused_softmax  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.mimo import MimoModel, MimoModelConfig  # noqa: E402
from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules  # noqa: E402
from megatron.core.models.vision.clip_vit_model import CLIPViTModel  # noqa: E402
from megatron.core.models.vision.multimodal_projector import MultimodalProjector  # noqa: E402
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.tensor_parallel import random as random_module  # noqa: E402
from megatron.core.transformer.mlp import MLPSubmodules  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from mimo_ckpt import LayoutError, ModuleLayout  # noqa: E402


@dataclass(frozen=True)
class Size:
    """Model and batch dimensions; the default is the tiny model the tests train on CPU."""

    vocab: int = 70  # real tokens; the last is the image token
    vocab_multiple: int = 8  # padded to a multiple of this x TP: 72 at TP1, 80 at TP2, 96 at TP4
    seq: int = 16
    hidden: int = 32
    heads: int = 4
    layers: int = 2
    encoder_hidden: int = 24
    encoder_layers: int = 1
    patch: int = 2  # CLIP's patch side, in pixels
    grid: int = 2  # patches per image side: each image gives grid^2 + 1 rows (the class token kept)
    batch: int = 4  # global batch

    @property
    def image_tokens(self) -> int:
        """Image token positions per sample: one per CLIP output row."""
        return self.grid * self.grid + 1

    @property
    def image_side(self) -> int:
        return self.patch * self.grid

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1

    def padded_vocab(self, tp: int) -> int:
        multiple = self.vocab_multiple * tp
        return -(-self.vocab // multiple) * multiple


TINY = Size()
LANGUAGE, IMAGES = "language", "images"
GRID_GROUPS = (["tp"], ["cp"], ["pp"], ["dp"], ["dp", "cp"], ["tp", "pp"])


class _CpuMemoryBuffer:
    """Stands in for megatron's GlobalMemoryBuffer (which allocates on CUDA). Attention uses it
    as the `beta=0` input of baddbmm, so fresh memory serves as well."""

    def get_tensor(self, shape: Any, dtype: torch.dtype, name: str, mem_alloc_context: Any = None) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _CpuRngTracker:
    """megatron's CUDA RNG tracker interface with nothing to track on CPU."""

    def fork(self, name: str = "") -> Any:
        return contextlib.nullcontext()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        pass

    def is_initialized(self) -> bool:
        return True


def use_cpu() -> None:
    """Replace the CUDA-only pieces megatron reaches for during a forward pass (module docstring)."""
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._GLOBAL_MEMORY_BUFFER = _CpuMemoryBuffer()
    random_module._CUDA_RNG_STATE_TRACKER = _CpuRngTracker()
    random_module._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    if not getattr(RotaryEmbedding.get_emb, "on_cpu", False):
        RotaryEmbedding.get_emb = _rotary_emb_on_cpu(RotaryEmbedding.get_emb)


def _rotary_emb_on_cpu(get_emb: Any) -> Any:
    """RotaryEmbedding.get_emb moves its frequencies to the current CUDA device on first use."""
    def on_cpu(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.cuda.is_available():
            return get_emb(self, *args, **kwargs)
        from unittest import mock

        with mock.patch("torch.cuda.current_device", lambda: "cpu"):
            return get_emb(self, *args, **kwargs)

    on_cpu.on_cpu = True
    return on_cpu


def seed_generators(device: str, seed: int, tp_rank: int) -> None:
    """Seeds as megatron seeds them: CPU per rank, and on CUDA the tracker's per-TP-rank streams."""
    torch.manual_seed(seed + tp_rank)
    if device != "cpu":
        random_module.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)


@contextlib.contextmanager
def cpu_dist_checkpointing() -> Any:
    """Lets megatron's dist_checkpointing.save run on a machine without CUDA."""
    if torch.cuda.is_available():
        yield
        return
    from unittest import mock

    with mock.patch("torch.cuda.synchronize", lambda *a, **k: None), \
            mock.patch("torch.cuda.current_device", lambda: "cpu"):
        yield


def build_grids(layouts: dict[str, ModuleLayout], backend: str) -> dict[str, Any]:
    """One HyperCommGrid per module; every rank creates every group in the same order (collective)."""
    grids = {}
    for name in sorted(layouts):
        grid = layouts[name].to_hyper_comm_grid(backend)
        for dims in GRID_GROUPS:
            grid.create_pg(dims)
        grids[name] = grid
    return grids


def _pg_collection(grid: Any) -> Any:
    return ProcessGroupCollection(
        tp=grid.get_pg("tp"), cp=grid.get_pg("cp"), pp=grid.get_pg("pp"), dp=grid.get_pg("dp"),
        dp_cp=grid.get_pg(["dp", "cp"]), mp=grid.get_pg(["tp", "pp"]), embd=None, pos_embd=None,
    )


def _config(layout: ModuleLayout, num_layers: int, hidden: int, heads: int, dtype: torch.dtype,
            llama: bool = False, ffn: int | None = None, **extra: Any) -> Any:
    """The encoder's config, or with `llama` the language model's: SwiGLU, RMSNorm, no biases."""
    style = dict(gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
                 normalization="RMSNorm") if llama else dict(add_bias_linear=True, normalization="LayerNorm")
    return TransformerConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn or 2 * hidden,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0, attention_dropout=0.0, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, **style, **extra,
    )


class _GatherColumns(torch.autograd.Function):
    """All-gather a TP-split last dimension; backward keeps this rank's columns, since every TP
    rank computes the same loss from the gathered values (megatron's gather from the tensor-parallel
    region, whose output buffer is made on CUDA)."""

    @staticmethod
    def forward(ctx: Any, part: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, part.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        columns = grad.chunk(dist.get_world_size(ctx.group), dim=-1)
        return columns[dist.get_rank(ctx.group)].contiguous(), None


class ClipViT(CLIPViTModel):
    """megatron-core's CLIP ViT on a module grid: it keeps its TP group, which its
    `sharded_state_dict` otherwise takes from megatron's global parallel_state."""

    def __init__(self, *args: Any, pg_collection: Any, **kwargs: Any) -> None:
        super().__init__(*args, pg_collection=pg_collection, **kwargs)
        self.tp_group = pg_collection.tp


@contextlib.contextmanager
def _cuda_free_construction() -> Any:
    """CLIPViTModel puts its position ids on CUDA when it is built; without CUDA they stay put."""
    if torch.cuda.is_available():
        yield
        return
    from unittest import mock

    with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self):
        yield


def causal_mask(n: int, device: Any) -> torch.Tensor:
    """megatron's mask convention: True where attention is masked out."""
    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1).view(1, 1, n, n)


def build_model(layouts: dict[str, ModuleLayout], grids: dict[str, Any], dtype: torch.dtype = torch.float32,
                size: Size = TINY, sum_language_grads: bool = False) -> Any:
    """The MimoModel parts this rank runs, or None on a rank outside every grid. With
    `sum_language_grads` the language model's config says its loss is already each replica's share
    (`calculate_per_token_loss`), so megatron's DDP sums its gradients over DP instead of averaging."""
    rank = dist.get_rank()
    if not any(layout.contains(rank) for layout in layouts.values()):
        return None
    lm, enc = layouts[LANGUAGE], layouts[IMAGES]
    lm_pg = _pg_collection(grids[LANGUAGE]) if lm.contains(rank) else None
    enc_pg = _pg_collection(grids[IMAGES]) if enc.contains(rank) else None
    pp_rank = lm.coords(rank)["pp"] if lm.contains(rank) else 0
    language = ModuleSpec(module=GPTModel, params=dict(
        config=_config(lm, size.layers, size.hidden, size.heads, dtype, llama=True,
                       calculate_per_token_loss=sum_language_grads),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=size.padded_vocab(lm.tp), max_sequence_length=size.seq, pre_process=pp_rank == 0, post_process=pp_rank == lm.pp - 1,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
        pg_collection=lm_pg,
    ))
    # the projector maps encoder rows to the language model's width in two linears (LLaVA's)
    projector_config = _config(enc, 1, size.hidden, size.heads, dtype, ffn=size.hidden)
    images = ModuleSpec(module=VisionModalitySubmodules, params=dict(pg_collection=enc_pg), submodules={
        "encoders": {"clip": ModuleSpec(module=ClipViT, params=dict(
            transformer_config=_config(enc, size.encoder_layers, size.encoder_hidden, size.heads, dtype),
            transformer_layer_spec=get_vit_layer_with_local_spec(), ln_pre_impl=WrappedTorchNorm,
            patch_dim=size.patch, img_h=size.image_side, img_w=size.image_side, pg_collection=enc_pg))},
        "input_projections": [ModuleSpec(
            module=MultimodalProjector,
            params=dict(config=projector_config, projector_type="mlp", input_size=size.encoder_hidden, pg_collection=enc_pg),
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        )],
    })
    with warnings.catch_warnings(), _cuda_free_construction():
        warnings.simplefilter("ignore", UserWarning)  # "MimoModel is experimental"
        return MimoModel(MimoModelConfig(
            language_model_spec=language, modality_submodules_spec={IMAGES: images},
            special_token_ids={IMAGES: size.image_token_id}, module_to_grid_map=grids,
        ))


# -- weights and parameters ---------------------------------------------------------------------


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""The language model's tensors with a row per (padded) vocabulary entry."""


def _global_init(module: str, key: str, shape: tuple[int, ...], size: Size) -> torch.Tensor:
    """A tensor's initial global value: a function of its module, key and shape only; padded
    vocabulary rows are zero, and the real rows do not depend on the padding."""
    seed = int.from_bytes(hashlib.sha256(f"{module}/{key}".encode()).digest()[:8], "little") >> 1
    g = torch.Generator().manual_seed(seed)
    if module == LANGUAGE and key in VOCAB_KEYS:
        full = torch.zeros(shape)
        full[: size.vocab] = torch.randn((size.vocab, *shape[1:]), generator=g) / max(1.0, shape[-1] ** 0.5)
        return full
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    if key.endswith(("layer_norm_weight", "layernorm.weight", "norm.weight")):
        return 1.0 + 0.1 * t
    return 0.2 * t if key.endswith("bias") else t / max(1.0, shape[-1] ** 0.5)


def module_tensors(model: Any) -> dict[str, list[Any]]:
    """This rank's model tensors per module as mimo_ckpt TensorShards with canonical keys
    (mimo_ckpt.interop.megatron_keys), factories built: SwiGLU's fc1 gives two boxes, each a view of the
    rows of the local weight it covers."""
    from mimo_ckpt.interop.megatron_keys import from_megatron
    from mimo_ckpt.model.tree import flatten_module_state

    state = from_megatron(model_sharded_state_dict(model)) if model is not None else {}
    return {m: flatten_module_state(m, shards).tensors for m, shards in state.items()}


def model_sharded_state_dict(model: Any) -> dict[str, Any]:
    """`model.sharded_state_dict()` with the keys of the unwrapped model: MimoModel adds a `module.`
    level under a language model wrapped in megatron's DistributedDataParallel."""
    from megatron.core.distributed import DistributedDataParallel

    wrapped = model.language_model
    if not isinstance(wrapped, DistributedDataParallel):
        return model.sharded_state_dict()
    model._modules["language_model"] = wrapped.module
    try:
        return model.sharded_state_dict()
    finally:
        model._modules["language_model"] = wrapped


@torch.no_grad()
def init_weights(model: Any, size: Size = TINY) -> None:
    """Set every weight box from its layout-independent global value."""
    for module, shards in module_tensors(model).items():
        for s in shards:
            full = _global_init(module, s.key, s.global_shape, size)
            box = tuple(slice(o, o + n) for o, n in zip(s.box.offset, s.box.shape))
            s.data.copy_(full[box].to(s.data.dtype))


def sharded_params(model: Any) -> dict[str, list[Any]]:
    """Per module, the trainable parameters as optim.ShardedParams (the model's own boxes; a box
    that covers only some rows of its parameter, as each half of SwiGLU's fc1 does, is a part)."""
    from optim import ShardedParam

    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()} if model is not None else {}
    out: dict[str, list[Any]] = {}
    seen: set[tuple[int, Any]] = set()
    for module, shards in module_tensors(model).items():
        for s in shards:
            p = params.get(s.data.untyped_storage().data_ptr())
            if p is None:  # a buffer
                continue
            prepend = s.data.dim() - p.dim()
            rows = None
            if s.data.numel() != p.numel():
                first = (s.data.data_ptr() - p.data_ptr()) // (p.stride(0) * p.element_size())
                rows = (first, first + s.data.shape[prepend])
            if (id(p), rows) in seen:  # a tied copy
                continue
            seen.add((id(p), rows))
            out.setdefault(module, []).append(ShardedParam(
                s.key, p, s.global_shape, s.global_offset, prepend, rows=rows,
                allow_shape_mismatch=s.allow_shape_mismatch))
    return out


# -- data -----------------------------------------------------------------------------------------


def global_batch(step: int, device: Any = "cpu", size: Size = TINY) -> dict[str, torch.Tensor]:
    """Step `step`'s whole batch, the same on every rank: tokens with `image_tokens` image slots,
    labels, a loss mask and the images."""
    g = torch.Generator().manual_seed(1000 + step)
    shape, image = (size.batch, size.seq), size.image_token_id
    tokens = torch.randint(0, image, shape, generator=g)
    tokens[:, 1 : 1 + size.image_tokens] = image
    labels = torch.randint(0, image, shape, generator=g)
    loss_mask = torch.ones(shape)
    loss_mask[:, : 1 + size.image_tokens] = 0.0
    images = torch.randn(size.batch, 3, size.image_side, size.image_side, generator=g)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "images": images}
    return {k: v.to(device) for k, v in batch.items()}


def samples(layout: ModuleLayout, rank: int, batch: int) -> tuple[int, int]:
    """The rows of the global batch the rank's data-parallel replica processes."""
    per = batch // layout.dp
    dp = layout.coords(rank)["dp"]
    return dp * per, (dp + 1) * per


# -- moving activations and gradients between module ranks ---------------------------------------


def encoder_routes(enc: ModuleLayout, lm: ModuleLayout, batch: int) -> list[tuple[int, int, int, int]]:
    """(encoder rank, language rank, first sample, end sample): who sends which encoder rows to
    the language model's first stage. Encoder TP ranks hold the same output; TP rank 0 sends it."""
    routes = []
    for r in lm.ranks:
        c = lm.coords(r)
        if c["pp"] != 0:
            continue
        lo, hi = samples(lm, r, batch)
        for s in enc.ranks:
            if enc.coords(s)["tp"] != 0 or enc.coords(s)["cp"] != 0:
                continue
            elo, ehi = samples(enc, s, batch)
            if max(lo, elo) < min(hi, ehi):
                routes.append((s, r, max(lo, elo), min(hi, ehi)))
    return sorted(routes)


def gradient_routes(enc: ModuleLayout, lm: ModuleLayout, batch: int) -> list[tuple[int, int, int, int]]:
    """(language rank, encoder rank, first, end): the gradient of encoder rows goes back from the
    language model's first-stage TP rank 0 to every encoder rank of the matching replica."""
    routes = []
    for _, r, lo, hi in encoder_routes(enc, lm, batch):
        if lm.coords(r)["tp"] != 0:
            continue
        for t in enc.ranks:
            elo, ehi = samples(enc, t, batch)
            if max(lo, elo) < min(hi, ehi):
                routes.append((r, t, max(lo, elo), min(hi, ehi)))
    return sorted(routes)


def _exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> None:
    ops = [dist.P2POp(dist.isend, t, peer) for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for peer, t in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _stage_peer(lm: ModuleLayout, rank: int, step: int) -> int:
    c = lm.coords(rank)
    return lm.rank_of(**{**c, "pp": c["pp"] + step})


# -- training -------------------------------------------------------------------------------------

LR = {IMAGES: 2e-3, LANGUAGE: 1e-3}
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


def lr_factor(step: int) -> float:
    """The learning rate after `step` optimizer steps, as a multiple of LR."""
    return 1.0 / (1 + 0.1 * step)


class InverseDecay:
    """`LambdaLR(lr_factor)` for a megatron optimizer (its param groups' `lr`), with the
    `step(increment=)` and state of megatron's OptimizerParamScheduler."""

    def __init__(self, optimizer: Any, lr: float) -> None:
        self.optimizer, self.lr, self.num_steps = optimizer, lr, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(self.num_steps)

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()


class MegatronMimoRun:
    """The model, a MimoOptimizer over per-module AdamW, one training step, save and load.

    With `distributed_optimizer`, the language model is wrapped in megatron's
    DistributedDataParallel and trained by megatron's DistributedOptimizer (AdamW with the same
    hyperparameters, weight decay on every parameter as torch's AdamW applies it) through
    optim.megatron.MegatronModuleOptimizer, whose state is saved as boxes of the model's tensors
    (FLAT_BOXES); the encoder keeps its NativeModuleOptimizer."""

    def __init__(self, layouts: dict[str, ModuleLayout], *, backend: str = "gloo", device: str = "cpu",
                 dtype: torch.dtype = torch.float32, size: Size = TINY, distributed_optimizer: bool = False) -> None:
        from optim import MimoOptimizer, NativeModuleOptimizer, build_module_groups

        self.rank, self.layouts, self.device, self.dtype = dist.get_rank(), layouts, device, dtype
        self.size, self.distributed_optimizer, self.ddp = size, distributed_optimizer, None
        enc, lm = layouts[IMAGES], layouts[LANGUAGE]
        if enc.contains(self.rank) and lm.contains(self.rank) and (enc.dp, enc.pp, lm.pp) != (lm.dp, 1, 1):
            raise LayoutError("colocated modules need the same DP size and PP 1 here "
                              f"(images {enc.describe()}, language {lm.describe()})")
        if device == "cpu":
            use_cpu()
        elif parallel_state._GLOBAL_MEMORY_BUFFER is None:  # made by initialize_model_parallel, unused here
            parallel_state._set_global_memory_buffer()
        mine = [layout for layout in layouts.values() if layout.contains(self.rank)]
        seed_generators(device, 1234, mine[0].coords(self.rank)["tp"] if mine else 0)
        self.grids = build_grids(layouts, backend)
        if distributed_optimizer:
            from examples.megatron_cpu import grid_pg_collection

            # the groups megatron's DDP and optimizer ask for (collective: every rank creates them)
            self.language_pgs = grid_pg_collection(self.grids[LANGUAGE], lm.contains(self.rank))
        self.model = build_model(layouts, self.grids, dtype, size, sum_language_grads=distributed_optimizer)
        if self.model is not None:
            self.model.to(device=device, dtype=dtype)  # as megatron's Float16Module does
            init_weights(self.model, size)
        self.groups = build_module_groups(layouts)
        modules = {
            m: NativeModuleOptimizer(
                params, self.groups[m], lambda gs, m=m: torch.optim.AdamW(gs, lr=LR[m], weight_decay=WEIGHT_DECAY),
                make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_factor),
            )
            for m, params in sharded_params(self.model).items()
            if not (distributed_optimizer and m == LANGUAGE)
        }
        if distributed_optimizer and lm.contains(self.rank):
            modules[LANGUAGE] = self._distributed_optimizer()
        self.opt = MimoOptimizer(modules, self.grids, max_grad_norm=MAX_GRAD_NORM)

    def _distributed_optimizer(self) -> Any:
        """Wrap the language model in megatron's DDP (MimoModel's forward calls the wrapper) and
        build its DistributedOptimizer, driven as one module of the MimoOptimizer."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from examples.megatron_cpu import gather_objects_within, patch_for_cpu, report_cuda_tensor_type
        from optim.megatron import FLAT_BOXES, MegatronModuleOptimizer

        if self.device == "cpu":
            patch_for_cpu()
        language, pgs = self.model.language_model, self.language_pgs
        self.ddp = DistributedDataParallel(
            language.config, DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False),
            language, pg_collection=pgs)
        self.model.language_model = self.ddp
        config = OptimizerConfig(optimizer="adam", lr=LR[LANGUAGE], weight_decay=WEIGHT_DECAY,
                                 bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                                 use_distributed_optimizer=True)
        # config_overrides={}: no group without weight decay for 1-D parameters (megatron's default,
        # which its own scheduler applies), so every parameter decays as in the native AdamW.
        # The param-group keys are agreed among the module's own ranks, not the world's.
        with report_cuda_tensor_type(self.ddp.parameters()), gather_objects_within(pgs.intra_dist_opt):
            optimizer = get_megatron_optimizer(config, [self.ddp], config_overrides={}, pg_collection=pgs,
                                               use_gloo_process_groups=False)
        return MegatronModuleOptimizer(
            optimizer, self.groups[LANGUAGE], self._language_sharded_state_dict,
            zero_grad_buffer=self.ddp.zero_grad_buffer, scheduler=InverseDecay(optimizer, LR[LANGUAGE]),
            metadata=dict(FLAT_BOXES, dp_cp_group=pgs.dp_cp))

    def _language_sharded_state_dict(self) -> dict[str, Any]:
        """The language model's ShardedTensors (and factories) under canonical keys, so its
        optimizer state is keyed `optimizer.state.<name>.<key>` as the native optimizer's is."""
        import dataclasses

        from mimo_ckpt.interop.megatron_keys import iter_leaves, split_key
        from mimo_ckpt.model.megatron_leaves import kind

        out = {}
        for path, leaf in iter_leaves(model_sharded_state_dict(self.model)):
            if kind(leaf) in ("ShardedTensor", "ShardedTensorFactory"):
                module, key = split_key(leaf.key)
                if module == LANGUAGE:
                    out["/".join(map(str, path))] = dataclasses.replace(leaf, key=key)
        return out

    def train_step(self, step: int) -> tuple[float, float | None]:
        """(loss over the global batch, global grad norm); the same on every rank."""
        batch = global_batch(step, self.device, self.size)
        self.opt.zero_grad()
        local = self._forward_backward(batch)
        self._reduce_grads()
        if self.ddp is not None:
            self.ddp.finish_grad_sync()  # reduce-scatter over DP: each rank keeps its optimizer's slice
        _, grad_norm, _ = self.opt.step()
        loss = torch.tensor([local], dtype=torch.float64, device=self.device)
        dist.all_reduce(loss)
        return loss.item(), grad_norm

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> float:
        enc, lm, r = self.layouts[IMAGES], self.layouts[LANGUAGE], self.rank
        size = self.size
        to_lm, to_enc = encoder_routes(enc, lm, size.batch), gradient_routes(enc, lm, size.batch)
        per, seq = size.image_tokens, size.seq

        if enc.contains(r) and lm.contains(r):
            return self._forward_backward_colocated(batch)
        if enc.contains(r):
            lo, hi = samples(enc, r, size.batch)
            out = self.model(input_ids=batch["tokens"][lo:hi],
                             modality_inputs=self._images(batch, lo, hi))[0][IMAGES]
            _exchange([(dst, out[(a - lo) * per : (b - lo) * per].detach().contiguous())
                       for src, dst, a, b in to_lm if src == r], [])
            grad = torch.zeros_like(out)
            _exchange([], [(src, grad[(a - lo) * per : (b - lo) * per]) for src, dst, a, b in to_enc if dst == r])
            out.backward(grad)
            return 0.0
        if not lm.contains(r):
            return 0.0

        c, (lo, hi) = lm.coords(r), samples(lm, r, size.batch)
        first, last = c["pp"] == 0, c["pp"] == lm.pp - 1
        if first:
            inp = torch.empty(((hi - lo) * per, size.hidden), dtype=self.dtype, device=self.device)
            _exchange([], [(src, inp[(a - lo) * per : (b - lo) * per]) for src, dst, a, b in to_lm if dst == r])
            self.model.set_input_tensor({IMAGES: inp.requires_grad_()})
        else:
            inp = torch.empty((seq, hi - lo, size.hidden), dtype=self.dtype, device=self.device)
            _exchange([], [(_stage_peer(lm, r, -1), inp)])
            self.model.set_input_tensor({LANGUAGE: inp.requires_grad_()})
        positions = torch.arange(seq, device=self.device).expand(hi - lo, seq)
        out, _ = self.model(input_ids=batch["tokens"][lo:hi], position_ids=positions,
                            attention_mask=causal_mask(seq, self.device), loss_mask=batch["loss_mask"][lo:hi])
        value = 0.0
        if last:
            # Each replica's share of the global mean, so gradients are summed over replicas.
            losses = self._token_losses(out, batch["labels"][lo:hi])
            objective = (losses * batch["loss_mask"][lo:hi]).sum() / batch["loss_mask"].sum()
            objective.backward()
            value = objective.item() if c["tp"] == 0 else 0.0
        else:
            hidden = out[LANGUAGE]
            _exchange([(_stage_peer(lm, r, 1), hidden.detach().contiguous())], [])
            grad = torch.empty_like(hidden)
            _exchange([], [(_stage_peer(lm, r, 1), grad)])
            hidden.backward(grad)
        if first:
            _exchange([(dst, inp.grad[(a - lo) * per : (b - lo) * per].contiguous())
                       for src, dst, a, b in to_enc if src == r], [])
        else:
            _exchange([(_stage_peer(lm, r, -1), inp.grad.contiguous())], [])
        return value

    def _forward_backward_colocated(self, batch: dict[str, torch.Tensor]) -> float:
        """Both modules on this rank (megatron's colocated mode): one forward through MimoModel."""
        lm, seq = self.layouts[LANGUAGE], self.size.seq
        lo, hi = samples(lm, self.rank, self.size.batch)
        logits, _ = self.model(
            input_ids=batch["tokens"][lo:hi], position_ids=torch.arange(seq, device=self.device).expand(hi - lo, seq),
            attention_mask=causal_mask(seq, self.device), loss_mask=batch["loss_mask"][lo:hi],
            modality_inputs=self._images(batch, lo, hi),
        )
        losses = self._token_losses(logits, batch["labels"][lo:hi])
        objective = (losses * batch["loss_mask"][lo:hi]).sum() / batch["loss_mask"].sum()
        objective.backward()
        return objective.item() if lm.coords(self.rank)["tp"] == 0 else 0.0

    def _images(self, batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, Any]:
        return {IMAGES: {"clip": {"x": batch["images"][lo:hi].to(self.dtype)}}}

    def _token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross entropy per token over the real vocabulary: the TP-split logits are gathered and
        the padding columns cut off, so padding rows of the output layer get no gradient."""
        full = _GatherColumns.apply(logits, self.grids[LANGUAGE].get_pg("tp"))
        real = full[..., : self.size.vocab].float()
        return torch.nn.functional.cross_entropy(real.flatten(0, -2), labels.flatten(), reduction="none").view_as(labels)

    @torch.no_grad()
    def _reduce_grads(self) -> None:
        """Sum gradients over each module's data-parallel replicas (what megatron's DDP does; a
        module in megatron's DDP is left to it)."""
        for name, opt in self.opt.modules.items():
            if len(self.groups[name].members["dp_cp"]) == 1 or (name == LANGUAGE and self.ddp is not None):
                continue
            params = [sp.param for sp in opt.params]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.groups[name].group("dp_cp"))
            for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
                p.grad = chunk.view_as(p).clone()

    # -- checkpoints ------------------------------------------------------------------------------

    def state(self, is_loading: bool = False) -> dict[str, dict[str, Any]]:
        """Model, optimizer and generator state per module, with canonical keys."""
        from mimo_ckpt import rng_state
        from mimo_ckpt.interop.megatron_keys import from_megatron

        state = from_megatron(model_sharded_state_dict(self.model)) if self.model is not None else {}
        optimizer = self.opt.sharded_state_dict(is_loading=is_loading)
        trackers = random_module.get_cuda_rng_tracker().get_states()
        for m in state:
            state[m]["optimizer"] = optimizer[m]
            state[m]["rng"] = rng_state(self.layouts[m], self.rank, trackers)
        return state

    def save(self, path: str, step: int, metadata: dict[str, Any] | None = None) -> None:
        import mimo_ckpt

        mimo_ckpt.save(self.state(), path, layouts=self.layouts, metadata={**(metadata or {}), "step": step})

    def load(self, path: str) -> Any:
        import mimo_ckpt

        result = mimo_ckpt.load(self.state(is_loading=True), path, layouts=self.layouts)
        self.opt.load_sharded_state_dict({m: s["optimizer"] for m, s in result.state.items()})
        for name, s in result.state.items():
            if name not in result.not_loaded:
                random_module.get_cuda_rng_tracker().set_states(mimo_ckpt.restore_rng_state(s["rng"]))
        return result

    def load_weights(self, path: str) -> Any:
        """The model's weights only, before the first step: a start from pretrained weights (a
        Hugging Face import) or from another run's; the optimizer starts fresh. The native AdamW
        steps the parameters themselves; megatron's DistributedOptimizer keeps main copies made
        at construction, so it is not used with this."""
        import mimo_ckpt
        from mimo_ckpt.interop.megatron_keys import from_megatron

        if self.distributed_optimizer:
            raise NotImplementedError("load_weights: the distributed optimizer keeps its own main params")
        state = from_megatron(model_sharded_state_dict(self.model)) if self.model is not None else {}
        return mimo_ckpt.load(state, path, layouts=self.layouts, strict="requested")

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The language model's logits over the real vocabulary for this rank's samples, with
        both modules on this rank (colocated layouts); None on a rank outside them."""
        lm, enc = self.layouts[LANGUAGE], self.layouts[IMAGES]
        if not (lm.contains(self.rank) and enc.contains(self.rank)):
            return None
        lo, hi = samples(lm, self.rank, self.size.batch)
        seq = self.size.seq
        out, _ = self.model(
            input_ids=batch["tokens"][lo:hi], position_ids=torch.arange(seq, device=self.device).expand(hi - lo, seq),
            attention_mask=causal_mask(seq, self.device), modality_inputs=self._images(batch, lo, hi))
        return _GatherColumns.apply(out, self.grids[LANGUAGE].get_pg("tp"))[..., : self.size.vocab]


def megatron_state(run: MegatronMimoRun) -> dict[str, Any]:
    """The run's state as megatron's model and MimoOptimizer hand it to `dist_checkpointing`, for
    writing checkpoints stock megatron reads: model ShardedTensors, Adam state under
    `mimo.<name>.optimizer.state.<name>.<model key>` with the model's replica ids, and each
    module's param_groups as a ShardedObject."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from mimo_ckpt import TensorShard
    from mimo_ckpt.model.megatron_leaves import kind, to_sharded_tensor
    from mimo_ckpt.interop.megatron_keys import iter_leaves, megatron_key

    if run.distributed_optimizer:
        raise NotImplementedError("megatron_state: the language model's optimizer is megatron's own")
    sd = dict(run.model.sharded_state_dict()) if run.model is not None else {}
    replica = {}  # the model's replica ids, which its optimizer state shares (factories built)
    for entry in sd.values():
        built = entry.build() if kind(entry) == "ShardedTensorFactory" else entry
        for _, t in iter_leaves(built):
            if hasattr(t, "global_offset"):
                replica[(t.key, tuple(t.global_offset))] = t.replica_id
    for module, state in run.opt.sharded_state_dict().items():
        for entries in state["state"].values():
            for shard in entries.values():
                if not isinstance(shard, TensorShard):
                    continue
                model_key = megatron_key(module, shard.key.split(".", 3)[3])  # optimizer.state.<name>.<key>
                key = megatron_key(module, shard.key)
                sd[f"{key}@{shard.global_offset}"] = to_sharded_tensor(
                    dataclasses.replace(shard, key=key), replica[(model_key, shard.global_offset)])
        groups = state["param_groups"]
        sd[f"mimo.{module}.param_groups"] = ShardedObject(
            megatron_key(module, "optimizer.param_groups"), groups.data, (1,), (0,),
            replica_id=0 if groups.is_main_replica else 1)
    return sd


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Train some steps under torchrun, optionally loading first and saving at the end."""
    import argparse
    import os

    import mimo_ckpt
    from mimo_ckpt.cli.args import parse_layout_arg

    p = argparse.ArgumentParser(prog="python -m examples.megatron_mimo", description=main.__doc__)
    p.add_argument("--images", default="tp1", help="encoder layout, e.g. tp2 or dp2 (ranks from 0)")
    p.add_argument("--language", default="tp1", help="language model layout, e.g. pp2 or tp2,dp2 (ranks after "
                                                     "the encoder's, or from 0 with --colocated)")
    p.add_argument("--colocated", action="store_true", help="both modules on the same ranks (PP 1)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--load", metavar="DIR", help="checkpoint to resume from (any layouts)")
    p.add_argument("--save", metavar="DIR", help="checkpoint to write after the last step")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="train the language model with megatron's DDP + DistributedOptimizer")
    args = p.parse_args(argv)

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    images = parse_layout_arg(f"images={args.images}", None)[1]
    offset = 0 if args.colocated else images.size
    language = parse_layout_arg(f"language={args.language},offset={offset}", None)[1]
    layouts = {IMAGES: images, LANGUAGE: language}
    if max(layout.rank_offset + layout.size for layout in layouts.values()) > dist.get_world_size():
        raise SystemExit(f"layouts need more than the {dist.get_world_size()} ranks started")

    run = MegatronMimoRun(layouts, backend=dist.get_backend(), device=args.device,
                          distributed_optimizer=args.distributed_optimizer)
    first = 0
    if args.load:
        run.load(args.load)
        manifest = mimo_ckpt.read_manifest(mimo_ckpt.open_storage(args.load), args.load)
        first = int(manifest.metadata.get("step", 0))
    for step in range(first, first + args.steps):
        loss, grad_norm = run.train_step(step)
        if dist.get_rank() == 0:
            print(f"step {step + 1}: loss {loss:.6f} grad norm {grad_norm:.6f}", flush=True)
    if args.save:
        run.save(args.save, first + args.steps)
        if dist.get_rank() == 0:
            print(f"saved {args.save}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
