"""The `Storage` protocol, held against every backend: a local directory, and tensorstore's file
and memory key-value stores. The commit protocol, save and load rely on exactly these rules."""

import uuid

import pytest

from mimo_ckpt.errors import CheckpointExistsError, StorageError
from mimo_ckpt.io.storage import LocalStorage, TensorStoreStorage, read_small_file


@pytest.fixture(params=["local", "tensorstore-file", "tensorstore-memory"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "ckpt")
    if request.param == "tensorstore-file":
        return TensorStoreStorage(f"file://{tmp_path}/ckpt")
    return TensorStoreStorage(f"memory://conformance-{uuid.uuid4().hex}")


def _chunks(*parts: bytes):
    buf = bytearray(max(map(len, parts)))
    for part in parts:  # one buffer, refilled: the backend must be done with a chunk when it asks for the next
        buf[: len(part)] = part
        yield memoryview(buf)[: len(part)]


def test_a_written_file_reads_back_whole_and_in_scattered_pieces(storage):
    parts = [bytes(range(7)), b"", bytes(range(100, 140)), b"z" * 300]
    storage.write_file("m/f.bin", _chunks(*parts))
    data = b"".join(parts)
    assert storage.size("m/f.bin") == len(data) and storage.exists("m/f.bin")
    assert read_small_file(storage, "m/f.bin") == data
    a, b = bytearray(5), bytearray(11)
    storage.read_into("m/f.bin", 3, memoryview(a), memoryview(b))
    assert bytes(a + b) == data[3:19]
    with storage.reader("m/f.bin") as read:
        c = bytearray(4)
        read(len(data) - 4, memoryview(c))
        assert bytes(c) == data[-4:]


def test_missing_files_are_none_not_errors(storage):
    assert storage.size("nope") is None and not storage.exists("nope")
    assert read_small_file(storage, "nope") is None
    storage.remove("nope")


def test_a_writer_never_writes_through_an_existing_name(storage):
    storage.write_file("m/f.bin", [b"first"])
    with pytest.raises(StorageError):
        storage.write_file("m/f.bin", [b"second"])
    assert read_small_file(storage, "m/f.bin") == b"first"


def test_reading_past_the_end_is_an_error(storage):
    storage.write_file("f", [b"abc"])
    with pytest.raises(StorageError):
        storage.read_into("f", 1, memoryview(bytearray(5)))


def test_exclusive_commit_refuses_an_existing_file_and_plain_commit_replaces(storage):
    storage.commit_file("index.json", b"one", exclusive=True)
    with pytest.raises(CheckpointExistsError):
        storage.commit_file("index.json", b"two", exclusive=True)
    assert read_small_file(storage, "index.json") == b"one"
    storage.commit_file("latest", b"a")
    storage.commit_file("latest", b"b")
    assert read_small_file(storage, "latest") == b"b"


def test_listing_and_removal(storage):
    for name in ("a/x", "a/y", "b"):
        storage.write_file(name, [name.encode()])
    assert sorted(storage.list_files()) == ["a/x", "a/y", "b"]
    storage.remove("a/x")
    assert sorted(storage.list_files()) == ["a/y", "b"] and not storage.exists("a/x")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../up", "a/../../up", "a/./b", ""])
def test_paths_that_leave_the_checkpoint_are_refused(storage, bad):
    with pytest.raises(StorageError):
        storage.write_file(bad, [b"x"])
