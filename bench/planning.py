"""Pure planning at scale: a simulated 16,384-rank MIMO job, planned on one core.

The job: a 70B-class LLM (80 layers, hidden 8192, FFN 28672, vocab 128256) on TP8 x PP8 x DP248
(15,872 ranks), with fp32 main params and Adam moments ZeRO-1-sharded over DP (each DP rank owns a
slice of every TP-local weight), plus a vision encoder (TP2 x DP128) and an audio encoder
(TP1 x DP256) with their own ranks. For each module, the benchmark times what one rank computes:
`plan_module_save` over every rank's shard metadata, the manifest entry built from it, and
`plan_module_load` of one rank's boxes under the same layout. Rank counts are scaled down by
`--scales` to show how time grows; peak memory (of the planners, not of their input) is traced
with tracemalloc in a second, untimed pass.

Run: .venv/bin/python bench/planning.py [--scales 0.25 0.5 1]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mimo_ckpt.model.box import Box  # noqa: E402
from mimo_ckpt.format.checksums import ShardSums  # noqa: E402
from mimo_ckpt.model.layout import ModuleLayout  # noqa: E402
from mimo_ckpt.plan.load import plan_module_load  # noqa: E402
from mimo_ckpt.plan.save import plan_module_save  # noqa: E402
from mimo_ckpt.model.shard import TensorMeta  # noqa: E402

LLM_WEIGHTS = {  # key -> (per-layer shape, TP-split dim within the layer shape)
    "self_attention.linear_qkv.weight": ((10240, 8192), 0),
    "self_attention.linear_proj.weight": ((8192, 8192), 1),
    "mlp.linear_fc1.weight": ((57344, 8192), 0),
    "mlp.linear_fc2.weight": ((8192, 28672), 1),
    "input_layernorm.weight": ((8192,), None),
    "pre_mlp_layernorm.weight": ((8192,), None),
}
ENCODER_WEIGHTS = {
    "attn.qkv.weight": ((3072, 1024), 0), "attn.proj.weight": ((1024, 1024), 1),
    "mlp.fc1.weight": ((4096, 1024), 0), "mlp.fc2.weight": ((1024, 4096), 1), "norm.weight": ((1024,), None),
}


def module_metas(layout: ModuleLayout, layers: int, weights: dict, extra: dict) -> dict[int, list[TensorMeta]]:
    """Every rank's shard metadata: bf16 weights (TP x PP boxes, DP replicas) and fp32 Adam state
    (param, exp_avg, exp_avg_sq) sliced over DP along the stacked layer's first weight row."""
    out: dict[int, list[TensorMeta]] = {}
    per_stage = layers // layout.pp
    for rank in layout.ranks:
        c = layout.coords(rank)
        metas = []
        for key, (shape, tp_dim) in weights.items():
            gshape = (layers, *shape)
            local = list(gshape)
            offset = [c["pp"] * per_stage] + [0] * len(shape)
            local[0] = per_stage
            if tp_dim is not None:
                n = shape[tp_dim] // layout.tp
                local[tp_dim + 1], offset[tp_dim + 1] = n, c["tp"] * n
            box = Box(tuple(offset), tuple(local))
            metas.append(TensorMeta(f"layers.{key}", "BF16", gshape, box, c["dp"] == 0))
            rows = local[1]
            lo, hi = rows * c["dp"] // layout.dp, rows * (c["dp"] + 1) // layout.dp
            if hi > lo:
                zoff = list(offset)
                zoff[1] += lo
                zshape = list(local)
                zshape[1] = hi - lo
                zbox = Box(tuple(zoff), tuple(zshape))
                for state in ("fp32_param", "exp_avg", "exp_avg_sq"):
                    metas.append(TensorMeta(f"optimizer.state.{state}.layers.{key}", "F32", gshape, zbox, True))
        for key, gshape in extra.items():
            if c["pp"] == 0:
                n = gshape[0] // layout.tp
                metas.append(TensorMeta(key, "BF16", gshape, Box((c["tp"] * n, 0), (n, gshape[1])), c["dp"] == 0))
        out[rank] = metas
    return out


def job(scale: float) -> dict[str, tuple[ModuleLayout, int, dict, dict]]:
    llm_dp = max(1, round(248 * scale))
    enc_dp = max(1, round(128 * scale))
    audio_dp = max(1, round(256 * scale))
    vision = ModuleLayout(tp=2, dp=enc_dp)
    audio = ModuleLayout(dp=audio_dp, rank_offset=vision.size)
    llm = ModuleLayout(tp=8, pp=8, dp=llm_dp, rank_offset=vision.size + audio.size)
    return {
        "vision": (vision, 24, ENCODER_WEIGHTS, {}),
        "audio": (audio, 12, ENCODER_WEIGHTS, {}),
        "language": (llm, 80, LLM_WEIGHTS, {"embedding.word_embeddings.weight": (128256, 8192)}),
    }


def bench(scale: float) -> dict:
    out = {"ranks": 0, "shards": 0, "save_s": 0.0, "load_s": 0.0, "peak_mb": 0.0}
    for name, (layout, layers, weights, extra) in job(scale).items():
        metas = module_metas(layout, layers, weights, extra)
        out["ranks"] += layout.size
        out["shards"] += sum(len(m) for m in metas.values())
        gc.collect()
        t0 = time.perf_counter()
        plan = plan_module_save(name, layout, metas, {})
        entry = plan.module_entry(layout, {f.path: [ShardSums(0)] * len(f.items) for f in plan.files})
        t1 = time.perf_counter()
        last = layout.ranks[-1]  # one rank plans its own reads
        plan_module_load(name, entry, metas[last])
        t2 = time.perf_counter()
        del plan, entry
        gc.collect()
        tracemalloc.start()  # a second, untimed pass for memory (tracing slows Python down)
        plan = plan_module_save(name, layout, metas, {})
        entry = plan.module_entry(layout, {f.path: [ShardSums(0)] * len(f.items) for f in plan.files})
        plan_module_load(name, entry, metas[last])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out["save_s"] += t1 - t0
        out["load_s"] += t2 - t1
        out["peak_mb"] = max(out["peak_mb"], peak / 1e6)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    opts = parser.parse_args()
    print(f"{'ranks':>7} {'shards':>9} {'save plan s':>12} {'load plan s':>12} {'peak MB':>8}")
    for scale in opts.scales:
        r = bench(scale)
        print(f"{r['ranks']:>7} {r['shards']:>9} {r['save_s']:>12.2f} {r['load_s']:>12.3f} {r['peak_mb']:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
