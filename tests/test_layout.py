import itertools

import pytest

from mimo_ckpt import LayoutError, ModuleLayout


@pytest.mark.parametrize("sizes, order, offset", [
    (dict(tp=2, pp=3), ("tp", "cp", "ep", "pp", "dp"), 2),
    (dict(tp=2, cp=2, dp=2), ("tp", "cp", "dp", "pp", "ep"), 0),
    (dict(tp=2, dp=3), ("dp", "cp", "ep", "pp", "tp"), 1),
    (dict(ep=2, pp=2, dp=2), ("pp", "dp", "ep", "tp", "cp"), 4),
])
def test_coords_match_hyper_comm_grid(monkeypatch, sizes, order, offset):
    layout = ModuleLayout(**sizes, order=order, rank_offset=offset)
    monkeypatch.setenv("WORLD_SIZE", str(offset + layout.size))
    grid = layout.to_hyper_comm_grid()
    assert ModuleLayout.from_hyper_comm_grid(grid) == layout
    for dim in ("tp", "cp", "ep", "pp", "dp"):
        for group in grid.get_rank_enum(dim):
            # ranks in one group differ only in `dim`, which runs 0..size-1 in order
            coords = [layout.coords(r) for r in group]
            assert [c[dim] for c in coords] == list(range(getattr(layout, dim)))
            others = {tuple(v for k, v in c.items() if k != dim) for c in coords}
            assert len(others) == 1
    for rank in layout.ranks:
        assert layout.rank_of(**layout.coords(rank)) == rank
        assert layout.contains(rank) and not layout.contains(offset + layout.size)


def test_json_round_trip_and_errors():
    layout = ModuleLayout(tp=4, dp=2, order=("dp", "tp", "cp", "ep", "pp"), rank_offset=8)
    assert ModuleLayout.from_json(layout.to_json()) == layout
    assert list(layout.ranks) == list(range(8, 16))
    with pytest.raises(LayoutError, match="tp=0"):
        ModuleLayout(tp=0)
    with pytest.raises(LayoutError, match="permutation"):
        ModuleLayout(order=("tp", "tp", "cp", "pp", "dp"))
    with pytest.raises(LayoutError, match="unknown layout fields"):
        ModuleLayout.from_json({"tp": 2, "zz": 1})
    with pytest.raises(LayoutError, match="outside"):
        ModuleLayout(tp=2).coords(5)


def test_all_coordinates_distinct():
    layout = ModuleLayout(tp=2, cp=2, ep=2, pp=2, dp=2, rank_offset=3)
    seen = {tuple(layout.coords(r).values()) for r in layout.ranks}
    assert len(seen) == 32 and seen == set(itertools.product(range(2), repeat=5))
