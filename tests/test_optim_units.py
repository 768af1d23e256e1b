"""Pure parts of optim/: group membership, replica ownership, ZeRO-1 rows, loss scaling."""

import pytest
import torch

from mimo_ckpt import LayoutError, ModuleLayout, ShardError
from mimo_ckpt.model.box import Box
from optim import DynamicLossScaler, ShardedParam, peer_rank_lists
from optim.loss_scale import ConstantLossScaler
from optim.params import SliceRef, first_holders, first_key_holders, zero1_rows


def test_peer_rank_lists_follow_the_dimension_order():
    layout = ModuleLayout(tp=2, pp=2, dp=2, rank_offset=4)  # tp fastest, then pp, then dp
    assert peer_rank_lists(layout, ("tp",)) == [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert peer_rank_lists(layout, ("dp",)) == [[4, 8], [5, 9], [6, 10], [7, 11]]
    assert peer_rank_lists(layout, ("dp", "cp")) == peer_rank_lists(layout, ("dp",))
    assert peer_rank_lists(layout, ("tp", "cp", "ep", "pp", "dp")) == [list(range(4, 12))]
    dp_first = ModuleLayout(tp=2, dp=2, order=("dp", "tp", "cp", "ep", "pp"))
    assert peer_rank_lists(dp_first, ("dp",)) == [[0, 1], [2, 3]]


def test_every_box_is_counted_by_exactly_one_rank():
    a, b = Box((0,), (4,)), Box((4,), (4,))
    refs = {
        3: [SliceRef("w", a), SliceRef("bias", Box((), ()))],
        1: [SliceRef("w", b), SliceRef("bias", Box((), ()))],
        2: [SliceRef("w", a)],
    }
    assert first_holders(refs) == {SliceRef("w", b): 1, SliceRef("bias", Box((), ())): 1, SliceRef("w", a): 2}
    assert first_key_holders(refs) == {"w": 1, "bias": 1}
    assert SliceRef.from_wire(SliceRef("w", a).to_wire()) == SliceRef("w", a)


@pytest.mark.parametrize("rows,count", [(8, 2), (7, 3), (2, 4), (1, 2), (0, 3)])
def test_zero1_rows_tile_dimension_zero_in_order(rows, count):
    spans = [zero1_rows(rows, i, count) for i in range(count)]
    assert spans[0][0] == 0 and spans[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    sizes = [e - b for b, e in spans]
    assert max(sizes) - min(sizes) <= 1


def test_dynamic_loss_scaler_backs_off_after_hysteresis_and_grows_after_clean_intervals():
    s = DynamicLossScaler(scale=64.0, growth_interval=2, hysteresis=2, min_scale=16.0)
    s.update(True)
    assert s.scale == 64.0  # one overflow is absorbed by hysteresis
    s.update(True)
    assert s.scale == 32.0
    s.update(True)
    assert s.scale == 16.0
    s.update(True)
    assert s.scale == 16.0  # floor
    s.update(False)
    s.update(False)
    assert s.scale == 32.0 and s.hysteresis_tracker == 2
    restored = DynamicLossScaler()
    restored.load_state_dict(s.state_dict())
    assert restored == s
    with pytest.raises(ShardError, match="kind 'constant'"):
        restored.load_state_dict(ConstantLossScaler(4.0).state_dict())
    with pytest.raises(ValueError):
        DynamicLossScaler(scale=0.0)


def test_sharded_param_rejects_a_box_outside_its_tensor():
    with pytest.raises(ShardError, match="'w'.*does not fit"):
        ShardedParam("w", torch.nn.Parameter(torch.zeros(3, 2)), (4, 2), (2, 0))
    with pytest.raises(ShardError, match="non-empty"):
        ShardedParam("", torch.nn.Parameter(torch.zeros(1)), (1,), (0,))
    whole = ShardedParam.whole("b", torch.nn.Parameter(torch.zeros(5)))
    assert whole.box == Box((0,), (5,)) and whole.global_shape == (5,)


def test_a_grid_with_extra_dimensions_is_refused():
    from optim.groups import as_layout

    class Grid:
        dim_names, shape, rank_offset = ["tp", "gtp_remat"], [2, 2], 0

    with pytest.raises(LayoutError, match="gtp_remat"):
        as_layout("vision", Grid())
    with pytest.raises(LayoutError, match="'vision'"):
        as_layout("vision", {"tp": 2})


def test_stacked_layers_share_a_key_and_differ_in_their_box():
    """megatron stacks a module's layers under one key with a prepended layer axis."""
    layer1 = ShardedParam("decoder.layers.w", torch.nn.Parameter(torch.zeros(3, 2)), (4, 3, 2), (1, 0, 0), prepend_axes=1)
    assert layer1.box == Box((1, 0, 0), (1, 3, 2)) and layer1.name == "decoder.layers.w[1]"
    with pytest.raises(ShardError, match="does not fit"):
        ShardedParam("decoder.layers.w", torch.nn.Parameter(torch.zeros(3, 2)), (4, 3, 2), (4, 0, 0), prepend_axes=1)


def test_a_part_places_a_run_of_rows_and_is_named_by_them():
    param = torch.nn.Parameter(torch.zeros(4, 2))
    gate = ShardedParam("fc1.w", param, (8, 2), (2, 0), rows=(0, 2))
    up = ShardedParam("fc1.w", param, (8, 2), (6, 0), rows=(2, 4))
    assert gate.box == Box((2, 0), (2, 2)) and up.box == Box((6, 0), (2, 2))
    assert gate.name != up.name and up.part(param).data_ptr() == param[2:].data_ptr()
    with pytest.raises(ShardError, match="rows \\[2, 5\\]"):
        ShardedParam("fc1.w", param, (8, 2), (6, 0), rows=(2, 5))
