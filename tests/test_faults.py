"""A rank killed (SIGKILL) at each stage of a 4-rank save, and during a load.

After each: the surviving ranks fail with RemoteRankError well inside the comm's timeout, the
previous checkpoint loads bit-exactly, the partial one is not the latest step (a committed one is),
and saving the same step again succeeds and leaves only the files its manifest names.
"""

import pytest

import mimo_ckpt
from mimo_ckpt import ThreadWorld
from tests.harness.local_world import run_local_world
from mimo_ckpt.run.manager import CheckpointManager
from mimo_ckpt.format.manifest import MANIFEST_PATH
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.storage import LocalStorage
from tests.conftest import run_threads
from tests.fault_worlds import LAYOUTS, WORLD, state_of
from examples.synthetic_state import check_rank_state

TIMEOUT_S = 20.0
FAULTS = ["save.start@1", "save.write@1", "save.written@2", "save.commit@0", "save.committed@0", "load.read@3",
          "save.write@1:hang"]
HANG_TIMEOUT_S = 5.0


def _load_step(manager, step):
    def fn(comm, rank):
        targets = state_of(rank, fill=float("nan"))
        result = mimo_ckpt.load(targets, manager.path_for(step), layouts=LAYOUTS, comm=comm)
        return [p for m in targets for p in check_rank_state(m, LAYOUTS[m], rank, result.state[m])]
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert not errors, errors
    return [p for r in results for p in r]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_killed_rank_fails_the_others_and_leaves_the_previous_checkpoint(tmp_path, fault):
    point, killed = fault.split("@")
    hangs = killed.endswith(":hang")
    killed = killed.removesuffix(":hang")
    timeout = HANG_TIMEOUT_S if hangs else TIMEOUT_S
    results = run_local_world(WORLD, "tests.fault_worlds:save_then_fault",
                              {"root": str(tmp_path), "fault": fault, "timeout": timeout},
                              timeout=120, allow_failures=True)
    assert results[int(killed)] == {"exit_code": -9}
    survivors = [r for i, r in enumerate(results) if i != int(killed)]
    for r in survivors:
        assert r["error"] == "RemoteRankError", r
        assert "died, hung or left" in r["message"]
        # a dead peer is noticed at once; a hung one when the comm's timeout runs out
        assert (timeout - 1 <= r["seconds"] < timeout + 10) if hangs else r["seconds"] < timeout

    manager = CheckpointManager(tmp_path)
    assert _load_step(manager, 1) == []
    step2 = LocalStorage(manager.path_for(2))
    if point == "save.committed":  # the manifest was written just before rank 0 died
        assert step2.size(MANIFEST_PATH) is not None
        assert manager.latest_step() == 2  # whole, though `latest` was never moved to it
        assert _load_step(manager, 2) == []
        return
    assert manager.latest_step() == 1
    assert step2.size(MANIFEST_PATH) is None

    def again(comm, rank):
        CheckpointManager(tmp_path, comm=comm).save(state_of(rank), 2, layouts=LAYOUTS)
    _, errors = run_threads(ThreadWorld(WORLD), again)
    assert not errors, errors
    assert manager.latest_step() == 2 and _load_step(manager, 2) == []
    named = {s.file for m in read_manifest(step2).modules.values() for t in m.tensors.values() for s in t.shards}
    assert set(step2.list_files()) == named | {MANIFEST_PATH}
