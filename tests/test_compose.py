"""`mimo-ckpt compose` and `split`: a MIMO checkpoint from modules saved apart, each at its own
layout, with files shared by hard links; one module taken out of it again. Loads under new
layouts are checked element by element against the full-tensor reference."""

import hashlib
import os

import pytest

import mimo_ckpt
from examples.synthetic_state import check_rank_state, rank_state
from mimo_ckpt import CheckpointExistsError, ModuleLayout, ThreadWorld
from mimo_ckpt.cli import main as cli
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.storage import LocalStorage
from mimo_ckpt.offline.compose import COMPOSED_FROM
from mimo_ckpt.offline.verify import verify_checkpoint
from tests.conftest import run_threads


def _save(path, module, layout):
    def fn(comm, rank):
        state = {module: rank_state(module, layout, rank)} if layout.contains(rank) else {}
        mimo_ckpt.save(state, path, layouts={module: layout}, comm=comm)
    _, errors = run_threads(ThreadWorld(layout.rank_offset + layout.size), fn)
    assert errors == {}


def _load_problems(path, layouts):
    world = max(l.rank_offset + l.size for l in layouts.values())

    def fn(comm, rank):
        targets = {m: rank_state(m, l, rank, fill=float("nan")) for m, l in layouts.items() if l.contains(rank)}
        result = mimo_ckpt.load(targets, path, layouts=layouts, comm=comm)
        return [p for m in targets for p in check_rank_state(m, layouts[m], rank, result.state[m])]
    results, errors = run_threads(ThreadWorld(world), fn)
    assert errors == {}
    return [p for r in results for p in r]


def _digests(path):
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    vision, llm = str(root / "vision"), str(root / "llm")
    _save(vision, "images", ModuleLayout(tp=2))
    _save(llm, "language", ModuleLayout(tp=2, pp=2))
    return root, vision, llm


def test_modules_saved_apart_compose_into_one_checkpoint_that_loads_under_new_layouts(sources):
    root, vision, llm = sources
    before = {p: _digests(p) for p in (vision, llm)}
    out = str(root / "vlm")
    assert cli(["compose", out, "--module", f"images={vision}", "--module", f"language={llm}", "--quiet"]) == 0

    manifest = read_manifest(LocalStorage(out))
    assert sorted(manifest.modules) == ["images", "language"]
    assert manifest.metadata[COMPOSED_FROM] == {"images": vision, "language": llm}
    assert manifest.modules["images"].layout == ModuleLayout(tp=2)  # each module at its own layout
    assert manifest.modules["language"].layout == ModuleLayout(tp=2, pp=2)
    # every data file is the source's own, linked, not rewritten
    for module, src in (("images", vision), ("language", llm)):
        files = {s.file for t in manifest.modules[module].tensors.values() for s in t.shards}
        assert files and all(os.path.samefile(os.path.join(out, f), os.path.join(src, f)) for f in files)
    assert verify_checkpoint(LocalStorage(out), manifest, progress=False) == []
    # colocated on ranks 0-1, and disjoint: images DP2 on 0-1, language TP1 x PP2 on 2-3
    assert _load_problems(out, {"images": ModuleLayout(dp=2), "language": ModuleLayout(dp=2)}) == []
    assert _load_problems(out, {"images": ModuleLayout(dp=2), "language": ModuleLayout(pp=2, rank_offset=2)}) == []
    assert {p: _digests(p) for p in (vision, llm)} == before  # sources only read


def test_split_takes_one_module_out(sources):
    root, vision, llm = sources
    both = str(root / "both")
    assert cli(["compose", both, "--module", f"images={vision}", "--module", f"language={llm}", "--quiet"]) == 0
    alone = str(root / "language_alone")
    assert cli(["split", both, alone, "--module", "language", "--quiet"]) == 0
    manifest = read_manifest(LocalStorage(alone))
    assert list(manifest.modules) == ["language"] and os.listdir(alone).count("images") == 0
    assert _load_problems(alone, {"language": ModuleLayout(tp=4)}) == []


def test_bad_requests_fail_with_the_module_named_and_write_nothing(sources, capsys):
    root, vision, llm = sources
    out = str(root / "bad")
    assert cli(["compose", out, "--module", f"images={vision}", "--module", f"images={llm}", "--quiet"]) == 2
    assert "module 'images' is taken from both" in capsys.readouterr().err
    assert cli(["compose", out, "--module", f"audio={vision}", "--quiet"]) == 2
    assert f"module 'audio' is not in {vision}" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert cli(["split", vision, vision, "--module", "images", "--quiet"]) == 2  # a committed target
    assert "already holds a committed checkpoint" in capsys.readouterr().err


def test_the_library_call_refuses_a_committed_target(sources):
    from mimo_ckpt.io.stream import Budget
    from mimo_ckpt.offline.compose import ModuleSource, run_compose

    root, vision, llm = sources
    with pytest.raises(CheckpointExistsError):
        run_compose([ModuleSource("language", llm)], vision, budget=Budget(chunk_bytes=1 << 20, temp_bytes=1 << 20), progress=False)
