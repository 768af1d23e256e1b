"""Canonical keys for megatron MIMO state, and the optional entries a load tolerates: layout-bound
rank state after a layout change, `_extra_state` a checkpoint does not hold."""

import warnings

import pytest
import torch

import mimo_ckpt
from mimo_ckpt import KeyMismatchError, LayoutChangedWarning, LocalStorage, ModuleLayout, ObjectShard, ShardError, TensorShard, ThreadWorld
from mimo_ckpt.interop.megatron_keys import megatron_key, split_key
from mimo_ckpt.model.rank_state import same_grid

MODEL = "decoder.layers.mlp.linear_fc1.weight"


@pytest.mark.parametrize("key, expected", [
    # wrapper depth differs between trainers
    ("language_model.decoder.layers.mlp.linear_fc1.weight", ("language", MODEL)),
    ("language_model.module.module.decoder.layers.mlp.linear_fc1.weight", ("language", MODEL)),
    ("modality_submodules.images.module.encoders.clip.proj.weight", ("images", "encoders.clip.proj.weight")),
    # optimizer state: Float16Optimizer's fp32_param and DistributedOptimizer's param are one name
    ("optimizer.state.fp32_param.language_model.module." + MODEL, ("language", "optimizer.state.fp32_param." + MODEL)),
    ("optimizer.state.param.language_model." + MODEL, ("language", "optimizer.state.fp32_param." + MODEL)),
    ("optimizer.state.exp_avg.modality_submodules.images.encoders.x", ("images", "optimizer.state.exp_avg.encoders.x")),
    # megatron's MimoOptimizer prefixes and its param_groups objects
    ("mimo.language.optimizer.state.exp_avg_sq.language_model." + MODEL, ("language", "optimizer.state.exp_avg_sq." + MODEL)),
    ("mimo.images.optimizer.mimo.images.param_groups", ("images", "optimizer.param_groups")),
])
def test_split_key_gives_one_spelling(key, expected):
    assert split_key(key) == expected


@pytest.mark.parametrize("module, key", [
    ("language", MODEL), ("images", "encoders.clip.proj.weight"),
    ("language", "optimizer.state.exp_avg." + MODEL), ("images", "optimizer.param_groups"),
])
def test_megatron_key_inverts_split_key(module, key):
    assert split_key(megatron_key(module, key)) == (module, key)


def test_main_param_name_follows_the_target_optimizer():
    key = "optimizer.state.fp32_param." + MODEL
    assert megatron_key("language", key, main_param_name="param") == f"mimo.language.optimizer.state.param.language_model.{MODEL}"
    assert megatron_key("language", key, optimizer_prefix=False) == f"optimizer.state.fp32_param.language_model.{MODEL}"


def test_keys_outside_any_module_and_cross_module_state_are_errors():
    with pytest.raises(ShardError, match="names no MIMO module"):
        split_key("decoder.layers.mlp.linear_fc1.weight")
    with pytest.raises(ShardError, match="optimizer of module 'images' holds state of module 'language'"):
        split_key("mimo.images.optimizer.state.exp_avg.language_model." + MODEL)


def test_same_grid_ignores_the_rank_offset_and_unit_dimensions():
    assert same_grid(ModuleLayout(tp=2, rank_offset=0), ModuleLayout(tp=2, rank_offset=4))
    assert same_grid(ModuleLayout(tp=2, order=("tp", "cp", "ep", "pp", "dp")),
                     ModuleLayout(tp=2, order=("cp", "tp", "ep", "pp", "dp")))
    assert not same_grid(ModuleLayout(tp=2), ModuleLayout(dp=2))
    assert not same_grid(ModuleLayout(tp=2, dp=2), ModuleLayout(tp=2, dp=2, order=("dp", "tp", "cp", "ep", "pp")))


def _run(threads, layout, fn):
    results, errors = threads(ThreadWorld(layout.size), fn)
    assert not errors, errors
    return dict(enumerate(results))


def test_rank_state_loads_under_the_same_grid_and_is_left_alone_with_a_warning_otherwise(threads, tmp_path):
    saved = ModuleLayout(tp=2)

    def save(comm, rank):
        state = {"lm": {"w": TensorShard("w", torch.full((1,), float(rank)), (2,), (rank,)),
                        "rng": mimo_ckpt.rng_state(saved, rank)}}
        mimo_ckpt.save(state, "ckpt", layouts={"lm": saved}, comm=comm, storage=LocalStorage(tmp_path))
        return state["lm"]["rng"].data

    saved_rng = _run(threads, saved, save)

    def load(layout):
        def fn(comm, rank):
            rows = 2 // layout.tp
            template = {"lm": {"w": TensorShard("w", torch.zeros(rows), (2,), (layout.coords(rank)["tp"] * rows,)),
                               "rng": mimo_ckpt.rng_state(layout, rank)}}
            result = mimo_ckpt.load(template, "ckpt", layouts={"lm": layout}, comm=comm, storage=LocalStorage(tmp_path))
            return result, template["lm"]["rng"].data

        with warnings.catch_warnings(record=True) as caught:  # ranks are threads: one record for all
            warnings.simplefilter("always", LayoutChangedWarning)
            out = _run(threads, layout, fn)
        return out, [str(w.message) for w in caught if w.category is LayoutChangedWarning]

    same, caught = load(saved)
    assert caught == []
    for rank, (result, _) in same.items():
        assert result.not_loaded == {} and result.state["lm"]["rng"] == saved_rng[rank]
    changed, caught = load(ModuleLayout(dp=2))
    assert len(caught) == 1 and "'lm'" in caught[0] and "rank_state.rng" in caught[0]  # once, by the first rank
    for rank, (result, mine) in changed.items():
        assert result.not_loaded == {"lm": ["rank_state.rng"]}
        assert result.state["lm"]["rng"] == mine  # the target's own value, untouched
        assert torch.equal(result.state["lm"]["w"], torch.tensor([0.0, 1.0]))


def test_a_missing_extra_state_is_tolerated_other_missing_objects_are_not(threads, tmp_path):
    one = ModuleLayout()
    _run(threads, one, lambda comm, rank: mimo_ckpt.save(
        {"lm": {"w": torch.ones(2)}}, "ckpt", layouts={"lm": one}, comm=comm, storage=LocalStorage(tmp_path)))

    def load(extra_key):
        def fn(comm, rank):
            template = {"lm": {"w": torch.zeros(2), "x": ObjectShard(extra_key, None, (2,), (0,))}}
            return mimo_ckpt.load(template, "ckpt", layouts={"lm": one}, comm=comm, storage=LocalStorage(tmp_path))
        return fn

    result = _run(threads, one, load("decoder.layers.mlp.linear_fc1._extra_state"))[0]
    assert result.not_loaded == {"lm": ["decoder.layers.mlp.linear_fc1._extra_state"]}
    assert torch.equal(result.state["lm"]["w"], torch.ones(2)) and result.state["lm"]["x"] is None
    _, errors = threads(ThreadWorld(1), load("decoder.something"))
    assert isinstance(errors[0], KeyMismatchError) and "missing: object 'decoder.something'" in str(errors[0])


def test_from_megatron_refuses_values_that_name_no_module():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mimo_ckpt.interop.megatron_keys import from_megatron

    w = ShardedTensor.from_rank_offsets("language_model.module.decoder.w", torch.ones(2, 3), replica_id=0)
    state = from_megatron({"a": {"w": w}})
    assert state["language"]["a/w"].key == "decoder.w" and state["language"]["a/w"].data is w.data
    with pytest.raises(ShardError, match="'a/iteration' is a plain int"):
        from_megatron({"a": {"w": w, "iteration": 3}})
