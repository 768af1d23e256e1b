"""Writers delete only what they created, never write through a name, never follow links out of a
root, and never block on a file that is not a regular file."""

import errno
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

import mimo_ckpt
from mimo_ckpt import ThreadWorld
from mimo_ckpt.errors import StorageError
from mimo_ckpt.run.manager import CheckpointManager
from mimo_ckpt.format.manifest import MANIFEST_PATH
from mimo_ckpt.io.storage import LocalStorage
from tests.commit_cases import LAYOUTS, RESHARDED, WORLD, load_problems, run_forked, save_world, states, tree_hashes
from tests.conftest import run_threads


def mimo_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mimo_ckpt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def manager_save(root, step, keep_last=None):
    def fn(comm, rank):
        CheckpointManager(root, comm=comm, keep_last=keep_last).save(states(LAYOUTS, rank), step, layouts=LAYOUTS)
    _, errors = run_threads(ThreadWorld(WORLD), fn)
    assert not errors, errors


def test_a_save_into_a_run_root_deletes_nothing_of_it(tmp_path):
    root = tmp_path / "run"
    manager_save(root, 1)
    (root / "train.log").write_text("step 1 loss 3.2\n")
    before = tree_hashes(root)
    save_world(root)  # the slip: the run root instead of a step directory
    after = tree_hashes(root)
    assert {k: after.get(k) for k in before} == before
    assert load_problems(root / "step_000000001") == []
    assert load_problems(root) == []


def test_retention_never_follows_a_linked_step(tmp_path):
    shared = tmp_path / "shared" / "pretrained"
    save_world(shared)
    before = tree_hashes(shared)
    root = tmp_path / "run"
    root.mkdir()
    os.symlink(shared, root / "step_000000000")
    for step in (1, 2, 3):
        manager_save(root, step, keep_last=1)
    assert tree_hashes(shared) == before
    assert load_problems(shared) == []
    assert not (root / "step_000000001").exists() and not (root / "step_000000002").exists()


def test_retention_never_deletes_through_a_linked_module_directory(tmp_path):
    root, archive = tmp_path / "run", tmp_path / "archive"
    manager_save(root, 1)
    os.rename(root / "step_000000001" / "images", archive)
    os.symlink(archive, root / "step_000000001" / "images")
    before = tree_hashes(archive)
    for step in (2, 3):
        manager_save(root, step, keep_last=1)
    assert tree_hashes(archive) == before and before
    assert not (root / "step_000000001" / MANIFEST_PATH).exists()
    assert not (root / "step_000000001" / "language").exists()  # what lay inside the step is gone


def test_retention_deletes_only_the_files_a_manifest_names(tmp_path):
    root = tmp_path / "run"
    manager_save(root, 1)
    notes = root / "step_000000001" / "notes.txt"
    notes.write_text("eval: 71.2\n")
    for step in (2, 3):
        manager_save(root, step, keep_last=1)
    assert notes.read_text() == "eval: 71.2\n"
    assert not (root / "step_000000001" / MANIFEST_PATH).exists()


def _reshard(src, dst, *extra, fault=None):
    return mimo_cli("reshard", src, dst, "--module", "images=tp1,dp2", "--quiet", *extra,
                    env={"MIMO_CKPT_FAULT": fault} if fault else None)


def test_a_rerun_reshard_never_writes_into_its_source(tmp_path):
    first, src, dst = tmp_path / "first", tmp_path / "src", tmp_path / "dst"
    save_world(first)
    assert _reshard(first, src).returncode == 0  # a source whose files came from a reshard
    out = mimo_cli("reshard", src, dst, "--module", "images=tp2", "--quiet", env={"MIMO_CKPT_FAULT": "offline.write@0"})
    assert out.returncode == -9, out.stderr
    before = tree_hashes(src)
    out = mimo_cli("reshard", src, dst, "--module", "images=tp2", "--quiet")
    assert out.returncode == 0, out.stderr
    assert tree_hashes(src) == before
    assert mimo_cli("verify", src, "--quiet").returncode == 0
    assert load_problems(dst) == []


def test_a_killed_reshard_with_workers_leaves_no_worker_behind(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_world(src)
    tag = uuid.uuid4().hex
    env = {**os.environ, "MIMO_CKPT_FAULT": "offline.write@0:hang", "MIMO_CKPT_HANG_S": "60", "MIMO_TEST_TAG": tag}
    parent = subprocess.Popen([sys.executable, "-m", "mimo_ckpt.cli", "reshard", str(src), str(dst), "--module",
                               "images=tp1,dp2", "--module", "language=tp1", "--workers", "2", "--quiet"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(_tagged(tag)) < 3 and time.monotonic() < deadline:  # the parent and its two workers
        time.sleep(0.2)
    assert len(_tagged(tag)) == 3
    time.sleep(1.0)  # the parent sits at the fault point, its workers idle
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _tagged(tag) == []
    out = _reshard(src, dst, "--module", "language=tp1", "--workers", "2")
    assert out.returncode == 0, out.stderr
    assert load_problems(dst, {"images": RESHARDED["images"], "language": mimo_ckpt.ModuleLayout()}) == []


def _tagged(tag: str) -> list[int]:
    """Live processes whose environment holds MIMO_TEST_TAG=tag."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"MIMO_TEST_TAG={tag}".encode() in env.split(b"\0") and state != "Z":
            pids.append(int(pid))
    return pids


def test_hf_export_never_writes_over_an_export(tmp_path):
    src, out = tmp_path / "src", tmp_path / "hf"
    save_world(src)
    assert mimo_cli("export", src, "--module", "language", "--format", "safetensors", "--to", out, "--quiet").returncode == 0
    before = tree_hashes(out)
    again = mimo_cli("export", src, "--module", "images", "--format", "safetensors", "--to", out, "--quiet")
    assert again.returncode == 2 and "already holds" in again.stderr
    assert tree_hashes(out) == before


def test_a_killed_hf_export_reruns_with_no_stale_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "hf"
    save_world(src)
    small = ("--max-shard-size", "4K")  # several files
    killed = mimo_cli("export", src, "--module", "language", "--format", "safetensors", "--to", out, "--quiet", *small,
                      env={"MIMO_CKPT_FAULT": "offline.write@0"})
    assert killed.returncode == -9
    assert mimo_cli("export", src, "--module", "language", "--format", "safetensors", "--to", out, "--quiet", *small).returncode == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(os.listdir(out)) == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})


@pytest.mark.parametrize(("command", "theirs"), [
    (["export", "{src}", "--module", "language", "--format", "safetensors", "--to", "{out}"], "model-00001-of-00001.safetensors"),
    (["export", "{src}", "--format", "torch_dist", "--to", "{out}"], "__0_0.distcp"),
])
def test_an_export_refuses_a_name_another_program_holds_and_leaves_it(tmp_path, capsys, command, theirs):
    from mimo_ckpt.cli import main as cli_main

    src, out = tmp_path / "src", tmp_path / "out"
    save_world(src)
    out.mkdir()
    (out / theirs).write_bytes(b"not ours")
    assert cli_main([a.format(src=src, out=out) for a in command] + ["--quiet"]) == 2
    assert theirs in capsys.readouterr().err
    assert os.listdir(out) == [theirs] and (out / theirs).read_bytes() == b"not ours"


@pytest.mark.parametrize("where", ["data", "manifest"])
def test_a_fifo_fails_with_the_file_named_instead_of_blocking(tmp_path, where):
    ckpt = tmp_path / "ckpt"
    save_world(ckpt)
    victim = ckpt / MANIFEST_PATH if where == "manifest" else next((ckpt / "images").iterdir())
    victim.unlink()
    os.mkfifo(victim)
    commands = [["verify", ckpt, "--quiet"]] + ([["inspect", ckpt]] if where == "manifest" else [])
    for command in commands:  # inspect reads no data file
        out = mimo_cli(*command, timeout=60)
        assert out.returncode in (1, 2) and ("FIFO" in out.stderr + out.stdout), (out.stdout, out.stderr)
        assert victim.name in out.stderr + out.stdout

    def load():
        def fn(comm, rank):
            mimo_ckpt.load(states(LAYOUTS, rank, fill=0.0), ckpt, layouts=LAYOUTS, comm=comm)
        _, errors = run_threads(ThreadWorld(WORLD, timeout=30), fn)
        assert errors and all(isinstance(e, StorageError) or "FIFO" in str(e) for e in errors.values()), errors
        assert all("FIFO" in str(e) for e in errors.values()), errors
    assert run_forked(load, timeout=60) == 0  # in a child: a regression blocks there, not here


def test_a_fifo_or_directory_as_latest_or_manifest_of_a_step(tmp_path):
    root = tmp_path / "run"
    manager_save(root, 1)
    manager_save(root, 2)
    os.unlink(root / "latest")
    os.mkfifo(root / "latest")
    os.unlink(root / "step_000000002" / MANIFEST_PATH)
    os.mkdir(root / "step_000000002" / MANIFEST_PATH)
    assert run_forked(lambda: 0 if CheckpointManager(root).latest_step() == 1 else 1, timeout=60) == 0
    with pytest.raises(StorageError, match="directory"):
        LocalStorage(root / "step_000000002").size(MANIFEST_PATH)
    assert run_forked(lambda: manager_save(root, 3), timeout=60) == 0  # the next save replaces the FIFO
    assert (root / "latest").is_file() and CheckpointManager(root).latest_step() == 3


def test_latest_step_is_the_newest_committed_even_when_latest_lags(tmp_path):
    root = tmp_path / "run"
    manager_save(root, 1)
    save_world(root / "step_000000002")  # committed, but the job died before `latest` moved
    assert (root / "latest").read_text().strip() == "step_000000001"
    manager = CheckpointManager(root)
    assert manager.latest_step() == 2
    manager_save(root, 3)  # the job goes on
    assert manager.latest_step() == 3


class _ReadOnly(LocalStorage):
    def commit_file(self, path, data, *, exclusive=False):
        raise StorageError(f"committing {path}: read-only") from OSError(errno.EROFS, "Read-only file system")


class _ReadOnlyManager(CheckpointManager):
    def _storage(self, path):
        return _ReadOnly(path)


def test_load_latest_works_on_read_only_storage(tmp_path):
    root = tmp_path / "run"
    manager_save(root, 1)

    def fn(comm, rank):
        targets = states(LAYOUTS, rank, fill=float("nan"))
        step, _ = _ReadOnlyManager(root, comm=comm).load_latest(targets, layouts=LAYOUTS)
        return step
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert not errors, errors
    assert results == [1, 1]


def test_writers_only_create_files(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write_file("a.bin", [b"one"])
    os.link(tmp_path / "a.bin", tmp_path / "b.bin")
    with pytest.raises(StorageError, match="already exists"):
        storage.write_file("b.bin", [b"two"])
    os.symlink(tmp_path / "a.bin", tmp_path / "c.bin")
    with pytest.raises(StorageError, match="already exists"):
        storage.write_file("c.bin", [b"two"])
    assert (tmp_path / "a.bin").read_bytes() == b"one"


@pytest.mark.parametrize("bad_path", ["../outside.distcp", "/etc/hostname"])
def test_import_never_reads_outside_its_source(tmp_path, bad_path):
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp

    from mimo_ckpt.errors import ManifestError
    from mimo_ckpt.interop.torch_dist import import_torch_dist

    src = tmp_path / "src"
    dcp.save({"language_model.w": torch.arange(6.0)}, storage_writer=dcp.FileSystemWriter(src), no_dist=True)
    (tmp_path / "outside.distcp").write_bytes((src / "__0_0.distcp").read_bytes())
    with open(src / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # written just above by this test
    for info in metadata.storage_data.values():
        info.relative_path = bad_path
    with open(src / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(ManifestError, match="plain relative path"):
        import_torch_dist(str(src), str(tmp_path / "dst"), progress=False)
