"""CopyWaves on CPU: the same code as on CUDA, with synchronous copies. Whatever point the
optimizer step comes at, every destination ends up with the bytes its source had before."""

import threading
import time

import pytest
import torch

from mimo_ckpt.io.copy_waves import CopyWaves, cloned_tail, waves_of
from mimo_ckpt.io.staging import SideCopies, flat_bytes


def test_waves_cover_every_item_once_in_order():
    lengths = [5, 1, 9, 30, 2, 2, 2, 7]
    waves = waves_of(lengths, 10)
    assert [i for a, b in waves for i in range(a, b)] == list(range(len(lengths)))
    assert all(sum(lengths[a:b - 1]) < 10 for a, b in waves)  # a wave closes at the item that fills it
    assert waves_of([], 10) == [] and waves_of([3], 10) == [(0, 1)]


@pytest.mark.parametrize("lengths, spare, start", [
    ([4, 4, 4], 0, 3), ([4, 4, 4], 4, 2), ([4, 4, 4], 7, 2), ([4, 4, 4], 12, 0), ([4, 9, 1], 9, 2), ([], 5, 0),
])
def test_the_cloned_tail_is_the_longest_that_fits(lengths, spare, start):
    assert cloned_tail(lengths, spare) == start


def sources():
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(64, 33, generator=g).t(),  # not contiguous: copied in C order
           torch.randint(-100, 100, (500,), generator=g, dtype=torch.int16),
           torch.randn(1000, generator=g).to(torch.bfloat16),
           torch.randn(7, generator=g, dtype=torch.float64)]
    return out * 3


def destinations(srcs):
    return [torch.zeros(s.numel() * s.element_size(), dtype=torch.uint8) for s in srcs]


@pytest.mark.parametrize("waves_first", [0, 1, 3])
@pytest.mark.parametrize("spare", [0, 3000, 1 << 30])
def test_a_release_at_any_point_leaves_every_destination_with_the_bytes_before_it(monkeypatch, waves_first, spare):
    srcs = sources()
    before = [flat_bytes(s).clone() for s in srcs]
    dsts = destinations(srcs)
    cloned = []
    original = CopyWaves._copy_through_clone
    monkeypatch.setattr(CopyWaves, "_copy_through_clone", lambda self, pairs: (cloned.append(len(pairs)),
                                                                             original(self, pairs)))
    waves = CopyWaves(SideCopies(None), list(zip(dsts, srcs)), wave_bytes=4000)
    for _ in range(waves_first):
        assert waves.issue_wave() is not False
    rest = [d.numel() for d in dsts][sum(b - a for a, b in waves_of([d.numel() for d in dsts], 4000)[:waves_first]):]
    waves.release(spare)
    assert waves.issued() and waves.copied()
    assert cloned == ([len(rest) - cloned_tail(rest, spare)] if cloned_tail(rest, spare) < len(rest) else [])
    for s in srcs:
        s.fill_(0)  # the optimizer step
    waves.run()  # the background thread, late: nothing is left to issue
    waves.release(spare)
    waves.wait_copied()
    assert all(torch.equal(d, b) for d, b in zip(dsts, before))


def test_running_every_wave_copies_everything_and_a_release_after_changes_nothing():
    srcs = sources()
    dsts = destinations(srcs)
    waves = CopyWaves(SideCopies(None), list(zip(dsts, srcs)), wave_bytes=1)
    assert not waves.issued()
    waves.run()
    assert waves.copied()
    assert all(torch.equal(d, flat_bytes(s)) for d, s in zip(dsts, srcs))
    assert waves.issue_wave() is False
    waves.release(1 << 30)
    assert CopyWaves(SideCopies(None), []).copied()


def test_a_failing_copy_ends_the_waves_so_that_nobody_waits_forever():
    srcs = sources()
    dsts = destinations(srcs)
    dsts[5] = dsts[5][:-1]  # one byte short
    waves = CopyWaves(SideCopies(None), list(zip(dsts, srcs)), wave_bytes=1)
    with pytest.raises(RuntimeError):
        waves.run()
    assert waves.issued()
    waves.wait_copied()


class SlowCopies(SideCopies):
    """Copies that take a while, so that a release lands while a wave is being issued."""

    def copy(self, dst, src):
        time.sleep(0.0005)
        super().copy(dst, src)


def test_a_release_racing_the_background_thread_still_copies_each_source_before_it_changes():
    for attempt in range(30):
        srcs = sources() * 4
        before = [flat_bytes(s).clone() for s in srcs]
        dsts = destinations(srcs)
        waves = CopyWaves(SlowCopies(None), list(zip(dsts, srcs)), wave_bytes=2000 + 997 * attempt, ahead=1)
        background = threading.Thread(target=waves.run)
        background.start()
        time.sleep(0.0003 * attempt)
        waves.release(spare_bytes=(attempt % 3) * 5000)
        for s in srcs:
            s.fill_(0)  # the step, right after its hook
        background.join()
        waves.wait_copied()
        assert all(torch.equal(d, b) for d, b in zip(dsts, before)), f"attempt {attempt}"
