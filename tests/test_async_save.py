"""Async save with ranks as threads: a snapshot at call time, reused buffers, pending saves, errors."""

import errno
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import mimo_ckpt
from mimo_ckpt import AsyncSaver, MimoCkptError, ModuleLayout, ThreadWorld
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt.io.storage import LocalStorage
from mimo_ckpt.io.writer_process import SHM_DIR
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


@pytest.mark.parametrize("writer", ["thread", "process"])
@pytest.mark.parametrize("part_bytes", [None, 64])  # one file per module and rank, or several
def test_async_save_snapshots_at_call_time_and_reuses_its_buffers(tmp_path, part_bytes, writer):
    options = SaveOptions(part_bytes=part_bytes) if part_bytes else SaveOptions()

    def fn(comm, rank):
        saver = AsyncSaver(comm, writer=writer)
        state = state_of(rank)
        first = saver.save(state, str(tmp_path / "a"), layouts=LAYOUTS, options=options)
        scribble(state)  # the saved values must be those of the call, not these
        first.wait()
        pointers = {m: b.data_ptr() for m, b in saver.stager._buffers.items()}
        nbytes = saver.stager.nbytes
        second = saver.save(state_of(rank), str(tmp_path / "b"), layouts=LAYOUTS, options=options)
        second.wait()
        reused = pointers == {m: b.data_ptr() for m, b in saver.stager._buffers.items()}
        same_size = nbytes == saver.stager.nbytes
        saver.close()
        return len(pointers), reused, same_size, first.done()
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


def test_a_pending_save_is_waited_for_or_refused_on_every_rank_and_a_long_wait_is_reported(tmp_path, caplog):
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
            threading.Timer(0.3, gate.set).start()
        waited = saver.save(state_of(rank), str(tmp_path / "next"), layouts=LAYOUTS)  # waits for "slow"
        waited.wait()
        return refused, slow.done(), waited.waited_seconds, waited.blocking_seconds
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {}, errors
    assert all("still running" in refused and done for refused, done, _, _ in results)
    assert all(0.1 < waited <= blocking for _, _, waited, blocking in results)
    assert caplog.text.count("saves come faster than this storage takes them") == WORLD
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


def shared_images():
    return {p.name for p in Path(SHM_DIR).glob("mimo-ckpt-image-*")}


def test_a_writer_process_writes_from_shared_memory_and_leaves_nothing_behind(tmp_path):
    before = shared_images()

    def fn(comm, rank):
        saver = AsyncSaver(comm, writer="process")
        handle = saver.save(state_of(rank), str(tmp_path / "a"), layouts=LAYOUTS)
        assert handle.staged()  # host tensors: copied before save returns
        saver.before_optimizer_step()  # nothing to order on a host
        handle.wait()
        writer_pid = saver._process._proc.pid
        during = shared_images() - before
        saver.close()
        return writer_pid, during
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {}, errors
    assert len({pid for pid, _ in results}) == WORLD  # a writer each
    assert all(during for _, during in results)
    assert shared_images() == before
    assert load_problems(str(tmp_path / "a")) == []


def test_a_writer_process_that_dies_fails_the_save_on_every_rank_and_the_next_save_starts_another(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MIMO_CKPT_FAULT", "save.write@3")  # inherited by rank 3's writer, which dies

    def fn(comm, rank):
        saver = AsyncSaver(comm, writer="process")
        with pytest.raises(MimoCkptError, match="rank 3: the async writer process died"):
            saver.save(state_of(rank), str(tmp_path / "a"), layouts=LAYOUTS).wait()
        comm.all_gather_bytes(b"")  # every rank has seen it before the fault is disarmed
        if rank == 0:
            monkeypatch.delenv("MIMO_CKPT_FAULT")
        comm.all_gather_bytes(b"")
        saver.save(state_of(rank), str(tmp_path / "b"), layouts=LAYOUTS).wait()
        saver.close()
        return True
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {}, errors
    assert not (tmp_path / "a" / "manifest.json").exists()
    assert load_problems(str(tmp_path / "b")) == []


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_device_tensors_are_planned_and_copied_in_the_background(tmp_path, monkeypatch, writer):
    """float32 tensors stand for device tensors here: their planning (collectives) and copies run
    in the background, so save returns on ranks 0-2 before rank 3 has even called it; the
    other tensors are copied before save returns."""
    import mimo_ckpt.run.async_save as async_save

    monkeypatch.setattr(async_save, "staged_through_chunks", lambda t: t.dtype == torch.float32)
    returned = threading.Barrier(WORLD - 1)
    gate = threading.Event()

    def fn(comm, rank):
        saver = AsyncSaver(comm, writer=writer)
        state = state_of(rank)
        if rank == 3:
            assert gate.wait(30), "the other ranks' saves waited for this one"
        handle = saver.save(state, str(tmp_path / "a"), layouts=LAYOUTS)
        if rank != 3 and returned.wait(30) == 0:
            gate.set()
        for leaf in (v for m in state.values() for v in m.values()):
            if isinstance(leaf, mimo_ckpt.TensorShard) and leaf.data.dtype != torch.float32:
                leaf.data.fill_(7)  # copied at the call: may change at once
        handle.wait_staged()
        scribble(state)  # staged: everything may change
        handle.wait()
        saver.close()
        return handle.staged()
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {}, errors
    assert all(results)
    assert load_problems(str(tmp_path / "a")) == []


@pytest.mark.parametrize("spare", [0, 1 << 30])
def test_copies_not_issued_when_the_optimizer_step_comes_are_taken_by_it(tmp_path, monkeypatch, spare):
    """The background thread issues no copies here: the step's hook must take them all, from a
    device clone when `spare_device_bytes` holds them, and the checkpoint still holds the state
    at the call although the step changes every tensor right after its hook."""
    import mimo_ckpt.run.async_save as async_save
    from mimo_ckpt.io.copy_waves import CopyWaves

    monkeypatch.setattr(async_save, "staged_through_chunks", lambda t: t.dtype == torch.float32)
    monkeypatch.setattr(CopyWaves, "run", lambda self: None)
    cloned = []
    clone = CopyWaves._copy_through_clone
    monkeypatch.setattr(CopyWaves, "_copy_through_clone", lambda self, pairs: (cloned.append(len(pairs)),
                                                                             clone(self, pairs)))

    def fn(comm, rank):
        saver = AsyncSaver(comm, writer="thread", spare_device_bytes=spare)
        state = state_of(rank)
        handle = saver.save(state, str(tmp_path / "a"), layouts=LAYOUTS)
        saver.before_optimizer_step()
        assert handle.staged()
        scribble(state)
        handle.wait()
        saver.close()
        return True
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert errors == {}, errors
    assert (len(cloned) == WORLD) == (spare > 0) and (len(cloned) == 0) == (spare == 0)
    assert load_problems(str(tmp_path / "a")) == []


def no_room(fd, offset, size):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_dev_shm_is_a_clear_error_for_the_writer_process_and_auto_falls_back_to_a_thread(
        tmp_path, monkeypatch, caplog):
    import mimo_ckpt.io.writer_process as writer_process

    monkeypatch.setattr(writer_process.os, "posix_fallocate", no_room)
    comm = ThreadWorld(1).comm(0)
    state = {"m": {"w": torch.arange(1000.0)}}
    one = {"m": ModuleLayout()}
    with pytest.raises(mimo_ckpt.StorageError, match=r"/dev/shm has \d+ MiB free.*--shm-size"):
        AsyncSaver(comm, writer="process", pin=False).save(state, str(tmp_path / "p"), layouts=one).wait()
    assert not (tmp_path / "p" / "manifest.json").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # where "auto" picks the writer process
    saver = AsyncSaver(comm, pin=False)
    saver.save(state, str(tmp_path / "a"), layouts=one).wait()
    assert "writes from a thread from now on" in caplog.text
    assert saver._process is None  # no writer process was started
    loaded = {"m": {"w": torch.zeros(1000)}}
    mimo_ckpt.load(loaded, str(tmp_path / "a"), layouts=one, comm=comm)
    assert torch.equal(loaded["m"]["w"], torch.arange(1000.0))


def test_an_attached_optimizer_orders_each_step_after_the_pending_snapshot(tmp_path):
    saver = AsyncSaver(ThreadWorld(1).comm(0), writer="thread")
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=1.0)
    saver.attach(opt)
    calls = []

    class Pending:  # stands for a save whose device copies are still queued
        def stream_waits_staged(self):
            calls.append(w.detach().clone())  # the parameter as the step is about to change it

    saver.pending = Pending()
    w.grad = torch.ones(4)
    opt.step()
    assert len(calls) == 1 and torch.equal(calls[0], torch.ones(4)) and torch.equal(w.detach(), torch.zeros(4))
    with pytest.raises(TypeError, match="before_optimizer_step"):
        saver.attach(object())


def test_cuda_free_staging_copies_every_dtype_bit_exactly():
    from mimo_ckpt.io.copy_waves import CopyWaves
    from mimo_ckpt.io.staging import SideCopies
    from mimo_ckpt.run.async_save import HostStager
    from mimo_ckpt.plan.save import plan_module_save

    state = rank_state("images", ModuleLayout(), 0)
    tensors = [v for v in state.values() if isinstance(v, mimo_ckpt.TensorShard)]
    plan = plan_module_save("images", ModuleLayout(), {0: [t.meta() for t in tensors]}, {0: []}).files_of(0)[0]
    image, fill = HostStager(pin=False).stage(("images", 0), plan, {(t.key, t.box): t.data for t in tensors})
    CopyWaves(SideCopies(None), fill, wave_bytes=100).run()
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
