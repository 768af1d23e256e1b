"""Megatron-LM's dist_checkpointing cases (test_serialization.py, test_flattened_resharding.py,
test_mapping.py, optimizer state shapes of test_optimizer.py), re-expressed in
tests/megatron_cases.py and run on 8 gloo ranks in one world for the whole module.

Every case is saved and loaded once through megatron's own `dist_checkpointing.save/load`
(torch_dist) and once through mimo_ckpt; both results are compared, on every rank, with a
reference cut out of full tensors with plain torch. mimo_ckpt must match the reference in every
case. megatron must too, except where the table records megatron's own failure: those cases check
the reference against megatron, which keeps the table honest.
"""

import pytest

from tests.harness.local_world import free_port, run_local_world
from tests.megatron_cases import CASES, W


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    args = {"root": str(tmp_path_factory.mktemp("megatron-cases")), "port": free_port()}
    return run_local_world(W, "tests.megatron_cases:run_all", args, timeout=900)


def _check(outcomes, name, lib):
    bad = {rank: o[name][lib] for rank, o in enumerate(outcomes) if o[name][lib] != "ok"}
    assert not bad, "\n".join(f"rank {rank}: {what}" for rank, what in bad.items())


@pytest.mark.parametrize("name", list(CASES))
def test_mimo_ckpt_matches_the_reference(outcomes, name):
    _check(outcomes, name, "mimo")


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.megatron_fails])
def test_megatron_matches_the_reference(outcomes, name):
    _check(outcomes, name, "megatron")
