"""Thousands of single-byte flips over a checkpoint's data bytes, safetensors headers and manifest.

Each flip is either refused, by load (a typed error on every rank, naming the file) and by
verify (naming the same file), or provably harmless: the load returns exactly the reference.
Loads read whole shards on some ranks and parts of shards on others (TP4 and DP-sharded
optimizer state). `MIMO_CKPT_FLIPS` sets how many flips (default 2,400).
"""

import dataclasses
import os
import random
import struct

import pytest
import torch

import mimo_ckpt
from mimo_ckpt import MimoCkptError, ModuleLayout, ThreadWorld
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.storage import LocalStorage
from mimo_ckpt.offline.verify import verify_checkpoint
from tests.commit_cases import save_world, states
from tests.conftest import run_threads

FLIPS = int(os.environ.get("MIMO_CKPT_FLIPS", "2400"))
READERS = {"images": ModuleLayout(tp=4), "language": ModuleLayout(tp=2, dp=2)}


def _same(got, want) -> bool:
    if isinstance(want, torch.Tensor):
        return got.dtype == want.dtype and got.shape == want.shape and \
            torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    return got == want


class _Reader:
    """Loads under READERS on 4 thread ranks and compares with the reference, cut once."""

    def __init__(self) -> None:
        self.targets = [states(READERS, rank, fill=float("nan")) for rank in range(4)]
        self.expected = [{m: {k: s.data for k, s in shards.items()} for m, shards in states(READERS, rank).items()}
                         for rank in range(4)]

    def load(self, path) -> tuple[list[str], dict[int, BaseException]]:
        """(what differs from the reference, errors by rank)."""
        def fn(comm, rank):
            targets = {m: {k: dataclasses.replace(s, data=s.data.clone() if isinstance(s.data, torch.Tensor) else None)
                           for k, s in shards.items()} for m, shards in self.targets[rank].items()}
            got = mimo_ckpt.load(targets, path, layouts=READERS, comm=comm).state
            return [f"rank {rank} {m}/{k}" for m, want in self.expected[rank].items()
                    for k, v in want.items() if not _same(got[m][k], v)]
        results, errors = run_threads(ThreadWorld(4), fn)
        return [p for r in results if r for p in r], errors


def _verify(path) -> str:
    """'' when verify finds nothing; otherwise what it says."""
    storage = LocalStorage(str(path))
    try:
        manifest = read_manifest(storage, str(path))
    except MimoCkptError as exc:
        return str(exc)
    return "\n".join(map(str, verify_checkpoint(storage, manifest, progress=False)))


def _regions(path) -> dict[str, list[tuple[str, int, int]]]:
    """(file, begin, end) byte ranges per kind: the manifest, safetensors headers, data."""
    out = {"manifest": [("manifest.json", 0, os.path.getsize(path / "manifest.json"))], "header": [], "data": []}
    for dirpath, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if not rel.endswith(".safetensors"):
                continue
            with open(path / rel, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            out["header"].append((rel, 0, 8 + n))
            out["data"].append((rel, 8 + n, os.path.getsize(path / rel)))
    return out


def _pick(regions: list[tuple[str, int, int]], rng: random.Random) -> tuple[str, int]:
    """A byte chosen uniformly over the regions' bytes together."""
    at = rng.randrange(sum(end - begin for _, begin, end in regions))
    for name, begin, end in regions:
        if at < end - begin:
            return name, begin + at
        at -= end - begin
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("flips") / "ckpt"
    save_world(path)
    reader = _Reader()
    problems, errors = reader.load(path)
    assert not errors and not problems, (errors, problems)
    assert _verify(path) == ""
    return path, reader


@pytest.mark.parametrize("kind", ["manifest", "header", "data"])
def test_every_flip_is_refused_by_load_and_verify_or_harmless(checkpoint, kind):
    checkpoint, reader = checkpoint
    regions = _regions(checkpoint)[kind]
    assert regions
    rng = random.Random(f"flips-{kind}")
    outcomes = {"refused": 0, "harmless": 0}
    for _ in range(FLIPS // 3):
        name, at = _pick(regions, rng)
        mask = rng.randrange(1, 256)
        with open(checkpoint / name, "r+b") as f:
            f.seek(at)
            original = f.read(1)
            f.seek(at)
            f.write(bytes([original[0] ^ mask]))
        try:
            problems, errors = reader.load(checkpoint)
            found = _verify(checkpoint)
        finally:
            with open(checkpoint / name, "r+b") as f:
                f.seek(at)
                f.write(original)
        where = f"{kind} flip {mask:#04x} at {name}:{at}"
        if errors:
            assert len(errors) == 4, f"{where}: only ranks {sorted(errors)} raised: {errors}"
            untyped = {r: e for r, e in errors.items() if not isinstance(e, MimoCkptError)}
            assert not untyped, f"{where}: untyped errors {untyped!r}"
            assert any(os.path.basename(name) in str(e) for e in errors.values()), f"{where}: {errors}"
            assert os.path.basename(name) in found, f"{where}: load refused it, verify says {found!r}"
            outcomes["refused"] += 1
        else:
            assert problems == [], f"{where}: loaded wrong values {problems}"
            # A header is not read by load; verify finds every change but one that keeps its JSON.
            assert found == "" or (kind == "header" and os.path.basename(name) in found), f"{where}: {found!r}"
            outcomes["harmless"] += 1
    assert _verify(checkpoint) == ""
    if kind == "data":  # every data byte is under a checksum
        assert outcomes["harmless"] == 0, outcomes
    if kind == "manifest":  # the manifest carries its own checksum
        assert outcomes["harmless"] == 0, outcomes
