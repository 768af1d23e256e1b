"""megatron-core GPTModels that load Hugging Face models imported by `mimo-ckpt import --format hf`
(see tests/test_hf.py), and the MimoModel example's language model, on a 4-rank gloo world.

For each case the test process has written a Hugging Face folder and imported it under the
case's layout. Here every rank builds the megatron model of that architecture on the layout,
loads the imported checkpoint with mimo_ckpt.load, and runs the forward (pipeline stages pass the
hidden states on; the last stage gathers the TP-split logits). With `train`, one SGD step follows
(gradients back through the stages), the trained model's logits are taken again, and it is saved
with mimo_ckpt.save for the test to export. Logits go to safetensors files for the test to compare
with transformers' forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig
from safetensors.torch import save_file

import mimo_ckpt
from mimo_ckpt import ModuleLayout
from mimo_ckpt.interop.megatron_keys import from_megatron
from examples.megatron_mimo import _GatherColumns, _pg_collection, build_grids, causal_mask, use_cpu

MODULE = "language"
LR = 0.05


def _config(arch: str, sizes: dict[str, int], layout: ModuleLayout) -> TransformerConfig:
    common = dict(
        num_layers=sizes["layers"], hidden_size=sizes["hidden"], num_attention_heads=sizes["heads"],
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False, layernorm_epsilon=1e-5,
    )
    if arch == "llama":
        return TransformerConfig(**common, num_query_groups=sizes["groups"], ffn_hidden_size=sizes["ffn"],
                                 gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                                 add_bias_linear=False, normalization="RMSNorm")
    return TransformerConfig(**common, ffn_hidden_size=4 * sizes["hidden"], normalization="LayerNorm",
                             activation_func=functools.partial(torch.nn.functional.gelu, approximate="tanh"),
                             add_bias_linear=True)


def _build(arch: str, sizes: dict[str, int], layout: ModuleLayout, grid: Any, padded_vocab: int) -> GPTModel:
    pp_rank = layout.coords(dist.get_rank())["pp"]
    llama = arch == "llama"
    return GPTModel(
        config=_config(arch, sizes, layout),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm" if llama else "LayerNorm"),
        vocab_size=padded_vocab, max_sequence_length=sizes["seq"], pre_process=pp_rank == 0,
        post_process=pp_rank == layout.pp - 1, share_embeddings_and_output_weights=not llama,
        position_embedding_type="rope" if llama else "learned_absolute", pg_collection=_pg_collection(grid),
    )


def _state(model: GPTModel, grid: Any, layout: ModuleLayout) -> dict[str, Any]:
    """The model's state with canonical keys. Tied output embeddings ask megatron's global
    parallel_state for the DP rank, which only `initialize_model_parallel` sets: the grid's."""
    metadata = {"dp_cp_group": grid.get_pg(["dp", "cp"])}
    dp_rank = layout.coords(dist.get_rank())["dp"]
    with mock.patch.object(parallel_state, "get_data_parallel_rank", lambda **_: dp_rank):
        return from_megatron(model.sharded_state_dict(prefix="language_model.", metadata=metadata))


def _peer(layout: ModuleLayout, step: int) -> int:
    c = layout.coords(dist.get_rank())
    return layout.rank_of(**{**c, "pp": c["pp"] + step})


@dataclass
class _Stage:
    """One forward on this rank: the stage's input (from the previous stage), its output, and on
    the last stage the logits over the real vocabulary, with the graph kept."""

    input: torch.Tensor | None
    output: torch.Tensor
    logits: torch.Tensor | None


def _forward(model: GPTModel, layout: ModuleLayout, grid: Any, tokens: torch.Tensor, hidden: int,
             vocab: int) -> _Stage:
    c = layout.coords(dist.get_rank())
    b, s = tokens.shape
    inp = None
    if c["pp"] > 0:
        inp = torch.empty(s, b, hidden)
        dist.recv(inp, _peer(layout, -1))
        model.set_input_tensor(inp.requires_grad_())
    positions = torch.arange(s).expand(b, s)
    out = model(input_ids=tokens, position_ids=positions, attention_mask=causal_mask(s, tokens.device))
    if c["pp"] < layout.pp - 1:
        dist.send(out.detach().contiguous(), _peer(layout, 1))
        return _Stage(inp, out, None)
    return _Stage(inp, out, _GatherColumns.apply(out, grid.get_pg("tp"))[..., :vocab])


def _train_step(model: GPTModel, layout: ModuleLayout, stage: _Stage, tokens: torch.Tensor) -> None:
    """One SGD step on next-token cross entropy; gradients go back through the pipeline stages."""
    if stage.logits is not None:
        logits = stage.logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    else:
        grad = torch.empty_like(stage.output)
        dist.recv(grad, _peer(layout, 1))
        stage.output.backward(grad)
    if stage.input is not None:
        dist.send(stage.input.grad.contiguous(), _peer(layout, -1))
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad
                p.grad = None


def _write_logits(path: str, logits: torch.Tensor | None, layout: ModuleLayout) -> None:
    if logits is None:
        return
    c = layout.coords(dist.get_rank())
    if c["tp"] == 0 and c["dp"] == 0:
        save_file({"logits": logits.detach().contiguous()}, path)


def case(args: dict[str, Any]) -> dict[str, Any]:
    """Load the imported checkpoint under the case's layout, forward, and optionally train and save."""
    use_cpu()
    layout = ModuleLayout.from_json(args["layout"])
    sizes = args["sizes"]
    rank = dist.get_rank()
    grids = build_grids({MODULE: layout}, "gloo")
    out: dict[str, Any] = {}
    if not layout.contains(rank):
        dist.barrier()
        return out
    model = _build(args["arch"], sizes, layout, grids[MODULE], args["padded_vocab"])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # every weight must come from the checkpoint
    state = _state(model, grids[MODULE], layout)
    result = mimo_ckpt.load(state, args["ckpt"], layouts={MODULE: layout})
    out["not_loaded"] = result.not_loaded
    out["nan_params"] = sum(bool(p.isnan().any()) for p in model.parameters())
    tokens = torch.tensor(args["tokens"])
    stage = _forward(model, layout, grids[MODULE], tokens, sizes["hidden"], sizes["vocab"])
    _write_logits(args["logits"], stage.logits, layout)
    if args.get("train"):
        _train_step(model, layout, stage, tokens)
        with torch.no_grad():
            trained = _forward(model, layout, grids[MODULE], tokens, sizes["hidden"], sizes["vocab"])
        _write_logits(args["trained_logits"], trained.logits, layout)
        metadata = {key: result.metadata[key] for key in ("hf",) if args["keep_metadata"] and key in result.metadata}
        mimo_ckpt.save(_state(model, grids[MODULE], layout), args["trained_ckpt"], layouts={MODULE: layout}, metadata=metadata)
    return out


def example(args: dict[str, Any]) -> dict[str, Any]:
    """The MimoModel example (examples/megatron_mimo.py), both modules on all 4 ranks (colocated,
    TP2 x DP2), trained `steps` steps and saved; its language model's logits for `tokens`."""
    from examples.megatron_mimo import IMAGES, LANGUAGE, MegatronMimoRun

    layout = ModuleLayout(tp=2, dp=2)
    run = MegatronMimoRun({IMAGES: layout, LANGUAGE: layout})
    for step in range(args["steps"]):
        run.train_step(step)
    run.save(args["ckpt"], args["steps"])
    lm = run.model.language_model
    tokens = torch.tensor(args["tokens"])
    b, s = tokens.shape
    with torch.no_grad():
        out = lm(input_ids=tokens, position_ids=torch.arange(s).expand(b, s), attention_mask=causal_mask(s, "cpu"))
        logits = _GatherColumns.apply(out, run.grids[LANGUAGE].get_pg("tp"))[..., : run.size.vocab]
    _write_logits(args["logits"], logits, layout)
    return {}


def llava(args: dict[str, Any]) -> dict[str, Any]:
    """The MimoModel example started from an imported Hugging Face LLaVA: its logits with the
    imported weights; two training steps under the imported layouts (images TP2 on ranks 0-1,
    language PP2 on ranks 2-3), saved with the import's Hugging Face metadata; the trained logits.
    Logits are taken with both modules at TP2 on ranks 0-1 (colocated), loaded from each checkpoint."""
    from examples.megatron_mimo import IMAGES, LANGUAGE, MegatronMimoRun, global_batch

    saved = {IMAGES: ModuleLayout(tp=2), LANGUAGE: ModuleLayout(pp=2, rank_offset=2)}
    colocated = {IMAGES: ModuleLayout(tp=2), LANGUAGE: ModuleLayout(tp=2)}
    batch = global_batch(args["step"])

    def logits(path: str, out: str) -> None:
        run = MegatronMimoRun(colocated)
        run.load_weights(path)
        _write_logits(out, run.logits(batch), colocated[LANGUAGE])

    logits(args["imported"], args["logits"])
    run = MegatronMimoRun(saved)
    result = run.load_weights(args["imported"])
    losses = [run.train_step(step) for step in range(2)]
    run.save(args["trained"], 2, metadata={"hf": result.metadata["hf"]})
    logits(args["trained"], args["trained_logits"])
    return {"losses": losses}


def suite(args: dict[str, Any]) -> dict[str, Any]:
    """Every case in one world (megatron's groups are made once per case), then the examples."""
    return {"cases": [case(a) for a in args["cases"]], "example": example(args["example"]),
            "llava": llava(args["llava"])}

