"""`mimo-ckpt reshard` arguments and the split rules it replays, on small real checkpoints."""

import pytest
import torch

import mimo_ckpt
from mimo_ckpt import LayoutError, ModuleLayout, TensorShard, ThreadWorld
from mimo_ckpt.model.box import Box
from mimo_ckpt.cli import main
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.offline.reshard import plan_reshard
from mimo_ckpt.model.split import balanced_part
from mimo_ckpt.io.storage import open_storage
from optim.params import zero1_rows
from tests.conftest import run_threads

OPT = "optimizer.state.exp_avg.w"


def _save(path, layout: ModuleLayout, rank_state) -> None:
    """Save module 'language' under `layout`, one thread per rank."""
    def fn(comm, rank):
        mimo_ckpt.save({"language": rank_state(layout, rank)}, path, layouts={"language": layout}, comm=comm)
    _, errors = run_threads(ThreadWorld(layout.size), fn)
    assert not errors, errors


def _cut(full: torch.Tensor, offset, shape) -> torch.Tensor:
    view = full
    for dim, (o, s) in enumerate(zip(offset, shape)):
        view = view.narrow(dim, o, s)
    return view.clone()


def _tp_pp_state(layout: ModuleLayout, rank: int) -> dict:
    """Stacked layers (4, 8, 6): dim 0 by PP, dim 1 by TP; a norm replicated everywhere."""
    c = layout.coords(rank)
    layers = torch.arange(4 * 8 * 6, dtype=torch.float32).reshape(4, 8, 6)
    offset, shape = (c["pp"] * 2, c["tp"] * 4, 0), (2, 4, 6)
    return {
        "layers.weight": TensorShard("layers.weight", _cut(layers, offset, shape), (4, 8, 6), offset),
        "norm.weight": TensorShard("norm.weight", torch.ones(6), (6,), (0,), c["tp"] == 0),
    }


def _whole_state(layout: ModuleLayout, rank: int) -> dict:
    return {"w": TensorShard.whole("w", torch.arange(32, dtype=torch.float32).reshape(8, 4))}


def _zero1_box(rows: int, cols: int, layout: ModuleLayout, rank: int) -> Box:
    """The box NativeModuleOptimizer(shard_state=True) keeps: rows of its TP part, split over dp x cp."""
    c = layout.coords(rank)
    part = rows // layout.tp
    members = sorted(r for r in layout.ranks if all(layout.coords(r)[d] == c[d] for d in ("tp", "ep", "pp")))
    begin, end = zero1_rows(part, members.index(rank), len(members))
    return Box((c["tp"] * part + begin, 0), (end - begin, cols))


def _zero1_state(rows: int, cols: int):
    full = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)

    def state(layout: ModuleLayout, rank: int) -> dict:
        box = _zero1_box(rows, cols, layout, rank)
        return {OPT: TensorShard(OPT, _cut(full, box.offset, box.shape), (rows, cols), box.offset)}
    return state


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory):
    path = tmp_path_factory.mktemp("args") / "tp2pp2"
    _save(path, ModuleLayout(tp=2, pp=2), _tp_pp_state)
    return path


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    path = tmp_path_factory.mktemp("args") / "tp1"
    _save(path, ModuleLayout(), _whole_state)
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(capsys, *argv) -> str:
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and "error:" in err, (rc, err)
    return err


# --- 1: sizes not named keep the saved ones; uneven model-parallel splits are refused ------------


def test_sizes_not_named_keep_their_saved_value(tp2pp2, tmp_path, capsys):
    rc, out, _ = _run(capsys, "reshard", tp2pp2, tmp_path / "x", "--module", "language=tp4", "--dry-run")
    assert rc == 0
    assert "-> [tp4 pp2 @ranks 0-7]" in out


def test_a_tp_split_that_does_not_divide_a_dimension_is_refused(tp2pp2, tmp_path, capsys):
    err = _one_line_error(capsys, "reshard", tp2pp2, tmp_path / "x", "--module", "language=tp3", "--dry-run")
    for part in ("'language'", "'layers.weight'", "dimension 1", "8", "tp=3", "--allow-uneven"):
        assert part in err, err
    rc, out, _ = _run(capsys, "reshard", tp2pp2, tmp_path / "x", "--module", "language=tp3", "--allow-uneven",
                      "--dry-run")
    assert rc == 0 and "tp3" in out
    with pytest.raises(LayoutError, match="dimension 0 .* pp=3"):
        plan_reshard(read_manifest(open_storage(str(tp2pp2))), {"language": ModuleLayout(tp=2, pp=3)})


# --- 2: a parallel dim growing from 1 that no hint names ------------------------------------------


def test_tp_growing_from_one_without_a_hint_is_refused(tp1, tmp_path, capsys):
    err = _one_line_error(capsys, "reshard", tp1, tmp_path / "x", "--module", "language=tp2", "--dry-run")
    for part in ("'language'", "tp grows from 1 to 2", "'w'", "hint"):
        assert part in err, err
    manifest = read_manifest(open_storage(str(tp1)))
    with pytest.raises(LayoutError, match="pp grows from 1 to 2"):
        plan_reshard(manifest, {"language": ModuleLayout(pp=2)})


def test_dp_cp_ep_growing_from_one_still_replicate(tp1, tmp_path, capsys):
    manifest = read_manifest(open_storage(str(tp1)))
    layout = ModuleLayout(dp=2, cp=2, ep=2)
    plan = plan_reshard(manifest, {"language": layout})["language"].plan
    assert [i.box for f in plan.files for i in f.items] == [Box((0, 0), (8, 4))]
    rc, _, _ = _run(capsys, "reshard", tp1, tmp_path / "dp2", "--module", "language=dp2", "-q")
    assert rc == 0
    assert _run(capsys, "diff", tp1, tmp_path / "dp2", "-q")[0] == 0


# --- 3: argument errors are one line, exit 2 -------------------------------------------------------


def test_a_module_given_twice_is_refused(tp2pp2, tmp_path, capsys):
    err = _one_line_error(capsys, "reshard", tp2pp2, tmp_path / "x", "--module", "language=tp1",
                          "--module", "language=dp4", "--dry-run")
    assert "'language'" in err and "more than once" in err


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_workers_must_be_positive(tp2pp2, tmp_path, capsys, workers):
    err = _one_line_error(capsys, "reshard", tp2pp2, tmp_path / "x", "--module", "language=tp1",
                          "--workers", workers, "--dry-run")
    assert "--workers" in err


@pytest.mark.parametrize("option", ["--include", "--exclude"])
def test_a_bad_export_regex_is_a_one_line_error(tp2pp2, tmp_path, capsys, option):
    err = _one_line_error(capsys, "export", tp2pp2, "--module", "language", "--format", "safetensors", "--to", tmp_path / "hf",
                          option, "(")
    assert option in err and "'('" in err
    assert not (tmp_path / "hf").exists()


# --- 4: one balanced rule for reshard and ZeRO-1 ---------------------------------------------------


@pytest.mark.parametrize("rows,count", [(7, 3), (10, 4), (5, 2), (2, 4), (0, 3), (9, 3)])
def test_zero1_rows_are_the_balanced_parts(rows, count):
    for i in range(count):
        begin, size = balanced_part(rows, count, i)
        assert zero1_rows(rows, i, count) == (begin, begin + size)
    sizes = [e - b for b, e in (zero1_rows(rows, i, count) for i in range(count))]
    assert sizes == sorted(sizes, reverse=True)  # remainder to the first, as torch.tensor_split


@pytest.mark.parametrize("old,new", [
    (ModuleLayout(tp=2, dp=2), ModuleLayout(tp=2, dp=3)),       # TP part 4 rows -> 2, 1, 1
    (ModuleLayout(dp=2, cp=2), ModuleLayout(dp=3, cp=2)),       # 10 rows flat over dp x cp = 6
    (ModuleLayout(tp=2, dp=3), ModuleLayout(tp=1, dp=4)),
])
def test_resharded_uneven_optimizer_boxes_are_what_zero1_asks_for(tmp_path, capsys, old, new):
    rows, cols = (8, 3) if old.tp > 1 else (10, 3)
    _save(tmp_path / "src", old, _zero1_state(rows, cols))
    manifest = read_manifest(open_storage(str(tmp_path / "src")))
    plan = plan_reshard(manifest, {"language": new})["language"].plan
    for rank in new.ranks:
        written = [i.box for f in plan.files_of(rank) for i in f.items if i.key == OPT]
        assert written == [_zero1_box(rows, cols, new, rank)], rank

    text = ",".join(f"{d}{getattr(new, d)}" for d in ("tp", "cp", "dp"))
    rc, _, err = _run(capsys, "reshard", tmp_path / "src", tmp_path / "dst", "--module", f"language={text}", "-q")
    assert rc == 0, err
    shards = read_manifest(open_storage(str(tmp_path / "dst"))).modules["language"].tensors[OPT].shards
    assert sorted(s.box.offset for s in shards) == sorted(_zero1_box(rows, cols, new, r).offset for r in new.ranks)
    assert _run(capsys, "diff", tmp_path / "src", tmp_path / "dst", "-q")[0] == 0


def test_hints_survive_a_reshard_to_size_one_so_it_can_split_again(tmp_path):
    """tp2 -> tp1 -> tp2: the tp1 checkpoint keeps the source's tp hints, so the second reshard
    cuts the same tensors again, and its output loads bit-exactly under tp2."""
    from tests.commit_cases import LAYOUTS, load_problems, save_world

    save_world(tmp_path / "tp2")
    assert main(["reshard", str(tmp_path / "tp2"), str(tmp_path / "tp1"), "--module", "images=tp1", "--quiet"]) == 0
    assert main(["reshard", str(tmp_path / "tp1"), str(tmp_path / "back"), "--module", "images=tp2", "--quiet"]) == 0
    for path in ("tp2", "tp1", "back"):
        stored = read_manifest(open_storage(str(tmp_path / path))).modules["images"].tensors["vision.proj.weight"]
        assert stored.split[0] == ("tp",), (path, stored.split)
    back = read_manifest(open_storage(str(tmp_path / "back"))).modules["images"]
    assert back.layout == LAYOUTS["images"]
    assert load_problems(tmp_path / "back", LAYOUTS) == []
