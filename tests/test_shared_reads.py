"""DP replicas share reads: each box several ranks of a module load is read from storage once and
broadcast (gloo), so a load reads each stored byte once; the result is bit-exact either way."""

import pytest

from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.storage import LocalStorage
from mimo_ckpt.plan.shared_reads import plan_shared_reads
from tests.harness.local_world import run_local_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shared") / "ckpt")
    results = run_local_world(4, "tests.shared_read_worlds:loads", {"path": path, "rounds": 2}, timeout=600)
    manifest = read_manifest(LocalStorage(path))
    return results, sum(m.nbytes for m in manifest.modules.values())


@pytest.mark.parametrize("case", ["images_dp4_language_tp2dp2", "images_tp2dp2_language_dp2pp2"])
def test_replicas_read_each_stored_byte_once_and_load_bit_exact(world, case):
    results, unique = world
    for run in range(2):
        for mode in ("own", "shared"):
            assert all(r[case][run][mode]["problems"] == [] for r in results), (case, run, mode)
        own = sum(r[case][run]["own"]["read"] for r in results)
        shared = sum(r[case][run]["shared"]["read"] for r in results)
        # reads beyond tensor bytes: the manifest (rank 0) and the files' headers
        assert unique <= shared <= 1.02 * unique, (case, shared, unique)
        assert own >= 1.9 * unique, (case, own, unique)


def test_owners_are_balanced_by_bytes_and_every_rank_plans_alike():
    boxes = [("w", (i,), (1,), "torch.float32", n) for i, n in enumerate([400, 300, 200, 100, 100])]
    requests = {0: boxes, 1: boxes, 2: boxes[:2], 3: [("z", (0,), (1,), "torch.float32", 50)]}
    messages = plan_shared_reads(requests, chunk_bytes=1 << 20)
    assert messages == plan_shared_reads(dict(reversed(list(requests.items()))), chunk_bytes=1 << 20)
    owned = {}
    for m in messages:
        for box in m.boxes:
            owned.setdefault(m.members, {})[box] = m.owner
    assert set(owned[(0, 1, 2)].values()) <= {0, 1, 2} and len(owned[(0, 1, 2)]) == 2  # the two boxes rank 2 shares
    load = {}
    for box, owner in owned[(0, 1)].items():
        load[owner] = load.get(owner, 0) + box[4]
    assert sorted(load.values()) == [200, 200]  # 200 + 100 + 100 split evenly
    assert not any(m.members == (3,) for m in messages)  # a box only one rank loads is read by it
    small = plan_shared_reads({0: boxes, 1: boxes}, chunk_bytes=350)
    assert all(m.nbytes <= 400 for m in small) and sum(len(m.boxes) for m in small) == len(boxes)
