"""Device tensors move through reused host chunks (io.staging). On CPU the same code runs with
plain chunks and synchronous copies; these tests route host tensors through it and compare with
independent references: the tensors' own bytes and checksums, and the direct route's results."""

import itertools

import pytest
import torch

import mimo_ckpt
import mimo_ckpt.io.tensors as tensors_io
import mimo_ckpt.run.load as load_run
from mimo_ckpt import CorruptShardError, ModuleLayout, SoloComm, ThreadWorld
from mimo_ckpt.format.checksums import shard_sums
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.staging import StagedFile, plan_device_pieces
from mimo_ckpt.io.storage import LocalStorage
from mimo_ckpt.model.box import Box
from examples.synthetic_state import check_rank_state, rank_state
from tests.conftest import run_threads


def some_tensors():
    g = torch.Generator().manual_seed(3)
    return [
        torch.randn(37, 11, generator=g),
        torch.randn(5, 300, generator=g).to(torch.bfloat16),
        torch.zeros(0, 4),
        torch.tensor(7, dtype=torch.int64),
        torch.randn(64, 64, generator=g).t(),  # not contiguous
        torch.randint(0, 255, (1000,), generator=g, dtype=torch.uint8),
    ]


def as_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("chunk_bytes,depth", [(1 << 10, 1), (1 << 10, 3), (3000, 2), (1 << 20, 4)])
def test_a_staged_file_yields_its_items_back_to_back_with_their_checksums(chunk_bytes, depth):
    items = some_tensors()
    staged = StagedFile(items, block_bytes=512, chunk_bytes=chunk_bytes, depth=depth)
    out = []
    for chunk in staged.chunks():
        assert len(chunk) <= chunk_bytes
        out.append(bytes(chunk))  # copied now: the chunk is reused once the next is asked for
    assert len(out) == staged.count
    assert b"".join(out) == b"".join(as_bytes(t) for t in items)
    assert staged.sums() == [shard_sums(memoryview(as_bytes(t)), 512) for t in items]


@pytest.mark.parametrize("chunk_bytes", [256, 1000, 1 << 16])
def test_device_pieces_cover_every_target_byte_once_within_aligned_chunks(chunk_bytes):
    targets = [(0, Box((0, 0), (37, 11)), 4), (1, Box((2, 5), (3, 100)), 2), (2, Box((0,), (0,)), 4),
               (3, Box((), ()), 8), (4, Box((10,), (1000,)), 1)]
    batches = plan_device_pieces(targets, chunk_bytes)
    covered = {r: [] for r, _, _ in targets}
    for batch in batches:
        spans = sorted((p.at, p.at + p.hi - p.lo) for p in batch)
        assert all(a % 64 == 0 for a, _ in spans)
        assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))  # no overlap in the chunk
        assert spans[-1][1] <= chunk_bytes or len(batch) == 1
        for p in batch:
            covered[p.request].append((p.lo, p.hi))
            assert (p.hi - p.lo) == p.box.volume * dict((r, s) for r, _, s in targets)[p.request]
    for request, box, itemsize in targets:
        spans = sorted(covered[request])
        assert spans[0][0] == 0 and spans[-1][1] == box.volume * itemsize
        assert all(b == a for (_, b), (a, _) in itertools.pairwise(spans))


@pytest.fixture
def through_chunks(monkeypatch):
    """Route every tensor of save and load through small host chunks, as device tensors go."""
    monkeypatch.setattr(tensors_io, "staged_through_chunks", lambda t: True)
    monkeypatch.setattr(load_run, "staged_through_chunks", lambda t: True)
    monkeypatch.setattr(tensors_io, "CHUNK_BYTES", 4096)


SAVED = {"images": ModuleLayout(tp=2, dp=2), "language": ModuleLayout(tp=2, pp=2, rank_offset=4)}
LOADED = {"images": ModuleLayout(dp=4, rank_offset=4), "language": ModuleLayout(tp=4, dp=2)}


def states(layouts, rank, fill=None):
    return {m: rank_state(m, l, rank, fill=fill) for m, l in layouts.items() if l.contains(rank)}


def on_ranks(fn):
    results, errors = run_threads(ThreadWorld(8), fn)
    assert errors == {}, errors
    return results


def save_then_load(path):
    """Save under SAVED on 8 thread ranks, then load under LOADED; the problems found."""
    on_ranks(lambda comm, rank: mimo_ckpt.save(states(SAVED, rank), path, layouts=SAVED, comm=comm))

    def load(comm, rank):
        targets = states(LOADED, rank, fill=float("nan"))
        result = mimo_ckpt.load(targets, path, layouts=LOADED, comm=comm)
        return [p for m in targets for p in check_rank_state(m, LOADED[m], rank, result.state[m])]
    return [p for r in on_ranks(load) for p in r]


def shard_checksums(path):
    manifest = read_manifest(LocalStorage(path))
    return {(name, key, s.box): (s.crc32c, s.block_crcs) for name, e in manifest.modules.items()
            for key, t in e.tensors.items() for s in t.shards}


def test_saves_and_resharded_loads_through_chunks_match_the_direct_route(tmp_path, monkeypatch):
    direct = str(tmp_path / "direct")
    assert save_then_load(direct) == []
    chunked = str(tmp_path / "chunked")
    monkeypatch.setattr(tensors_io, "staged_through_chunks", lambda t: True)
    monkeypatch.setattr(load_run, "staged_through_chunks", lambda t: True)
    monkeypatch.setattr(tensors_io, "CHUNK_BYTES", 4096)
    assert save_then_load(chunked) == []
    assert shard_checksums(chunked) == shard_checksums(direct)  # the same bytes went to disk


def test_a_load_through_chunks_casts_and_pads_as_the_direct_route(tmp_path, through_chunks):
    from mimo_ckpt import TensorShard

    rows = torch.arange(70 * 6, dtype=torch.float32).reshape(70, 6)
    path = str(tmp_path / "c")
    mimo_ckpt.save({"m": {"emb": rows}}, path, layouts={"m": ModuleLayout()}, comm=SoloComm())
    padded = TensorShard("emb", torch.full((48, 6), float("nan"), dtype=torch.bfloat16), (96, 6), (48, 0),
                         allow_shape_mismatch=True)
    mimo_ckpt.load({"m": {"emb": padded}}, path, layouts={"m": ModuleLayout()}, comm=SoloComm(), strict=False)
    assert torch.equal(padded.data[:22], rows[48:70].to(torch.bfloat16))
    assert torch.equal(padded.data[22:], torch.zeros(26, 6, dtype=torch.bfloat16))


def test_a_corrupt_byte_is_caught_on_the_way_through_chunks(tmp_path, through_chunks, monkeypatch):
    monkeypatch.setattr(tensors_io, "CHUNK_BYTES", 256 << 10)  # pieces of a quarter block
    path = tmp_path / "c"
    w = torch.randn(1024, 512)  # 2 MiB: two checksum blocks
    mimo_ckpt.save({"m": {"w": w}}, str(path), layouts={"m": ModuleLayout()}, comm=SoloComm())
    data = next(p for p in (path / "m").iterdir())
    raw = bytearray(data.read_bytes())
    raw[-100_000] ^= 1
    data.chmod(0o644)
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match="checksum mismatch in block"):
        mimo_ckpt.load({"m": {"w": torch.empty(1024, 512)}}, str(path), layouts={"m": ModuleLayout()}, comm=SoloComm())
