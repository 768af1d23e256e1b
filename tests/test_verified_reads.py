"""Every byte a verified load returns is checked, and every writer gives the same checksums.

A flipped byte in the rows a rank asks for must fail the load, whatever part of a shard the rank
reads and whichever route reads it: partial reads widen to whole checksum blocks, and a shard
without blocks is read and checked whole. With verify=False the flipped value comes through,
which shows each case can see the flip.
"""

from dataclasses import astuple

import crc32c
import numpy as np
import pytest
import torch

import mimo_ckpt
from mimo_ckpt import CorruptShardError, ModuleLayout, TensorShard, ThreadWorld
from mimo_ckpt.io import read as reads
from mimo_ckpt.model.box import Box
from mimo_ckpt.format.checksums import BLOCK_BYTES, shard_sums
from mimo_ckpt.cli import main
from mimo_ckpt.plan.load import plan_module_load
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.model.shard import TensorMeta
from mimo_ckpt.io.storage import LocalStorage, open_storage
from tests.conftest import run_threads

MODULE = {"m": ModuleLayout()}


def _full(shape) -> torch.Tensor:
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)


def _save_one_rank(path, full: torch.Tensor) -> None:
    state = {"m": {"w": TensorShard.whole("w", full)}}
    mimo_ckpt.save(state, path, layouts=MODULE, comm=ThreadWorld(1).comm(0))


def _flip(path, element: tuple[int, int]) -> str:
    """Flip one bit of stored element `element` of the one shard of "w"; returns its file."""
    (shard,) = read_manifest(open_storage(str(path))).modules["m"].tensors["w"].shards
    at = shard.begin + 4 * (element[0] * shard.box.shape[1] + element[1])
    with open(path / shard.file, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x40]))
    return shard.file


def _load_box(path, shape, box: Box, verify: bool) -> torch.Tensor:
    out = torch.zeros(box.shape, dtype=torch.float32)
    targets = {"m": {"w": TensorShard("w", out, shape, box.offset)}}
    mimo_ckpt.load(targets, path, layouts=MODULE, comm=ThreadWorld(1).comm(0), verify=verify)
    return out


def _read_box(path, shape, box: Box, temp_bytes: int | None) -> torch.Tensor:
    """Through the read executor, with a bounded scratch buffer."""
    entry = read_manifest(open_storage(str(path))).modules["m"]
    items = plan_module_load("m", entry, [TensorMeta("w", "F32", shape, box, True)])
    out = np.zeros(box.shape, dtype=np.uint32)
    reads.execute_reads(LocalStorage(path), items, [(out, box)], verify=True, temp_bytes=temp_bytes)
    return torch.from_numpy(out.view(np.float32))


def _route(path, shape, box: Box) -> str:
    entry = read_manifest(open_storage(str(path))).modules["m"]
    (item,) = plan_module_load("m", entry, [TensorMeta("w", "F32", shape, box, True)])
    dst = np.zeros(box.shape, dtype=np.uint32)
    if item.contiguous:
        return "direct"
    return "runs" if reads._runs(item, dst, box, reads.ReadOptions().min_run_bytes) is not None else "span"


def _expect_flip_caught(path, full, box: Box, flipped: tuple[int, int], file: str) -> None:
    with pytest.raises(CorruptShardError, match=file):
        _load_box(path, tuple(full.shape), box, verify=True)
    wrong = _load_box(path, tuple(full.shape), box, verify=False)
    local = tuple(f - o for f, o in zip(flipped, box.offset))
    assert wrong[local] != full[flipped]  # the flip lies in the rows asked for
    wrong[local] = full[flipped]
    assert torch.equal(wrong, full[box.offset[0] : box.end[0], box.offset[1] : box.end[1]])


def test_a_flip_in_the_rows_a_tp4_rank_reads_of_a_small_shard_fails_the_load(tmp_path):
    """(64, 40) F32: 10 KiB, one shard with no blocks; a TP4 rank reads rows 16..32."""
    path = tmp_path / "ckpt"
    full = _full((64, 40))
    _save_one_rank(path, full)
    box = Box((16, 0), (16, 40))
    assert torch.equal(_load_box(path, (64, 40), box, verify=True), full[16:32])
    flipped = (20, 5)
    file = _flip(path, flipped)
    _expect_flip_caught(path, full, box, flipped, file)
    for temp_bytes in (None, 64, 4096):
        with pytest.raises(CorruptShardError, match=file):
            _read_box(path, (64, 40), box, temp_bytes)


@pytest.mark.parametrize("route, shape, box, flipped", [
    # rows 300..400 of 3 KiB rows: bytes 0.88..1.17 MiB, partly covering blocks 0 and 1
    ("direct", (1024, 768), Box((300, 0), (100, 768)), (350, 7)),
    # the left half of 48 KiB rows: runs of 24 KiB; the read ends inside block 2
    ("runs", (64, 12288), Box((0, 0), (64, 6144)), (60, 100)),
    # the right half of 768-byte rows: short runs through a span that starts inside block 0
    ("span", (4096, 192), Box((0, 96), (4096, 96)), (10, 120)),
])
def test_a_flip_in_a_partly_read_block_fails_the_load_on_every_route(tmp_path, route, shape, box, flipped):
    path = tmp_path / "ckpt"
    full = _full(shape)
    _save_one_rank(path, full)
    (shard,) = read_manifest(open_storage(str(path))).modules["m"].tensors["w"].shards
    assert shard.end - shard.begin > 2 * BLOCK_BYTES and shard.block_crcs
    assert _route(path, shape, box) == route
    at = 4 * (flipped[0] * shape[1] + flipped[1])
    lo, hi = 4 * box.offset[0] * shape[1] + 4 * box.offset[1], 4 * ((box.end[0] - 1) * shape[1] + box.end[1])
    block = at // BLOCK_BYTES
    assert not (lo <= block * BLOCK_BYTES and (block + 1) * BLOCK_BYTES <= hi)  # only partly covered
    expected = full[box.offset[0] : box.end[0], box.offset[1] : box.end[1]]
    assert torch.equal(_load_box(path, shape, box, verify=True), expected)
    file = _flip(path, flipped)
    _expect_flip_caught(path, full, box, flipped, file)
    with pytest.raises(CorruptShardError, match=f"block {block} "):
        _read_box(path, shape, box, 64 << 10)


@pytest.mark.parametrize("shape", [(64, 12288), (8, 98304)], ids=["short-gaps", "gaps-over-max-gap"])
def test_a_column_split_reads_each_touched_block_once(tmp_path, monkeypatch, shape):
    """The left half of long rows (the gaps between runs 24 KiB, or 192 KiB: more than runs are
    read together across): the runs' widened blocks touch, so they are read as one stretch, no
    byte twice, and the bytes read are the whole blocks the runs touch."""
    path = tmp_path / "ckpt"
    full = _full(shape)
    _save_one_rank(path, full)
    box = Box((0, 0), (shape[0], shape[1] // 2))
    assert _route(path, shape, box) == "runs"
    entry = read_manifest(open_storage(str(path))).modules["m"]
    items = plan_module_load("m", entry, [TensorMeta("w", "F32", shape, box, True)])
    (shard,) = entry.tensors["w"].shards
    seen: list[tuple[int, int]] = []
    storage = LocalStorage(path)
    reader = storage.reader

    def recording(p):
        class Recorder:
            def __enter__(self):
                self.inner = reader(p)
                read = self.inner.__enter__()

                def record(offset, *out):
                    seen.append((offset, offset + sum(memoryview(b).nbytes for b in out)))
                    read(offset, *out)
                return record

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)
        return Recorder()

    monkeypatch.setattr(storage, "reader", recording)
    out = np.zeros(box.shape, dtype=np.uint32)
    nbytes = reads.execute_reads(storage, items, [(out, box)], verify=True)
    assert torch.equal(torch.from_numpy(out.view(np.float32)), full[:, : shape[1] // 2])
    seen.sort()
    assert all(a_end <= b for (_, a_end), (b, _) in zip(seen, seen[1:]))  # no byte read twice
    assert seen[0][0] == shard.begin and seen[-1][1] == shard.end == shard.begin + nbytes


@pytest.mark.parametrize("sizes", [[0], [1], [4095, 1], [BLOCK_BYTES], [BLOCK_BYTES + 1],
                                   [3, BLOCK_BYTES, 5 << 20, 7], [BLOCK_BYTES // 3] * 8])
def test_the_block_hasher_matches_the_one_pass_checksums(sizes):
    from mimo_ckpt.format.checksums import BlockHasher, ShardSums, shard_sums

    data = np.random.default_rng(len(sizes)).integers(0, 256, sum(sizes), dtype=np.uint8)
    hasher, pos = BlockHasher(), 0
    for n in sizes:
        hasher.update(data[pos : pos + n])
        pos += n
    sums = hasher.sums()
    assert sums == shard_sums(memoryview(data))
    raw = data.tobytes()  # the reference: crc32c of the bytes and of each whole block, directly
    blocks = tuple(crc32c.crc32c(raw[i : i + BLOCK_BYTES]) for i in range(0, len(raw), BLOCK_BYTES))
    assert (sums.crc32c, sums.block_crcs) == (crc32c.crc32c(raw), blocks if len(raw) > BLOCK_BYTES else ())
    assert bool(sums.block_crcs) == (len(data) > BLOCK_BYTES)
    assert ShardSums.from_wire(sums.to_wire()) == sums


def _save_tp2(path, full: dict[str, torch.Tensor]) -> None:
    layout = ModuleLayout(tp=2)

    def fn(comm, rank):
        state = {}
        for key, t in full.items():
            rows = t.shape[0] // 2
            state[key] = TensorShard(key, t[rank * rows : (rank + 1) * rows].clone(), tuple(t.shape), (rank * rows, 0))
        mimo_ckpt.save({"m": state}, path, layouts={"m": layout}, comm=comm)
    _, errors = run_threads(ThreadWorld(2), fn)
    assert not errors, errors


@pytest.mark.parametrize("workers", [1, 2])
def test_reshard_output_has_the_block_checksums_a_save_writes(tmp_path, workers):
    """tp2 -> tp1: each tensor becomes one shard, written by streaming; its checksums are
    correct and the same as a save of the same tensor under tp1 gives."""
    tensors = {"big": _full((1000, 700)), "block": _full((512, 512)), "small": _full((64, 40))}
    _save_tp2(tmp_path / "tp2", tensors)
    rc = main(["reshard", str(tmp_path / "tp2"), str(tmp_path / "tp1"), "--module", "m=tp1",
               "--workers", str(workers), "--max-memory", "8GiB"])
    assert rc in (0, None)
    out = read_manifest(open_storage(str(tmp_path / "tp1"))).modules["m"]
    saved_state = {"m": {k: TensorShard.whole(k, t) for k, t in tensors.items()}}
    mimo_ckpt.save(saved_state, tmp_path / "saved", layouts=MODULE, comm=ThreadWorld(1).comm(0))
    saved = read_manifest(open_storage(str(tmp_path / "saved"))).modules["m"]
    for key, t in tensors.items():
        (shard,) = out.tensors[key].shards
        data = (tmp_path / "tp1" / shard.file).read_bytes()[shard.begin : shard.end]
        assert data == t.numpy().tobytes()
        assert (shard.crc32c, shard.block_bytes, shard.block_crcs) == astuple(shard_sums(memoryview(data)))
        assert shard.block_bytes == (BLOCK_BYTES if shard.block_crcs else 0)
        assert bool(shard.block_crcs) == (len(data) > BLOCK_BYTES), key
        (twin,) = saved.tensors[key].shards
        assert (twin.crc32c, twin.block_bytes, twin.block_crcs) == (shard.crc32c, shard.block_bytes, shard.block_crcs)


@pytest.mark.parametrize("command", [
    ["reshard", "{src}", "{out}", "--module", "m=tp1"],
    ["export", "{src}", "--module", "m", "--format", "safetensors", "--to", "{out}"],
    ["diff", "{src}", "{twin}"],
])
def test_offline_tools_refuse_a_corrupt_source_and_commit_nothing(tmp_path, capsys, command):
    """A flipped byte in a shard an offline tool reads stops it, naming the file; no output is
    committed (reshard's manifest, the export's index)."""
    tensors = {"w": _full((64, 40))}
    _save_tp2(tmp_path / "src", tensors)
    _save_tp2(tmp_path / "twin", tensors)
    (shard, _) = read_manifest(open_storage(str(tmp_path / "src"))).modules["m"].tensors["w"].shards
    with open(tmp_path / "src" / shard.file, "r+b") as f:
        f.seek(shard.begin + 100)
        byte = f.read(1)[0]
        f.seek(shard.begin + 100)
        f.write(bytes([byte ^ 0x10]))
    args = [a.format(src=tmp_path / "src", out=tmp_path / "out", twin=tmp_path / "twin") for a in command]
    assert main(args + ["--quiet"]) == 2  # an error (diff's 1 would say "they differ")
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and shard.file in err, err
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not (out / "model.safetensors.index.json").exists()


def test_verify_checks_block_checksums_not_only_the_whole_shard(tmp_path):
    """Two block checksums swapped in the manifest (re-signed, whole-shard crc still right): a
    partial load would fail on them, so verify reports them too."""
    import json

    from mimo_ckpt.format.manifest import encode_manifest
    from mimo_ckpt.offline.verify import verify_checkpoint

    _save_one_rank(tmp_path, _full((1024, 768)))  # 3 MiB: three blocks
    doc = json.loads((tmp_path / "manifest.json").read_bytes())
    blocks = doc["modules"]["m"]["tensors"]["w"]["shards"][0]["blocks"]
    crcs = blocks["crc32c"]
    assert len(crcs) == 3 * 8
    blocks["crc32c"] = crcs[8:16] + crcs[:8] + crcs[16:]
    (tmp_path / "manifest.json").write_bytes(encode_manifest(doc))
    storage = open_storage(str(tmp_path))
    (bad,) = verify_checkpoint(storage, read_manifest(storage), progress=False)
    assert "block 0 checksum" in bad.problem, bad.problem
    with pytest.raises(CorruptShardError, match="block 0"):
        _load_box(tmp_path, (1024, 768), Box((0, 0), (10, 768)), verify=True)


@pytest.mark.parametrize("flip", [False, True])
def test_streaming_checks_a_shard_without_blocks_once_not_per_piece(tmp_path, monkeypatch, flip):
    """A 4 MiB shard without blocks (as reshard wrote them before it wrote blocks), streamed in
    256 KiB pieces: checked whole once, so about twice its bytes are read, not 16 times."""
    import json

    from mimo_ckpt.format.manifest import encode_manifest
    from mimo_ckpt.io.stream import Budget, iter_box

    full = _full((1024, 1024))
    _save_one_rank(tmp_path, full)
    doc = json.loads((tmp_path / "manifest.json").read_bytes())
    shard = doc["modules"]["m"]["tensors"]["w"]["shards"][0]
    del shard["blocks"]
    (tmp_path / "manifest.json").write_bytes(encode_manifest(doc))
    if flip:
        _flip(tmp_path, (1000, 3))

    import mimo_ckpt.io.storage as storage_module

    read = [0]
    preadv = storage_module._preadv_exact

    def counted(fd, offset, buffers, *args):
        read[0] += sum(memoryview(b).nbytes for b in buffers)
        return preadv(fd, offset, buffers, *args)

    monkeypatch.setattr(storage_module, "_preadv_exact", counted)
    storage = LocalStorage(str(tmp_path))
    stored = read_manifest(storage).modules["m"].tensors["w"]
    budget = Budget(chunk_bytes=256 << 10, temp_bytes=256 << 10)
    pieces = iter_box(storage, "m", "w", stored, Box((0, 0), (1024, 1024)), budget)
    if flip:
        with pytest.raises(CorruptShardError, match=r"checksum mismatch in bytes"):
            next(pieces)
        return
    got = np.concatenate([values.reshape(-1).copy() for _, values in pieces])
    assert np.array_equal(got.view(np.float32), full.numpy().reshape(-1))
    assert read[0] <= 2 * full.numel() * 4 + (64 << 10), read[0]
