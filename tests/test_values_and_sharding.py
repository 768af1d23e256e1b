import numpy as np
import pytest
import torch

from mimo_ckpt import ModuleLayout
from mimo_ckpt.model.box import Box
from mimo_ckpt.model.split import box_for_rank, infer_split
from mimo_ckpt.format.values import Summary, as_float64
from examples.synthetic_state import OPTIM, SPECS, rank_boxes


@pytest.mark.parametrize("dtype, code", [
    (torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.float8_e5m2, "F8_E5M2"), (torch.int16, "I16"),
])
def test_every_bit_pattern_converts_like_torch(dtype, code):
    raw_dtype = {1: torch.uint8, 2: torch.uint16}[torch.empty(0, dtype=dtype).element_size()]
    codes = torch.arange(2 ** (8 * torch.empty(0, dtype=dtype).element_size()), dtype=torch.int64).to(raw_dtype)
    want = codes.view(dtype).double().numpy()
    got = as_float64(codes.numpy(), code)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_summary_accumulates_piecewise():
    values = np.array([1.0, -2.0, np.nan, np.inf, 4.0])
    s = Summary()
    s.add(values[:2])
    s.add(values[2:])
    assert s.to_json() == {"count": 5, "nan": 1, "inf": 1, "min": -2.0, "max": 4.0, "mean": 1.0,
                           "norm": pytest.approx(21 ** 0.5)}


@pytest.mark.parametrize("module, layout", [
    ("language", ModuleLayout(tp=2, pp=3, rank_offset=2)),
    ("language", ModuleLayout(ep=2, pp=3, order=("pp", "ep", "tp", "cp", "dp"))),
    ("images", ModuleLayout(tp=2, dp=3, order=("dp", "cp", "ep", "pp", "tp"))),
])
def test_inferred_split_replays_the_layout(module, layout):
    boxes: dict[str, dict[int, Box]] = {}
    for rank in layout.ranks:
        for key, (offset, shape, _) in rank_boxes(module, layout, rank).items():
            boxes.setdefault(key, {})[rank] = Box(tuple(offset), tuple(shape))
    uneven = set(OPTIM[module]) if layout.dp > 1 else set()
    replayed = 0
    for key, by_rank in boxes.items():
        global_shape = SPECS[module][key if key in SPECS[module] else OPTIM[module][key][0]][0]
        split = infer_split(layout, by_rank, len(global_shape))
        if key == "decoder.layers.mlp.experts.weight":
            assert split[0] == ("pp",) and split[1] == (("ep",) if layout.ep > 1 else ())
        if key in uneven:
            assert split[0] == ("tp", "dp")  # TP-major, DP inside each TP part
            continue
        for rank, box in by_rank.items():
            assert box_for_rank(split, global_shape, layout, rank) == box, (key, rank)
            replayed += 1
    assert replayed > 2 * layout.size
