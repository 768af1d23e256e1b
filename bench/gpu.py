"""Saving from and loading into a GPU, side by side with PyTorch DCP and the machine's limits.

One process, one GPU, all in one run. The state is a training run's: a transformer stack
(`--layers` x `--hidden`, fp32 parameters, bf16 autocast) and its fused AdamW moments.
* raw:      the state's bytes written from host memory (`--files` files at once, 64 MiB pwrites,
            fsync) and read back cold: the disk's limits for these bytes;
* pinned:   device-to-host copy of the state into preallocated pinned buffers;
* sync:     mimo_ckpt.save and DCP save of the CUDA state; cold loads into CUDA tensors (both
            checked bit-exact against the state), after a first save and load of each that
            allocate their host buffers (reported apart);
* async:    the time each async save holds the caller: mimo (writer process, writer thread), DCP
            async_save by default, process-based, and with its pinned DefaultStager;
* training: `--steps` steps with no checkpointing, then, for each interval of `--every`, saving
            every N steps with mimo (`AsyncSaver`, `before_optimizer_step` before each optimizer
            step), with the bare device-to-host copies (the floor of any snapshot) and with DCP's
            DefaultStager (its staging future waited on before each optimizer step); the
            slowdown of each against no checkpointing (loops without it run between, to show
            the noise), and where each loop's extra device time fell, step by step after a save.
Caches are dropped before each cold read (/proc/sys/vm/drop_caches, else posix_fadvise).

    python -m bench.gpu --dir /tmp/gpu-bench --out results.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.report import write_json  # noqa: E402

PIECE = 64 << 20


def drop_caches(path: str) -> str:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return "drop_caches"
    except OSError:
        for folder, _, files in os.walk(path):
            for name in files:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        return "fadvise"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class Run:
    """The model, its optimizer and the flat state every system saves."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        dev = args.device
        layer = lambda: torch.nn.TransformerEncoderLayer(  # noqa: E731
            args.hidden, args.heads, 4 * args.hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.model = torch.nn.Sequential(*[layer() for _ in range(args.layers)]).to(dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=dev == "cuda")
        self.x = torch.randn(args.batch, args.seq, args.hidden, device=dev)
        self.device = dev
        self.params = sum(p.numel() for p in self.model.parameters())
        self.step(before_update=lambda: None)

    def step(self, before_update: Callable[[], None]) -> None:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = self.model(self.x).float().square().mean()
        loss.backward()
        before_update()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.model.named_parameters():
            out[f"w.{name}"] = p.data
            for k, v in self.opt.state[p].items():
                out[f"{k}.{name}"] = v
        return out


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def raw(state: dict[str, torch.Tensor], root: str, files: int, rounds: int, *, read_back: bool = True,
        writeback: bool = False) -> dict[str, Any]:
    """Write the state's bytes (already on the host) into `files` files at once, then read them
    back cold; with `writeback`, the disk is asked to start on each piece as soon as it is written
    (sync_file_range: whether the disk idling while the page cache fills is what separates a
    save from raw)."""

    total = nbytes(state)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    pos = 0
    for t in state.values():
        n = t.numel() * t.element_size()
        host[pos: pos + n].copy_(t.detach().reshape(-1).view(torch.uint8))
        pos += n
    view = memoryview(host.numpy())
    bounds = [(total * i // files, total * (i + 1) // files) for i in range(files)]
    paths = [os.path.join(root, f"raw{i}") for i in range(files)]

    def write(i: int) -> None:
        lo, hi = bounds[i]
        fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for off in range(lo, hi, PIECE):
            os.pwrite(fd, view[off: min(hi, off + PIECE)], off - lo)
            if writeback:
                _start_writeback(fd, off - lo, min(hi, off + PIECE) - off)
        os.fsync(fd)
        os.close(fd)

    def read(i: int) -> None:
        lo, hi = bounds[i]
        fd = os.open(paths[i], os.O_RDONLY)
        for off in range(lo, hi, PIECE):
            os.preadv(fd, [view[off: min(hi, off + PIECE)]], off - lo)
        os.close(fd)

    writes, reads, how = [], [], ""
    for _ in range(rounds):
        with ThreadPoolExecutor(files) as pool:
            writes.append(timed(lambda: list(pool.map(write, range(files)))))
        if read_back:
            how = drop_caches(root)
            with ThreadPoolExecutor(files) as pool:
                reads.append(timed(lambda: list(pool.map(read, range(files)))))
        for p in paths:
            os.remove(p)
    out = {"write_s": statistics.median(writes), "writes_s": writes}
    if reads:
        out.update(read_s=statistics.median(reads), cache_drop=how, reads_s=reads)
    return out


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    import ctypes

    call = ctypes.CDLL(None, use_errno=True).sync_file_range
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


def pinned_copy(state: dict[str, torch.Tensor], rounds: int) -> dict[str, Any]:
    pin = torch.cuda.is_available()
    bufs = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for k, t in state.items()}

    def copy() -> None:
        for k, t in state.items():
            bufs[k].copy_(t, non_blocking=pin)

    times = [timed(copy) for _ in range(rounds + 1)][1:]
    return {"s": statistics.median(times), "all_s": times}


def checked(state: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(state[k], loaded[k]) for k in state)


def empty_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(t) for k, t in state.items()}


def sync_rounds(state: dict[str, torch.Tensor], root: str, rounds: int, name: str,
                save: Callable[[str], Any], load: Callable[[dict[str, torch.Tensor], str], Any] | None = None,
                ) -> dict[str, Any]:
    """`rounds` timed saves of the state to a fresh path (`save(path)`), each then loaded cold into
    zeroed tensors (`load(target, path)`) and checked bit-exact, after a first round reported
    apart: a system's first save and load also allocate (and pin) the host buffers that later
    ones reuse, as the raw write's buffer is before it is timed."""
    saves, loads, exact = [], [], True
    for r in range(rounds + 1):
        path = os.path.join(root, f"{name}{r}")
        saves.append(timed(lambda: save(path)))
        if load is not None:
            drop_caches(root)
            target = empty_like(state)
            loads.append(timed(lambda: load(target, path)))
            exact = exact and checked(state, target)
        shutil.rmtree(path)
    out = {"save_s": statistics.median(saves[1:]), "first_save_s": saves[0], "saves_s": saves[1:]}
    if load is not None:
        out.update(load_s=statistics.median(loads[1:]), bit_exact=exact, first_load_s=loads[0], loads_s=loads[1:])
    return out


def mimo_sync(state: dict[str, torch.Tensor], root: str, rounds: int) -> dict[str, Any]:
    import mimo_ckpt
    from mimo_ckpt import ModuleLayout, SoloComm

    layouts, comm = {"m": ModuleLayout()}, SoloComm()
    return sync_rounds(state, root, rounds, "mimo",
                       lambda path: mimo_ckpt.save({"m": state}, path, layouts=layouts, comm=comm),
                       lambda target, path: mimo_ckpt.load({"m": target}, path, layouts=layouts, comm=comm))


def mimo_load_threads(state: dict[str, torch.Tensor], root: str, threads: list[int]) -> dict[str, Any]:
    """Cold loads of one mimo checkpoint with each `io_threads`."""
    import mimo_ckpt
    from mimo_ckpt import ModuleLayout, SoloComm

    layouts, comm, path = {"m": ModuleLayout()}, SoloComm(), os.path.join(root, "mimo-threads")
    mimo_ckpt.save({"m": state}, path, layouts=layouts, comm=comm)
    out: dict[str, Any] = {}
    for n in threads:
        drop_caches(root)
        target = empty_like(state)
        out[f"load_s/{n}"] = timed(lambda: mimo_ckpt.load({"m": target}, path, layouts=layouts, comm=comm, io_threads=n))
        out[f"bit_exact/{n}"] = checked(state, target)
    shutil.rmtree(path)
    return out


def save_parts(state: dict[str, torch.Tensor], root: str, parts: list[int], rounds: int) -> dict[str, Any]:
    """Sync saves with up to N files per module (`SaveOptions.max_parts`), and raw writes of as
    many files (plain, and starting writeback as they go), for each N."""
    import mimo_ckpt
    from mimo_ckpt import ModuleLayout, SoloComm
    from mimo_ckpt.plan.options import SaveOptions

    out: dict[str, Any] = {}
    for n in parts:
        out[f"raw_write_s/{n}"] = raw(state, root, n, rounds, read_back=False)["write_s"]
        out[f"raw_writeback_write_s/{n}"] = raw(state, root, n, rounds, read_back=False, writeback=True)["write_s"]
        saves = sync_rounds(state, root, rounds, f"mimo-parts{n}-",
                            lambda path: mimo_ckpt.save({"m": state}, path, layouts={"m": ModuleLayout()},
                                                        comm=SoloComm(), options=SaveOptions(max_parts=n)))
        out[f"save_s/{n}"] = saves["save_s"]
        out[f"saves_s/{n}"] = saves["saves_s"]
    return out


def dcp_sync(state: dict[str, torch.Tensor], root: str, rounds: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    return sync_rounds(state, root, rounds, "dcp", lambda path: dcp.save(dict(state), checkpoint_id=path),
                       lambda target, path: dcp.load(target, checkpoint_id=path))


def attempt(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a peer that fails here is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def mimo_async(state: dict[str, torch.Tensor], root: str, rounds: int, writer: str) -> dict[str, Any]:
    from mimo_ckpt import AsyncSaver, ModuleLayout

    saver = AsyncSaver(writer=writer)
    blocking, staged, total = [], [], []
    for r in range(rounds + 1):
        path = os.path.join(root, f"mimo-async-{writer}{r}")
        sync()
        start = time.perf_counter()
        handle = saver.save({"m": state}, path, layouts={"m": ModuleLayout()})
        blocking.append(time.perf_counter() - start)
        handle.wait_staged()
        staged.append(time.perf_counter() - start)
        handle.wait()
        total.append(time.perf_counter() - start)
        shutil.rmtree(path)
    saver.close()
    return {"first_blocking_s": blocking[0], "blocking_s": statistics.median(blocking[1:]),
            "staged_s": statistics.median(staged[1:]), "committed_s": statistics.median(total[1:]),
            "all_blocking_s": blocking}


def dcp_async(state: dict[str, torch.Tensor], root: str, rounds: int, kind: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    blocking, staged, total = [], [], []
    stager = None
    for r in range(rounds + 1):
        path = os.path.join(root, f"dcp-async-{kind}{r}")
        sync()
        start = time.perf_counter()
        if kind == "stager":
            stager = stager or reusable_default_stager()
            response = dcp.async_save(dict(state), checkpoint_id=path, async_stager=stager)
            blocking.append(time.perf_counter() - start)
            response.staging_completion.result()
            staged.append(time.perf_counter() - start)
            response.upload_completion.result()
        else:
            kind_arg = AsyncCheckpointerType.PROCESS if kind == "process" else AsyncCheckpointerType.THREAD
            future = dcp.async_save(dict(state), checkpoint_id=path, async_checkpointer_type=kind_arg)
            blocking.append(time.perf_counter() - start)
            staged.append(blocking[-1])
            future.result()
        total.append(time.perf_counter() - start)
        shutil.rmtree(path)
    if stager is not None:
        stager.close()
    return {"first_blocking_s": blocking[0], "blocking_s": statistics.median(blocking[1:]),
            "staged_s": statistics.median(staged[1:]), "committed_s": statistics.median(total[1:]),
            "all_blocking_s": blocking}


def snapshot_exact(run: Run, saver: Any, root: str) -> bool:
    """Whether an async save taken while training goes on holds the state of its call, bit for
    bit: a clone queued right after the call is compared with the checkpoint loaded into fresh
    CUDA tensors, after two more steps have changed every tensor."""
    import mimo_ckpt
    from mimo_ckpt import ModuleLayout

    path = os.path.join(root, "snapshot-check")
    handle = saver.save({"m": run.state()}, path, layouts={"m": ModuleLayout()})
    expected = {k: t.clone() for k, t in run.state().items()}  # the same stream, right after the call
    for _ in range(2):
        run.step(saver.before_optimizer_step)
    handle.wait()
    loaded = empty_like(expected)
    mimo_ckpt.load({"m": loaded}, path, layouts={"m": ModuleLayout()})
    changed = not checked(expected, run.state())
    shutil.rmtree(path)
    return changed and checked(expected, loaded)


def reusable_default_stager() -> Any:
    """DCP's pinned DefaultStager, kept from one save to the next. torch 2.11 closes its inner
    stager after every save, so the next save fails with KeyError(<class 'type'>)
    (pytorch/pytorch#183413); here that close is skipped, which gives DCP its buffers back
    on every save, as a fixed torch does."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(True, False, True, True))
    inner = getattr(stager, "_state_dict_stager", None)
    if inner is not None:
        inner.close = lambda: None
    return stager


def say(message: str) -> None:
    """Progress on stderr: a run cut short by a time limit still shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def training(run: Run, root: str, args: argparse.Namespace, partial: Callable[[dict[str, Any]], None]
             ) -> dict[str, Any]:
    """Loop times with no checkpointing, and with mimo, a copy-only floor and DCP's DefaultStager
    saving every N steps, for each N of `--every`; `partial(results so far)` after each N."""
    from mimo_ckpt import AsyncSaver, ModuleLayout

    timelines: dict[str, list[float]] = {}
    side = torch.cuda.Stream() if torch.cuda.is_available() else None

    def loop(save: Callable[[int], Any] | None, before_update: Callable[[], None], every: int = 0,
             name: str = "", steps: int = args.steps) -> float:
        # an event after each step on the training stream: where the time a save costs goes
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if name and side else []
        sync()
        start = time.perf_counter()
        if marks:
            marks[0].record()
        for i in range(steps):
            run.step(before_update)
            if marks:
                marks[i + 1].record()
            if save is not None and i % every == every // 2:
                save(i)
        sync()
        if marks:
            timelines[name] = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        took = time.perf_counter() - start
        say(f"loop {name or 'plain'}: {steps} steps in {took:.2f} s")
        return took

    saver = AsyncSaver(writer="process")
    saver_spare = AsyncSaver(writer="process", spare_device_bytes=int(args.spare_gib * 2**30))
    saver_thread = AsyncSaver(writer="thread")
    handles: list[Any] = []

    def mimo_save(i: int) -> None:
        handles.append(saver.save({"m": run.state()}, os.path.join(root, f"loop-mimo{i}"),
                                  layouts={"m": ModuleLayout()}))

    def spare_save(i: int) -> None:
        handles.append(saver_spare.save({"m": run.state()}, os.path.join(root, f"loop-mimo-spare{i}"),
                                        layouts={"m": ModuleLayout()}))

    def thread_save(i: int) -> None:
        handles.append(saver_thread.save({"m": run.state()}, os.path.join(root, f"loop-mimo-thread{i}"),
                                         layouts={"m": ModuleLayout()}))

    # the floor of any snapshot taken this way: the same device-to-host copies into pinned
    # buffers on a side stream, the optimizer step ordered after them, and nothing else
    copies = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=side is not None) for k, t in run.state().items()}
    copied: list[Any] = []

    def copy_save(i: int) -> None:
        if side is None:
            return
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k, t in run.state().items():
                copies[k].copy_(t, non_blocking=True)
        copied[:] = [torch.cuda.Event()]
        copied[0].record(side)

    def copy_wait() -> None:
        if copied:
            torch.cuda.current_stream().wait_event(copied.pop())

    pending: list[Any] = []
    out: dict[str, Any] = {"steps": args.steps}
    try:
        stager = reusable_default_stager()
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported
        stager, out["dcp_stager_error"] = None, f"{type(exc).__name__}: {exc}"[:300]

    def dcp_stager_save(i: int) -> None:
        import torch.distributed.checkpoint as dcp

        if pending:
            pending[-1].upload_completion.result()  # one at a time, as mimo's saver does
        pending.append(dcp.async_save(run.state(), checkpoint_id=os.path.join(root, f"loop-dcp{i}"),
                                      async_stager=stager))

    def dcp_wait_staged() -> None:
        if pending:
            pending[-1].staging_completion.result()

    def settle() -> None:
        """Wait for every save, then delete the checkpoints: a loop writes up to 4 states, and
        GPU hosts' disks hold about 64 GB."""
        for h in handles:
            h.wait()
        for p in pending:
            p.upload_completion.result()
        for name in os.listdir(root):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    loop(None, lambda: None, steps=20)  # warm
    say("warm; first saves")
    # each system's first save allocates its pinned buffers: once per run, outside the timed loops
    start = time.perf_counter()
    mimo_save(-1)
    out["mimo_first_blocking_s"] = time.perf_counter() - start
    if "thread" in args.loops:
        thread_save(-1)
    settle()
    if args.spare_gib:
        spare_save(-1)
        settle()
    try:
        if stager is not None:
            start = time.perf_counter()
            dcp_stager_save(-1)
            dcp_wait_staged()
            out["dcp_stager_first_staged_s"] = time.perf_counter() - start
            settle()
    except Exception as exc:  # noqa: BLE001
        out["dcp_stager_error"] = f"{type(exc).__name__}: {exc}"[:300]
    handles.clear()
    pending.clear()

    say("first saves done")
    out["async_snapshot_exact"] = snapshot_exact(run, saver, root)
    if args.spare_gib:
        out["async_snapshot_exact_spare"] = snapshot_exact(run, saver_spare, root)
    partial(out)
    say("snapshots checked")
    plain_s = [loop(None, lambda: None, name="plain")]
    runs: dict[int, dict[str, Any]] = {}
    for every in args.every:
        r: dict[str, Any] = {}
        r["mimo_s"] = loop(mimo_save, saver.before_optimizer_step, every, f"mimo/{every}")
        settle()
        r["mimo_blocking_s"] = [h.blocking_seconds for h in handles]
        r["mimo_planned_s"] = [h.planned_seconds for h in handles]
        r["mimo_waited_s"] = [h.waited_seconds for h in handles]
        r["mimo_write_s"] = [h.write_seconds for h in handles]
        handles.clear()
        if args.spare_gib:
            r["mimo_spare_s"] = loop(spare_save, saver_spare.before_optimizer_step, every, f"mimo_spare/{every}")
            settle()
            r["mimo_spare_blocking_s"] = [h.blocking_seconds for h in handles]
            handles.clear()
        r["copy_only_s"] = loop(copy_save, copy_wait, every, f"copy_only/{every}")
        if "thread" in args.loops:
            r["mimo_thread_s"] = loop(thread_save, saver_thread.before_optimizer_step, every)
            settle()
            handles.clear()
        if "dcp_stager_error" not in out:
            r["dcp_stager_s"] = loop(dcp_stager_save, dcp_wait_staged, every, f"dcp_stager/{every}")
            settle()
            pending.clear()
        plain_s.append(loop(None, lambda: None))
        runs[every] = r
        partial(summary(out, plain_s, runs, timelines, args.steps))
    saver_thread.close()
    if stager is not None:
        stager.close()
    saver.close()
    saver_spare.close()
    settle()
    return summary(out, plain_s, runs, timelines, args.steps)


def summary(out: dict[str, Any], plain_s: list[float], runs: dict[int, dict[str, Any]],
            timelines: dict[str, list[float]], steps: int) -> dict[str, Any]:
    """The loops' slowdowns and costs per save against the median loop without checkpoints."""
    plain = statistics.median(plain_s)
    out.update(plain_s=plain_s, step_s=plain / steps, plain_spread=(max(plain_s) - min(plain_s)) / plain)
    for every, r in runs.items():
        saves = len([i for i in range(steps) if i % every == every // 2])
        r["saves"] = saves
        for name in ("mimo", "mimo_spare", "mimo_thread", "copy_only", "dcp_stager"):
            if f"{name}_s" in r:
                r[f"{name}_slowdown"] = r[f"{name}_s"] / plain - 1
                r[f"{name}_cost_per_save_s"] = (r[f"{name}_s"] - plain) / saves
        r["excess_by_step"] = excess_by_step(timelines, every)
        out[f"every_{every}"] = r
    return out


def excess_by_step(timelines: dict[str, list[float]], every: int) -> dict[str, dict[str, float]]:
    """For each loop that saved every `every` steps: the device time its steps took beyond the
    plain loop's median step, summed over saves by the step's place after its save (+0: the
    step right after the save call, whose optimizer step waits for the copies; "later": the rest)."""
    if "plain" not in timelines:
        return {}
    base = statistics.median(timelines["plain"])
    out = {}
    for name, steps in timelines.items():
        if not name.endswith(f"/{every}"):
            continue
        rows: dict[str, float] = defaultdict(float)
        for i, s in enumerate(steps):
            since = (i - every // 2 - 1) % every
            rows[f"+{since}" if since < 4 else "later"] += s - base
        out[name.split("/")[0]] = dict(rows)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/mimo-gpu-bench")
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--files", type=int, default=4, help="files the raw write and read use at once")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of raw, pinned and sync (sync: after a first one)")
    ap.add_argument("--async-rounds", type=int, default=2, help="timed async saves, after a first one")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=lambda v: [int(x) for x in v.split(",")], default=[100, 50],
                    help="save intervals of the training loops, in steps (comma-separated)")
    ap.add_argument("--only", default="raw,pinned,sync,async,train")
    ap.add_argument("--spare-gib", type=float, default=8.0,
                    help="device memory the 'mimo_spare' loop's saver may clone into (0: no such loop)")
    ap.add_argument("--loops", default="", help="extra training loops: 'thread' (mimo's thread writer)")
    ap.add_argument("--save-parts", type=lambda v: [int(x) for x in v.split(",") if x], default=[4, 8],
                    help="with --only parts: sync saves and raw writes of up to N files, for each N")
    ap.add_argument("--load-threads", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="also time mimo's cold load with each of these io_threads (comma-separated)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    os.makedirs(args.dir, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    import torch.distributed as dist

    dist.init_process_group("cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    run = Run(args)
    state = run.state()
    res: dict[str, Any] = {
        "machine": {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "cpus": os.cpu_count(),
                    "disk": os.popen(f"df -hT {args.dir} | tail -1").read().strip()},
        "params": run.params, "state_bytes": nbytes(state), "tensors": len(state), "args": vars(args),
    }
    steps = [
        ("raw", lambda: raw(state, args.dir, args.files, args.rounds)),
        ("pinned", lambda: pinned_copy(state, args.rounds)),
        ("mimo_sync", lambda: mimo_sync(state, args.dir, args.rounds)),
        ("dcp_sync", lambda: dcp_sync(state, args.dir, args.rounds)),
        ("mimo_load_threads", lambda: mimo_load_threads(state, args.dir, args.load_threads)),
        ("save_parts", lambda: save_parts(state, args.dir, args.save_parts, args.rounds)),
        ("mimo_async_process", lambda: mimo_async(state, args.dir, args.async_rounds, "process")),
        ("mimo_async_thread", lambda: mimo_async(state, args.dir, args.async_rounds, "thread")),
        ("dcp_async_thread", lambda: dcp_async(state, args.dir, args.async_rounds, "thread")),
        ("dcp_async_process", lambda: dcp_async(state, args.dir, args.async_rounds, "process")),
        ("dcp_async_stager", lambda: dcp_async(state, args.dir, args.async_rounds, "stager")),
        ("training", lambda: training(run, args.dir, args, lambda part: write_json({**res, "training": part}, args.out))),
    ]
    groups = {"raw": "raw", "pinned": "pinned", "mimo_sync": "sync", "dcp_sync": "sync", "training": "train",
              "mimo_load_threads": "sync", "save_parts": "parts"}
    for name, fn in steps:
        if groups.get(name, "async") not in only or (name == "mimo_load_threads" and not args.load_threads):
            continue
        start = time.perf_counter()
        res[name] = attempt(fn)
        print(f"{name}: {time.perf_counter() - start:.1f} s {res[name]}", flush=True)
        write_json(res, args.out)
    add_ratios(res)
    write_json(res, args.out, echo=True)
    dist.destroy_process_group()
    return 0


def add_ratios(res: dict[str, Any]) -> None:
    """The bars: each as a ratio of times measured in this run (> 1: mimo is faster)."""
    r: dict[str, float] = {}
    get = lambda k, f: res.get(k, {}).get(f)  # noqa: E731
    if get("raw", "write_s") and get("mimo_sync", "save_s"):
        r["save_vs_raw_write"] = res["raw"]["write_s"] / res["mimo_sync"]["save_s"]
        r["load_vs_raw_read"] = res["raw"]["read_s"] / res["mimo_sync"]["load_s"]
    if get("dcp_sync", "save_s") and get("mimo_sync", "save_s"):
        r["save_vs_dcp"] = res["dcp_sync"]["save_s"] / res["mimo_sync"]["save_s"]
        r["load_vs_dcp"] = res["dcp_sync"]["load_s"] / res["mimo_sync"]["load_s"]
    if get("pinned", "s") and get("mimo_async_process", "blocking_s"):
        r["async_blocking_vs_pinned_copy"] = res["mimo_async_process"]["blocking_s"] / res["pinned"]["s"]
    res["ratios"] = r


if __name__ == "__main__":
    raise SystemExit(main())
