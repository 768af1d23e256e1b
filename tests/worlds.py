"""Functions run on every rank of a local gloo world (see tests.harness.local_world)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import mimo_ckpt
from mimo_ckpt import ModuleLayout
from examples.synthetic_state import check_rank_state, rank_state

WORLD = 8

# Named layouts over 8 ranks. Disjoint ones put images first; colocated ones share all ranks.
LAYOUTS = {
    "A": {"images": dict(tp=2), "language": dict(tp=2, pp=3, rank_offset=2)},
    "B": {"images": dict(dp=2), "language": dict(tp=2, pp=3, rank_offset=2)},
    "C": {"images": dict(tp=2), "language": dict(pp=2, dp=3, rank_offset=2)},
    "D": {"images": dict(tp=2), "language": dict(tp=2, cp=3, rank_offset=2)},
    "E": {"images": dict(tp=2), "language": dict(ep=2, pp=3, rank_offset=2)},
    "F": {"images": dict(tp=2, dp=4), "language": dict(tp=2, dp=4)},
    "G": {"images": dict(tp=4, dp=2, order=("dp", "tp", "cp", "ep", "pp")),
          "language": dict(tp=2, ep=2, dp=2)},
    "I": {"images": dict(dp=4), "language": dict(tp=2, pp=2, rank_offset=4)},
    "J": {"images": dict(tp=2, dp=3, order=("dp", "cp", "ep", "pp", "tp")),
          "language": dict(tp=2, pp=1, rank_offset=6)},
}

# (save, load): one module changed, both changed, disjoint <-> colocated, rank offsets moved.
PAIRS = [
    ("A", "A"), ("A", "B"), ("A", "C"), ("A", "D"), ("A", "E"), ("B", "C"), ("A", "F"),
    ("F", "G"), ("G", "I"), ("I", "A"), ("C", "E"), ("E", "B"), ("I", "J"), ("J", "F"),
]


def layouts(name: str) -> dict[str, ModuleLayout]:
    return {m: ModuleLayout(**kw) for m, kw in LAYOUTS[name].items()}


def reshard_matrix(args: dict) -> dict:
    """Save each needed layout once, then load every pair; returns problems per pair."""
    rank, root = dist.get_rank(), args["root"]
    comm = mimo_ckpt.TorchComm()
    for name in sorted({s for s, _ in PAIRS}):
        lay = layouts(name)
        state = {m: rank_state(m, l, rank) for m, l in lay.items() if l.contains(rank)}
        mimo_ckpt.save(state, os.path.join(root, name), layouts=lay, comm=comm,
                       metadata={"layout_name": name})
    out = {}
    for i, (src, dst) in enumerate(PAIRS):
        lay = layouts(dst)
        targets = {m: rank_state(m, l, rank, fill=float("nan")) for m, l in lay.items() if l.contains(rank)}
        # every other pair with replicas sharing reads (each stored byte read once, then broadcast)
        options = mimo_ckpt.ReadOptions(share_bytes=4 << 10 if i % 2 else 0)
        result = mimo_ckpt.load(targets, os.path.join(root, src), layouts=lay, comm=comm, read_options=options)
        problems = [p for m in targets for p in check_rank_state(m, lay[m], rank, result.state[m])]
        out[f"{src}->{dst}"] = {"modules": sorted(targets), "problems": problems}
    out["strict"] = _strict_error_crosses_modules(comm, root, rank)
    return out


def _strict_error_crosses_modules(comm, root: str, rank: int) -> dict:
    """A key only the language ranks ask for fails the load on every rank, without a hang."""
    lay = layouts("A")
    targets = {m: rank_state(m, l, rank, fill=0.0) for m, l in lay.items() if l.contains(rank)}
    if "language" in targets:
        extra = targets["language"]["iteration"]
        targets["language"]["no.such.key"] = mimo_ckpt.TensorShard("no.such.key", extra.data, (), ())
    try:
        mimo_ckpt.load(targets, os.path.join(root, "A"), layouts=lay, comm=comm)
    except mimo_ckpt.MimoCkptError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}


# Layouts for the CLI tests: save disjoint, then reshard images offline to TP1 x DP2.
CLI_SAVE = {"images": dict(tp=2), "language": dict(tp=2, pp=2, rank_offset=2)}
CLI_NEW = {"images": dict(dp=2), "language": dict(tp=2, pp=2, rank_offset=2)}


def _with_rng(state: dict, layout: ModuleLayout, rank: int) -> dict:
    """Add per-rank (layout-bound) state, as RNG states are."""
    c = layout.coords(rank)
    state["rank_state.rng"] = mimo_ckpt.ObjectShard("rank_state.rng", {"seed": rank}, (layout.pp, layout.tp), (c["pp"], c["tp"]))
    return state


def save_for_cli(args: dict) -> None:
    rank, lay = dist.get_rank(), {m: ModuleLayout(**kw) for m, kw in CLI_SAVE.items()}
    state = {m: _with_rng(rank_state(m, l, rank), l, rank) for m, l in lay.items() if l.contains(rank)}
    mimo_ckpt.save(state, args["path"], layouts=lay, metadata={"step": 3})


def load_both(args: dict) -> dict:
    """Load SRC and DST under the new layout; both must equal the reference, bit for bit."""
    rank, lay = dist.get_rank(), {m: ModuleLayout(**kw) for m, kw in CLI_NEW.items()}
    out = {}
    for name in ("src", "dst"):
        targets = {m: rank_state(m, l, rank, fill=float("nan")) for m, l in lay.items() if l.contains(rank)}
        result = mimo_ckpt.load(targets, args[name], layouts=lay, strict=False)
        out[name] = {
            "problems": [p for m in targets for p in check_rank_state(m, lay[m], rank, result.state[m])],
            "bytes": {f"{m}/{k}": v.reshape(-1).view(torch.uint8).tolist()
                      for m in targets for k, v in result.state[m].items() if isinstance(v, torch.Tensor)},
            "unexpected": {m: v for m, v in result.report.unexpected.items()},
        }
    return out
