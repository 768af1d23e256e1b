"""run/collective.root_decides: rank 0's answer, or its error as the same class on every rank."""

import pytest

from mimo_ckpt import CheckpointExistsError, StorageError, ThreadWorld
from mimo_ckpt.run.collective import root_decides
from tests.conftest import run_threads


def _decide_on_every_rank(decide):
    return run_threads(ThreadWorld(3), lambda comm, rank: root_decides(comm, decide, otherwise=StorageError))


def test_every_rank_gets_rank_0s_answer():
    results, errors = _decide_on_every_rank(lambda: b"id-42")
    assert errors == {} and results == [b"id-42"] * 3


@pytest.mark.parametrize("raised, expected, text", [
    (CheckpointExistsError("/ckpt already holds a committed checkpoint"), CheckpointExistsError, "already holds"),
    (PermissionError(13, "Permission denied"), StorageError, "PermissionError: [Errno 13] Permission denied"),
])
def test_rank_0s_error_is_raised_as_one_class_everywhere(raised, expected, text):
    def decide():
        raise raised

    _, errors = _decide_on_every_rank(decide)
    assert sorted(errors) == [0, 1, 2]
    for rank, exc in errors.items():
        assert type(exc) is expected and text in str(exc), (rank, exc)
