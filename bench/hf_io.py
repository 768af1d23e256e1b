"""Hugging Face import and export throughput against a raw copy of the same bytes.

    python -m bench.hf_io --dir /work/bench-tmp --gb 1 --rounds 3 --out docs/results/hf_io.json

Writes a Llama-class Hugging Face folder of about `--gb` GB (bf16, grouped-query attention, random
values) in files of at most 1 GB, then, in `--rounds` rounds (commands in an order shuffled per
round), times whole commands run as separate processes:

- `raw_read`: a process reads every file of the folder (cold) into one reused 64 MiB buffer;
- `raw_write`: a process writes as many bytes from a buffer into 1 GB files, each fsync'd;
- `raw_copy`: a process reads every file and writes a copy, fsync'd, chunk after chunk: the same
  bytes in and out as an import, with no mapping and no overlap of reads and writes;
- `import_tp1`: `mimo-ckpt import --format hf` for one rank's layout;
- `import_tp2_pp2`: the same for TP2 x PP2 (4 files, QKV and gate/up rows split four ways);
- `export`: `mimo-ckpt export --format hf` of the TP2 x PP2 import back to a folder.

Before each command: `sync`, and with root `drop_caches`, so every read is cold. Times include
the interpreter's start (`startup`: `mimo-ckpt --help`, timed the same way). GB/s counts the bytes
written. The machine's floor for moving the bytes is `raw_read` + `raw_write` done one after the
other, and max(`raw_read`, `raw_write`) done fully overlapped; each command's median time is
given against both. Peak memory is the command's max RSS (wait4); every mimo-ckpt command gets
`--max-memory`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench.report import write_json
from mimo_ckpt.format.safetensors import FileEntry, layout_file

CLI = [sys.executable, "-m", "mimo_ckpt.cli"]


def llama_config(gb: float) -> dict[str, Any]:
    hidden, heads, groups, ffn, vocab = 2048, 16, 4, 5632, 32000
    head_dim = hidden // heads
    per_layer = 2 * (hidden * (heads + 2 * groups) * head_dim + hidden * hidden + 3 * hidden * ffn + 2 * hidden)
    layers = max(4, 4 * round((gb * 1e9 - 4 * vocab * hidden) / per_layer / 4))  # PP2 and PP4 split it
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_attention_heads": heads, "num_key_value_heads": groups, "intermediate_size": ffn,
            "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "dtype": "bfloat16"}


def llama_tensors(c: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    h, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (c["num_attention_heads"] * hd, h)),
                (p + "self_attn.k_proj.weight", (c["num_key_value_heads"] * hd, h)),
                (p + "self_attn.v_proj.weight", (c["num_key_value_heads"] * hd, h)),
                (p + "self_attn.o_proj.weight", (h, c["num_attention_heads"] * hd)),
                (p + "mlp.gate_proj.weight", (c["intermediate_size"], h)),
                (p + "mlp.up_proj.weight", (c["intermediate_size"], h)),
                (p + "mlp.down_proj.weight", (h, c["intermediate_size"]))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def write_folder(path: str, gb: float, file_bytes: int = 1 << 30) -> int:
    """A Llama-class folder of random bf16 values; returns its tensor bytes."""
    os.makedirs(path)
    config = llama_config(gb)
    groups: list[list[FileEntry]] = [[]]
    size = 0
    for name, shape in llama_tensors(config):
        e = FileEntry(name, "BF16", shape)
        if size + e.nbytes > file_bytes and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    block = np.random.default_rng(0).integers(0, 1 << 16, 1 << 22, dtype=np.uint16).tobytes()
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        prefix, ranges = layout_file(group, {"format": "pt"})
        with open(os.path.join(path, file), "wb") as f:
            f.write(prefix)
            left = ranges[-1][1] - len(prefix)
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
        for e in group:
            weight_map[e.name] = file
            total += e.nbytes
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return total


RAW_COPY = r"""
import os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
buf = bytearray(64 << 20)
view = memoryview(buf)
for name in sorted(os.listdir(src)):
    fd_in = os.open(os.path.join(src, name), os.O_RDONLY)
    fd_out = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    while n := os.readv(fd_in, [view]):
        os.write(fd_out, view[:n])
    os.fsync(fd_out)
    os.close(fd_in)
    os.close(fd_out)
"""


RAW_READ = r"""
import os, sys
src = sys.argv[1]
view = memoryview(bytearray(64 << 20))
for name in sorted(os.listdir(src)):
    fd = os.open(os.path.join(src, name), os.O_RDONLY)
    while os.readv(fd, [view]):
        pass
    os.close(fd)
"""

RAW_WRITE = r"""
import os, sys
dst, total = sys.argv[1], int(sys.argv[2])
os.makedirs(dst)
view = memoryview(os.urandom(64 << 20))
i = 0
while total > 0:
    fd = os.open(os.path.join(dst, f"part-{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    left = min(total, 1 << 30)
    total -= left
    while left:
        left -= os.write(fd, view[: min(left, len(view))])
    os.fsync(fd)
    os.close(fd)
    i += 1
"""


def settle() -> None:
    os.sync()
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command."""
    settle()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return seconds, usage.ru_maxrss * 1024


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-memory", default="512M")
    p.add_argument("--out")
    args = p.parse_args()
    root = os.path.join(args.dir, "hf_io")
    shutil.rmtree(root, ignore_errors=True)
    folder = os.path.join(root, "hf")
    total = write_folder(folder, args.gb)
    mem = ["--max-memory", args.max_memory, "--quiet"]
    reference = os.path.join(root, "reference")  # the export's source, written once
    subprocess.run(CLI + ["import", folder, reference, "--format", "hf", "--module", "language=tp2,pp2"] + mem,
                   check=True)
    commands = {
        "startup": lambda out: CLI + ["--help"],
        "raw_read": lambda out: [sys.executable, "-c", RAW_READ, folder],
        "raw_write": lambda out: [sys.executable, "-c", RAW_WRITE, out, str(dir_bytes(folder))],
        "raw_copy": lambda out: [sys.executable, "-c", RAW_COPY, folder, out],
        "import_tp1": lambda out: CLI + ["import", folder, out, "--format", "hf", "--module", "language=tp1"] + mem,
        "import_tp2_pp2": lambda out: CLI + ["import", folder, out, "--format", "hf", "--module",
                                             "language=tp2,pp2"] + mem,
        "export": lambda out: CLI + ["export", reference, "--module", "language", "--to", out] + mem,
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    for r in range(args.rounds):
        order = list(commands)
        random.Random(r).shuffle(order)
        for name in order:
            out = os.path.join(root, f"{name}-{r}")
            seconds, rss = timed(commands[name](out))
            written = dir_bytes(out) if os.path.exists(out) else 0
            runs[name].append({"seconds": seconds, "peak_rss": rss, "written": written})
            shutil.rmtree(out, ignore_errors=True)
    summary = {}
    med = {name: statistics.median(x["seconds"] for x in xs) for name, xs in runs.items()}
    serial, overlapped = med["raw_read"] + med["raw_write"], max(med["raw_read"], med["raw_write"])
    for name, xs in runs.items():
        summary[name] = {
            "best_s": min(x["seconds"] for x in xs), "median_s": med[name],
            "gb_per_s": xs[0]["written"] / med[name] / 1e9 if xs[0]["written"] else None,
            "serial_raw_over_this": serial / med[name], "overlapped_raw_over_this": overlapped / med[name],
            "peak_rss_mib": max(x["peak_rss"] for x in xs) / 2**20,
        }
        print(f"{name:16s} median {med[name]:6.2f} s  best {summary[name]['best_s']:6.2f} s  "
              f"read+write/this {serial / med[name]:5.2f}  max(read,write)/this {overlapped / med[name]:5.2f}  "
              f"peak {summary[name]['peak_rss_mib']:7.1f} MiB")
    shutil.rmtree(root, ignore_errors=True)
    write_json({"tensor_bytes": total, "config": llama_config(args.gb), "max_memory": args.max_memory,
                "rounds": args.rounds, "summary": summary, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
