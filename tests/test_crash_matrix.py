"""Every writer killed (SIGKILL) or interrupted (SIGINT) at each of its fault points, then the same
call run again: it succeeds, its output loads bit-exactly, and no byte of a source or of an
earlier checkpoint changed. Writers run in forked children; ranks are threads."""

import os
import shutil

import pytest

import mimo_ckpt
from mimo_ckpt import ModuleLayout, ThreadWorld
from mimo_ckpt.cli import main as cli_main
from mimo_ckpt.errors import CheckpointExistsError
from mimo_ckpt.run.manager import CheckpointManager
from tests.commit_cases import LAYOUTS, RESHARDED, WORLD, load_problems, run_forked, states, tree_hashes
from tests.conftest import run_threads

SAVE_POINTS = ["save.start", "save.write", "save.written", "save.commit", "save.committed"]
OFFLINE_POINTS = ["offline.start", "offline.write", "offline.commit"]
SIGNALS = {"kill": "", "int": ":int"}
ONE_RANK = {"images": ModuleLayout(), "language": ModuleLayout()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """An earlier step of a run, and a torch_dist export of it (the source of an import)."""
    from mimo_ckpt.interop.torch_dist import export_torch_dist

    root = tmp_path_factory.mktemp("crash")
    run = root / "run"

    def fn(comm, rank):
        CheckpointManager(run, comm=comm).save(states(LAYOUTS, rank), 1, layouts=LAYOUTS)
    _, errors = run_threads(ThreadWorld(WORLD), fn)
    assert not errors, errors
    export_torch_dist(str(run / "step_000000001"), str(root / "torch_dist"), progress=False)
    return root


def _threads(fn):
    _, errors = run_threads(ThreadWorld(WORLD), fn)
    if errors:
        raise next(iter(errors.values()))


def _save(out, sources):
    _threads(lambda comm, rank: mimo_ckpt.save(states(LAYOUTS, rank), out, layouts=LAYOUTS, comm=comm))


def _async_save(out, sources):
    def fn(comm, rank):
        saver = mimo_ckpt.AsyncSaver(comm)
        saver.save(states(LAYOUTS, rank), str(out), layouts=LAYOUTS).wait()
    _threads(fn)


def _manager_save(out, sources):
    def fn(comm, rank):
        CheckpointManager(out, comm=comm).save(states(LAYOUTS, rank), 2, layouts=LAYOUTS)
    _threads(fn)


def _import(out, sources):
    from mimo_ckpt.interop.torch_dist import import_torch_dist

    import_torch_dist(str(sources / "torch_dist"), str(out), progress=False)


def _cli(*args):
    def run(out, sources):
        return cli_main([a.format(out=out, src=sources / "run" / "step_000000001") for a in args] + ["--quiet"])
    return run


WRITERS = {  # name: (call, fault points, where its output is, layouts its output loads under)
    "save": (_save, SAVE_POINTS, lambda out, s: out, LAYOUTS),
    "async_save": (_async_save, SAVE_POINTS, lambda out, s: out, LAYOUTS),
    "manager_save": (_manager_save, SAVE_POINTS, lambda out, s: out / "step_000000002", LAYOUTS),
    "reshard": (_cli("reshard", "{src}", "{out}", "--module", "images=tp1,dp2"), OFFLINE_POINTS, lambda out, s: out, RESHARDED),
    "import": (_import, SAVE_POINTS, lambda out, s: out, ONE_RANK),
    "compose": (_cli("compose", "{out}", "--module", "images={src}", "--module", "language={src}"),
                OFFLINE_POINTS, lambda out, s: out, LAYOUTS),
    "export_safetensors": (_cli("export", "{src}", "--module", "language", "--format", "safetensors", "--to", "{out}",
                                 "--max-shard-size", "4K"),
                  OFFLINE_POINTS, lambda out, s: out, None),
    "export_torch_dist": (_cli("export", "{src}", "--format", "torch_dist", "--to", "{out}"),
                          OFFLINE_POINTS, lambda out, s: out, None),
}
CASES = [(w, p, sig) for w, (_, points, _, _) in WRITERS.items() for p in points for sig in SIGNALS]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize(("writer", "point", "signal"), CASES, ids=[f"{w}-{p}-{s}" for w, p, s in CASES])
def test_a_writer_killed_at_any_point_reruns_to_the_same_result(sources, tmp_path, writer, point, signal):
    call, _, output_of, layouts = WRITERS[writer]
    out = tmp_path / "out"
    if writer == "manager_save":  # a run whose step 1 is committed; the writer adds step 2
        shutil.copytree(sources / "run", out)
    before = {**tree_hashes(sources), **{f"out/{k}": v for k, v in tree_hashes(out).items() if k != "latest"}}
    code = run_forked(lambda: call(out, sources), fault=f"{point}@0{SIGNALS[signal]}")
    assert code == (-9 if signal == "kill" else 130), code
    output = output_of(out, sources)
    committed = point == "save.committed"  # the index was published just before the crash
    rerun = run_forked(lambda: call(out, sources))
    if committed:
        assert rerun == 1  # the same save again: refused, the checkpoint exists
        with pytest.raises(CheckpointExistsError):
            call(out, sources)
    else:
        assert rerun == 0
    after = {**tree_hashes(sources), **{f"out/{k}": v for k, v in tree_hashes(out).items()}}
    assert {k: after.get(k) for k in before} == before
    if layouts is not None:
        assert load_problems(output, layouts) == []
        assert not [n for n in os.listdir(output) if n.startswith(".saving-")] or committed
    else:
        _check_export(writer, output, sources)


def _check_export(writer, output, sources):
    """The exported tensors equal what the source checkpoint loads to; no file beyond the export's."""
    import json

    import torch

    from mimo_ckpt.interop.megatron_keys import megatron_key
    from examples.synthetic_state import global_tensors

    if writer == "export_safetensors":
        from safetensors.torch import load_file

        index = json.loads((output / "model.safetensors.index.json").read_text())
        assert sorted(os.listdir(output)) == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
        got = {}
        for name in set(index["weight_map"].values()):
            got.update(load_file(output / name))
        want = {"language": global_tensors("language")}
        got = {"language": got}
    else:
        import torch.distributed.checkpoint as dcp

        assert sorted(os.listdir(output)) in ([".metadata", "__0_0.distcp", "common.pt", "metadata.json"],
                                              [".metadata", "__0_0.distcp", "metadata.json"])
        want = {m: global_tensors(m) for m in LAYOUTS}
        into = {megatron_key(m, k): torch.empty_like(v) for m in want for k, v in want[m].items()}
        dcp.load(into, storage_reader=dcp.FileSystemReader(output), no_dist=True)
        got = {m: {k: into[megatron_key(m, k)] for k in want[m]} for m in want}
    for module, tensors in want.items():
        for key, tensor in tensors.items():
            assert torch.equal(got[module][key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
