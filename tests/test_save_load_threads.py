"""save/load with ranks as threads: storage backends, strict mode, megatron-core shards."""

import os

import pytest
import tensorstore as ts
import torch

import mimo_ckpt
from mimo_ckpt import (
    CheckpointExistsError, CheckpointNotFoundError, KeyMismatchError, ModuleLayout, ObjectShard,
    RemoteRankError, TensorShard, TensorStoreStorage, ThreadWorld,
)
from mimo_ckpt.io.storage import LocalStorage
from examples.synthetic_state import check_rank_state, rank_state

SAVE = {"images": ModuleLayout(tp=2), "language": ModuleLayout(tp=2, pp=2, rank_offset=2)}
LOAD = {"images": ModuleLayout(dp=2), "language": ModuleLayout(pp=2, dp=2, rank_offset=2)}


def _save(threads, storage_for, layouts=SAVE):
    def fn(comm, rank):
        state = {m: rank_state(m, l, rank) for m, l in layouts.items() if l.contains(rank)}
        mimo_ckpt.save(state, "ckpt", layouts=layouts, comm=comm, storage=storage_for(rank))
    _, errors = threads(ThreadWorld(6), fn)
    assert not errors, errors


def _load(threads, storage_for, layouts=LOAD, **kwargs):
    def fn(comm, rank):
        targets = {m: rank_state(m, l, rank, fill=float("nan")) for m, l in layouts.items() if l.contains(rank)}
        result = mimo_ckpt.load(targets, "ckpt", layouts=layouts, comm=comm, storage=storage_for(rank), **kwargs)
        return {m: result.state[m] for m in targets}
    return threads(ThreadWorld(6), fn)


def _loaded_bytes(states):
    out = {}
    for rank, state in enumerate(states):
        for module, values in state.items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    out[(rank, module, key)] = value.reshape(-1).view(torch.uint8).clone() if value.numel() else value
                else:
                    out[(rank, module, key)] = value
    return out


def test_memory_and_file_tensorstore_match_local_filesystem(threads, tmp_path):
    context = ts.Context()
    backends = {
        "local": lambda rank: LocalStorage(tmp_path / "local"),
        "file": lambda rank: TensorStoreStorage(f"file://{tmp_path}/ts", context=context),
        "memory": lambda rank: TensorStoreStorage("memory://ckpt", context=context),
    }
    loaded = {}
    for name, storage_for in backends.items():
        _save(threads, storage_for)
        states, errors = _load(threads, storage_for)
        assert not errors, (name, errors)
        for rank, state in enumerate(states):
            for module, values in state.items():
                assert check_rank_state(module, LOAD[module], rank, values) == [], name
        loaded[name] = _loaded_bytes(states)
    assert loaded["local"].keys() == loaded["memory"].keys() == loaded["file"].keys()
    for key, value in loaded["local"].items():
        for other in ("memory", "file"):
            theirs = loaded[other][key]
            assert (torch.equal(value, theirs) if isinstance(value, torch.Tensor) else value == theirs), (other, key)
    # tensorstore's file driver and ours write the same bytes (file names differ by save id only)
    for module in ("images", "language"):
        mine, theirs = (sorted(os.listdir(tmp_path / d / module)) for d in ("local", "ts"))
        assert [n.split("-")[0] for n in mine] == [n.split("-")[0] for n in theirs]
        for a, b in zip(mine, theirs, strict=True):
            assert (tmp_path / "local" / module / a).read_bytes() == (tmp_path / "ts" / module / b).read_bytes()


def test_reference_check_detects_a_changed_element():
    layout = SAVE["language"]
    state = rank_state("language", layout, 3)
    loaded = {k: (v.data.clone() if isinstance(v, TensorShard) else v.data) for k, v in state.items()}
    assert check_rank_state("language", layout, 3, loaded) == []
    loaded["decoder.layers.mlp.linear_fc2.weight"].view(-1)[5] += 1
    assert len(check_rank_state("language", layout, 3, loaded)) == 1


def _storage(tmp_path):
    return lambda rank: LocalStorage(tmp_path)


def _mutated_load(threads, tmp_path, mutate, **kwargs):
    def fn(comm, rank):
        targets = {m: rank_state(m, l, rank, fill=0.0) for m, l in SAVE.items() if l.contains(rank)}
        mutate(rank, targets)
        return mimo_ckpt.load(targets, "ckpt", layouts=SAVE, comm=comm, storage=LocalStorage(tmp_path), **kwargs)
    return threads(ThreadWorld(6), fn)


def _lang_rank(rank):
    return rank >= 2


def _missing(rank, targets):
    if _lang_rank(rank):
        targets["language"]["absent.weight"] = TensorShard("absent.weight", torch.zeros(3), (3,), (0,))


def _unexpected(rank, targets):
    if _lang_rank(rank):
        targets["language"].pop("decoder.final_layernorm.weight", None)


def _wrong_shape(rank, targets):
    if "images" in targets:
        t = targets["images"]["vision.norm/bias"]
        targets["images"]["vision.norm/bias"] = TensorShard(t.key, torch.zeros(11, dtype=t.data.dtype), (11,), (0,))


def _wrong_dtype(rank, targets):
    if "images" in targets:
        t = targets["images"]["step"]
        targets["images"]["step"] = TensorShard(t.key, torch.zeros((), dtype=torch.int32), (), ())


@pytest.mark.parametrize("mutate, module, label, key", [
    (_missing, "language", "missing", "absent.weight"),
    (_unexpected, "language", "unexpected", "decoder.final_layernorm.weight"),
    (_wrong_shape, "images", "mismatched", "vision.norm/bias"),
    (_wrong_dtype, "images", "mismatched", "step"),
])
def test_strict_mode_errors(threads, tmp_path, mutate, module, label, key):
    _save(threads, _storage(tmp_path))
    _, errors = _mutated_load(threads, tmp_path, mutate)
    assert sorted(errors) == list(range(6)), "every rank must fail"
    for exc in errors.values():
        assert isinstance(exc, (KeyMismatchError, RemoteRankError))
        assert f"{label}: " in str(exc) and key in str(exc) and repr(module) in str(exc), str(exc)
    owner = SAVE[module]
    direct = [r for r in errors if owner.contains(r)]
    assert all(isinstance(errors[r], KeyMismatchError) for r in direct)
    report = errors[direct[0]].report
    assert any(key in line for line in getattr(report, label)[module])

    # Non-strict: the rest loads and the report comes back.
    results, errors = _mutated_load(threads, tmp_path, mutate, strict=False)
    assert not errors, errors
    for rank in owner.ranks:
        report = results[rank].report
        assert any(key in line for line in getattr(report, label)[module])
        loaded = results[rank].state[module]
        assert torch.equal(loaded["vision.proj.weight" if module == "images" else "iteration"],
                           rank_state(module, SAVE[module], rank)["vision.proj.weight" if module == "images" else "iteration"].data)


def test_saving_over_a_committed_checkpoint_is_refused(threads, tmp_path):
    _save(threads, _storage(tmp_path))
    before = (tmp_path / "manifest.json").read_bytes()
    def fn(comm, rank):
        state = {m: rank_state(m, l, rank) for m, l in SAVE.items() if l.contains(rank)}
        mimo_ckpt.save(state, "ckpt", layouts=SAVE, comm=comm, storage=LocalStorage(tmp_path))
    _, errors = threads(ThreadWorld(6), fn)
    assert sorted(errors) == list(range(6))
    assert all(isinstance(e, CheckpointExistsError) for e in errors.values())
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_load_without_checkpoint_raises_not_found(threads, tmp_path):
    _, errors = _load(threads, _storage(tmp_path / "nothing"))
    assert sorted(errors) == list(range(6))
    assert all(isinstance(e, CheckpointNotFoundError) for e in errors.values())


def test_overlapping_boxes_fail_the_save_and_commit_nothing(threads, tmp_path):
    layout = {"m": ModuleLayout(dp=2)}
    def fn(comm, rank):
        data = torch.arange(6.0)[rank * 2: rank * 2 + 4]  # [0:4] and [2:6] overlap
        state = {"m": {"w": TensorShard("w", data.clone(), (6,), (rank * 2,))}}
        mimo_ckpt.save(state, "ckpt", layouts=layout, comm=comm, storage=LocalStorage(tmp_path))
    _, errors = threads(ThreadWorld(2), fn)
    assert sorted(errors) == [0, 1]
    assert all("overlaps" in str(e) and "'w'" in str(e) for e in errors.values())
    assert not (tmp_path / "manifest.json").exists()


def test_sharded_objects_and_plain_values(threads, tmp_path):
    layout = {"lm": ModuleLayout(tp=2, pp=2)}
    def fn_save(comm, rank):
        c = layout["lm"].coords(rank)
        state = {"lm": {
            "rng": ObjectShard("rng", {"seed": 100 + rank}, (2, 2), (c["pp"], c["tp"])),
            "sched": {"lr": 0.1, "warmup": [1, 2]},
            "w": torch.full((3,), 7.0),
        }}
        mimo_ckpt.save(state, "ckpt", layouts=layout, comm=comm, storage=LocalStorage(tmp_path))
    _, errors = threads(ThreadWorld(4), fn_save)
    assert not errors, errors
    def fn_load(comm, rank):
        c = layout["lm"].coords(rank)
        w = torch.zeros(3)
        state = {"lm": {"rng": ObjectShard("rng", None, (2, 2), (c["pp"], c["tp"])), "sched": None, "w": w}}
        loaded = mimo_ckpt.load(state, "ckpt", layouts=layout, comm=comm, storage=LocalStorage(tmp_path)).state
        assert loaded["lm"]["w"] is w  # a plain tensor is filled in place and handed back
        return loaded
    results, errors = threads(ThreadWorld(4), fn_load)
    assert not errors, errors
    for rank, state in enumerate(results):
        assert isinstance(state["lm"]["w"], torch.Tensor)
        assert state["lm"]["rng"] == {"seed": 100 + rank}
        assert state["lm"]["sched"] == {"lr": 0.1, "warmup": [1, 2]}
        assert torch.equal(state["lm"]["w"], torch.full((3,), 7.0))


def test_megatron_sharded_tensors_round_trip(threads, tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    full = torch.arange(2 * 8 * 6, dtype=torch.float32).reshape(2, 8, 6)
    save_layout, load_layout = {"language": ModuleLayout(tp=2)}, {"language": ModuleLayout(dp=2)}

    def fn_save(comm, rank):
        # one layer of a stacked tensor: prepend axis with the global layer offset
        local = full[1, rank * 4:(rank + 1) * 4].clone()
        st = ShardedTensor.from_rank_offsets("decoder.layers.w", local, (0, 1, 2), (1, rank, 2),
                                             replica_id=0, prepend_axis_num=1)
        obj = ShardedObject("decoder.layers._extra_state", {"v": rank}, (2,), (rank,), replica_id=0)
        layer0 = ShardedTensor.from_rank_offsets("decoder.layers.w", full[0, rank * 4:(rank + 1) * 4].clone(),
                                                 (0, 0, 2), (1, rank, 2), replica_id=0, prepend_axis_num=1)
        mimo_ckpt.save({"language": {"a": st, "b": layer0, "o": obj}}, "ckpt", layouts=save_layout,
                       comm=comm, storage=LocalStorage(tmp_path))
    _, errors = threads(ThreadWorld(2), fn_save)
    assert not errors, errors

    def fn_load(comm, rank):
        dst = torch.zeros(2, 8, 6)
        st = ShardedTensor.from_rank_offsets("decoder.layers.w", dst, replica_id=(0, 0, rank))
        obj = ShardedObject("decoder.layers._extra_state", None, (2,), (rank,), replica_id=0)
        res = mimo_ckpt.load({"language": {"w": st, "o": obj}}, "ckpt", layouts=load_layout, comm=comm,
                             storage=LocalStorage(tmp_path))
        return res.state["language"], dst
    results, errors = threads(ThreadWorld(2), fn_load)
    assert not errors, errors
    for rank, (state, dst) in enumerate(results):
        assert state["w"] is dst and torch.equal(dst, full)
        assert state["o"] == {"v": rank}


def test_our_shards_convert_to_megatron_and_back():
    from mimo_ckpt.model.megatron_leaves import to_shards, to_sharded_object, to_sharded_tensor

    shard = TensorShard("w", torch.arange(6.0).reshape(2, 3), (4, 3), (2, 0), is_main_replica=False)
    st = to_sharded_tensor(shard, replica_id=(0, 0, 1))
    assert st.global_offset == (2, 0) and st.local_shape == (2, 3) and st.data is shard.data
    (back,) = to_shards(st, module="m")
    assert back.box == shard.box and back.global_shape == (4, 3) and not back.is_main_replica
    assert not back.allow_shape_mismatch
    padded = TensorShard("emb", torch.zeros(2, 3), (4, 3), (0, 0), allow_shape_mismatch=True)
    assert to_shards(to_sharded_tensor(padded), module="m")[0].allow_shape_mismatch
    obj = ObjectShard("rng", {"a": 1}, (2,), (1,))
    assert to_shards(to_sharded_object(obj), module="m") == [obj]
