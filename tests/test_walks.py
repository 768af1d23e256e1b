"""The two walks of docs/architecture.md, recorded from real calls: from `save()` to the storage
call that writes the bytes and from `load()` to the reads that fill the tensor, the stack goes down the layers (run -> plan ->
io) without climbing back into an upper one."""

import sys

import torch

import mimo_ckpt
from mimo_ckpt import ModuleLayout, ThreadWorld, TensorShard
from tests.test_layers import ORDER

LAYOUTS = {"m": ModuleLayout()}


def _layers(frames: list[str]) -> list[str]:
    """The layers of the package's frames, outermost first, with repeats collapsed."""
    out: list[str] = []
    for module in frames:
        parts = module.split(".")
        if parts[0] != "mimo_ckpt" or len(parts) < 3:
            continue
        if not out or out[-1] != parts[1]:
            out.append(parts[1])
    return out


def _stack_at(target, call) -> list[str]:
    """Module names of the frames on the stack the first time `target` runs: a Python function's
    code object, or a builtin (os.pwrite)."""
    seen: list[list[str]] = []

    def profile(frame, event, arg):
        hit = (event == "call" and frame.f_code is target) or (event == "c_call" and arg is target)
        if hit and not seen:
            stack, f = [], frame
            while f is not None:
                stack.append(f.f_globals.get("__name__", ""))
                f = f.f_back
            seen.append(stack[::-1])

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    assert seen, f"{target} was never called"
    return seen[0]


def _downwards(layers: list[str]) -> bool:
    return all(ORDER.index(a) >= ORDER.index(b) for a, b in zip(layers, layers[1:]))


def test_save_walks_down_to_the_write(tmp_path):
    state = {"m": {"w": TensorShard.whole("w", torch.arange(64.0))}}
    comm = ThreadWorld(1).comm(0)
    from mimo_ckpt.io.storage import LocalStorage

    # the last frame in the calling thread: its pool threads pwrite the pieces
    stack = _stack_at(LocalStorage.write_file.__code__,
                      lambda: mimo_ckpt.save(state, tmp_path / "c", layouts=LAYOUTS, comm=comm))
    layers = _layers(stack)
    assert layers[0] == "run" and layers[-1] == "io" and _downwards(layers), layers


def test_load_walks_down_to_the_filled_tensor(tmp_path):
    from mimo_ckpt.io.read import execute_reads

    comm = ThreadWorld(1).comm(0)
    mimo_ckpt.save({"m": {"w": TensorShard.whole("w", torch.arange(64.0))}}, tmp_path / "c", layouts=LAYOUTS, comm=comm)
    target = torch.zeros(64)
    stack = _stack_at(execute_reads.__code__, lambda: mimo_ckpt.load(
        {"m": {"w": TensorShard.whole("w", target)}}, tmp_path / "c", layouts=LAYOUTS, comm=comm))
    layers = _layers(stack)
    assert layers[0] == "run" and layers[-1] == "io" and _downwards(layers), layers
    assert torch.equal(target, torch.arange(64.0))


def test_a_climb_back_is_seen():
    assert not _downwards(["run", "io", "plan", "io"])
    assert _layers(["x", "mimo_ckpt.run.save", "mimo_ckpt.run.save", "mimo_ckpt.io.storage"]) == ["run", "io"]
