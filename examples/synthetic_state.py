"""A two-module MIMO-like state, sharded the way Megatron shards it, plus its full-tensor reference.

`global_tensors` builds every global tensor from a seed, independently of mimo_ckpt; `rank_state`
cuts this rank's boxes out of them for a layout (TP on dim 0 or 1, PP over stacked layers with
global offsets, EP over experts, CP and DP replicas, DP-sharded optimizer state with uneven splits).
"""

from __future__ import annotations

import zlib

import torch

from mimo_ckpt import ModuleLayout, ObjectShard, TensorShard

LAYERS = {"images": 4, "language": 6}

# key -> (global shape, dtype, {dim: parallel dim splitting it}, pp-stacked, holder stage)
SPECS = {
    "images": {
        "vision.proj.weight": ((24, 10), torch.float32, {0: "tp"}, False, None),
        "vision.fc2.weight": ((10, 24), torch.bfloat16, {1: "tp"}, False, None),
        "vision.norm/bias": ((10,), torch.float16, {}, False, None),
        "vision.layers.mlp.weight": ((4, 12, 8), torch.float32, {1: "tp"}, True, None),
        "step": ((), torch.int64, {}, False, None),
        "empty.buffer": ((0, 4), torch.float32, {}, False, None),
    },
    "language": {
        "embedding.word_embeddings.weight": ((32, 8), torch.bfloat16, {0: "tp"}, False, "first"),
        "decoder.layers.self_attention.linear_qkv.weight": ((6, 12, 8), torch.float32, {1: "tp"}, True, None),
        "decoder.layers.mlp.linear_fc2.weight": ((6, 8, 16), torch.float16, {2: "tp"}, True, None),
        "decoder.layers.mlp.experts.weight": ((6, 4, 6, 10), torch.float32, {1: "ep", 3: "tp"}, True, None),
        "decoder.final_layernorm.weight": ((8,), torch.float32, {}, False, "last"),
        "output_layer.weight": ((32, 8), torch.bfloat16, {0: "tp"}, False, "last"),
        "vocab/counts.int64": ((7,), torch.int64, {}, False, None),
        "iteration": ((), torch.int64, {}, False, None),
    },
}

# Optimizer-like state: DP-sharded (ZeRO-1 style) along `dim` of the TP-local piece, unevenly.
OPTIM = {
    "images": {"optimizer.exp_avg.vision.proj.weight": ("vision.proj.weight", 0)},
    "language": {
        "optimizer.exp_avg.decoder.layers.self_attention.linear_qkv.weight": (
            "decoder.layers.self_attention.linear_qkv.weight", 1),
        "optimizer.exp_avg_sq.output_layer.weight": ("output_layer.weight", 0),
    },
}

OBJECTS = {
    "images": {"config": {"hidden": 10, "name": "vit", "scales": [1.0, 0.5]}},
    "language": {"hparams": {"layers": 6, "vocab": 32, "rope": None}},
}


def global_tensors(module: str, seed: int = 1234) -> dict[str, torch.Tensor]:
    out = {}
    for i, (key, (shape, dtype, *_)) in enumerate(sorted(SPECS[module].items())):
        g = torch.Generator().manual_seed(seed + 1000 * i + len(module))
        if dtype == torch.int64:
            out[key] = torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64)
        else:
            out[key] = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    for key, (base, _) in OPTIM[module].items():
        g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()) % 10_000)
        out[key] = torch.randn(SPECS[module][base][0], generator=g).float()
    return out


def uneven_bounds(n: int, parts: int) -> list[int]:
    """Boundaries splitting n into `parts` pieces of growing size (1:2:3...)."""
    total = parts * (parts + 1) // 2
    return [round(n * (i * (i + 1) // 2) / total) for i in range(parts + 1)]


def _tp_box(shape, splits, coords, layout, stacked):
    offset, size = [0] * len(shape), list(shape)
    for dim, pdim in splits.items():
        ways = getattr(layout, pdim)
        size[dim] = shape[dim] // ways
        offset[dim] = coords[pdim] * size[dim]
    if stacked:
        per = shape[0] // layout.pp
        offset[0], size[0] = coords["pp"] * per, per
    return offset, size


def _holds(holder, coords, layout) -> bool:
    if holder == "first":
        return coords["pp"] == 0
    if holder == "last":
        return coords["pp"] == layout.pp - 1
    return True


def _cut(t: torch.Tensor, offset, size) -> torch.Tensor:
    view = t
    for dim, (o, s) in enumerate(zip(offset, size)):
        view = view.narrow(dim, o, s)
    return view.clone()


def rank_boxes(module: str, layout: ModuleLayout, rank: int) -> dict[str, tuple[list[int], list[int], bool]]:
    """key -> (offset, shape, is_main_replica) of what this rank holds."""
    coords = layout.coords(rank)
    out = {}
    for key, (shape, _, splits, stacked, holder) in SPECS[module].items():
        if not _holds(holder, coords, layout):
            continue
        offset, size = _tp_box(shape, splits, coords, layout, stacked)
        replica = [coords[d] for d in ("tp", "cp", "ep", "dp") if d not in splits.values()]
        out[key] = (offset, size, not any(replica))
    for key, (base, dim) in OPTIM[module].items():
        if base not in out:
            continue
        offset, size, _ = out[base]
        bounds = uneven_bounds(size[dim], layout.dp)
        lo, hi = bounds[coords["dp"]], bounds[coords["dp"] + 1]
        offset, size = list(offset), list(size)
        offset[dim] += lo
        size[dim] = hi - lo
        out[key] = (offset, size, coords["cp"] == 0)
    return out


def rank_state(module: str, layout: ModuleLayout, rank: int, *, fill: float | None = None) -> dict:
    """This rank's state: boxes of the reference (or tensors filled with `fill` as load targets)."""
    ref = global_tensors(module)
    state: dict = {}
    for key, (offset, size, main) in rank_boxes(module, layout, rank).items():
        data = _cut(ref[key], offset, size)
        if fill is not None:
            data = torch.full_like(data, fill) if data.dtype != torch.int64 else torch.full_like(data, -7)
        state[key] = TensorShard(key, data, tuple(ref[key].shape), tuple(offset), main)
    for key, value in OBJECTS[module].items():
        state[key] = ObjectShard(key, value if fill is None else None)
    return state


def check_rank_state(module: str, layout: ModuleLayout, rank: int, loaded: dict) -> list[str]:
    """Differences between loaded tensors/objects and the reference; empty when bit-exact."""
    ref = global_tensors(module)
    problems = []
    for key, (offset, size, _) in rank_boxes(module, layout, rank).items():
        want = _cut(ref[key], offset, size)
        got = loaded[key]
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            problems.append(f"{module}/{key}: got {got.dtype}{tuple(got.shape)} want {want.dtype}{tuple(want.shape)}")
        elif not torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                             want.reshape(-1).view(torch.uint8) if want.numel() else want):
            problems.append(f"{module}/{key}: values differ at box {offset}+{size}")
    for key, value in OBJECTS[module].items():
        if loaded[key] != value:
            problems.append(f"{module}/{key}: object {loaded[key]!r} != {value!r}")
    return problems
