"""CheckpointManager drives async saves: `latest` and retention move when the background commit
lands, and a process killed between staging and commit leaves both as they were; saves and loads
in one process need no process group."""

import os
import subprocess
import sys
import textwrap

import mimo_ckpt
from mimo_ckpt import ModuleLayout, ThreadWorld
from mimo_ckpt.run.manager import CheckpointManager
from tests.commit_cases import LAYOUTS, WORLD, load_problems, run_forked, states
from tests.conftest import run_threads


def _async_steps(root, steps, keep_last=2):
    """Ranks as threads: each saves `steps` through one manager and one saver (its own comm, as
    the background thread's collectives need); after each save commits, what every rank sees."""
    saver_world = ThreadWorld(WORLD)

    def fn(comm, rank):
        manager = CheckpointManager(root, keep_last=keep_last, comm=comm)
        saver = mimo_ckpt.AsyncSaver(saver_world.comm(rank))
        seen = []
        for step in steps:
            handle = manager.async_save(states(LAYOUTS, rank), step, layouts=LAYOUTS, saver=saver)
            handle.wait()
            seen.append((manager.latest_step(), manager.committed_steps()))
        return seen
    results, errors = run_threads(ThreadWorld(WORLD), fn)
    assert not errors, errors
    return results


def _latest(root):
    return (root / "latest").read_text().strip()


def test_async_saves_move_latest_and_retention_when_they_commit(tmp_path):
    root = tmp_path / "run"
    seen = _async_steps(root, [1, 2, 3, 4, 5])
    assert seen[0] == seen[1]
    assert seen[0] == [(1, [1]), (2, [1, 2]), (3, [2, 3]), (4, [3, 4]), (5, [4, 5])]
    assert _latest(root) == "step_000000005"
    assert sorted(os.listdir(root)) == ["latest", "step_000000004", "step_000000005"]
    assert load_problems(root / "step_000000005") == []


def test_a_kill_between_staging_and_commit_leaves_latest_and_the_kept_steps(tmp_path):
    root = tmp_path / "run"
    _async_steps(root, [1, 2])
    # the background thread dies writing step 3: the process is killed after staging
    code = run_forked(lambda: _async_steps(root, [3]), fault="save.write@0")
    assert code == -9
    assert _latest(root) == "step_000000002"
    assert CheckpointManager(root).committed_steps() == [1, 2]
    assert load_problems(root / "step_000000002") == []
    seen = _async_steps(root, [3, 4])  # step 3 again takes the dead save over
    assert seen[0] == [(3, [2, 3]), (4, [3, 4])]
    assert not [n for n in os.listdir(root / "step_000000004") if n.startswith(".saving-")]


def test_one_process_saves_loads_and_manages_without_a_process_group(tmp_path):
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist, mimo_ckpt
        from mimo_ckpt import ModuleLayout
        assert not dist.is_initialized()
        one = {{"m": ModuleLayout()}}
        w = torch.arange(12.0).view(3, 4)
        mimo_ckpt.save({{"m": {{"w": w, "step": 3}}}}, "{tmp_path}/c", layouts=one)
        out = {{"m": {{"w": torch.zeros(3, 4), "step": 0}}}}
        result = mimo_ckpt.load(out, "{tmp_path}/c", layouts=one)
        assert torch.equal(out["m"]["w"], w) and result.state["m"]["step"] == 3
        manager = mimo_ckpt.CheckpointManager("{tmp_path}/run", keep_last=1)
        saver = mimo_ckpt.AsyncSaver()
        for step in (1, 2):
            manager.async_save({{"m": {{"w": w + step}}}}, step, layouts=one, saver=saver).wait()
        assert manager.committed_steps() == [2]
        try:
            mimo_ckpt.save({{"m": {{"w": w}}}}, "{tmp_path}/x", layouts={{"m": ModuleLayout(tp=2)}})
        except mimo_ckpt.LayoutError as exc:
            print("refused:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert done.returncode == 0, done.stderr
    assert "refused: module 'm'" in done.stdout
