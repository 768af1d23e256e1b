"""megatron's DDP + DistributedOptimizer on CPU (examples/megatron_cpu.py) under optim.MimoOptimizer,
its state saved with FLAT_BOXES (each rank's own slices as boxes of the model-space tensors) at
TP1 x DP2, then loaded at DP4, DP1 and TP2 x DP2, and after an offline `mimo-ckpt reshard` to DP4;
every resumed run must follow that layout's uninterrupted run (4 gloo ranks,
tests/distopt_worlds.py)."""

import math

import pytest

from tests.harness.local_world import run_local_world
from tests.distopt_worlds import CASES, SAVED, WORLD

STEPS, RESUME_AT = 6, 3
REL = 1e-6  # fp32: layouts differ only in the order of TP / DP sums
MAIN_AND_ADAM = {"fp32_param", "exp_avg", "exp_avg_sq"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("distopt"))
    return run_local_world(WORLD, "tests.distopt_worlds:suite", {"root": root, "steps": STEPS, "resume_at": RESUME_AT},
                           timeout=300)


def _close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(a), abs(b))


def _all_close(got, want):
    assert len(got) == len(want)
    return all(_close(loss, ref_loss) and _close(norm, ref_norm)
               for (loss, norm), (ref_loss, ref_norm) in zip(got, want, strict=True))


def test_members_of_a_layout_see_the_same_losses(results):
    for case, (_, layout) in CASES.items():
        members = [r[case]["resumed"] for rank, r in enumerate(results) if layout.contains(rank)]
        assert len(members) == layout.size and all(m == members[0] for m in members), case
        assert all(r[case]["resumed"] == [] for rank, r in enumerate(results) if not layout.contains(rank))


def test_saved_layout_trains_like_each_new_layout(results):
    """DistributedOptimizer at DP2 (on CPU, driven by MimoOptimizer) follows every other layout's
    uninterrupted run: the patches change no arithmetic beyond the order of sums."""
    r = results[0]
    saved = r["saved"] + r["saved_continued"]
    for case in CASES:
        assert _all_close(saved, r[case]["reference"]), (case, saved, r[case]["reference"])
    # clipping was active (max norm 1.0), so the global grad norm steered the updates
    assert all(norm > 1.0 for _, norm in saved)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_equals_uninterrupted_run(results, case):
    r = results[0][case]
    assert _all_close(r["resumed"], r["reference"][RESUME_AT:]), (case, r["resumed"], r["reference"])


def test_the_load_replaced_other_weights(results):
    """Each resumed run started from other weights, which the load replaced."""
    for case in CASES:
        r = results[0][case]
        assert not _close(r["before_load"], r["reference"][RESUME_AT][0], rel=1e-2), case


def test_offline_reshard_stored_the_new_layout(results):
    r = results[0]
    assert r["dp4_offline_reshard"]["stored_layout"]["dp"] == 4
    assert r["dp4"]["stored_layout"]["dp"] == SAVED.dp == 2


def test_optimizer_state_is_stored_in_model_space(results):
    """No flat or bucket tensors: every optimizer tensor is `optimizer.state.<name>.<model key>`
    with the model tensor's global shape (from the live model, not from the checkpoint), covered
    exactly once by its boxes."""
    stored, model = results[0]["stored"], results[0]["model_shapes"]
    assert SAVED.dp == 2 and model
    optimizer = {k: v for k, v in stored.items() if k.startswith("optimizer.state.")}
    assert set(stored) - set(optimizer) == set(model)  # the rest is exactly the model's tensors
    seen = {}
    for key, t in optimizer.items():
        name, _, model_key = key[len("optimizer.state."):].partition(".")
        assert name in MAIN_AND_ADAM, key
        assert model_key in model, key
        assert t["global_shape"] == model[model_key], key
        assert t["covered"] == math.prod(t["global_shape"]), key
        assert t["dtype"] == "F32", key
        seen.setdefault(model_key, set()).add(name)
    assert seen == {k: MAIN_AND_ADAM for k in model}
    for key in stored:
        assert "bucket" not in key and "flat" not in key and "param_state" not in key, key
