"""Disk full, concurrent savers, retention, corruption and hostile checkpoints (ranks as threads)."""

import errno
import json
import os
import shutil
import threading
import time

import pytest
import torch

import mimo_ckpt
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt import (
    CheckpointExistsError,
    CorruptShardError,
    ManifestError,
    MimoCkptError,
    ModuleLayout,
    PlanError,
    StorageError,
    ThreadWorld,
)
from mimo_ckpt.run.manager import LATEST_PATH, CheckpointManager
from mimo_ckpt.format.manifest import MANIFEST_PATH, Manifest, encode_manifest
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.storage import LocalStorage
from mimo_ckpt.offline.verify import verify_checkpoint
from tests.conftest import run_threads
from examples.synthetic_state import check_rank_state, rank_state

WORLD = 4
LAYOUTS = {"images": ModuleLayout(tp=2), "language": ModuleLayout(tp=2, rank_offset=2)}


def state_of(rank, fill=None):
    return {m: rank_state(m, l, rank, fill=fill) for m, l in LAYOUTS.items() if l.contains(rank)}


def save_with(path, storage_of=None, metadata=None, options=None):
    def fn(comm, rank):
        storage = storage_of(rank) if storage_of else LocalStorage(path)
        mimo_ckpt.save(state_of(rank), path, layouts=LAYOUTS, comm=comm, storage=storage, metadata=metadata,
                       options=options(rank) if options else SaveOptions())
    return run_threads(ThreadWorld(WORLD), fn)[1]


def load_problems(path, storage=None, **kwargs):
    def fn(comm, rank):
        targets = state_of(rank, fill=float("nan"))
        result = mimo_ckpt.load(targets, path, layouts=LAYOUTS, comm=comm, storage=storage or LocalStorage(path), **kwargs)
        return [p for m in targets for p in check_rank_state(m, LAYOUTS[m], rank, result.state[m])]
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    return [p for r in results if r for p in r], errors


def manifest_files(path):
    m = read_manifest(LocalStorage(path))
    return {s.file for e in m.modules.values() for t in e.tensors.values() for s in t.shards}


class FullDisk(LocalStorage):
    """Raises ENOSPC once `budget` bytes (shared by all ranks) have been written."""

    def __init__(self, root, budget):
        super().__init__(root)
        self.budget = budget

    def write_file(self, path, chunks):
        def metered():
            for chunk in chunks:
                n = memoryview(chunk).nbytes
                if n > self.budget[0]:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.budget[0] -= n
                yield chunk
        try:
            super().write_file(path, metered())
        except OSError as exc:
            raise StorageError(f"writing {path}: {exc}") from exc


def test_disk_full_fails_every_rank_commits_nothing_and_keeps_the_previous_step(tmp_path):
    manager_errors = run_threads(ThreadWorld(WORLD), lambda comm, rank: CheckpointManager(tmp_path, comm=comm).save(
        state_of(rank), 1, layouts=LAYOUTS))[1]
    assert not manager_errors
    step2 = tmp_path / "step_000000002"
    budget = [600]  # bytes: the first file or two fit, then the disk is full
    errors = save_with(str(step2), storage_of=lambda rank: FullDisk(step2, budget))
    assert sorted(errors) == list(range(WORLD))
    assert all(isinstance(e, MimoCkptError) for e in errors.values())
    assert any("No space left on device" in str(e) for e in errors.values())
    assert not (step2 / MANIFEST_PATH).exists()
    assert [p for p in LocalStorage(step2).list_files()] == []  # the failed save removed its own files
    assert CheckpointManager(tmp_path).latest_step() == 1
    assert load_problems(str(tmp_path / "step_000000001")) == ([], {})


class GatedStorage(LocalStorage):
    """Holds every data write until `gate` opens."""

    def __init__(self, root, gate, started):
        super().__init__(root)
        self.gate, self.started = gate, started

    def write_file(self, path, chunks):
        self.started.set()
        assert self.gate.wait(60)
        super().write_file(path, chunks)


def test_a_second_saver_on_the_same_path_makes_the_first_fail_and_wins(tmp_path):
    path = str(tmp_path / "ckpt")
    gate, started = threading.Event(), threading.Event()
    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(save_with(
        path, storage_of=lambda rank: GatedStorage(path, gate, started), metadata={"who": "first"})))
    runner.start()
    assert started.wait(60)
    assert save_with(path, metadata={"who": "second"}) == {}  # takes the marker over and commits
    gate.set()
    runner.join()
    assert sorted(first) == list(range(WORLD))
    assert "another write" in str(first[0]) or "committed first" in str(first[0])
    assert read_manifest(LocalStorage(path)).metadata == {"who": "second"}
    assert set(LocalStorage(path).list_files()) == manifest_files(path) | {MANIFEST_PATH}
    assert load_problems(path) == ([], {})


def test_a_committed_checkpoint_is_never_replaced(tmp_path):
    path = str(tmp_path / "ckpt")
    assert save_with(path) == {}
    before = (tmp_path / "ckpt" / MANIFEST_PATH).read_bytes()
    errors = save_with(path)
    assert all(isinstance(e, CheckpointExistsError) for e in errors.values()) and len(errors) == WORLD
    assert (tmp_path / "ckpt" / MANIFEST_PATH).read_bytes() == before


def test_retention_keeps_the_last_n_and_any_checkpoint_being_read(tmp_path):
    def save_steps(steps, keep_last):
        def fn(comm, rank):
            manager = CheckpointManager(tmp_path, comm=comm, keep_last=keep_last)
            for step in steps:
                manager.save(state_of(rank), step, layouts=LAYOUTS)
        assert run_threads(ThreadWorld(WORLD), fn)[1] == {}

    save_steps([1, 2, 3], keep_last=None)
    (tmp_path / "step_000000001" / ".reading-test").write_text(str(time.time()))
    save_steps([4, 5], keep_last=2)
    manager = CheckpointManager(tmp_path)
    assert manager.committed_steps() == [1, 4, 5]  # 1 is held by a reader; 2 and 3 are gone
    assert not (tmp_path / "step_000000002").exists()
    assert (tmp_path / LATEST_PATH).read_text().strip() == "step_000000005"
    assert manager.latest_step() == 5

    def load_latest(comm, rank):
        step, result = CheckpointManager(tmp_path, comm=comm).load_latest(state_of(rank, fill=0.0), layouts=LAYOUTS)
        return step, [p for m in result.state for p in check_rank_state(m, LAYOUTS[m], rank, result.state[m])]
    results, errors = run_threads(ThreadWorld(WORLD), load_latest)
    assert errors == {} and all(r == (5, []) for r in results)
    assert not [n for n in os.listdir(tmp_path / "step_000000005") if n.startswith(".reading-")]


def test_latest_naming_a_broken_step_falls_back_to_the_newest_committed(tmp_path):
    def fn(comm, rank):
        CheckpointManager(tmp_path, comm=comm).save(state_of(rank), 7, layouts=LAYOUTS)
    assert run_threads(ThreadWorld(WORLD), fn)[1] == {}
    (tmp_path / LATEST_PATH).write_text("step_000000009\n")  # points at a step that never committed
    assert CheckpointManager(tmp_path).latest_step() == 7


@pytest.fixture
def committed(tmp_path):
    path = tmp_path / "ckpt"
    assert save_with(str(path)) == {}
    return path


def _shard(path, module="images", key="vision.proj.weight"):
    doc = json.loads((path / MANIFEST_PATH).read_bytes())
    return doc["modules"][module]["tensors"][key]["shards"][0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corruption_is_detected_on_load_and_by_verify(committed, damage):
    shard = _shard(committed)
    file = committed / shard["file"]
    if damage == "flip":
        data = bytearray(file.read_bytes())
        data[shard["begin"] + 3] ^= 0x01
        file.write_bytes(bytes(data))
    elif damage == "truncate":
        file.write_bytes(file.read_bytes()[: shard["end"] - 2])
    else:
        file.unlink()
    _, errors = load_problems(str(committed))
    assert sorted(errors) == list(range(WORLD))  # every rank fails, not only the readers
    reader_error = errors[0]  # rank 0 reads the first images shard; the others learn of its failure
    assert isinstance(reader_error, CorruptShardError if damage == "flip" else StorageError)
    named = ["module 'images'", "tensor '", shard["file"], "box ["]
    if damage != "delete":  # a missing file fails on the first of its tensors that is read
        named += ["tensor 'vision.proj.weight'", "[0:12, 0:10]"]
    for name in named:
        assert name in str(reader_error), (name, str(reader_error))
    storage = LocalStorage(committed)
    findings = verify_checkpoint(storage, read_manifest(storage))
    assert findings and any(shard["file"] in str(f) for f in findings)


def test_checksums_can_be_skipped_for_speed(committed):
    shard = _shard(committed)
    file = committed / shard["file"]
    data = bytearray(file.read_bytes())
    data[shard["begin"] + 3] ^= 0x01
    file.write_bytes(bytes(data))
    problems, errors = load_problems(str(committed), verify=False)
    assert errors == {} and any("vision.proj.weight" in p for p in problems)


def test_symlinks_out_of_the_checkpoint_are_refused(committed, tmp_path):
    shard = _shard(committed)
    outside = tmp_path / "outside.bin"
    shutil.copy(committed / shard["file"], outside)
    (committed / shard["file"]).unlink()
    os.symlink(outside, committed / shard["file"])
    _, errors = load_problems(str(committed))
    assert sorted(errors) == list(range(WORLD))
    assert any("outside the checkpoint" in str(e) for e in errors.values())


def _edited(path, edit):
    doc = json.loads((path / MANIFEST_PATH).read_bytes())
    edit(doc)
    return encode_manifest(doc)  # a valid checksum: the checks past it are under test


def _tensor(doc, key="vision.proj.weight"):
    return doc["modules"]["images"]["tensors"][key]


@pytest.mark.parametrize("edit, message", [
    (lambda d: _tensor(d)["shards"][1].update(offset=[6, 0]), "overlap"),
    (lambda d: _tensor(d)["shards"].pop(), "hold 120 of the tensor's 240 elements"),
    (lambda d: _tensor(d).update(shape=[2**70, 10]), "2\\^62"),
    (lambda d: _tensor(d).update(shape=[-24, 10]), "non-negative|2\\^62"),
    (lambda d: _tensor(d).update(shape=[1] * 65), "at most 64"),
    (lambda d: _tensor(d)["shards"][0].update(file="images/../../../etc/passwd"), "not a plain relative path"),
    (lambda d: _tensor(d).update(dtype="BF16"), "does not hold"),
    (lambda d: d.update(version=99), "version 99"),
])
def test_hostile_manifests_are_rejected_with_a_named_error(committed, edit, message):
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.from_bytes(_edited(committed, edit), source="hostile.json")
    assert "hostile.json" in str(info.value)


def test_a_hostile_manifest_fails_the_load_on_every_rank(committed):
    (committed / MANIFEST_PATH).write_bytes(_edited(committed, lambda d: _tensor(d)["shards"].pop()))
    _, errors = load_problems(str(committed))
    assert sorted(errors) == list(range(WORLD))
    assert all(isinstance(e, MimoCkptError) for e in errors.values())


def test_no_read_path_can_unpickle():
    """Loading never runs pickle: no pickle, no torch.load without weights_only, no allow_pickle.
    The one exception is importing megatron's torch_dist format, whose index and objects are
    pickles (tests/test_torch_dist.py shows what it refuses)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for package in ("mimo_ckpt", "optim"):
        for dirpath, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if not name.endswith(".py") or (package, name) == ("mimo_ckpt", "torch_dist.py"):
                    continue
                text = open(os.path.join(dirpath, name)).read()
                for needle in ("import pickle", "pickle.load", "cloudpickle", "dill", "allow_pickle=True",
                               "weights_only=False", "torch.load("):
                    if needle in text:
                        offenders.append(f"{package}/{name}: {needle}")
    assert offenders == []


def test_a_ranks_share_written_as_several_files_loads_back_under_any_layout(tmp_path):
    path = str(tmp_path / "ckpt")
    assert save_with(path, options=lambda rank: SaveOptions(part_bytes=64)) == {}
    files = manifest_files(path)
    assert len(files) > WORLD and {f for f in files if ".3-" in f}, sorted(files)  # 4 writers, up to 4 files each
    assert {f"images/{n}" for n in os.listdir(os.path.join(path, "images"))} == {f for f in files if f.startswith("images/")}
    assert load_problems(path) == ([], {})
    assert verify_checkpoint(LocalStorage(path), read_manifest(LocalStorage(path)), progress=False) == []

    new = {"images": ModuleLayout(dp=2, rank_offset=2), "language": ModuleLayout(pp=2, tp=2)}

    def load(comm, rank):
        targets = {m: rank_state(m, l, rank, fill=float("nan")) for m, l in new.items() if l.contains(rank)}
        result = mimo_ckpt.load(targets, path, layouts=new, comm=comm)
        return [p for m in targets for p in check_rank_state(m, new[m], rank, result.state[m])]
    results, errors = run_threads(ThreadWorld(WORLD), load)
    assert errors == {} and results == [[]] * WORLD


def test_partial_reads_are_checked_block_by_block(tmp_path):
    """A (1024, 1024) F32 tensor saved TP2 on dim 0 (2 MiB shards, two 1 MiB blocks each), read
    back TP4: each reader covers one block of a shard. A flipped byte in block 1 of shard 0 fails
    the rank that reads it, naming the block."""
    full = torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024)
    path = str(tmp_path / "ckpt")

    def state(layout, rank, fill=None):
        rows = 1024 // layout.tp
        t = layout.coords(rank)["tp"]
        data = full[t * rows:(t + 1) * rows].clone() if fill is None else torch.full((rows, 1024), fill)
        return {"w": mimo_ckpt.TensorShard("w", data, (1024, 1024), (t * rows, 0))}

    saved = {"m": ModuleLayout(tp=2)}
    assert run_threads(ThreadWorld(2), lambda comm, rank: mimo_ckpt.save(
        {"m": state(saved["m"], rank)}, path, layouts=saved, comm=comm))[1] == {}
    shard = json.loads((tmp_path / "ckpt" / MANIFEST_PATH).read_bytes())["modules"]["m"]["tensors"]["w"]["shards"][0]
    assert shard["blocks"]["bytes"] == 1 << 20 and len(shard["blocks"]["crc32c"]) == 16
    file = tmp_path / "ckpt" / shard["file"]
    data = bytearray(file.read_bytes())
    data[shard["begin"] + (1 << 20) + 100] ^= 0x10
    file.write_bytes(bytes(data))

    new = {"m": ModuleLayout(tp=4)}

    def load(comm, rank):
        targets = {"m": state(new["m"], rank, fill=float("nan"))}
        result = mimo_ckpt.load(targets, path, layouts=new, comm=comm)
        return result.state["m"]["w"]
    _, errors = run_threads(ThreadWorld(4), load)
    assert sorted(errors) == [0, 1, 2, 3]
    assert isinstance(errors[1], CorruptShardError)  # rank 1 reads rows 256-511: block 1 of shard 0
    assert "block 1" in str(errors[1]) and shard["file"] in str(errors[1]) and "tensor 'w'" in str(errors[1])
    assert not isinstance(errors[0], CorruptShardError)  # rank 0's block is intact; it hears of rank 1

    ok = {"m": ModuleLayout(tp=4)}
    results, errors = run_threads(ThreadWorld(4), lambda comm, rank: mimo_ckpt.load(
        {"m": state(ok["m"], rank, fill=0.0)}, path, layouts=ok, comm=comm, verify=False).state["m"]["w"])
    assert errors == {} and not torch.equal(results[1], full[256:512]) and torch.equal(results[0], full[:256])


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5])
def test_whole_shard_crc_combined_from_blocks_equals_one_pass(size):
    import crc32c

    from mimo_ckpt.format.checksums import crc32c_combine, shard_sums

    data = os.urandom(size)
    sums = shard_sums(memoryview(data), 4096)
    whole, blocks = sums.crc32c, sums.block_crcs
    assert whole == crc32c.crc32c(data)
    assert blocks == (() if size <= 4096 else tuple(crc32c.crc32c(data[i:i + 4096]) for i in range(0, size, 4096)))
    cut = size // 3
    assert crc32c_combine(crc32c.crc32c(data[:cut]), crc32c.crc32c(data[cut:]), size - cut) == crc32c.crc32c(data)


def test_ranks_that_pass_different_save_options_fail_alike_and_commit_nothing(tmp_path):
    path = str(tmp_path / "ckpt")
    errors = save_with(path, options=lambda rank: SaveOptions(part_bytes=64 if rank == 1 else 1 << 20))
    assert sorted(errors) == list(range(WORLD)), errors
    for rank, exc in errors.items():
        assert isinstance(exc, MimoCkptError) and "part_bytes=1048576 vs 64" in str(exc), (rank, exc)
    assert not os.path.exists(os.path.join(path, MANIFEST_PATH))


def test_save_options_refuse_values_that_cannot_cut_files():
    with pytest.raises(PlanError, match="part_bytes"):
        SaveOptions(part_bytes=0)
    with pytest.raises(PlanError, match="max_iov"):
        mimo_ckpt.ReadOptions(max_iov=0)
