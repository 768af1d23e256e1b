"""MimoOptimizer on 6 gloo ranks against a single-process torch reference of the same model.

One world runs every scenario (see tests/optim_worlds.py): plain training under disjoint and
colocated layouts, with and without ZeRO-1 sharded state; an overflow planted in one module; and
resumes across a TP, PP or DP change of one module.
"""

import pytest
import torch

from tests.harness.local_world import run_local_world
from tests.optim_worlds import WORLD
from tests.fixtures.toy_training import MAX_GRAD_NORM
from tests.fixtures.toy_mimo import D_IN, full_weights, reference_run

STEPS, RESUME_AT = 6, 3
TRAINING = [
    {"name": "disjoint", "layout": "disjoint", "shard_state": False},
    {"name": "disjoint_zero1", "layout": "disjoint", "shard_state": True},
    {"name": "colocated_zero1", "layout": "colocated", "shard_state": True},
]
RESUMES = [
    {"save_layout": "disjoint", "save_sharded": True, "load_sharded": True,
     "load_layouts": ["vision_tp1_dp2", "language_pp1_dp4", "language_pp4"]},
    {"save_layout": "disjoint", "save_sharded": False, "load_sharded": True, "load_layouts": ["language_pp1_dp4"]},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    args = {
        "training": {"steps": STEPS, "cases": TRAINING},
        "overflow": {"shard_state": True},
        "resume": [dict(r, k=RESUME_AT, total=STEPS) for r in RESUMES],
        "mixed_precision": {"steps": 3},
        "root": str(tmp_path_factory.mktemp("optim")),
    }
    return run_local_world(WORLD, "tests.optim_worlds:suite", args, timeout=600)


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, MAX_GRAD_NORM)


def global_losses(per_rank_logs):
    """The loss per step: the sum of the last-stage ranks' partial (data-parallel) losses."""
    steps = zip(*[log["loss"] for log in per_rank_logs])
    return [sum(x for x in step if x is not None) for step in steps]


def assemble(per_rank_weights, module):
    """Full tensors from every rank's boxes; replicas must agree and every element be covered."""
    out = {}
    for key, ref in full_weights()[module].items():
        full = torch.full(ref.shape, float("nan"), dtype=torch.float64)
        for weights in per_rank_weights:
            if f"{module}/{key}" not in weights:
                continue
            offset, shape, values = weights[f"{module}/{key}"]
            region = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            local = torch.tensor(values, dtype=torch.float64).reshape(shape)
            seen = ~torch.isnan(region)
            assert torch.equal(region[seen], local[seen]), f"replicas of {module}/{key} disagree"
            region.copy_(local)
        assert not torch.isnan(full).any(), f"{module}/{key}: elements not held by any rank"
        out[key] = full
    return out


def check_weights(per_rank_weights, reference, atol=2e-5):
    for module, ref_weights in reference["weights"].items():
        got = assemble(per_rank_weights, module)
        for key, ref in ref_weights.items():
            torch.testing.assert_close(got[key], ref.double(), rtol=0, atol=atol, msg=f"{module}/{key}")


def test_reference_clips_every_step(reference):
    assert all(n > MAX_GRAD_NORM for n in reference["grad_norm"])  # clipping is active


@pytest.mark.parametrize("case", [c["name"] for c in TRAINING])
def test_training_matches_single_process_reference(results, reference, case):
    logs = [r["training"][case]["log"] for r in results]
    assert global_losses(logs) == pytest.approx(reference["loss"], rel=1e-5)
    for rank, log in enumerate(logs):
        assert log["grad_norm"] == logs[0]["grad_norm"], f"rank {rank} saw another global norm"
        assert log["ok"] == [True] * STEPS
        assert log["zeros"] == [0] * STEPS
        for step, lrs in enumerate(log["lr"]):
            for module, lr in lrs.items():
                assert lr == pytest.approx(reference["lr"][step][module], rel=1e-12)
        assert log["scale"] == [2.0**10 * 2 ** (s // 2) for s in range(STEPS)]  # growth every 2 clean steps
    assert logs[0]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    check_weights([r["training"][case]["weights"] for r in results], reference)


def test_overflow_in_one_module_skips_the_step_everywhere(results):
    for rank, r in enumerate(results):
        o = r["overflow"]
        assert o["poisoned"] == [False, None, None], f"rank {rank}"
        assert o["unchanged"], f"rank {rank} changed weights on a skipped step"
        assert o["scales"] == [2.0**10, 2.0**9], f"rank {rank}: the scaler did not back off"
        assert o["recovered"][0] is True and o["recovered"][1] == results[0]["overflow"]["recovered"][1]
        assert o["zeros"] == [D_IN, D_IN], f"rank {rank}: one zeroed row of encoder.fc1.weight"


def test_plain_state_dict_rewinds_exactly_and_bad_state_fails_on_every_rank(results):
    for rank, r in enumerate(results):
        p = r["plain_state"]
        assert p["rewound"], f"rank {rank}: replaying a step after load_state_dict differs"
        kind, message = p["scaler_mismatch"]
        assert kind == "ShardError" and "loss scaler" in message, f"rank {rank}: {p['scaler_mismatch']}"
        module = "vision" if rank < 2 else "language"
        kind, message = p["param_groups"]
        assert kind == "ShardError" and f"module {module!r}" in message and "param groups" in message
        kind, message = p["no_optimizer"]
        assert kind == "LayoutError" and f"rank {rank} is in module {module!r}" in message


def test_a_parameter_in_two_parts_trains_saves_and_reshards_like_a_whole_one(results):
    """Parts in swapped order in the stored tensor, ZeRO-1 rows inside each part: the trained
    weights equal plain AdamW's, and a DP2 load of the stored tensor as one parameter gets the
    swapped rows of both weights and Adam state."""
    w0 = torch.linspace(-1, 1, 12).reshape(4, 3)
    ref = torch.nn.Parameter(w0.clone())
    adam = torch.optim.AdamW([ref], lr=0.1)
    for step in range(3):
        ref.grad = torch.cos(w0 * (step + 1))
        adam.step()
    swap = [2, 3, 0, 1]
    stored, exp_avg = ref.detach()[swap], adam.state[ref]["exp_avg"][swap]
    for rank, r in enumerate(results):
        assert torch.equal(torch.tensor(r["parts"]["trained"]), ref.detach()), rank
    for rank in (0, 1):
        loaded = results[rank]["parts"]["loaded"]
        begin, end = loaded["rows"]
        assert (begin, end) == (2 * rank, 2 * rank + 2)
        assert torch.equal(torch.tensor(loaded["weights"]), stored)
        assert torch.equal(torch.tensor(loaded["exp_avg"]), exp_avg[begin:end])


def test_bf16_weights_keep_fp32_main_params_across_a_zero1_dp_change(results):
    """Reference: torch AdamW on an fp32 copy, bf16 weights cast from it after each step."""
    w0 = torch.linspace(-1, 1, 24).reshape(6, 4)
    main = torch.nn.Parameter(w0.to(torch.bfloat16).float())
    adam = torch.optim.AdamW([main], lr=0.1)
    for step in range(3):
        main.grad = torch.cos(w0 * (step + 1)).to(torch.bfloat16).float()
        adam.step()
    saved_main = main.detach().clone()
    main.grad = torch.cos(w0 * 4).to(torch.bfloat16).float()
    adam.step()
    for rank in (0, 1):  # the DP2 ranks after the load; each holds 3 rows of the fp32 main params
        begin, end = results[rank]["mixed_precision"]["main"][0]
        assert (begin, end) == (3 * rank, 3 * rank + 3)
        assert torch.equal(torch.tensor(results[rank]["mixed_precision"]["main"][1]), saved_main[begin:end])
        weights = torch.tensor(results[rank]["mixed_precision"]["weights"])
        torch.testing.assert_close(weights, main.detach().to(torch.bfloat16).float(), rtol=0, atol=0)
    assert all(r["mixed_precision"] == {} for r in results[2:])


@pytest.mark.parametrize("resume_index,layout", [
    (i, name) for i, r in enumerate(RESUMES) for name in r["load_layouts"]
])
def test_resume_across_a_layout_change_continues_the_trajectory(results, reference, resume_index, layout):
    per_rank = [r[f"resume{resume_index}"] for r in results]
    first = global_losses([p["first"] for p in per_rank])
    resumed = global_losses([p[layout]["log"] for p in per_rank])
    assert first + resumed == pytest.approx(reference["loss"], rel=1e-5)
    for rank, p in enumerate(per_rank):
        log = p[layout]["log"]
        assert p[layout]["restored"]["scaler"], f"rank {rank}: loss scaler not restored"
        assert p[layout]["restored"]["adam_steps"] == [float(RESUME_AT)], f"rank {rank}: Adam step counts"
        assert log["grad_norm"] == pytest.approx(reference["grad_norm"][RESUME_AT:], rel=1e-5)
        assert log["scale"] == [2.0**10 * 2 ** (s // 2) for s in range(RESUME_AT, STEPS)]
        for step, lrs in zip(range(RESUME_AT, STEPS), log["lr"]):
            for module, lr in lrs.items():
                assert lr == pytest.approx(reference["lr"][step][module], rel=1e-12)
    check_weights([p[layout]["weights"] for p in per_rank], reference)


def test_megatrons_training_loop_calls_work_on_every_rank(results):
    """scale_loss / a tensor loss scale / is_stub_optimizer / sharded_state_dict with megatron's
    arguments; the scaled, unscaled step equals plain SGD on the unscaled loss."""
    for rank, r in enumerate(results):
        got = r["megatron_loop"]
        assert got["scale"] == [True, [1], 16.0] and got["stub"] == (rank >= 4), (rank, got)
        assert got["step"][0] is True and got["step"][1] > 0
        if rank < 4:
            assert got["max_abs_diff"] < 1e-6 and got["state_keys"] == ["m"], got
