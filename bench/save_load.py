"""Save/load throughput of mimo_ckpt vs raw disk, torch DCP and megatron dist_checkpointing.

One invocation measures, for each world size in `--ranks` (gloo CPU processes on 127.0.0.1):

* raw:       each rank os.write()s its share of the bytes to its own file + fsync, and reads it
             back with os.preadv into preallocated tensors (the disk's bandwidth for this pattern);
* mimo_ckpt: `mimo_ckpt.save` / `mimo_ckpt.load` (load with verify=True, the default, with
             verify=False, and with io_threads=1: one file read at a time per rank instead of several);
* mimo_ckpt_1file (only when named in --systems): the same, but each rank writes one file per
             module instead of up to `SaveOptions.max_parts` (what the split into parts buys);
* dcp:       torch.distributed.checkpoint save/load, FileSystemWriter/Reader (defaults: fsync on,
             one writer thread), shards expressed as DTensors on per-module-stage device meshes;
* megatron:  megatron.core.dist_checkpointing save/load (torch_dist, defaults), shards as
             ShardedTensor.from_rank_offsets over the same boxes.

The state has two modules, "images" (fp32 ViT-like, 4 layers) and "language" (bf16 GPT-like,
8 layers stacked along a layer axis and split by PP), with matrices TP-split on dim 0 or dim 1
and sized so the unique bytes sum to `--total-gb`. Each system saves under the "save" layouts,
then loads (a) under the same layouts and (b) resharded (see `layouts_for`). Every load goes into
preallocated tensors that were filled with NaN, and is checked afterwards against the
deterministic pattern the state was built from (sampled elements, untimed).

Timing: barrier, then each rank times the call until it returns (save includes fsync and
commit); the reported time is the max over ranks. Per world size all systems run in one process
world: a first round (reported as "first call": it includes one-time start-up costs) and then
`--repeats` timed rounds, each running every system once in a shuffled order, and a system's
loads in a shuffled order too: on this VM a save's or a cold read's time depends on what ran
just before it (bench/probe_cold_read_state.py). The orders come from `--seed`, random unless
given and recorded in the JSON, so no system keeps the same place or predecessor from run to
run. Every load comes right after a save of the checkpoint it reads, as raw's read does: a
cold read right after a save is the fast one of the two speeds it takes here. The round's first
save is timed, the others only rewrite the checkpoint. The table gives the best and the median
of the timed rounds. GB/s = unique bytes (1e9) /
time; for resharded loads more bytes than that may be requested (replicas) or read (spans), see
the JSON.
Before each save and load (untimed): `os.sync()`, then wait until no dirty or writeback pages
and no disk I/O in flight remain. Before each load the page cache is dropped
(`echo 3 > /proc/sys/vm/drop_caches` when permitted, always followed by posix_fadvise(DONTNEED)
on every checkpoint file), so all loads are cold reads (of the guest page cache; a hypervisor's
cache is out of reach); `--warm` skips that. If a world fails, each system is re-run in a world
of its own, so a peer that fails or hangs is recorded (with the reason) and the rest measured.

CPU-only megatron: megatron's save calls torch.cuda.synchronize() and builds tensors on
torch.cuda.current_device(); inside the megatron world both are monkeypatched (synchronize ->
no-op, current_device -> "cpu") for the duration of each megatron call. Nothing else is patched.

`--profile` adds one untimed mimo_ckpt save and loads under cProfile per rank (top functions
by own time go to the JSON). The JSON also records the git HEAD and a hash of mimo_ckpt/*.py.

Run from the repo root (defaults take ~4-5 min on 2 cores; `--total-gb 0.2` for a quick run;
`--dir /dev/shm/x` measures the CPU side with files in memory):

    .venv/bin/python bench/save_load.py --json bench.json
    .venv/bin/python bench/save_load.py --total-gb 0.2 --ranks 2 --repeats 1
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import logging
import math
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

Ops = tuple[Callable[[str], None], Callable[[str, str], None]]  # save(path), load(path, scenario)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ("raw", "mimo_ckpt", "dcp", "megatron", "mimo_ckpt_1file")
DEFAULT_SYSTEMS = SYSTEMS[:4]
NI, NL = 4, 8  # images layers, language layers
MATS = (("qkv", 3, 1, 0), ("proj", 1, 1, 1), ("fc1", 4, 1, 0), ("fc2", 1, 4, 1))  # name, rows*H, cols*H, tp dim


@dataclass(frozen=True)
class Spec:
    """A global tensor: key, dtype name, global shape, TP-split dim (None = replicated over TP),
    `stacked` (dim 0 is the layer axis; one box per layer) and `pos` (where in the model a
    non-stacked tensor sits, 0..1, which picks its PP stage)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    tp_dim: int | None
    stacked: bool = False
    pos: float = 0.0


@dataclass(frozen=True)
class BoxSpec:
    module: str
    spec: Spec
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    main: bool
    replica: tuple[int, int]  # (tp replica index, dp index) for megatron's replica_id
    layer: int | None  # for stacked tensors
    stage: int  # PP stage holding it


def hidden_for(total_bytes: float) -> int:
    """Hidden size H (multiple of 64) such that the state holds ~total_bytes (416 H^2 bytes)."""
    return max(64, int(round(math.sqrt(total_bytes / 416) / 64)) * 64)


def specs(hidden: int) -> dict[str, list[Spec]]:
    h, vocab = hidden, 8 * hidden
    images = [Spec(f"vision.layers.{i}.norm.weight", "float32", (h,), None, pos=i / NI) for i in range(NI)]
    images += [Spec(f"vision.layers.{i}.{n}.weight", "float32", (r * h, c * h), d, pos=i / NI)
               for i in range(NI) for n, r, c, d in MATS]
    language = [Spec("embedding.word_embeddings.weight", "bfloat16", (vocab, h), 0, pos=0.0),
                Spec("output_layer.weight", "bfloat16", (vocab, h), 0, pos=0.999),
                Spec("decoder.layers.input_layernorm.weight", "bfloat16", (NL, h), None, stacked=True)]
    language += [Spec(f"decoder.layers.{n}.weight", "bfloat16", (NL, r * h, c * h), d + 1, stacked=True)
                 for n, r, c, d in MATS]
    return {"images": images, "language": language}


def layouts_for(world: int) -> dict[str, dict[str, dict[str, int]]]:
    """ModuleLayout kwargs for the "save" and "reshard" (load) layouts of a world size."""
    if world == 2:  # disjoint single ranks -> both modules colocated on both ranks
        return {"save": {"images": dict(), "language": dict(rank_offset=1)},
                "reshard": {"images": dict(tp=2), "language": dict(pp=2)}}
    if world % 2 or NL % (world // 2):
        raise SystemExit(f"world size {world} unsupported: use 2 or 2k with k dividing {NL}")
    k = world // 2  # images TPk on [0,k), language TPk on [k,2k) -> images DPk, language PPk
    return {"save": {"images": dict(tp=k), "language": dict(tp=k, rank_offset=k)},
            "reshard": {"images": dict(dp=k), "language": dict(pp=k, rank_offset=k)}}


def rank_boxes(module: str, layout: Any, rank: int, hidden: int) -> list[BoxSpec]:
    if not layout.contains(rank):
        return []
    c = layout.coords(rank)
    out = []
    for s in specs(hidden)[module]:
        layers = range(s.shape[0]) if s.stacked else [None]
        for layer in layers:
            stage = (layer * layout.pp // s.shape[0]) if s.stacked else int(s.pos * layout.pp)
            if stage != c["pp"]:
                continue
            offset, shape = [0] * len(s.shape), list(s.shape)
            if s.stacked:
                offset[0], shape[0] = layer, 1
            if s.tp_dim is not None:
                shape[s.tp_dim] //= layout.tp
                offset[s.tp_dim] = c["tp"] * shape[s.tp_dim]
            tp_rep = 0 if s.tp_dim is not None else c["tp"]
            out.append(BoxSpec(module, s, tuple(offset), tuple(shape), tp_rep == 0 and c["dp"] == 0,
                               (tp_rep, c["dp"]), layer, stage))
    return out


def nbytes(box: BoxSpec) -> int:
    return math.prod(box.shape) * (4 if box.spec.dtype == "float32" else 2)


def unique_bytes(hidden: int) -> int:
    return sum(math.prod(s.shape) * (4 if s.dtype == "float32" else 2) for m in specs(hidden).values() for s in m)


def _values(idx: Any, seed: int, dtype: Any) -> Any:
    """The pattern value of each global linear index (deterministic, any box computable alone)."""
    import torch

    v = idx.mul_(2654435761).add_(seed).bitwise_right_shift_(9).bitwise_and_(0xFFFF)
    return v.sub_(32768).to(torch.float32).div_(256).to(dtype)


def pattern(box: BoxSpec) -> Any:
    import torch

    g, idx = box.spec.shape, torch.zeros((), dtype=torch.int64)
    strides = [math.prod(g[d + 1:]) for d in range(len(g))]
    for d, (o, n) in enumerate(zip(box.offset, box.shape)):
        view = [1] * len(g)
        view[d] = n
        idx = idx + (torch.arange(o, o + n, dtype=torch.int64) * strides[d]).view(view)
    return _values(idx, hash_key(box), getattr(torch, box.spec.dtype))


def hash_key(box: BoxSpec) -> int:
    import zlib

    return zlib.crc32(f"{box.module}/{box.spec.key}".encode()) & 0xFFFF


def check(box: BoxSpec, t: Any, step: int = 9973) -> bool:
    """Sampled bit-exact comparison of a loaded tensor with the pattern."""
    import torch

    n, g = t.numel(), box.spec.shape
    pos = torch.cat([torch.arange(0, n, step), torch.tensor([n - 1])])
    rem, idx = pos.clone(), torch.zeros_like(pos)
    for d in reversed(range(len(g))):
        coord = rem % box.shape[d] + box.offset[d]
        rem //= box.shape[d]
        idx += coord * math.prod(g[d + 1:])
    want = _values(idx, hash_key(box), t.dtype)
    got = t.reshape(-1)[pos]
    itype = torch.int32 if t.dtype == torch.float32 else torch.int16
    return bool(torch.equal(got.view(itype), want.view(itype)))


# ---------------------------------------------------------------- per-rank work


class World:
    """One rank's view: layouts, boxes, the state and the load targets of each scenario."""

    def __init__(self, args: dict[str, Any]) -> None:
        import torch
        import torch.distributed as dist

        from mimo_ckpt import ModuleLayout, TorchComm

        self.args, self.dist, self.torch = args, dist, torch
        self.comm = TorchComm()  # one for all mimo_ckpt calls: it caches the module subgroups
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.hidden = args["hidden"]
        kw = layouts_for(self.size)
        self.layouts = {sc: {m: ModuleLayout(**k) for m, k in kw[sc].items()} for sc in ("save", "reshard")}
        self.boxes = {sc: [b for m, lay in ls.items() for b in rank_boxes(m, lay, self.rank, self.hidden)]
                      for sc, ls in self.layouts.items()}
        self.boxes["same"] = self.boxes["save"]
        self.state = [pattern(b) for b in self.boxes["save"]]
        self.targets = {sc: [torch.empty(b.shape, dtype=getattr(torch, b.spec.dtype)) for b in self.boxes[sc]]
                        for sc in ("same", "reshard")}
        self.layouts["same"] = self.layouts["save"]

    def max_over_ranks(self, x: float) -> float:
        t = self.torch.tensor([x], dtype=self.torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t.item())

    def sum_over_ranks(self, x: int) -> int:
        t = self.torch.tensor([x], dtype=self.torch.int64)
        self.dist.all_reduce(t)
        return int(t.item())

    def timed(self, fn: Callable[[], Any]) -> float:
        self.dist.barrier()
        t0 = time.perf_counter()
        fn()
        return self.max_over_ranks(time.perf_counter() - t0)

    def drop_cache(self, path: str) -> str:
        """Evict the checkpoint's pages; returns the method that applied."""
        how = "warm"
        if self.args["fs_type"] == "tmpfs":
            how = "tmpfs (files live in memory)"
        elif not self.args["warm"]:
            how = "fadvise_dontneed"
            if self.rank == 0:
                os.sync()
                try:
                    with open("/proc/sys/vm/drop_caches", "w") as f:
                        f.write("3\n")
                    how = "drop_caches"
                except OSError:
                    pass
                for root, _, files in os.walk(path):
                    for name in files:
                        fd = os.open(os.path.join(root, name), os.O_RDONLY)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        os.close(fd)
            box = [how]
            self.dist.broadcast_object_list(box, src=0)
            how = box[0]
        self.quiesce()
        return how

    def quiesce(self, limit_s: float = 10.0) -> None:
        """sync, then (rank 0) wait until no dirty/writeback pages and no disk I/O in flight are
        left over from the previous step (up to limit_s); then barrier."""
        os.sync()
        if self.rank == 0:
            dev = os.path.basename(self.args["device"])
            deadline, quiet = time.monotonic() + limit_s, 0
            while time.monotonic() < deadline and quiet < 3:
                meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
                pending = sum(int(meminfo[k].split()[0]) for k in ("Dirty", "Writeback"))
                try:
                    inflight = sum(map(int, open(f"/sys/block/{dev}/inflight").read().split()))
                except OSError:
                    inflight = 0
                quiet = quiet + 1 if pending < 1024 and inflight == 0 else 0
                time.sleep(0.05)
        self.dist.barrier()

    def verify(self, scenario: str, main_only: bool = False) -> bool:
        ok = all(check(b, t) for b, t in zip(self.boxes[scenario], self.targets[scenario])
                 if b.main or not main_only)
        return self.max_over_ranks(0.0 if ok else 1.0) == 0.0


def _raw_ops(w: World) -> Ops:
    def save(path: str) -> None:
        fd = os.open(os.path.join(path, f"r{w.rank:05d}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for b, t in zip(w.boxes["save"], w.state):
            if b.main:
                view = memoryview(t.reshape(-1).view(w.torch.uint8).numpy())
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)

    def load(path: str, scenario: str) -> None:
        fd, pos = os.open(os.path.join(path, f"r{w.rank:05d}.bin"), os.O_RDONLY), 0
        for b, t in zip(w.boxes["same"], w.targets["same"]):
            if b.main:
                view = memoryview(t.reshape(-1).view(w.torch.uint8).numpy())
                while view:
                    n = os.preadv(fd, [view], pos)
                    view, pos = view[n:], pos + n
        os.close(fd)

    return save, load


class BytesRead(logging.Handler):
    """Sums the bytes mimo_ckpt.load reports reading (its debug log line) since the last take()."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.total = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "rank %d read %d bytes":
            self.total += int(record.args[1])  # type: ignore[index]

    def take(self) -> int:
        total, self.total = self.total, 0
        return total


_READ = BytesRead()


def _ours_ops(w: World, verify: bool = True, io_threads: int | None = None, one_file: bool = False,
              read_options: Any = None) -> Ops:
    import mimo_ckpt
    from mimo_ckpt import ReadOptions, SaveOptions, TensorShard

    logger = logging.getLogger("mimo_ckpt")
    if _READ not in logger.handlers:
        logger.addHandler(_READ)
        logger.setLevel(logging.DEBUG)
    comm = w.comm

    def shards(boxes: list[BoxSpec], tensors: list[Any]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for b, t in zip(boxes, tensors):
            name = b.spec.key if b.layer is None else f"{b.spec.key}.{b.layer}"
            out.setdefault(b.module, {})[name] = TensorShard(b.spec.key, t, b.spec.shape, b.offset, b.main)
        return out

    # DP replicas are equal here: their writes are spread, as megatron's fully parallel save does;
    # one_file: part_bytes out of reach, so one file per writer and module
    options = SaveOptions(part_bytes=1 << 62) if one_file else SaveOptions()

    def save(path: str) -> None:
        mimo_ckpt.save(shards(w.boxes["save"], w.state), path, layouts=w.layouts["save"], comm=comm,
                       replicas="spread", options=options)

    def load(path: str, scenario: str) -> None:
        threads = {} if io_threads is None else {"io_threads": io_threads}
        mimo_ckpt.load(shards(w.boxes[scenario], w.targets[scenario]), path,
                       layouts=w.layouts[scenario], comm=comm, verify=verify,
                       read_options=read_options or ReadOptions(), **threads)

    return save, load


def _dcp_ops(w: World) -> Ops:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    meshes: dict[tuple[str, str, int], Any] = {}  # (scenario, module, pp stage) -> (dp, tp) mesh
    for sc in ("save", "reshard"):  # collective: every rank creates every mesh, in the same order
        for m, lay in sorted(w.layouts[sc].items()):
            for stage in range(lay.pp):
                grid = [[lay.rank_of(tp=t, dp=d, pp=stage) for t in range(lay.tp)] for d in range(lay.dp)]
                meshes[(sc, m, stage)] = DeviceMesh("cpu", grid)
    meshes.update({("same", m, s): v for (sc, m, s), v in list(meshes.items()) if sc == "save"})

    def state_dict(scenario: str, tensors: list[Any]) -> dict[str, Any]:
        out = {}
        for b, t in zip(w.boxes[scenario], tensors):
            name = f"{b.module}.{b.spec.key}" + ("" if b.layer is None else f".{b.layer}")
            place = [Replicate(), Replicate() if b.spec.tp_dim is None else Shard(b.spec.tp_dim)]
            shape = (1, *b.spec.shape[1:]) if b.layer is not None else b.spec.shape
            stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
            out[name] = DTensor.from_local(t, meshes[(scenario, b.module, b.stage)], place,
                                           run_check=False, shape=shape, stride=stride)
        return out

    def save(path: str) -> None:
        dcp.save(state_dict("save", w.state), storage_writer=dcp.FileSystemWriter(path))

    def load(path: str, scenario: str) -> None:
        dcp.load(state_dict(scenario, w.targets[scenario]), storage_reader=dcp.FileSystemReader(path))

    return save, load


@contextmanager
def _cuda_as_cpu() -> Iterator[None]:
    """CPU-only machine: megatron's save synchronises CUDA and puts a flag tensor on the current
    CUDA device; make both harmless while megatron runs (see the module docstring)."""
    import torch

    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved  # type: ignore[assignment]


def _megatron_ops(w: World) -> Ops:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def sharded(scenario: str, tensors: list[Any]) -> dict[str, Any]:
        out = {}
        for b, t in zip(w.boxes[scenario], tensors):
            offsets = [(d, b.offset[d] // b.shape[d], b.spec.shape[d] // b.shape[d])
                       for d in range(len(b.shape)) if b.shape[d] != b.spec.shape[d]]
            name = f"{b.module}.{b.spec.key}" + ("" if b.layer is None else f".{b.layer}")
            out[name] = ShardedTensor.from_rank_offsets(f"{b.module}.{b.spec.key}", t, *offsets,
                                                        replica_id=b.replica)
        return out

    def save(path: str) -> None:
        if w.rank == 0:
            os.makedirs(path)  # megatron wants an existing, empty directory
        w.dist.barrier()
        with _cuda_as_cpu():
            dist_checkpointing.save(sharded("save", w.state), path)

    def load(path: str, scenario: str) -> None:
        with _cuda_as_cpu():
            dist_checkpointing.load(sharded(scenario, w.targets[scenario]), path)

    return save, load


def _profile(fn: Callable[[], Any], top: int = 14) -> str:
    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue().split("\n\n", 1)[-1].strip()


def _loads(system: str, w: World, ops: Ops) -> list[tuple[str, str, Callable[[str, str], None]]]:
    """(name, scenario, load function) of each load measured for a system."""
    out = [("load_same", "same", ops[1])]
    if system != "raw":
        out.append(("load_reshard", "reshard", ops[1]))
    if system == "mimo_ckpt":  # variants of the load, on the same checkpoint
        nover = _ours_ops(w, verify=False)[1]
        serial = _ours_ops(w, io_threads=1)[1]
        out += [("load_same_noverify", "same", nover), ("load_reshard_noverify", "reshard", nover),
                ("load_same_1thread", "same", serial), ("load_reshard_1thread", "reshard", serial)]
    return out


def _round(w: World, system: str, ops: Ops, path: str) -> tuple[dict[str, float], bool, str, dict[str, int]]:
    """The system's cold loads, each right after a save of the checkpoint it reads (the first
    save timed), and, for mimo_ckpt, the bytes each load read over all ranks."""
    times: dict[str, float] = {}
    verified, cache, read = True, "warm", {}
    loads = _loads(system, w, ops)
    for name, scenario, fn in random.Random(f"{w.args['seed']}-{path}").sample(loads, len(loads)):  # same on all ranks
        if w.rank == 0 and system == "raw":
            os.makedirs(path)
        w.quiesce()
        seconds = w.timed(lambda: ops[0](path))
        times.setdefault("save", seconds)
        for t in w.targets[scenario]:
            t.fill_(float("nan"))
        cache = w.drop_cache(path)
        _READ.take()
        times[name] = w.timed(lambda: fn(path, scenario))
        if system.startswith("mimo_ckpt"):
            read[name] = w.sum_over_ranks(_READ.take())
        verified = w.verify(scenario, main_only=system == "raw") and verified
        w.dist.barrier()
        if w.rank == 0:
            shutil.rmtree(path)
            os.sync()
        w.dist.barrier()
    return times, verified, cache, read


def rank_main(args: dict[str, Any]) -> dict[str, Any]:
    """Runs in every rank of a world: a first (warm-up) round and `repeats` timed rounds, each
    round running every system once, in an order shuffled from the run's seed (the same on all
    ranks)."""
    t0 = time.perf_counter()
    w = World(args)
    systems: list[str] = args["systems"]
    makers = {"raw": _raw_ops, "mimo_ckpt": _ours_ops, "dcp": _dcp_ops, "megatron": _megatron_ops,
              "mimo_ckpt_1file": lambda w: _ours_ops(w, one_file=True)}
    ops = {s: makers[s](w) for s in systems}
    setup_s = w.max_over_ranks(time.perf_counter() - t0)
    rec: dict[str, dict[str, Any]] = {s: {"first_call_s": {}, "times": {}, "verified": True} for s in systems}
    for rnd in range(args["repeats"] + 1):
        for system in random.Random(f"{args['seed']}-{rnd}").sample(systems, len(systems)):
            path = os.path.join(args["dir"], f"w{w.size}-{system}-{rnd}")
            times, ok, cache, read = _round(w, system, ops[system], path)
            r = rec[system]
            r["verified"], r["cache"] = r["verified"] and ok, cache
            if read:
                r["bytes_read"] = read
            for op, t in times.items():
                if rnd == 0:
                    r["first_call_s"][op] = t
                else:
                    r["times"].setdefault(op, []).append(t)
    out: dict[str, Any] = {"rank": w.rank}
    if args["profile"] and "mimo_ckpt" in ops:  # one extra, untimed round under cProfile
        save, load = ops["mimo_ckpt"]
        path = os.path.join(args["dir"], f"w{w.size}-profile")
        os.sync()
        out["profile"] = {"save": _profile(lambda: save(path))}
        for scenario in ("same", "reshard"):
            w.drop_cache(path)
            out["profile"][f"load_{scenario}"] = _profile(lambda: load(path, scenario))
        w.dist.barrier()
        if w.rank == 0:
            shutil.rmtree(path)
    loaded = {sc: w.sum_over_ranks(sum(nbytes(b) for b in w.boxes[sc])) for sc in ("same", "reshard")}
    if w.rank == 0:
        out.update(systems=rec, setup_s=setup_s, loaded_bytes=loaded)
    return out


# ---------------------------------------------------------------- driver


def machine_info(path: str) -> dict[str, Any]:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    du = shutil.disk_usage(path)
    real = os.path.realpath(path)
    mounts = [line.split()[:3] for line in open("/proc/mounts")]
    dev, _, fs = max((m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
                     key=lambda m: len(m[1]))
    root = os.path.join(REPO, "mimo_ckpt")
    sources = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".py"))
    # each file's path inside the package and its bytes: a move changes the digest too
    digest = hashlib.sha256(b"".join(os.path.relpath(f, root).encode() + b"\0" + open(f, "rb").read()
                                     for f in sources)).hexdigest()[:16]
    git = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "mimo_ckpt"], capture_output=True,
                           text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "ram_gib": round(mem / 2**30, 1), "disk_device": dev, "fs_type": fs,
            "git_head": git, "mimo_ckpt_dirty": bool(dirty), "mimo_ckpt_sha256": digest,
            "disk_total_gb": round(du.total / 1e9), "disk_free_gb": round(du.free / 1e9)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--total-gb", type=float, default=2.0, help="unique bytes of the state (1e9)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=SYSTEMS)
    p.add_argument("--dir", default="/work/bench-tmp", help="scratch directory (removed afterwards if created)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache before loads")
    p.add_argument("--profile", action="store_true", help="also cProfile one mimo_ckpt save/load per rank")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per process world")
    p.add_argument("--seed", type=int, help="for the order of systems and loads (default: random)")
    opts = p.parse_args()
    if opts.seed is None:
        opts.seed = random.SystemRandom().randrange(1 << 31)
    sys.path.insert(0, REPO)
    from tests.harness.local_world import run_local_world
    from bench.report import write_json

    hidden = hidden_for(opts.total_gb * 1e9)
    total = unique_bytes(hidden)
    created = not os.path.exists(opts.dir)
    os.makedirs(opts.dir, exist_ok=True)
    info = machine_info(opts.dir)
    print(f"state: H={hidden}, {total / 1e9:.3f} GB unique; machine: {info}", flush=True)
    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results: dict[str, Any] = {"machine": info, "hidden": hidden, "unique_bytes": total,
                               "options": vars(opts), "worlds": {}}
    started = time.perf_counter()

    def run(world: int, systems: list[str]) -> list[dict[str, Any]]:
        args = {"hidden": hidden, "systems": systems, "repeats": opts.repeats, "warm": opts.warm,
                "seed": opts.seed, "dir": opts.dir, "profile": opts.profile, "device": info["disk_device"], "fs_type": info["fs_type"]}
        print(f"[{time.perf_counter() - started:4.0f}s] {world} ranks: {', '.join(systems)}", flush=True)
        for name in os.listdir(opts.dir):  # leftovers of a failed world
            if name.startswith(f"w{world}-"):
                shutil.rmtree(os.path.join(opts.dir, name), ignore_errors=True)
        return run_local_world(world, "bench.save_load:rank_main", args, timeout=opts.timeout,
                               extra_env=env)

    for world in opts.ranks:
        res = results["worlds"][str(world)] = {"layouts": layouts_for(world), "systems": {}}
        try:  # all systems interleaved in one world ...
            worlds = [run(world, opts.systems)]
        except RuntimeError as exc:  # ... and if that fails, each alone, to pin down who and why
            print(f"    failed ({str(exc).splitlines()[0]}); running each system alone", flush=True)
            worlds = []
            for system in opts.systems:
                try:
                    worlds.append(run(world, [system]))
                except RuntimeError as exc:
                    res["systems"][system] = {"error": str(exc)[-3000:]}
                    print(f"    {system} FAILED: {str(exc).splitlines()[0]}", flush=True)
        for ranks in worlds:
            res["loaded_bytes"], res["setup_s"] = ranks[0]["loaded_bytes"], ranks[0]["setup_s"]
            if "profile" in ranks[0]:
                res["mimo_ckpt_profile"] = {f"rank{x['rank']}": x["profile"] for x in ranks}
            for system, r in ranks[0]["systems"].items():
                r["best_s"] = {k: min(v) for k, v in r["times"].items()}
                r["median_s"] = {k: statistics.median(v) for k, v in r["times"].items()}
                r["gbps"] = {k: total / 1e9 / v for k, v in r["best_s"].items()}
                r["median_gbps"] = {k: total / 1e9 / v for k, v in r["median_s"].items()}
                res["systems"][system] = r
                shown = ", ".join(f"{k} {v:.2f}s" for k, v in r["best_s"].items())
                print(f"    {system}: {shown}; verified={r['verified']} cache={r['cache']}", flush=True)
        add_ratios(res)
    results["elapsed_s"] = time.perf_counter() - started
    print_table(results)
    write_json(results, opts.json)
    if created:
        shutil.rmtree(opts.dir, ignore_errors=True)
    return 0


def add_ratios(res: dict[str, Any]) -> None:
    """ours/peer throughput ratios per operation, from best and from median times (raw: its save,
    and its same-layout read for every load)."""
    sy = res["systems"]
    for stat, field in (("ratios", "gbps"), ("median_ratios", "median_gbps")):
        ours = sy.get("mimo_ckpt", {}).get(field)
        if not ours:
            continue
        out: dict[str, dict[str, float]] = {}
        for op, g in ours.items():
            for peer in ("raw", "dcp", "megatron"):
                peer_g = sy.get(peer, {}).get(field, {})
                ref = peer_g.get("save" if op == "save" else "load_same") if peer == "raw" else \
                    peer_g.get(op.replace("_noverify", "").replace("_1thread", ""))
                if ref:
                    out.setdefault(op, {})[f"ours/{peer}"] = g / ref
        res[stat] = out


def print_table(results: dict[str, Any]) -> None:
    print(f"\nunique bytes {results['unique_bytes'] / 1e9:.3f} GB; time = max over ranks, best of "
          f"{results['options']['repeats']}; med = median; 1st = first call (not in best/median)")
    print(f"{'ranks':>5} {'op':<22} {'system':<15} {'time s':>7} {'GB/s':>6} {'med s':>6} {'1st s':>6}"
          "  ratios (GB/s ours/peer, best)")
    for world, res in results["worlds"].items():
        for system, r in res["systems"].items():
            if "error" in r:
                print(f"{world:>5} {'-':<22} {system:<15} FAILED: {r['error'].splitlines()[0][:80]}")
                continue
            for op, t in r["best_s"].items():
                rat = res.get("ratios", {}).get(op, {}) if system == "mimo_ckpt" else {}
                text = "  ".join(f"{k} {v:.2f}" for k, v in rat.items())
                print(f"{world:>5} {op:<22} {system:<15} {t:7.2f} {r['gbps'][op]:6.2f} "
                      f"{r['median_s'][op]:6.2f} {r['first_call_s'][op]:6.2f}  {text}")


if __name__ == "__main__":
    sys.exit(main())
