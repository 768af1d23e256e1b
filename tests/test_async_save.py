"""Async save with ranks as threads: a snapshot at call time, reused buffers, pending saves, errors."""

import subprocess
import sys
import threading

import pytest
import torch

import mimo_ckpt
from mimo_ckpt import AsyncSaver, MimoCkptError, ModuleLayout, ThreadWorld
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt.io.storage import LocalStorage
from tests.conftest import run_threads
from examples.synthetic_state import check_rank_state, rank_state

WORLD = 4
LAYOUTS = {"images": ModuleLayout(tp=2), "language": ModuleLayout(tp=2, rank_offset=2)}


def state_of(rank, fill=None):
    return {m: rank_state(m, l, rank, fill=fill) for m, l in LAYOUTS.items() if l.contains(rank)}


def scribble(state):
    """What training does next: overwrite every tensor in place."""
    for module in state.values():
        for leaf in module.values():
            if isinstance(leaf, mimo_ckpt.TensorShard):
                leaf.data.fill_(7)


def load_problems(path):
    def fn(comm, rank):
        targets = state_of(rank, fill=float("nan"))
        result = mimo_ckpt.load(targets, path, layouts=LAYOUTS, comm=comm)
        return [p for m in targets for p in check_rank_state(m, LAYOUTS[m], rank, result.state[m])]
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {}, errors
    return [p for r in results for p in r]


@pytest.mark.parametrize("part_bytes", [None, 64])  # one file per module and rank, or several
def test_async_save_snapshots_at_call_time_and_reuses_its_buffers(tmp_path, part_bytes):
    options = SaveOptions(part_bytes=part_bytes) if part_bytes else SaveOptions()

    def fn(comm, rank):
        saver = AsyncSaver(comm)
        state = state_of(rank)
        first = saver.save(state, str(tmp_path / "a"), layouts=LAYOUTS, options=options)
        scribble(state)  # the saved values must be those of the call, not these
        first.wait()
        pointers = {m: b.data_ptr() for m, b in saver.stager._buffers.items()}
        nbytes = saver.stager.nbytes
        second = saver.save(state_of(rank), str(tmp_path / "b"), layouts=LAYOUTS, options=options)
        second.wait()
        reused = pointers == {m: b.data_ptr() for m, b in saver.stager._buffers.items()}
        return len(pointers), reused, nbytes == saver.stager.nbytes, first.done()
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {}, errors
    assert all(r[1] and r[2] and r[3] for r in results)
    assert all((r[0] > 1) == bool(part_bytes) for r in results)  # a buffer per file
    assert load_problems(str(tmp_path / "a")) == []
    assert load_problems(str(tmp_path / "b")) == []


class Gated(LocalStorage):
    def __init__(self, root, gate):
        super().__init__(root)
        self.gate = gate

    def write_file(self, path, chunks):
        assert self.gate.wait(60)
        super().write_file(path, chunks)


def test_a_pending_save_is_waited_for_or_refused_on_every_rank(tmp_path):
    gate = threading.Event()

    def fn(comm, rank):
        saver = AsyncSaver(comm)
        slow = saver.save(state_of(rank), str(tmp_path / "slow"), layouts=LAYOUTS, storage=Gated(tmp_path / "slow", gate))
        assert not slow.done()
        try:
            saver.save(state_of(rank), str(tmp_path / "next"), layouts=LAYOUTS, if_pending="raise")
        except MimoCkptError as exc:
            refused = str(exc)
        else:
            refused = ""
        if rank == 0:
            gate.set()
        waited = saver.save(state_of(rank), str(tmp_path / "next"), layouts=LAYOUTS)  # waits for "slow"
        waited.wait()
        return refused, slow.done()
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {}, errors
    assert all("still running" in refused and done for refused, done in results)
    assert load_problems(str(tmp_path / "slow")) == [] and load_problems(str(tmp_path / "next")) == []


class Broken(LocalStorage):
    def write_file(self, path, chunks):
        raise mimo_ckpt.StorageError(f"writing {path}: [Errno 28] No space left on device")


def test_a_background_failure_reaches_every_rank_through_wait(tmp_path):
    def fn(comm, rank):
        storage = Broken(tmp_path / "x") if rank == 3 else LocalStorage(tmp_path / "x")
        handle = AsyncSaver(comm).save(state_of(rank), str(tmp_path / "x"), layouts=LAYOUTS, storage=storage)
        with pytest.raises(MimoCkptError, match="No space left"):
            handle.wait()
        return True
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {} and all(results)
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_cuda_free_staging_copies_every_dtype_bit_exactly():
    from mimo_ckpt.run.async_save import HostStager
    from mimo_ckpt.plan.save import plan_module_save

    state = rank_state("images", ModuleLayout(), 0)
    tensors = [v for v in state.values() if isinstance(v, mimo_ckpt.TensorShard)]
    plan = plan_module_save("images", ModuleLayout(), {0: [t.meta() for t in tensors]}, {0: []}).files_of(0)[0]
    image = HostStager(pin=False).stage(("images", 0), plan, {(t.key, t.box): t.data for t in tensors})
    for item in plan.items:
        t = next(t for t in tensors if t.key == item.key)
        assert bytes(image[item.begin:item.end].numpy()) == t.data.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_training_continues_while_checkpoints_are_written(tmp_path):
    from tests.harness.local_world import run_local_world

    results = run_local_world(6, "tests.async_worlds:train_while_saving",
                              {"root": str(tmp_path), "steps": 6, "every": 2}, timeout=300)
    for rank, r in enumerate(results):
        assert r["match"] == {"step0": True, "step2": True, "step4": True}, rank


def test_exiting_with_a_save_still_running_warns(tmp_path):
    script = f"""
import time, torch
from mimo_ckpt import AsyncSaver, ModuleLayout, TensorShard, ThreadWorld
from mimo_ckpt.io.storage import LocalStorage

class Slow(LocalStorage):
    def write_file(self, path, chunks):
        time.sleep(60)

saver = AsyncSaver(ThreadWorld(1).comm(0))
state = {{"m": {{"w": TensorShard.whole("w", torch.zeros(4))}}}}
saver.save(state, {str(tmp_path / "c")!r}, layouts={{"m": ModuleLayout()}}, storage=Slow({str(tmp_path / "c")!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "still running at exit and is not committed" in done.stderr and str(tmp_path / "c") in done.stderr


def test_exiting_after_the_save_finished_says_nothing(tmp_path):
    script = f"""
import torch
from mimo_ckpt import AsyncSaver, ModuleLayout, TensorShard, ThreadWorld

saver = AsyncSaver(ThreadWorld(1).comm(0))
state = {{"m": {{"w": TensorShard.whole("w", torch.zeros(4))}}}}
saver.save(state, {str(tmp_path / "c")!r}, layouts={{"m": ModuleLayout()}}).wait()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "at exit" not in done.stderr, done.stderr
