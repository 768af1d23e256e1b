"""megatron-core's own MimoModel trained with optim.MimoOptimizer, saved with mimo_ckpt, resharded
offline with the CLI and resumed under the new layout; the same with the language model in
megatron's DDP + DistributedOptimizer; and megatron torch_dist -> ours -> torch_dist read back by
megatron's own loader (4 gloo ranks, tests/megatron_worlds.py)."""

import hashlib
import json
import os

import pytest

from tests.harness.local_world import run_local_world
from tests.megatron_worlds import CASES, DISTOPT_CASES, SAVED, WORLD

STEPS, RESUME_AT = 6, 3
REL = 2e-5  # fp32 differences between layouts: reduction order of TP / DP sums


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("megatron"))
    args = {"root": root, "steps": STEPS, "resume_at": RESUME_AT}
    return run_local_world(WORLD, "tests.megatron_worlds:suite", args, timeout=900)


def _close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_every_rank_sees_the_same_losses(results):
    for case in CASES:
        assert all(r["resume"][case] ["resumed"] == results[0]["resume"][case]["resumed"] for r in results)


def test_saved_layout_trains_like_the_others(results):
    """Steps 1-3 under the saved layout match each new layout's uninterrupted run."""
    saved = results[0]["resume"]["saved"]
    for case in CASES:
        reference = results[0]["resume"][case]["reference"]
        for (loss, norm), (ref_loss, ref_norm) in zip(saved, reference[:RESUME_AT], strict=True):
            assert _close(loss, ref_loss) and _close(norm, ref_norm), case


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_offline_reshard_equals_uninterrupted_run(results, case):
    r = results[0]["resume"][case]
    reference = r["reference"][RESUME_AT:]
    assert len(r["resumed"]) == len(reference) == STEPS - RESUME_AT
    for (loss, norm), (ref_loss, ref_norm) in zip(r["resumed"], reference, strict=True):
        assert _close(loss, ref_loss), (case, r["resumed"], reference)
        assert _close(norm, ref_norm), (case, r["resumed"], reference)
    # Clipping was active, so the global norm across both modules steered every update.
    assert all(norm > 1.0 for _, norm in reference)


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _module_files(ckpt, module):
    with open(os.path.join(ckpt, "manifest.json")) as f:
        entry = json.load(f)["modules"][module]
    files = sorted({s["file"] for t in entry["tensors"].values() for s in t["shards"]})
    return entry, {p: _digest(os.path.join(ckpt, p)) for p in files}


@pytest.mark.parametrize("case, untouched", [("images_tp1_dp2", "language"), ("language_pp1", "images"),
                                             ("language_dp2", "images")])
def test_the_other_module_is_untouched(results, case, untouched):
    saved = results[0]["resume"]["saved_dir"]
    resharded = results[0]["resume"][case]["dir"]
    before, after = _module_files(saved, untouched), _module_files(resharded, untouched)
    assert before[0] == after[0]  # same manifest entry: layout, boxes, files, checksums
    assert before[1] == after[1] and before[1]


@pytest.mark.parametrize("case, changed", [("images_tp1_dp2", "images"), ("language_pp1", "language"),
                                           ("language_dp2", "language")])
def test_generator_state_of_a_changed_module_is_dropped_with_a_warning(results, case, changed):
    layouts = CASES[case][1]
    for rank, r in enumerate(results):
        not_loaded = r["resume"][case]["not_loaded"]
        in_changed = layouts[changed].contains(rank)
        assert not_loaded == ({changed: ["rank_state.rng"]} if in_changed else {})
    first = layouts[changed].rank_offset
    assert any(changed in w and "rank_state.rng" in w for w in results[first]["resume"][case]["warnings"])


def test_torch_dist_round_trip_is_read_back_exactly_by_megatron(results):
    """megatron's dist_checkpointing.save of the trained model and Adam state (megatron's
    `mimo.<name>.optimizer.state.*` keys, stacked layers, param_groups objects), then
    `mimo-ckpt import` and `mimo-ckpt export --format torch_dist`: megatron's own load gives every
    tensor and object back bit for bit, and so does mimo_ckpt's load of the imported checkpoint."""
    for rank, r in enumerate(results):
        t = r["torch_dist"]
        # every parameter with its exp_avg and exp_avg_sq (more for SwiGLU's fc1, saved in two boxes);
        # the fewest parameters are a language stage's: one layer's 6 and the embedding or output layer
        assert t["params"] >= 7 and t["tensors"] >= 3 * t["params"] and t["objects"] >= 5, rank
        assert t["ours_vs_trained"] == [] and t["megatron_vs_trained"] == [], rank


def test_torch_dist_export_loads_under_another_layout(results):
    """Under the language model at PP1 x DP2, megatron's loader and ours read the same values."""
    for rank, r in enumerate(results):
        t = r["torch_dist"]
        assert t["megatron_vs_ours_resharded"] == [], rank
        assert t["resharded"]["tensors"] > 0 and t["resharded"]["nonzero"] == t["resharded"]["tensors"], rank


# -- the language model in megatron's DDP + DistributedOptimizer ---------------------------------


def _same_trajectory(a, b):
    assert len(a) == len(b) and a
    for (loss, norm), (ref_loss, ref_norm) in zip(a, b, strict=True):
        assert _close(loss, ref_loss) and _close(norm, ref_norm), (a, b)


def test_distributed_optimizer_wraps_the_language_model(results):
    for rank, r in enumerate(results):
        expected = ["DistributedDataParallel", "DistributedOptimizer"] if SAVED["language"].contains(rank) else None
        assert r["distopt"].get("wrapped") == expected, rank


def test_distributed_optimizer_trains_like_the_native_adamw(results):
    """Both are torch AdamW (lr, betas, eps, weight decay on every parameter, the same schedule):
    the same losses and grad norms under the saved layout (PP2) and under language DP2, where
    megatron's DDP reduce-scatters the gradients and the optimizer keeps half of each."""
    r = results[0]
    _same_trajectory(r["distopt"]["saved"], r["resume"]["saved"])
    for name, (_, layouts) in DISTOPT_CASES.items():
        native = next(case for case, (_, l) in CASES.items() if l == layouts)
        _same_trajectory(r["distopt"][name]["reference"], r["resume"][native]["reference"])


@pytest.mark.parametrize("case", sorted(DISTOPT_CASES))
def test_distributed_optimizer_resumes_under_another_dp(results, case):
    """Saved with language PP2 (DP1), resumed with language DP2: the flat optimizer slices of the
    saved ranks are boxes of the model's tensors, read back into other slices."""
    for r in results:
        assert r["distopt"][case]["resumed"] == results[0]["distopt"][case]["resumed"]
    c = results[0]["distopt"][case]
    assert len(c["resumed"]) == STEPS - RESUME_AT
    _same_trajectory(c["resumed"], c["reference"][RESUME_AT:])
    assert all(norm > 1.0 for _, norm in c["reference"])


def _tensor_keys(ckpt, module):
    with open(os.path.join(ckpt, "manifest.json")) as f:
        entry = json.load(f)["modules"][module]
    return set(entry["tensors"]), entry["layout"]


def test_distributed_optimizer_state_is_saved_in_model_space(results):
    """The model's keys as in the native run's checkpoint (no `module.` from the DDP wrapper), and
    for each of them the DistributedOptimizer's main param and Adam moments, keyed by it."""
    d = results[0]["distopt"]
    keys, layout = _tensor_keys(d["saved_dir"], "language")
    native, native_layout = _tensor_keys(results[0]["resume"]["saved_dir"], "language")
    model = {k for k in keys if not k.startswith("optimizer.")}
    assert model == {k for k in native if not k.startswith("optimizer.")} and len(model) >= 8
    assert keys - model == {f"optimizer.state.{n}.{k}" for n in ("exp_avg", "exp_avg_sq", "fp32_param") for k in model}
    assert layout == native_layout and layout["pp"] == 2
    resharded, layout = _tensor_keys(d["language_pp2_to_dp2_offline"]["dir"], "language")
    assert resharded == keys and (layout["pp"], layout["dp"]) == (1, 2)


def test_a_native_checkpoint_exported_as_torch_dist_is_read_back_exactly_by_megatron(results):
    """mimo_ckpt's own save of the trained run (objects without a grid, no megatron common state),
    `mimo-ckpt export --format torch_dist`, then stock megatron's load: every tensor and object
    equal to the trained state."""
    for rank, r in enumerate(results):
        assert r["torch_dist"]["native_vs_trained"] == [], rank
