"""megatron-core optimizers under MimoOptimizer on one GPU (NCCL, world size 1).

For each of FP32Optimizer, Float16OptimizerWithFloat16Params (bf16) and DistributedOptimizer
(fully_reshardable, and FLAT_BOXES: each rank's own slices as boxes, also with SwiGLU MLPs), a
tiny GPTModel (local layer spec, DDP-wrapped) trains:
- once driven by megatron's own `optimizer.step()` (the reference),
- once as the single module of an optim.MimoOptimizer through MegatronModuleOptimizer;
losses must agree. The MIMO run then saves model + optimizer state with mimo_ckpt, a fresh model
(other seed) loads it, and both continue; losses must agree again. Prints one JSON document.

Run: python gpu_checks/megatron_optim_check.py --out $OUT/gpu_megatron_optim.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, RESUME_AT, SEQ, VOCAB = 6, 3, 16, 128
VARIANTS = {
    "fp32": dict(bf16=False, distributed=False),
    "bf16_float16_optimizer": dict(bf16=True, distributed=False),
    "distributed_fully_reshardable": dict(bf16=True, distributed=True),
    "distributed_flat_boxes": dict(bf16=True, distributed=True, flat=True),
    "distributed_flat_boxes_swiglu": dict(bf16=True, distributed=True, flat=True, glu=True),
}


def build(variant: dict, seed: int):
    """Model (DDP), megatron optimizer and the pieces MegatronModuleOptimizer needs."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    world = dist.group.WORLD
    names = ["tp", "pp", "mp", "embd", "pos_embd", "cp", "tp_cp", "ep", "expt_tp", "tp_ep", "tp_ep_pp",
             "dp", "dp_cp", "expt_dp", "intra_dp_cp", "intra_expt_dp", "intra_dist_opt", "tp_dp_cp"]
    pgc = ProcessGroupCollection(**{n: world for n in names})
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0)
    bf16, distributed = variant["bf16"], variant["distributed"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, bf16=bf16, params_dtype=dtype,
                            hidden_dropout=0.0, attention_dropout=0.0, gated_linear_unit=variant.get("glu", False))
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                     pg_collection=pgc).cuda()
    if bf16:
        model = Float16Module(cfg, model)
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed),
        model, pg_collection=pgc,
    )
    ocfg = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=0.05, bf16=bf16,
                           params_dtype=dtype, use_distributed_optimizer=distributed)
    opt = get_megatron_optimizer(ocfg, [ddp], pg_collection=pgc, use_gloo_process_groups=False)
    return ddp, opt, world


def batch(step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g).cuda()
    return tokens, torch.arange(SEQ, device="cuda").expand(2, SEQ)


def forward_backward(ddp, step: int, scale: float) -> float:
    tokens, pos = batch(step)
    loss = ddp(tokens, pos, None, labels=tokens).float().mean()
    (loss * scale).backward()
    ddp.finish_grad_sync()
    return loss.item()


def model_state(ddp):
    from megatron.core.utils import unwrap_model

    state = unwrap_model(ddp).sharded_state_dict(metadata={"dp_cp_group": __import__("torch").distributed.group.WORLD})
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def mimo_for(ddp, opt, world, variant):
    from mimo_ckpt import ModuleLayout
    from optim import MimoOptimizer, build_module_groups
    from optim.megatron import FLAT_BOXES, FULLY_RESHARDABLE, MegatronModuleOptimizer

    layouts = {"language": ModuleLayout()}
    groups = build_module_groups(layouts)
    metadata = dict(FLAT_BOXES if variant.get("flat") else FULLY_RESHARDABLE, dp_cp_group=world) \
        if variant["distributed"] else {}
    module = MegatronModuleOptimizer(opt, groups["language"], lambda: model_state(ddp),
                                     zero_grad_buffer=ddp.zero_grad_buffer, metadata=metadata)
    return MimoOptimizer({"language": module}, layouts, max_grad_norm=0.05), layouts


def run_variant(variant: dict) -> dict:
    import mimo_ckpt

    out: dict = {}
    ddp, opt, _ = build(variant, seed=1)  # megatron's own step
    reference = []
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        reference.append(forward_backward(ddp, step, float(opt.get_loss_scale())))
        opt.step()
    out["reference_losses"] = reference

    ddp, opt, world = build(variant, seed=1)
    mimo, layouts = mimo_for(ddp, opt, world, variant)
    losses, norms = [], []
    for step in range(RESUME_AT):
        mimo.zero_grad()
        losses.append(forward_backward(ddp, step, float(mimo.get_loss_scale())))
        norms.append(mimo.step()[1])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        state = {"language": {"model": model_state(ddp), "optimizer": mimo.sharded_state_dict()["language"]}}
        mimo_ckpt.save(state, path, layouts=layouts)
        manifest = mimo_ckpt.read_manifest(mimo_ckpt.open_storage(path))
        out["saved_tensor_keys"] = sorted(manifest.modules["language"].tensors)[:8]
        out["saved_object_keys"] = sorted(manifest.modules["language"].objects)[:12]
        continued = []
        for step in range(RESUME_AT, STEPS):
            mimo.zero_grad()
            continued.append(forward_backward(ddp, step, float(mimo.get_loss_scale())))
            mimo.step()

        ddp2, opt2, world2 = build(variant, seed=7)
        mimo2, _ = mimo_for(ddp2, opt2, world2, variant)
        template = {"language": {"model": model_state(ddp2), "optimizer": mimo2.sharded_state_dict(is_loading=True)["language"]}}
        result = mimo_ckpt.load(template, path, layouts=layouts)
        mimo2.load_sharded_state_dict({"language": result.state["language"]["optimizer"]})
        resumed = []
        for step in range(RESUME_AT, STEPS):
            mimo2.zero_grad()
            resumed.append(forward_backward(ddp2, step, float(mimo2.get_loss_scale())))
            mimo2.step()
    out["mimo_losses"] = losses + continued
    out["resumed_losses"] = losses + resumed
    out["mimo_grad_norms"] = norms
    out["max_rel_diff_mimo_vs_megatron"] = max(abs(a - b) / abs(b) for a, b in zip(out["mimo_losses"], reference, strict=True))
    out["max_rel_diff_resumed_vs_uninterrupted"] = max(
        abs(a - b) / abs(b) for a, b in zip(out["resumed_losses"], out["mimo_losses"], strict=True))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the JSON result here too")
    opts = parser.parse_args()
    import torch
    import torch.distributed as dist

    from tests.harness.local_world import free_port
    from bench.report import write_json

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, variant in VARIANTS.items():
        try:
            results[name] = run_variant(variant)
        except Exception:  # noqa: BLE001 - every variant reports, whatever the others do
            results[name] = {"error": traceback.format_exc()[-3000:]}
    write_json(results, opts.out, echo=True)
    dist.destroy_process_group()
    return 0 if all("error" not in r for r in results.values() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
