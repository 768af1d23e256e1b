"""Checkpoints on an S3-compatible object store: a real server (moto's, from PyPI) that the tests
start on 127.0.0.1, reached through tensorstore's s3 driver with the endpoint from the standard
AWS variables or from `--storage-spec`. Save, resharded load, reshard, verify, a kill mid-save,
two concurrent savers, missing credentials, a server stopped mid-save, and remote calls bounded
by their timeout."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

import mimo_ckpt  # noqa: E402
from mimo_ckpt import CheckpointExistsError, StorageError, ThreadWorld  # noqa: E402
from mimo_ckpt.cli import main as cli  # noqa: E402
from mimo_ckpt.io import commit  # noqa: E402
from mimo_ckpt.io.storage import TensorStoreStorage, open_storage  # noqa: E402
from mimo_ckpt.run.manager import CheckpointManager  # noqa: E402
from tests.commit_cases import LAYOUTS, RESHARDED, WORLD, load_problems, save_world, states  # noqa: E402
from tests.conftest import run_threads  # noqa: E402
from tests.harness.local_world import run_local_world  # noqa: E402
from tests.harness.s3_server import BUCKET, MotoServer, s3_server  # noqa: E402

@pytest.fixture(scope="module")
def server():
    with s3_server() as moto:
        yield moto


def url(name):
    return f"s3://{BUCKET}/{name}"


def save_errors(path):
    """Each rank's error (text) from a two-rank save to `path`; empty when it committed."""
    def fn(comm, rank):
        mimo_ckpt.save(states(LAYOUTS, rank), path, layouts=LAYOUTS, comm=comm)
    _, errors = run_threads(ThreadWorld(WORLD), fn)
    return {k: f"{type(e).__name__}: {e}" for k, e in errors.items() if isinstance(k, int)}


def test_save_resharded_load_reshard_and_verify(server):
    save_world(url("a"))
    assert load_problems(url("a")) == [] and load_problems(url("a"), RESHARDED) == []
    assert cli(["reshard", url("a"), url("a-tp1dp2"), "--module", "images=tp1,dp2", "--quiet"]) == 0
    assert cli(["verify", url("a-tp1dp2"), "--quiet"]) == 0
    assert load_problems(url("a-tp1dp2"), RESHARDED) == []
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="a/")["Contents"]}
    assert "a/manifest.json" in keys and not any(".saving-" in k for k in keys)


def test_replicas_share_reads_from_an_object_store_by_default(server, caplog):
    """On an object store, each stored byte a module's DP replicas load is fetched once by
    default (one rank reads, gloo broadcasts), against once per replica with sharing off."""
    save_world(url("shared"))
    read = {}
    for name, options in (("default", mimo_ckpt.ReadOptions()), ("own", mimo_ckpt.ReadOptions(share_bytes=0))):
        caplog.clear()
        with caplog.at_level("DEBUG", logger="mimo_ckpt"):
            def fn(comm, rank):
                targets = states(RESHARDED, rank, fill=float("nan"))
                mimo_ckpt.load(targets, url("shared"), layouts=RESHARDED, comm=comm, read_options=options)
                return targets
            _, errors = run_threads(ThreadWorld(WORLD), fn)
            assert not errors, errors
        read[name] = sum(r.args[1] for r in caplog.records if r.msg == "rank %d read %d bytes")
    assert load_problems(url("shared"), RESHARDED) == []
    stored = mimo_ckpt.read_manifest(open_storage(url("shared"))).modules["images"].tensors
    replicated = sum(t.nbytes for k, t in stored.items() if not k.startswith("optimizer."))  # ZeRO state is not
    assert replicated > 0 and read["own"] - read["default"] >= replicated  # the second replica fetched none of it


def test_the_storage_spec_flag_reaches_a_store_the_environment_does_not_name(server, capsys):
    save_world(url("spec"))
    env = {k: os.environ.pop(k) for k in ("AWS_ENDPOINT_URL",)}
    try:
        spec = json.dumps({"endpoint": server.endpoint, "aws_region": "us-east-1"})
        assert cli(["inspect", url("spec"), "--storage-spec", spec, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["modules"]["images"]["layout"]["tp"] == 2
    finally:
        os.environ.update(env)
        os.environ.pop("MIMO_CKPT_STORAGE_SPEC", None)


def save_step(root, step):
    """Two ranks (threads) save `step` of a run through the manager."""
    def fn(comm, rank):
        CheckpointManager(root, comm=comm).save(states(LAYOUTS, rank), step, layouts=LAYOUTS)
    _, errors = run_threads(ThreadWorld(WORLD), fn)
    if errors:
        raise next(iter(errors.values()))


def contended_save(target, start):
    """A save that begins at `start` (epoch seconds); exit status 3 if told, on every rank, that
    the other saver has the path (`TOLD`: which message depends on how the two interleave)."""
    time.sleep(max(0.0, start - time.time()))

    def fn(comm, rank):
        mimo_ckpt.save(states(LAYOUTS, rank), target, layouts=LAYOUTS, comm=comm)
    _, errors = run_threads(ThreadWorld(WORLD), fn)
    if errors:
        texts = [str(e) for k, e in errors.items() if isinstance(k, int)]
        print(texts)
        sys.exit(3 if all(any(m in t for m in TOLD) for t in texts) else 1)


TOLD = ("another save committed first",  # both reached the commit: the index exists
        "already holds a committed checkpoint",  # the other had committed when this one began
        "started while this one ran")  # the other began later and took this write over


def spawn(call, fault=None):
    """`call` (Python, with this module's names) in a new process: tensorstore forbids fork()
    once it runs threads. Returns the process, started."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **({"MIMO_CKPT_FAULT": fault} if fault else {}))
    return subprocess.Popen([sys.executable, "-c", f"from tests.test_s3 import *\n{call}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_save_killed_mid_write_leaves_the_previous_step_and_reruns(server):
    root = url("run")
    save_step(root, 1)
    killed = spawn(f"save_step({root!r}, 2)", fault="save.write@0")
    assert killed.wait(timeout=120) == -9, killed.communicate()[0]
    assert CheckpointManager(root).committed_steps() == [1]
    assert load_problems(f"{root}/step_000000001") == []
    save_step(root, 2)  # takes the dead save over
    assert CheckpointManager(root).committed_steps() == [1, 2]
    assert load_problems(f"{root}/step_000000002") == []


def test_of_two_concurrent_savers_exactly_one_commits(server):
    target = url("contended")
    start = time.time() + 3.0  # both processes begin together
    savers = [spawn(f"contended_save({target!r}, {start})") for _ in range(2)]
    codes = sorted(p.wait(timeout=120) for p in savers)
    outputs = [p.communicate()[0] for p in savers]
    assert codes == [0, 3], [o[-1500:] for o in outputs]
    assert load_problems(target) == []


def test_the_index_is_created_by_one_racing_writer_only(server):
    """The conditional PUT itself: 8 threads create the same index; one wins, each time."""
    for trial in range(3):
        storage = open_storage(url(f"race-{trial}"))
        won = []

        def race(i):
            try:
                storage.commit_file("manifest.json", str(i).encode(), exclusive=True)
                won.append(i)
            except CheckpointExistsError:
                pass
        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(won) == 1
        assert boto3.client("s3").get_object(Bucket=BUCKET, Key=f"race-{trial}/manifest.json")["Body"].read() \
            == str(won[0]).encode()


def test_missing_or_refused_credentials_fail_fast_naming_the_url(server):
    guarded = MotoServer(INITIAL_NO_AUTH_ACTION_COUNT="0")  # this one checks signatures
    try:
        keys = {k: os.environ.pop(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ["AWS_ENDPOINT_URL"] = guarded.endpoint
        started = time.monotonic()
        with pytest.raises(StorageError, match=f"s3://{BUCKET}/nocreds.*no AWS credentials"):
            open_storage(url("nocreds"))  # what every rank's save does first
        os.environ.update(AWS_ACCESS_KEY_ID="unknown", AWS_SECRET_ACCESS_KEY="unknown")
        errors = save_errors(url("refused"))
        assert sorted(errors) == [0, 1] and all(f"s3://{BUCKET}/refused" in e and "403" in e for e in errors.values())
        assert time.monotonic() - started < 15
    finally:
        os.environ.update(keys)
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        guarded.stop()


def test_a_server_stopped_mid_save_fails_within_the_timeout(server, monkeypatch):
    """The server goes away after the data is written, before the index: the save fails on every
    rank within the timeout, naming the URL, and nothing is committed."""
    other = MotoServer()
    other.make_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", other.endpoint)
    monkeypatch.setenv("MIMO_CKPT_REMOTE_TIMEOUT_S", "3")
    publish = commit.publish

    def stop_then_publish(*args, **kwargs):
        other.stop()
        return publish(*args, **kwargs)
    monkeypatch.setattr(commit, "publish", stop_then_publish)
    started = time.monotonic()
    errors = save_errors(url("stopped"))
    assert sorted(errors) == [0, 1]
    assert all(f"s3://{BUCKET}/stopped" in e and "no answer within 3 s" in e for e in errors.values()), errors
    assert time.monotonic() - started < 3 * 4 + 10  # the timeout bounds each call: publish, then cleanup


def test_an_unanswering_endpoint_is_bounded_by_the_timeout():
    quiet = socket.socket()
    quiet.bind(("127.0.0.1", 0))
    quiet.listen(8)  # accepts connections, never answers
    try:
        storage = TensorStoreStorage(url("x"), spec={"endpoint": f"http://127.0.0.1:{quiet.getsockname()[1]}",
                                                      "aws_credentials": {"type": "anonymous"}}, timeout_s=2)
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"s3://.*/x/manifest.json: no answer within 2 s"):
            storage.size("manifest.json")
        assert time.monotonic() - started < 5
    finally:
        quiet.close()


def _save_to_memory(args):
    import torch

    from mimo_ckpt import ModuleLayout
    try:
        mimo_ckpt.save({"m": {"w": torch.ones(2)}}, "memory://shared", layouts={"m": ModuleLayout(dp=2)})
    except StorageError as exc:
        return str(exc)
    return "saved"


def test_a_memory_store_refuses_ranks_that_are_processes():
    results = run_local_world(2, "tests.test_s3:_save_to_memory", {}, timeout=120)
    assert all("lives in one process's memory" in r for r in results), results
