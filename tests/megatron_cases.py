"""Cases of Megatron-LM's dist_checkpointing unit tests, run on 8 gloo ranks through megatron's own
`dist_checkpointing.save/load` (torch_dist) and through mimo_ckpt (tests/test_megatron_cases.py).

Where they come from (NVIDIA/Megatron-LM, tests/unit_tests/dist_checkpointing/):
- test_serialization.py: save/load of ShardedTensors under one split and another, 2-D splits,
  prepended axes, ShardedObjects (grids, BytesIO), factories mixed with tensors, global shape
  mismatches (with and without `allow_shape_mismatch`), ranks without state and megatron's common
  state, uneven 1-D splits (zero-sized and several boxes per rank), missing / unknown keys
  under megatron's default strictness;
- test_flattened_resharding.py (removed upstream with flattened_range; read at 5ab481cb45^):
  flat slices of each rank's box, saved under one TP x PP x DP split and loaded under another,
  or as plain tensors;
- test_mapping.py: a ShardedTensorFactory whose build makes a dict and whose merge picks a part;
- test_optimizer.py, for the shapes of optimizer state only: Adam moments and main params keyed
  after their parameter, param_groups objects, megatron's SwiGLU factory
  (`apply_swiglu_sharded_factory`), DistributedOptimizer's flat slices.

Each case is one function of a `Phase` that describes a rank's state. Its helpers make the
state to save (`c.saving`), the template to load into (sentinel-filled, NaN), or, in the expect
phase, the value the load must give, cut out of a full tensor with plain torch. The expected
structure is megatron's: what `dist_checkpointing.load` returns (common state included).
mimo_ckpt loads with strict="requested", megatron's default strictness (stored keys may go
unrequested). A few cases go beyond those files, to megatron behaviour they rely on: the save-time
sharding check (uncovered or doubly-claimed boxes), and one box held twice on a rank.

Both libraries run on the same ranks: every mimo_ckpt case first (its collectives carry errors, so
a failing case cannot stall the next), then every megatron case, with the default group's
timeout cut to STALL_S so that a rank left waiting fails rather than hangs.
MEGATRON_CASES_TRACE=1 prints each failure's traceback in the ranks' output.
"""

from __future__ import annotations

import io
import os
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject, ShardedObject, ShardedTensor, ShardedTensorFactory,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from torch.distributed.checkpoint import CheckpointException  # a BaseException

from mimo_ckpt import MimoCkptError, ModuleLayout

W = 8  # ranks, as megatron's tests assume
STALL_S = 60
MODULE = "language"
MEGATRON_ORDER = ("tp", "cp", "ep", "dp", "pp")  # megatron's default rank order, tp fastest
NAN = float("nan")


@dataclass(frozen=True)
class Grid:
    tp: int = 1
    pp: int = 1

    @property
    def dp(self) -> int:
        return W // (self.tp * self.pp)

    @property
    def layout(self) -> ModuleLayout:
        return ModuleLayout(tp=self.tp, pp=self.pp, dp=self.dp, order=MEGATRON_ORDER)


DP8, TP2, TP4, TP8 = Grid(), Grid(tp=2), Grid(tp=4), Grid(tp=8)
TP2PP4, TP1PP2, TP2PP2, TP4PP2 = Grid(2, 4), Grid(1, 2), Grid(2, 2), Grid(4, 2)


def ar(*shape: int) -> torch.Tensor:
    """A float32 tensor of its own flat indices."""
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float32).reshape(shape)


def cut(full: torch.Tensor, splits: tuple[tuple[int, int, int], ...], prepend: int = 0) -> torch.Tensor:
    """Part `index` of `parts` along each (global axis, index, parts); prepended axes dropped."""
    for axis, index, parts in splits:
        size = full.shape[axis] // parts
        full = full.narrow(axis, index * size, size)
    return full.reshape(full.shape[prepend:]) if prepend else full


class Phase:
    """A rank's view of one case in one phase: "save", "load" (template) or "expect"."""

    def __init__(self, phase: str, rank: int, grid: Grid) -> None:
        self.phase, self.rank, self.grid = phase, rank, grid
        self.tp, self.dp, self.pp = rank % grid.tp, rank // grid.tp % grid.dp, rank // (grid.tp * grid.dp)
        self.tp_size, self.dp_size, self.pp_size = grid.tp, grid.dp, grid.pp

    saving = property(lambda self: self.phase == "save")
    expecting = property(lambda self: self.phase == "expect")

    def _data(self, local: torch.Tensor, fill: float, garbage: bool) -> torch.Tensor:
        if self.saving:
            return torch.full_like(local, -7.0) if garbage else local.clone()
        return torch.full_like(local, fill)

    def tensor(self, key: str, full: torch.Tensor, *splits: tuple[int, int, int], replica: Any = 0,
               prepend: int = 0, flat: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
               fill: float = NAN, garbage: bool = False, **kw: Any) -> Any:
        """ShardedTensor.from_rank_offsets of this rank's part of `full` (with `flat`: elements
        [start, stop) of that part, flattened, as DistributedOptimizer emitted them); `garbage`
        puts junk in a non-main replica, which no save may write."""
        local = cut(full, splits, prepend).to(dtype or full.dtype)
        if flat is not None:
            local = local.reshape(-1)[flat[0]:flat[1]]
        if self.expecting:
            return local
        if flat is None:
            return ShardedTensor.from_rank_offsets(key, self._data(local, fill, garbage), *splits,
                                                   replica_id=replica, prepend_axis_num=prepend, **kw)
        # megatron-core 0.19 refuses flattened_range in the constructor: set it afterwards
        box = cut(full, splits, prepend).to(local.dtype)
        st = ShardedTensor.from_rank_offsets(key, box, *splits, replica_id=replica, prepend_axis_num=prepend)
        st.data, st.flattened_range = self._data(local, fill, garbage), slice(*flat)
        return st

    def box(self, key: str, full: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...],
            replica: Any = 0) -> Any:
        """A ShardedTensor of any box (no regular grid), as the uneven-split cases build them."""
        local = full
        for axis, (o, n) in enumerate(zip(offset, shape)):
            local = local.narrow(axis, o, n)
        if self.expecting:
            return local
        data = self._data(local, NAN, False)
        return ShardedTensor(key, data, data.dtype, tuple(shape), tuple(full.shape), tuple(offset), None, replica)

    def obj(self, key: str, value: Any, grid: tuple[int, ...] = (1,), offset: tuple[int, ...] = (0,),
            replica: Any = 0) -> Any:
        if self.expecting:
            return value
        return ShardedObject(key, value if self.saving else "<not loaded>", grid, offset, replica)

    def value(self, saved: Any, loaded: Any = ...) -> Any:
        """A plain value (megatron's common state): loads as rank 0 saved it."""
        return (saved if loaded is ... else loaded) if self.expecting else saved

    def local(self, value: Any) -> Any:
        return value if self.expecting else LocalNonpersistentObject(value)

    def swiglu(self, key: str, full: torch.Tensor, *layer: tuple[int, int, int], replica: Any = 0) -> Any:
        """megatron's own SwiGLU factory over linear_fc1's [W_r; V_r] rows of this TP rank; `layer`:
        sharded offsets of prepended (stacked layer) axes. `full` is [W; V] along axis len(layer)."""
        p = len(layer)
        w, v = cut(full, layer, p).chunk(2, dim=0)
        local = torch.cat([cut(w, ((0, self.tp, self.tp_size),)), cut(v, ((0, self.tp, self.tp_size),))])
        if self.expecting:
            return local
        st = ShardedTensor.from_rank_offsets(key, self._data(local, NAN, False), *layer,
                                             (p, self.tp, self.tp_size), replica_id=replica, prepend_axis_num=p)
        return apply_swiglu_sharded_factory(st, layer)


@dataclass(frozen=True)
class Case:
    build: Callable[[Phase], Any]
    save: Grid
    load: Grid
    route: str = "leaves"
    """"leaves": {MODULE: megatron state}; "keys": megatron MIMO keys through from_megatron/to_megatron;
    "common": as "leaves", with plain values saved as rank 0's common state (split_common)."""
    modules: tuple[str, ...] = (MODULE,)
    """mimo_ckpt modules (each gets the case's grid as layout)."""
    raises: str = ""
    """"save" or "load": that step must fail (in mimo_ckpt, with a MimoCkptError)."""
    megatron_fails: str = ""
    """megatron-core 0.19.2's own error on this case (seen on CPU / gloo), when it has one."""


CASES: dict[str, Case] = {}


def case(save: Grid, load: Grid, **kw: Any) -> Callable[[Callable[[Phase], Any]], Callable[[Phase], Any]]:
    def register(fn: Callable[[Phase], Any]) -> Callable[[Phase], Any]:
        CASES[fn.__name__] = Case(fn, save, load, **kw)
        return fn
    return register


def uneven(name: str, src: list[list[int]], dst: list[list[int]]) -> None:
    """1-D tensor in boxes of the given sizes per rank (several, or none); each element holds
    the rank that loads it, so every loaded box is all `rank`."""
    owner = torch.repeat_interleave(torch.arange(W, dtype=torch.float32), torch.tensor([sum(s) for s in dst]))

    def build(c: Phase) -> Any:
        split = src if c.saving else dst
        start = sum(sum(s) for s in split[:c.rank])
        out = {}
        for i, n in enumerate(split[c.rank]):
            out[i] = c.box("a", owner, (start,), (n,))
            start += n
        return out
    CASES[name] = Case(build, DP8, DP8)


# -- test_serialization.py ----------------------------------------------------------------------

A24, B357 = ar(2, 4), ar(3, 5, 7)


@case(DP8, DP8)
def replicated_subset_load(c: Phase) -> Any:
    """Every rank holds both tensors whole (replica id = rank); only one is loaded back, which
    megatron's default strictness allows."""
    if c.saving:
        return {"sd_keyA": c.tensor("keyA", A24, replica=c.rank), "sd_keyB": c.tensor("keyB", B357, replica=c.rank)}
    return {"load_sd_keyA": c.tensor("keyA", A24, replica=c.rank)}


def _split(c: Phase) -> dict[str, Any]:
    return {"sd_keyA": c.tensor("keyA", ar(2 * W, 4), (0, c.rank, W)),
            "sd_keyB": c.tensor("keyB", ar(3, 5, 7 * W), (2, c.rank, W))}


@case(DP8, DP8)
def split_across_ranks(c: Phase) -> Any:
    return _split(c)


@case(DP8, DP8)
def common_state_comes_from_rank0(c: Phase) -> Any:
    """Plain values are megatron's common state: rank 0's are saved and every rank loads them."""
    return {**_split(c), "lr": c.value(0.01), "rank": c.value(c.rank, loaded=0)}


PC_A, PC_B = ar(2, 4), ar(4, 5, 10 * W)


def _tp_pp(c: Phase) -> dict[str, Any]:
    return {"sd_keyA": c.tensor("keyA", PC_A, (0, c.tp, c.tp_size), (1, c.pp, c.pp_size)),
            "sd_keyB": c.tensor("keyB", PC_B, (2, c.rank, W))}


@case(TP2PP4, TP2PP4)
def tp_pp_grid_loaded_whole(c: Phase) -> Any:
    if c.saving:
        return _tp_pp(c)
    return {"sd_keyA": c.tensor("keyA", PC_A, replica=c.rank), "sd_keyB": c.tensor("keyB", PC_B, replica=c.rank)}


@case(TP2PP4, TP1PP2)
def tp_pp_grid_resplit_with_prepended_axis(c: Phase) -> Any:
    """keyA split by DP on the other axis; keyB's first axis becomes a prepended one."""
    if c.saving:
        return _tp_pp(c)
    return {"sd_keyA": c.tensor("keyA", PC_A, (1, c.dp, c.dp_size), replica=c.pp),
            "sd_keyB": c.tensor("keyB", PC_B, (0, c.rank // 2, 4), prepend=1, replica=c.rank % 2)}


@case(DP8, DP8)
def factory_mixed_with_tensors(c: Phase) -> Any:
    """A list of three tensors and a factory of three parts, merged by summing them."""
    def parts(key: str, t: torch.Tensor, replica_id: Any, flattened_range: Any) -> Any:
        return [ShardedTensor.from_rank_offsets(key + p, t, replica_id=replica_id) for p in ("part1", "part2", "part3")]

    if c.expecting:
        return {"all": [ar(2), ar(3), ar(4), 3 * ar(5)]}
    data = ar(5) if c.saving else torch.full((5,), NAN)
    return {"all": [c.tensor(k, ar(n), replica=c.rank) for k, n in (("A", 2), ("B", 3), ("C", 4))]
            + [ShardedTensorFactory("D", data, parts, sum, replica_id=c.rank)]}


@case(DP8, DP8)
def sharded_object_bytesio(c: Phase) -> Any:
    buf = io.BytesIO()
    torch.save({"some": "dict"}, buf)
    return {"some_key": c.obj("sh_obj_A", buf, replica=c.rank)}


ROWS = ar(32).repeat(2, 1)  # (2, 32): every row is 0..31


def _rows(c: Phase) -> dict[str, Any]:
    return {"rigid": c.tensor("keyA", ROWS, (1, c.rank, W)),
            "flexible": c.tensor("keyB", ROWS, (1, c.rank, W), allow_shape_mismatch=True)}


PADDED = torch.cat([ROWS, torch.zeros(2, 4)], 1)  # (2, 36)


def _rows_loaded(c: Phase, rigid: torch.Tensor, flexible: torch.Tensor) -> dict[str, Any]:
    """Both tensors loaded split by PP over their columns: `rigid` and `flexible` give the global
    shape each asks for (the stored one is (2, 32)); beyond the stored columns a target keeps its
    zeros."""
    if c.saving:
        return _rows(c)
    return {"rigid": c.tensor("keyA", rigid, (1, c.pp, 4), replica=c.tp),
            "flexible": c.tensor("keyB", flexible, (1, c.pp, 4), replica=c.tp, allow_shape_mismatch=True, fill=0.0)}


@case(TP2PP4, TP2PP4, raises="load")
def global_shape_smaller_raises(c: Phase) -> Any:
    return _rows_loaded(c, ROWS[:, :28], ROWS)


@case(TP2PP4, TP2PP4, raises="load")
def global_shape_larger_raises(c: Phase) -> Any:
    return _rows_loaded(c, PADDED, ROWS)


@case(TP2PP4, TP2PP4)
def allow_shape_mismatch_smaller(c: Phase) -> Any:
    return _rows_loaded(c, ROWS, ROWS[:, :28])


@case(TP2PP4, TP2PP4)
def allow_shape_mismatch_larger_pads(c: Phase) -> Any:
    return _rows_loaded(c, ROWS, PADDED)


@case(DP8, DP8, route="common")
def empty_ranks_and_common_state(c: Phase) -> Any:
    """Rank 0 holds only a plain value, ranks 1-2 only plain values that are not saved (common
    state is rank 0's), ranks 3-7 a replicated tensor whose main replica is rank 3's."""
    if c.expecting:
        return {"common": "common-value", **({"a": torch.full((2,), 3.0)} if c.rank >= 3 else {})}
    if c.rank == 0:
        return {"common": "common-value"}
    if c.rank in (1, 2):
        return {"ab"[c.rank - 1]: 3}
    return {"a": ShardedTensor.from_rank_offsets("x", torch.ones(2) * c.rank, replica_id=c.rank - 3)}


@case(DP8, DP8, raises="save")
def save_leaving_a_box_uncovered_raises(c: Phase) -> Any:
    """No rank holds rows 5 of the tensor; megatron's save refuses such a sharding."""
    return {} if c.rank == 5 else {"x": c.tensor("x", ar(W, 4), (0, c.rank, W))}


@case(DP8, DP8, raises="save")
def save_with_main_replicas_that_overlap_raises(c: Phase) -> Any:
    """Every rank claims the main copy of the whole tensor, each with other values."""
    return {"x": c.tensor("x", ar(4, 4) + c.rank)}


@case(DP8, DP8)
def ranks_without_state(c: Phase) -> Any:
    """Rows of one tensor: saved by ranks 0 and 3-7, loaded by ranks 0-2; the others hold nothing."""
    holders = [0, 3, 4, 5, 6, 7] if c.saving else [0, 1, 2]
    if c.rank not in holders:
        return {}
    rows = 6 // len(holders)
    return {"x": c.box("x", ar(6, 4), (holders.index(c.rank) * rows, 0), (rows, 4))}


uneven("uneven_1d_resplit", [[n] for n in (1, 5, 7, 3, 6, 2, 5, 4)], [[n] for n in (14, 3, 6, 3, 1, 1, 2, 3)])
uneven("uneven_1d_zero_sized_boxes", [[5]] * 6 + [[0], [0]], [[n] for n in (5, 0, 5, 0, 5, 5, 3, 7)])
uneven("uneven_1d_one_rank_holds_all", [[15]] + [[0]] * 7, [[0]] * 3 + [[3]] * 5)
uneven("uneven_1d_several_boxes_per_rank", [[4], [7, 8], [1], [1], [1], [1], [1], [3, 3]],
       [[2, 4], [], [5], [], [5, 9], [], [1, 1, 1, 1, 1], []])


def _nonstrict(c: Phase) -> dict[str, Any]:
    """The state of megatron's strictness tests: replica ids of every kind, objects in a grid."""
    return {
        "TenA": c.tensor("TenA", ar(2), replica=c.rank),
        "TenB": c.tensor("TenB", ar(3 * W), (0, c.rank, W)),
        "TenC": c.tensor("TenC", ar(3), replica=W - c.rank - 1),  # main replica on the last rank
        "ObjA": c.obj("ObjA", list(range(10)), replica=c.rank),
        "ObjB": c.obj("ObjB", {c.rank + 7}, (1, W), (0, c.rank)),
    }


@case(DP8, DP8)
def load_what_was_saved(c: Phase) -> Any:
    return _nonstrict(c)


@case(DP8, DP8)
def load_fewer_keys_than_saved(c: Phase) -> Any:
    state = _nonstrict(c)
    if not c.saving:
        del state["TenA"], state["ObjB"]
    return state


@case(DP8, DP8, raises="load")
def load_keys_the_checkpoint_lacks_raises(c: Phase) -> Any:
    state = _nonstrict(c)
    if not c.saving:
        state["TenD"] = c.tensor("UnexpectedTenD", ar(3), replica=c.rank)
        state["ObjD"] = c.obj("UnexpectedObjD", None, replica=c.rank)
    return state


@case(DP8, DP8)
def sharded_objects_read_by_other_ranks(c: Phase) -> Any:
    """Each rank loads the grid cell another rank saved."""
    j = (c.rank + 3) % W
    return {**_nonstrict(c), **({} if c.saving else {"ObjB": c.obj("ObjB", {j + 7}, (1, W), (0, j))})}


# -- test_mapping.py: a factory whose build makes a dict ----------------------------------------


@case(DP8, DP8)
def factory_builds_dict_merge_picks_part(c: Phase) -> Any:
    full = ar(3 * W)

    def build(key: str, t: torch.Tensor, replica_id: Any, flattened_range: Any) -> Any:
        return {f"level2_{x}": ShardedTensor.from_rank_offsets(f"{key}part{i}", t + i, (0, c.rank, W),
                                                               replica_id=replica_id) for i, x in ((1, "a"), (2, "b"))}

    local = cut(full, ((0, c.rank, W),))
    if c.expecting:
        return {"level1": local + 2}
    data = local.clone() if c.saving else torch.full_like(local, NAN)
    return {"level1": ShardedTensorFactory("a", data, build, lambda x: x["level2_b"])}


# -- SwiGLU, as megatron's MLP and test_optimizer.py build it -----------------------------------

GLU = ar(2 * 8, 6)  # [W; V], each (8, 6)
GLU_STACK = ar(4, 2 * 8, 6)  # 4 stacked layers


def _fc1(c: Phase, prefix: str = "") -> Any:
    return {"fc1": c.swiglu(prefix + "mlp.linear_fc1.weight", GLU, replica=(0, 0, c.dp)),
            "fc1_bias": c.swiglu(prefix + "mlp.linear_fc1.bias", ar(16), replica=(0, 0, c.dp))}


CASES["swiglu_tp2_to_tp4"] = Case(_fc1, TP2, TP4)
CASES["swiglu_mimo_keys_tp1_to_tp8"] = Case(lambda c: _fc1(c, "language_model.decoder.layers."), DP8, TP8, route="keys")


@case(TP2PP2, TP4)
def swiglu_stacked_layers_tp2pp2_to_tp4(c: Phase) -> Any:
    per = 4 // c.pp_size
    return {f"layer{i}": c.swiglu("decoder.layers.mlp.linear_fc1.weight", GLU_STACK, (0, c.pp * per + i, 4),
                                  replica=(0, 0, c.dp)) for i in range(per)}


# -- test_flattened_resharding.py ---------------------------------------------------------------

FLAT = ar(8, 5, 40)
# megatron-core 0.19.2 dropped flattened_range (DistributedOptimizer no longer emits it): every
# flat case fails in megatron's own save or load with this error; mimo_ckpt must still pass them.
FLAT_FAILS = "CheckpointingException: ShardedTensor.flattened_range is not supported."


def _flat(c: Phase, flat_key: str = "flat", as_flat: bool = True) -> dict[str, Any]:
    """The unflat box replicated over DP, and the same box as DP slices, each shifted by the DP
    rank so that they differ in size (as the original builds them)."""
    splits = ((0, c.tp, c.tp_size), (2, c.pp, c.pp_size))
    per = FLAT.numel() // (c.tp_size * c.pp_size * c.dp_size)
    start = per * c.dp + c.dp
    stop = per * (c.dp + 1) + (c.dp + 1 if c.dp + 1 < c.dp_size else 0)
    flat = c.tensor(flat_key, FLAT, *splits, flat=(start, stop)) if as_flat else \
        c.tensor(flat_key, FLAT, *splits, replica=c.dp)
    return {"sd_key_unflat": c.tensor("unflat", FLAT, *splits, replica=c.dp), "sd_key_flat": flat}


for _save, _load in ((TP2PP4, TP2PP2), (TP8, TP1PP2), (DP8, TP2PP2)):
    _name = f"flat_tp{_save.tp}pp{_save.pp}dp{_save.dp}_to_tp{_load.tp}pp{_load.pp}dp{_load.dp}"
    CASES[_name] = Case(_flat, _save, _load, megatron_fails=FLAT_FAILS)


@case(TP1PP2, DP8, megatron_fails=FLAT_FAILS)
def flat_loaded_as_plain_tensors(c: Phase) -> Any:
    if c.saving:
        return _flat(c)
    return {"flat": c.tensor("flat", FLAT, replica=c.rank), "unflat": c.tensor("unflat", FLAT, replica=c.rank)}


@case(TP2PP4, TP1PP2, megatron_fails=FLAT_FAILS)
def plain_tensors_loaded_as_flat(c: Phase) -> Any:
    return _flat(c, as_flat=not c.saving)


@case(DP8, DP8, raises="save", megatron_fails=FLAT_FAILS)
def flat_slices_leaving_a_gap_raises(c: Phase) -> Any:
    """DP slices of one (6, 8) box, 6 elements each, but rank 3's stops short: [20, 24) is lost."""
    return {"flat": c.tensor("flat", ar(6, 8), flat=(6 * c.rank, 6 * c.rank + (2 if c.rank == 3 else 6)))}


FLAT_STACK = ar(4, 8, 6)  # 4 stacked layers


@case(TP2, TP1PP2, megatron_fails=FLAT_FAILS)
def flat_slices_of_stacked_layers(c: Phase) -> Any:
    """DP slices of each layer's box, whose first (layer) axis is prepended."""
    per, n = 4 // c.pp_size, 8 // c.tp_size * 6
    lo, hi = n * c.dp // c.dp_size, n * (c.dp + 1) // c.dp_size
    return {f"layer{i}": c.tensor("decoder.layers.fc.weight", FLAT_STACK, (0, c.pp * per + i, 4), (1, c.tp, c.tp_size),
                                  prepend=1, flat=(lo, hi)) for i in range(per)}


# -- prepended axes, containers, replicas, dtypes -------------------------------------------------

STACK = ar(8, 8, 4)  # 8 stacked layers


@case(TP2PP4, TP4PP2)
def stacked_layers_prepended_axis(c: Phase) -> Any:
    per = 8 // c.pp_size
    return {f"layer{i}": c.tensor("decoder.layers.linear.weight", STACK, (0, c.pp * per + i, 8),
                                  (1, c.tp, c.tp_size), prepend=1, replica=(0, 0, c.dp)) for i in range(per)}


@case(TP2, TP4)
def nested_dicts_and_lists(c: Phase) -> Any:
    return {
        "model": {"layers": [c.tensor("layers.0.w", ar(8, 6), (0, c.tp, c.tp_size), replica=c.dp),
                             c.tensor("layers.1.w", ar(6, 8), (1, c.tp, c.tp_size), replica=c.dp)],
                  "norm": {"weight": c.tensor("norm.weight", ar(6), replica=(c.tp, c.dp))}},
        "optimizer": {"param_groups": [c.obj("optimizer.param_groups", [{"lr": 0.1, "betas": (0.9, 0.99)}],
                                             replica=c.rank)],
                      "step": c.obj("optimizer.step", 7, replica=c.rank),
                      "step_tensor": c.tensor("optimizer.step_tensor", torch.tensor([3]), replica=c.rank, fill=-1)},
    }


@case(DP8, DP8)
def same_box_twice_on_a_rank(c: Phase) -> Any:
    """A rank holds a box twice under two paths, once as main replica and once not (as a tied
    output layer copies its embedding); a load fills both."""
    return {"embedding": c.tensor("emb", ar(W, 3), (0, c.rank, W)),
            "output_layer": c.tensor("emb", ar(W, 3), (0, c.rank, W), replica=1)}


@case(DP8, DP8)
def local_nonpersistent_object(c: Phase) -> Any:
    """Not saved; a load gives back the template's own value."""
    return {"w": c.tensor("w", ar(4 * W), (0, c.rank, W)),
            "local": c.local(f"saved-{c.rank}" if c.saving else f"kept-{c.rank}")}


@case(TP2, DP8)
def only_main_replicas_are_saved(c: Phase) -> Any:
    """Non-main replicas hold junk; tuple replica ids; the main copy of `b` is on rank 3."""
    if not c.saving:
        return {"w": c.tensor("w", ar(8, 6), replica=c.rank), "b": c.tensor("b", ar(6), replica=c.rank)}
    return {"w": c.tensor("w", ar(8, 6), (0, c.tp, c.tp_size), replica=(0, 0, c.dp), garbage=c.dp != 0),
            "b": c.tensor("b", ar(6), replica=(c.rank + 5) % W, garbage=(c.rank + 5) % W != 0)}


@case(DP8, DP8)
def dtype_cast_on_load(c: Phase) -> Any:
    """Saved in float32 (and bfloat16), loaded into bfloat16 and float64 (and float32) targets;
    every value is exact in each."""
    if c.saving:
        return {"w": c.tensor("w", ar(4, 2 * W), (1, c.rank, W)), "v": c.tensor("v", ar(W, 3), (0, c.rank, W)),
                "u": c.tensor("u", ar(W, 2), (0, c.rank, W), dtype=torch.bfloat16)}
    return {"w": c.tensor("w", ar(4, 2 * W), (1, c.rank // 2, W // 2), replica=c.rank % 2, dtype=torch.bfloat16),
            "v": c.tensor("v", ar(W, 3), replica=c.rank, dtype=torch.float64),
            "u": c.tensor("u", ar(W, 2), replica=c.rank, dtype=torch.float32)}


# -- optimizer state shapes (test_optimizer.py), through megatron MIMO keys -----------------------

OPT = {"language": ("language_model.", ar(6, 8)), "images": ("modality_submodules.images.", ar(4, 8) + 0.5)}


@case(TP2, TP4, route="keys", modules=tuple(OPT))
def optimizer_state_mimo_keys(c: Phase) -> Any:
    """Per module: a row-parallel weight, its Adam moments and fp32 main param keyed after it,
    and param_groups: megatron MIMO keys, through from_megatron / to_megatron."""
    model, state, groups = {}, {}, {}
    for module, (prefix, full) in OPT.items():
        key, split, rep = prefix + "decoder.layers.mlp.linear_fc2.weight", (1, c.tp, c.tp_size), (0, 0, c.dp)
        model[key] = c.tensor(key, full, split, replica=rep)
        for i, name in enumerate(("exp_avg", "exp_avg_sq", "fp32_param")):
            k = f"mimo.{module}.optimizer.state.{name}.{key}"
            state.setdefault(name, {})[key] = c.tensor(k, full * (i + 2), split, replica=rep)
        groups[module] = c.obj(f"mimo.{module}.optimizer.mimo.{module}.param_groups",
                               [{"lr": 1e-3, "betas": (0.9, 0.95), "step": 3, "params": [0]}], replica=c.rank)
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}}


@case(TP2, TP4, route="keys", megatron_fails=FLAT_FAILS)
def distributed_optimizer_flat_state_mimo_keys(c: Phase) -> Any:
    """DistributedOptimizer's layout: each DP rank holds a contiguous slice of its TP box of the
    main param and moments (`optimizer.state.param.*`), the weight replicated over DP."""
    key, full, split = "language_model.decoder.layers.mlp.linear_fc1.weight", ar(8, 10), (0, c.tp, c.tp_size)
    n = full.numel() // c.tp_size
    lo, hi = n * c.dp // c.dp_size, n * (c.dp + 1) // c.dp_size
    out = {"model": {key: c.tensor(key, full, split, replica=(0, 0, c.dp))}, "optimizer": {}}
    for i, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
        k = f"optimizer.state.{name}.{key}"
        out["optimizer"][name] = c.tensor(k, full + 100 * i, split, flat=(lo, hi))
    return out


# -- running ------------------------------------------------------------------------------------


def mismatch(got: Any, want: Any, path: str = "") -> str | None:
    """Where `got` differs from `want` (None when equal): structure, types, dtypes, values."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return f"{path or '/'}: keys {sorted(map(str, got)) if isinstance(got, dict) else type(got).__name__} " \
                   f"!= {sorted(map(str, want))}"
        return next((m for k in want if (m := mismatch(got[k], want[k], f"{path}/{k}"))), None)
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{path}: {type(got).__name__} {got!r:.80} != list of {len(want)}"
        return next((m for i, (g, w) in enumerate(zip(got, want)) if (m := mismatch(g, w, f"{path}/{i}"))), None)
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: {type(got).__name__} instead of a tensor"
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{path}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            return f"{path}: value at {bad} is {got[tuple(bad)].item()}, want {want[tuple(bad)].item()}"
        return None
    if isinstance(want, io.BytesIO):
        if not isinstance(got, io.BytesIO):
            return f"{path}: {type(got).__name__} instead of a BytesIO"
        got, want = (torch.load(io.BytesIO(b.getvalue())) for b in (got, want))
    if type(got) is not type(want) or got != want:
        return f"{path}: {got!r} != {want!r}"
    return None


def _state(c: Case, phase: str, rank: int) -> Any:
    return c.build(Phase(phase, rank, c.save if phase == "save" else c.load))


def run_mimo(c: Case, path: str, rank: int, comm: Any, stage: list[str]) -> Any:
    import mimo_ckpt
    from mimo_ckpt.interop.megatron_keys import COMMON_METADATA, from_megatron, split_common, to_megatron, with_common

    def layouts(grid: Grid) -> dict[str, ModuleLayout]:
        return {m: grid.layout for m in c.modules}

    saved, template = _state(c, "save", rank), _state(c, "load", rank)
    if c.route == "common":  # megatron's common state: rank 0's plain values, on every rank
        saved, common = split_common(saved)
        mimo_ckpt.save({MODULE: saved}, path, layouts=layouts(c.save), comm=comm, metadata={COMMON_METADATA: common})
        stage.append("load")
        result = mimo_ckpt.load({MODULE: split_common(template)[0]}, path, layouts=layouts(c.load), comm=comm,
                                strict="requested")
        return with_common(result.state[MODULE], result.metadata[COMMON_METADATA])
    keys = c.route == "keys"
    mimo_ckpt.save(from_megatron(saved) if keys else {MODULE: saved}, path, layouts=layouts(c.save), comm=comm)
    stage.append("load")
    # megatron's default strictness (ASSUME_OK_UNEXPECTED): stored keys may go unrequested
    result = mimo_ckpt.load(from_megatron(template) if keys else {MODULE: template}, path,
                            layouts=layouts(c.load), comm=comm, strict="requested")
    return to_megatron(template, result.state) if keys else result.state[MODULE]


def _megatron_validation(state: Any) -> None:
    """The sharding check megatron's save makes, with its verdict shared: megatron checks on
    rank 0 alone, and the other ranks would go on into the save and wait there."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    try:
        save_preprocess(state)
        error = ""
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - shared below
        error = f"{type(exc).__name__}: {exc}"
    errors: list[str] = [""] * W
    dist.all_gather_object(errors, error)
    if any(errors):
        raise CheckpointingException(next(e for e in errors if e))


def run_megatron(c: Case, path: str, rank: int, comm: Any, stage: list[str]) -> Any:
    from megatron.core import dist_checkpointing

    from examples.megatron_mimo import cpu_dist_checkpointing

    if rank == 0:
        os.makedirs(path)
    _megatron_validation(_state(c, "save", rank))
    with cpu_dist_checkpointing():
        dist_checkpointing.save(_state(c, "save", rank), path)
    stage.append("load")
    return dist_checkpointing.load(_state(c, "load", rank), path)


def outcome(c: Case, run: Callable[[list[str]], Any], expected: Any, clean_error: type) -> str:
    """"ok", or one line saying how this rank's result differs from the reference."""
    stage = ["save"]
    try:
        got = run(stage)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported
        if os.environ.get("MEGATRON_CASES_TRACE"):
            traceback.print_exc()
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        error = f"{type(exc).__name__} in {stage[-1]}: {' / '.join(lines[:4])[:400]}"
        if c.raises == stage[-1] and isinstance(exc, clean_error):
            return "ok"
        return f"{error} (want {'a ' + clean_error.__name__ + ' in ' + c.raises if c.raises else 'no error'})"
    if c.raises:
        return f"no error (want a {clean_error.__name__} in {c.raises})"
    return f"differs from the reference: {m}" if (m := mismatch(got, expected)) else "ok"


def run_all(args: dict[str, Any]) -> dict[str, Any]:
    """On every rank: each case through mimo_ckpt, then each through megatron."""
    from mimo_ckpt import TorchComm

    rank = dist.get_rank()
    dist.destroy_process_group()  # again, with a timeout that turns a stall into an error
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args['port']}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=STALL_S))
    comm = TorchComm.with_timeout(STALL_S)
    out: dict[str, Any] = {name: {} for name in CASES}
    for lib, run, clean in (("mimo", run_mimo, MimoCkptError), ("megatron", run_megatron, BaseException)):
        for name, c in CASES.items():
            path = os.path.join(args["root"], lib, name)
            start = time.perf_counter()
            out[name][lib] = outcome(c, partial(run, c, path, rank, comm), _state(c, "expect", rank), clean)
            out[name][f"{lib}_s"] = round(time.perf_counter() - start, 3)
    return out
