"""megatron-core leaves as megatron emits them, saved under one split and loaded under another,
compared with full tensors cut by plain torch: SwiGLU factories (megatron's own
`apply_swiglu_sharded_factory`), flat slices of a box (`flattened_range`, as DistributedOptimizer
state was emitted), and ranks whose module state is empty or holds only plain values."""

import pytest
import torch

import mimo_ckpt
from mimo_ckpt import ModuleLayout, ThreadWorld
from tests.conftest import run_threads

pytest.importorskip("megatron.core")
from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: E402
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory  # noqa: E402

F, H = 8, 6  # SwiGLU: W and V, each (F, H); megatron's linear_fc1 holds [W_r; V_r] per TP rank


def _glu() -> tuple[torch.Tensor, torch.Tensor]:
    full = torch.arange(2 * F * H, dtype=torch.float32).reshape(2 * F, H)
    return full[:F], full[F:]


def _fc1_factory(tp: int, rank: int, fill: float | None = None):
    w, v = _glu()
    rows = F // tp
    local = torch.cat([w[rank * rows:(rank + 1) * rows], v[rank * rows:(rank + 1) * rows]])
    if fill is not None:
        local = torch.full_like(local, fill)
    sh = ShardedTensor.from_rank_offsets("mlp.linear_fc1.weight", local, (0, rank, tp), replica_id=0)
    return apply_swiglu_sharded_factory(sh, ()), local


def _run(world: int, fn):
    results, errors = run_threads(ThreadWorld(world), fn)
    assert not errors, errors
    return results


@pytest.mark.parametrize("save_tp, load_tp", [(2, 1), (2, 4), (4, 2), (1, 1)])
def test_swiglu_factory_saves_and_loads_across_tp(tmp_path, save_tp, load_tp):
    def save(comm, rank):
        factory, _ = _fc1_factory(save_tp, rank)
        mimo_ckpt.save({"language": {"fc1": factory}}, tmp_path, layouts={"language": ModuleLayout(tp=save_tp)},
                       comm=comm)
    _run(save_tp, save)

    def load(comm, rank):
        factory, target = _fc1_factory(load_tp, rank, fill=float("nan"))
        got = mimo_ckpt.load({"language": {"fc1": factory}}, tmp_path, layouts={"language": ModuleLayout(tp=load_tp)},
                             comm=comm).state["language"]["fc1"]
        return got, target
    w, v = _glu()
    rows = F // load_tp
    for rank, (got, target) in enumerate(_run(load_tp, load)):
        want = torch.cat([w[rank * rows:(rank + 1) * rows], v[rank * rows:(rank + 1) * rows]])
        assert torch.equal(got, want)  # the factory's merge: [W_r; V_r], as megatron's load returns
        assert torch.equal(target, want)  # and the parameter itself was filled in place


def _flat(key: str, full: torch.Tensor, start: int, stop: int, fill: float | None = None) -> ShardedTensor:
    """A ShardedTensor holding elements [start, stop) of the whole of `full`, flattened, as
    DistributedOptimizer emitted its state (megatron-core 0.19 no longer builds these itself)."""
    st = ShardedTensor.from_rank_offsets(key, full.clone())
    data = full.reshape(-1)[start:stop].clone()
    st.data = data if fill is None else torch.full_like(data, fill)
    st.flattened_range = slice(start, stop)
    return st


def _ranges(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *cuts, n]
    return list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("save_cuts, load_cuts", [([20], [10, 30]), ([7, 31], []), ([24], [1, 2, 47])])
def test_flat_slices_save_as_boxes_and_load_under_other_slices(tmp_path, save_cuts, load_cuts):
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    saved, loaded = _ranges(full.numel(), save_cuts), _ranges(full.numel(), load_cuts)

    def save(comm, rank):
        st = _flat("exp_avg.w", full, *saved[rank])
        mimo_ckpt.save({"m": {"w": st}}, tmp_path, layouts={"m": ModuleLayout(dp=len(saved))}, comm=comm)
    _run(len(saved), save)

    def load(comm, rank):
        st = _flat("exp_avg.w", full, *loaded[rank], fill=float("nan"))
        got = mimo_ckpt.load({"m": {"w": st}}, tmp_path, layouts={"m": ModuleLayout(dp=len(loaded))},
                             comm=comm).state["m"]["w"]
        return got is st.data, got
    for rank, (same, got) in enumerate(_run(len(loaded), load)):
        assert same  # megatron gets its flat tensor back, filled in place
        assert torch.equal(got, full.reshape(-1)[slice(*loaded[rank])])

    def load_whole(comm, rank):  # and as a plain (model-space) tensor
        target = torch.full_like(full, float("nan"))
        mimo_ckpt.load({"m": {"w": ShardedTensor.from_rank_offsets("exp_avg.w", target)}}, tmp_path,
                       layouts={"m": ModuleLayout()}, comm=comm)
        return target
    assert torch.equal(_run(1, load_whole)[0], full)


def test_a_flat_slice_is_at_most_2_ndim_minus_1_zero_copy_boxes():
    from mimo_ckpt.model.megatron_leaves import to_shards

    full = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    st = _flat("w", full, 7, 100)
    shards = to_shards(st, module="m")
    assert len(shards) == 5
    assert all(s.data.untyped_storage().data_ptr() == st.data.untyped_storage().data_ptr() for s in shards)
    for s in shards:
        cut = full[tuple(slice(o, o + n) for o, n in zip(s.global_offset, s.data.shape))]
        assert torch.equal(s.data, cut)


@pytest.mark.parametrize("second", [{}, {"iteration": 7, "note": "warm-up"}])
def test_a_rank_with_empty_or_plain_only_state(tmp_path, second):
    layout = {"m": ModuleLayout(dp=2)}
    full = torch.arange(6.0)

    def save(comm, rank):
        state = {"w": ShardedTensor.from_rank_offsets("w", full.clone(), replica_id=rank)} if rank == 0 else second
        mimo_ckpt.save({"m": state}, tmp_path, layouts=layout, comm=comm)
    _run(2, save)

    def load(comm, rank):
        if rank == 0:
            target = torch.zeros(6)
            got = mimo_ckpt.load({"m": {"w": ShardedTensor.from_rank_offsets("w", target)}}, tmp_path,
                                 layouts=layout, comm=comm).state["m"]
            return got["w"]
        asked = {k: None for k in second}
        return mimo_ckpt.load({"m": asked}, tmp_path, layouts=layout, comm=comm).state["m"]
    first, other = _run(2, load)
    assert torch.equal(first, full)
    assert other == second


def _vocab(rows: int) -> torch.Tensor:
    """An embedding whose vocabulary (10 real tokens) is padded to `rows`, padding rows zero."""
    full = torch.zeros(rows, 4)
    real = min(rows, 10)
    full[:real] = torch.arange(real * 4, dtype=torch.float32).reshape(real, 4) + 1
    return full


@pytest.mark.parametrize("saved_rows, save_tp, load_rows, load_tp", [(10, 2, 12, 3), (12, 3, 10, 2), (12, 4, 12, 2)])
def test_a_padded_vocabulary_loads_across_tp_as_megatron_does(tmp_path, saved_rows, save_tp, load_rows, load_tp):
    """allow_shape_mismatch: the rows the checkpoint holds load, rows beyond it are zero, stored
    rows beyond the request are dropped."""
    saved = _vocab(saved_rows)

    def save(comm, rank):
        rows = saved_rows // save_tp
        st = ShardedTensor.from_rank_offsets("embedding.weight", saved[rank * rows:(rank + 1) * rows].clone(),
                                             (0, rank, save_tp), replica_id=0)
        st.allow_shape_mismatch = True
        mimo_ckpt.save({"m": {"emb": st}}, tmp_path, layouts={"m": ModuleLayout(tp=save_tp)}, comm=comm)
    _run(save_tp, save)

    def load(comm, rank, allow=True):
        target = torch.full((load_rows // load_tp, 4), float("nan"))
        st = ShardedTensor.from_rank_offsets("embedding.weight", target, (0, rank, load_tp), replica_id=0)
        st.allow_shape_mismatch = allow
        mimo_ckpt.load({"m": {"emb": st}}, tmp_path, layouts={"m": ModuleLayout(tp=load_tp)}, comm=comm)
        return target
    got = torch.cat(_run(load_tp, load))
    assert torch.equal(got, _vocab(load_rows))
    if saved_rows != load_rows:  # without the flag, another shape is a key mismatch
        _, errors = run_threads(ThreadWorld(load_tp), lambda comm, rank: load(comm, rank, allow=False))
        assert len(errors) == load_tp and all(isinstance(e, mimo_ckpt.KeyMismatchError) for e in errors.values())
        assert "shape [%d, 4] requested, [%d, 4] stored" % (load_rows, saved_rows) in str(errors[0])


def test_floating_point_state_is_cast_on_load_and_kinds_never_mix(tmp_path):
    full = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    layout = {"m": ModuleLayout()}
    _run(1, lambda comm, rank: mimo_ckpt.save({"m": {"w": _whole(full)}}, tmp_path, layouts=layout, comm=comm))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        target = torch.zeros(6, 4, dtype=dtype)
        _run(1, lambda comm, rank: mimo_ckpt.load({"m": {"w": _whole(target)}}, tmp_path, layouts=layout,
                                                  comm=comm))
        assert torch.equal(target, full.to(dtype)), dtype
    _, errors = run_threads(ThreadWorld(1), lambda comm, rank: mimo_ckpt.load(
        {"m": {"w": _whole(torch.zeros(6, 4, dtype=torch.int32))}}, tmp_path, layouts=layout, comm=comm))
    assert isinstance(errors[0], mimo_ckpt.KeyMismatchError) and "dtype I32 requested, F32 stored" in str(errors[0])


def _whole(t: torch.Tensor) -> mimo_ckpt.TensorShard:
    return mimo_ckpt.TensorShard.whole("w", t)


def test_strict_requested_ignores_stored_keys_not_asked_for_as_megatron_does(tmp_path):
    layout = {"m": ModuleLayout()}
    stored = {"w": _whole(torch.arange(4.0)), "extra": mimo_ckpt.TensorShard.whole("extra", torch.ones(3))}
    _run(1, lambda comm, rank: mimo_ckpt.save({"m": stored}, tmp_path, layouts=layout, comm=comm))
    target = torch.zeros(4)
    result = _run(1, lambda comm, rank: mimo_ckpt.load({"m": {"w": _whole(target)}}, tmp_path, layouts=layout,
                                                       comm=comm, strict="requested"))[0]
    assert torch.equal(target, torch.arange(4.0)) and result.report.unexpected == {"m": ["tensor 'extra'"]}
    for strict in (True, "requested"):  # a requested key the checkpoint lacks fails either way
        asked = {"w": _whole(torch.zeros(4)), "absent": mimo_ckpt.TensorShard.whole("absent", torch.zeros(2))}
        _, errors = run_threads(ThreadWorld(1), lambda comm, rank: mimo_ckpt.load(
            {"m": asked}, tmp_path, layouts=layout, comm=comm, strict=strict))
        assert isinstance(errors[0], mimo_ckpt.KeyMismatchError) and "missing: tensor 'absent'" in str(errors[0])
    _, errors = run_threads(ThreadWorld(1), lambda comm, rank: mimo_ckpt.load(
        {"m": {"w": _whole(torch.zeros(4))}}, tmp_path, layouts=layout, comm=comm, strict=True))
    assert "unexpected: tensor 'extra'" in str(errors[0])


def test_the_main_replica_writes_the_stored_copy(tmp_path):
    """Ranks 0-2 hold the same box; rank 2 is the main replica (replica_id 0) and its values are
    the ones stored, whatever the planner would balance otherwise."""
    layout = {"m": ModuleLayout(dp=3)}

    def save(comm, rank):
        st = ShardedTensor.from_rank_offsets("w", torch.full((64,), float(rank)), replica_id=(0, 2 - rank))
        mimo_ckpt.save({"m": {"w": st}}, tmp_path, layouts=layout, comm=comm)
    _run(3, save)
    target = torch.zeros(64)
    _run(1, lambda comm, rank: mimo_ckpt.load({"m": {"w": _whole(target)}}, tmp_path, layouts={"m": ModuleLayout()},
                                              comm=comm))
    assert torch.equal(target, torch.full((64,), 2.0))


def test_a_box_with_no_main_replica_fails_on_every_rank(tmp_path):
    layout = {"m": ModuleLayout(dp=3)}

    def save(comm, rank):
        st = ShardedTensor.from_rank_offsets("w", torch.ones(4), replica_id=(1, 1, 2)[rank])
        mimo_ckpt.save({"m": {"w": st}}, tmp_path, layouts=layout, comm=comm)
    _, errors = run_threads(ThreadWorld(3), save)
    assert sorted(errors) == [0, 1, 2], errors
    assert all("none of them the main replica" in str(e) and "'w'" in str(e) and "'m'" in str(e)
               for e in errors.values()), errors
    assert not (tmp_path / "manifest.json").exists()


def test_common_state_is_rank_0s_on_every_rank_as_megatron_returns_it(tmp_path):
    """Plain values of a megatron state dict, inside dicts and inside lists of sharded values
    (where megatron's own loader fails), are saved from rank 0 and come back on every rank."""
    from mimo_ckpt.interop.megatron_keys import COMMON_METADATA, from_megatron, split_common, to_megatron

    def state(rank, target=None):
        w = torch.arange(4.0) if target is None else target
        return {"iteration": 100 + rank, "language_model": {
            "w": ShardedTensor.from_rank_offsets("language_model.w", w, replica_id=rank),
            "pair": [ShardedTensor.from_rank_offsets("language_model.v", w.clone(), replica_id=rank), f"rank {rank}"]}}
    layout = {"language": ModuleLayout(dp=2)}

    def save(comm, rank):
        sharded, common = split_common(state(rank))
        assert common == {"iteration": 100 + rank, "language_model/pair/1": f"rank {rank}"}
        mimo_ckpt.save(from_megatron(sharded), tmp_path, layouts=layout, comm=comm, metadata={COMMON_METADATA: common})
    _run(2, save)

    def load(comm, rank):
        sd = state(rank + 10, target=torch.zeros(4))
        sharded, _ = split_common(sd)
        result = mimo_ckpt.load(from_megatron(sharded), tmp_path, layouts=layout, comm=comm)
        return to_megatron(sd, result.state, result.metadata[COMMON_METADATA])
    for got in _run(2, load):
        assert got["iteration"] == 100 and got["language_model"]["pair"][1] == "rank 0"
        assert torch.equal(got["language_model"]["w"], torch.arange(4.0))
        assert torch.equal(got["language_model"]["pair"][0], torch.arange(4.0))


def test_a_box_held_twice_on_a_rank_as_main_and_copy_saves_once_and_loads_into_both(tmp_path):
    """A tied output layer keyed as its embedding with a non-main replica id, on the same rank."""
    full = torch.arange(12.0).reshape(4, 3)
    layout = {"m": ModuleLayout()}

    def state(emb, out):
        return {"embedding": ShardedTensor.from_rank_offsets("emb", emb, replica_id=0),
                "output_layer": ShardedTensor.from_rank_offsets("emb", out, replica_id=1)}
    _run(1, lambda comm, rank: mimo_ckpt.save({"m": state(full.clone(), torch.full((4, 3), -7.0))}, tmp_path,
                                              layouts=layout, comm=comm))
    emb, out = torch.zeros(4, 3), torch.zeros(4, 3)
    got = _run(1, lambda comm, rank: mimo_ckpt.load({"m": state(out, emb)}, tmp_path, layouts=layout,
                                                    comm=comm).state["m"])[0]
    assert torch.equal(emb, full) and torch.equal(out, full)
    assert got["embedding"] is out and got["output_layer"] is emb


@pytest.mark.parametrize("save_tp, save_dp, load_tp, load_dp", [(2, 3, 1, 2), (1, 2, 2, 2)])
def test_distributed_optimizer_flat_state_of_a_swiglu_weight_reshards_without_a_gather(
        tmp_path, save_tp, save_dp, load_tp, load_dp):
    """Adam state of megatron's SwiGLU linear_fc1, kept as each DP rank's flat slice of the TP
    rank's [W_r; V_r] (as DistributedOptimizer keeps it), saved as model-space boxes, loaded as
    other slices under another TP x DP, and whole."""
    from mimo_ckpt.model.megatron_leaves import flat_state_shards

    state = torch.arange(2 * F * H, dtype=torch.float32).reshape(2 * F, H) * 0.5 + 100  # [S_W; S_V]
    s_w, s_v = state[:F], state[F:]

    def local(tp, rank):
        rows = F // tp
        return torch.cat([s_w[rank * rows:(rank + 1) * rows], s_v[rank * rows:(rank + 1) * rows]]).reshape(-1)

    def shards(tp, dp, rank, fill=None):
        layout = ModuleLayout(tp=tp, dp=dp)
        c = layout.coords(rank)
        factory, _ = _fc1_factory(tp, c["tp"])
        flat = local(tp, c["tp"])
        bounds = [round(flat.numel() * k * (k + 1) / (dp * (dp + 1))) for k in range(dp + 1)]  # uneven
        lo, hi = bounds[c["dp"]], bounds[c["dp"] + 1]
        data = flat[lo:hi].clone() if fill is None else torch.full((hi - lo,), fill)
        return data, flat[lo:hi], flat_state_shards(factory, "optimizer.state.exp_avg.mlp.linear_fc1.weight", data,
                                                    lo, replica_id=(0, 0, 0), module="language")  # DP slices: no replicas

    def save(comm, rank):
        _, _, parts = shards(save_tp, save_dp, rank)
        assert len(parts) <= 2 * (2 * 2 - 1)  # in W, in V, or over both: at most 3 boxes in each
        mimo_ckpt.save({"language": {f"s{i}": p for i, p in enumerate(parts)}}, tmp_path,
                       layouts={"language": ModuleLayout(tp=save_tp, dp=save_dp)}, comm=comm)
    _run(save_tp * save_dp, save)

    def load(comm, rank):
        data, want, parts = shards(load_tp, load_dp, rank, fill=float("nan"))
        mimo_ckpt.load({"language": {f"s{i}": p for i, p in enumerate(parts)}}, tmp_path,
                       layouts={"language": ModuleLayout(tp=load_tp, dp=load_dp)}, comm=comm)
        return torch.equal(data, want)
    assert all(_run(load_tp * load_dp, load))

    whole = torch.zeros(2 * F, H)
    _run(1, lambda comm, rank: mimo_ckpt.load(
        {"language": {"s": mimo_ckpt.TensorShard.whole("optimizer.state.exp_avg.mlp.linear_fc1.weight", whole)}},
        tmp_path, layouts={"language": ModuleLayout()}, comm=comm))
    assert torch.equal(whole, state)


def test_flat_boxes_state_of_a_distributed_optimizer_shape_loads_as_model_space_tensors(tmp_path):
    """`MegatronModuleOptimizer._flat_state` over DistributedOptimizer's own structures (buckets
    mapping each model param to its range, the rank's main param and Adam moments as flat
    slices), stood in for here on CPU: 2 DP ranks, a plain weight and megatron's SwiGLU factory;
    saved and loaded whole, each state equals the slices put together."""
    from types import SimpleNamespace

    from optim.megatron import MegatronModuleOptimizer

    weight = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
    factory, fc1 = _fc1_factory(1, 0)
    params = {"proj.weight": weight, "fc1": fc1}
    model = {"proj": ShardedTensor.from_rank_offsets("proj.weight", weight, replica_id=(0, 0, 0)), "fc1": factory}
    full = {(name, p): torch.randn(t.numel(), generator=torch.Generator().manual_seed(len(name) * 7 + len(p)))
            for name in ("param", "exp_avg", "exp_avg_sq") for p, t in params.items()}

    def fake(dp_rank):
        ranges, owned = {}, {}
        for p, t in params.items():
            half = t.numel() // 2 + 1  # uneven halves
            lo, hi = (0, half) if dp_rank == 0 else (half, t.numel())
            ranges[id(t)] = SimpleNamespace(start=lo, end=hi)
            owned[id(t)] = {name: full[(name, p)][lo:hi].clone() for name in ("param", "exp_avg", "exp_avg_sq")}
        bucket = {"param_map": {t: {"param": ranges[id(t)]} for t in params.values()}}
        inner = SimpleNamespace(gbuf_ranges=[{torch.float32: [bucket]}], distributed_optimizer_instance_id=0,
                                _get_main_param_and_optimizer_states=lambda t: dict(owned[id(t)]))
        return SimpleNamespace(optimizer=inner, name="language", model_sharded_state_dict=lambda: model)

    layout = {"language": ModuleLayout(dp=2)}
    _run(2, lambda comm, rank: mimo_ckpt.save({"language": MegatronModuleOptimizer._flat_state(fake(rank))},
                                              tmp_path, layouts=layout, comm=comm))
    for name, key in (("param", "fp32_param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
        got = {"proj.weight": torch.zeros(4, 6), "mlp.linear_fc1.weight": torch.zeros(2 * F, H)}
        _run(1, lambda comm, rank: mimo_ckpt.load(
            {"language": {k: mimo_ckpt.TensorShard.whole(f"optimizer.state.{key}.{k}", t) for k, t in got.items()}},
            tmp_path, layouts={"language": ModuleLayout()}, comm=comm, strict="requested"))
        assert torch.equal(got["proj.weight"].reshape(-1), full[(name, "proj.weight")]), name
        # fc1's local tensor on TP1 is [W; V], and the factory stores it as [W; V]
        assert torch.equal(got["mlp.linear_fc1.weight"].reshape(-1), full[(name, "fc1")]), name
