"""Save under one layout and load under another with real gloo processes, every element checked."""

import pytest

from tests.harness.local_world import run_local_world
from tests.worlds import PAIRS, WORLD


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    return run_local_world(WORLD, "tests.worlds:reshard_matrix", {"root": str(root)}, timeout=600)


@pytest.mark.parametrize("pair", [f"{s}->{d}" for s, d in PAIRS])
def test_resharded_load_is_bit_exact(matrix, pair):
    assert len(matrix) == WORLD
    modules_seen = set()
    for rank, result in enumerate(matrix):
        case = result[pair]
        modules_seen.update(case["modules"])
        assert case["problems"] == [], f"rank {rank}: {case['problems']}"
    assert modules_seen == {"images", "language"}


def test_strict_error_reaches_every_rank(matrix):
    for rank, result in enumerate(matrix):
        err = result["strict"]
        assert err["type"] in {"KeyMismatchError", "RemoteRankError"}, (rank, err)
        assert "no.such.key" in err["message"], (rank, err)
        assert "language" in err["message"]
