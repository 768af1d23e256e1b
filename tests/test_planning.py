"""Pure planning: no process group, no I/O."""

import pytest

from mimo_ckpt.model.box import Box, first_overlap
from mimo_ckpt.format.checksums import ShardSums
from mimo_ckpt.errors import ManifestError, PlanError
from mimo_ckpt.plan.load import plan_module_load
from mimo_ckpt.model.layout import ModuleLayout
from mimo_ckpt.plan.options import SaveOptions
from mimo_ckpt.plan.save import plan_module_save
from mimo_ckpt.model.shard import ObjectMeta, TensorMeta


def meta(key, offset, shape, gshape, main=True, dtype="F32"):
    return TensorMeta(key, dtype, tuple(gshape), Box(tuple(offset), tuple(shape)), main)


@pytest.mark.parametrize("replicas, per_writer", [("spread", {0: 2, 1: 2, 2: 2, 3: 2}), ("main", {1: 8})])
def test_replicas_written_once_by_the_main_replica_or_spread(replicas, per_writer):
    # 4 DP replicas of 8 equal boxes, rank 1 the main one: each box written once, by rank 1, or
    # 2 per replica.
    metas = {r: [meta(f"w{i}", (0,), (10,), (10,), main=r == 1) for i in range(8)] for r in range(4)}
    plan = plan_module_save("m", ModuleLayout(dp=4), metas, {}, replicas=replicas)
    written = [(i.key, i.box) for f in plan.files for i in f.items]
    assert sorted(written) == sorted({(f"w{i}", Box((0,), (10,))) for i in range(8)})
    assert {f.writer: len(f.items) for f in plan.files} == per_writer


def test_plain_replicas_that_all_claim_main_share_the_writes_and_none_main_is_refused():
    metas = {r: [meta(f"w{i}", (0,), (10,), (10,), main=True) for i in range(8)] for r in range(4)}
    plan = plan_module_save("m", ModuleLayout(dp=4), metas, {})
    assert sorted(len(f.items) for f in plan.files) == [2, 2, 2, 2]
    metas = {r: [meta("w", (0,), (10,), (10,), main=False)] for r in range(4)}
    with pytest.raises(PlanError, match=r"'w', box \[0:10\]: held by ranks \[0, 1, 2, 3\], none of them the main"):
        plan_module_save("m", ModuleLayout(dp=4), metas, {})


def test_byte_ranges_are_disjoint_and_follow_the_header():
    metas = {r: [meta("w", (r * 3, 0), (3, 4), (6, 4)), meta("b", (), (), (), dtype="I64")] for r in range(2)}
    plan = plan_module_save("m", ModuleLayout(dp=4), metas, {})
    for f in plan.files:
        pos = len(f.prefix)
        for item in f.items:
            assert item.begin == pos
            pos = item.end
    assert sum(len(f.items) for f in plan.files) == 3


def test_a_writers_large_share_is_cut_into_files_of_about_equal_bytes():
    sizes = [10, 300, 20, 50, 200, 5, 120, 90, 7]
    metas = {0: [meta(f"w{i}", (0,), (n,), (n,)) for i, n in enumerate(sizes)], 1: []}
    whole = plan_module_save("m", ModuleLayout(dp=2), metas, {}, file_tag="t").files_of(0)
    assert [f.path for f in whole] == ["m/r00000-t.safetensors"]

    plan = plan_module_save("m", ModuleLayout(dp=2), metas, {}, file_tag="t",
                            options=SaveOptions(part_bytes=700))  # 3208 bytes: 4 parts (the most)
    files = plan.files_of(0)
    assert [f.path for f in files] == ["m/r00000-t.safetensors"] + [f"m/r00000.{p}-t.safetensors" for p in (1, 2, 3)]
    assert [(i.key, i.box) for f in files for i in f.items] == [(i.key, i.box) for i in whole[0].items]
    part_bytes = [sum(i.end - i.begin for i in f.items) for f in files]
    assert all(abs(b - sum(part_bytes) / 4) <= 4 * max(sizes) / 2 for b in part_bytes), part_bytes
    for f in files:
        assert f.items[0].begin == len(f.prefix)

    two = plan_module_save("m", ModuleLayout(dp=2), metas, {}, options=SaveOptions(part_bytes=1200))
    assert len(two.files_of(0)) == 2 and two.options.part_bytes == 1200

    crcs = {f.path: [ShardSums(n) for n in range(len(f.items))] for f in files}
    entry = plan.module_entry(ModuleLayout(dp=2), crcs)
    for f in files:
        for n, item in enumerate(f.items):
            (shard,) = entry.tensors[item.key].shards
            assert (shard.file, shard.begin, shard.crc32c) == (f.path, item.begin, n)


def test_inconsistent_global_shape_or_dtype_is_named():
    with pytest.raises(PlanError, match=r"'w'.*rank 0.*rank 1"):
        plan_module_save("m", ModuleLayout(dp=4), {0: [meta("w", (0,), (2,), (4,))], 1: [meta("w", (2,), (2,), (5,))]}, {})
    with pytest.raises(PlanError, match="F16"):
        plan_module_save("m", ModuleLayout(dp=4), {0: [meta("w", (0,), (2,), (4,))], 1: [meta("w", (2,), (2,), (4,), dtype="F16")]}, {})


def test_gaps_are_an_error():
    with pytest.raises(PlanError, match="cover 6 of 8"):
        plan_module_save("m", ModuleLayout(dp=4), {0: [meta("w", (0, 0), (3, 2), (4, 2))]}, {})


def test_object_without_main_replica_is_an_error():
    objs = {0: [ObjectMeta("o", (), (), False, None)]}
    with pytest.raises(PlanError, match="main replica"):
        plan_module_save("m", ModuleLayout(dp=4), {}, objs)


@pytest.mark.parametrize("grid_limit", [4_000_000, 0])  # the grid path and the sweep path
def test_first_overlap(grid_limit):
    boxes = [Box((0, 0), (2, 2)), Box((2, 0), (2, 2)), Box((1, 1), (2, 2)), Box((0, 0), (0, 5))]
    assert first_overlap(boxes, grid_limit) in [(0, 2), (1, 2)]
    tiling = [Box((r, c), (1, 2)) for r in range(4) for c in (0, 2)] + [Box((0, 0), (0, 4))]
    assert first_overlap(tiling, grid_limit) is None
    assert first_overlap(tiling + [Box((3, 1), (1, 2))], grid_limit) in [(6, 9), (7, 9)]
    assert first_overlap([Box((), ()), Box((), ())], grid_limit) == (0, 1)


def _stored_entry(boxes, gshape):
    from mimo_ckpt.format.manifest import ModuleEntry, StoredShard, StoredTensor

    shards, pos = [], 0
    for b in boxes:
        shards.append(StoredShard(b, "m/r0.safetensors", pos, pos + 4 * b.volume, 0))
        pos += 4 * b.volume
    return ModuleEntry(ModuleLayout(), {"w": StoredTensor("F32", gshape, tuple(shards))}, {})


def test_load_plan_reads_only_overlaps():
    # stored: TP2 on dim 1 of (4, 8); wanted: TP4 on dim 0 -> rows of both halves
    entry = _stored_entry([Box((0, 0), (4, 4)), Box((0, 4), (4, 4))], (4, 8))
    items = plan_module_load("m", entry, [meta("w", (1, 0), (1, 8), (4, 8))])
    assert [(i.overlap, i.end - i.begin) for i in items] == [
        (Box((1, 0), (1, 4)), 16), (Box((1, 4), (1, 4)), 16)]
    assert all(i.contiguous and not i.whole_shard for i in items)
    # a column strip spans rows: the span is the bounding range of the shard's rows
    items = plan_module_load("m", entry, [meta("w", (0, 2), (4, 1), (4, 8))])
    assert len(items) == 1 and items[0].end - items[0].begin == 4 * (3 * 4 + 1) and not items[0].contiguous


def test_load_plan_rejects_uncovered_requests():
    entry = _stored_entry([Box((0,), (4,))], (8,))
    with pytest.raises(ManifestError, match="covers 2 of 4"):
        plan_module_load("m", entry, [meta("w", (2,), (4,), (8,))])


def test_save_plan_at_scale():
    # 4096 simulated ranks of one module (TP8 x DP512), 20 tensors each, on one core.
    tp, dp = 8, 512
    metas = {}
    for r in range(tp * dp):
        t, d = r % tp, r // tp
        metas[r] = [meta(f"layer{k}.w", (t * 16, 0), (16, 64), (16 * tp, 64), main=d == 0) for k in range(20)]
    plan = plan_module_save("lm", ModuleLayout(tp=tp, dp=dp), metas, {}, replicas="spread")
    assert sum(len(f.items) for f in plan.files) == 20 * tp
    assert len(plan.files) == 20 * tp  # spread: one box per writer
    plan = plan_module_save("lm", ModuleLayout(tp=tp, dp=dp), metas, {})
    assert sorted(f.writer for f in plan.files) == list(range(tp))  # the main replicas, DP rank 0


def test_collector_pause_nests_across_threads_and_restores_the_callers_setting():
    import gc
    import threading

    from mimo_ckpt.run.gc_pause import collector_paused

    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def hold():
        with collector_paused():
            inside.set()
            release.wait(10)

    other = threading.Thread(target=hold)
    other.start()
    inside.wait(10)
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread is still planning
    release.set()
    other.join()
    assert gc.isenabled()
    gc.disable()  # a caller who runs with the collector off keeps it off
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_one_object_is_found_under_either_spelling_of_its_place():
    """A plain value (grid none) and megatron's single ShardedObject (grid (1,)) are one object:
    a torch_dist round trip turns the first into the second, and a load must not refuse it."""
    from mimo_ckpt.format.manifest import ModuleEntry, StoredObject
    from mimo_ckpt.plan.load import check_keys, stored_object_value

    entry = ModuleEntry(layout=ModuleLayout(), tensors={}, objects={"cfg": StoredObject((1,), {(0,): 7})})
    report, skipped = check_keys("m", entry, [], [("cfg", ())])
    assert not report.mismatched and not skipped
    report, skipped = check_keys("m", entry, [], [("cfg", (2,))])
    assert report.mismatched and skipped == {"cfg"}
    assert stored_object_value({(0,): 7}, ()) == 7 and stored_object_value({(): 7}, (0,)) == 7
    with pytest.raises(KeyError):
        stored_object_value({(0,): 7, (1,): 8}, ())
