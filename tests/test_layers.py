"""The package's layers (docs/architecture.md): each folder imports only folders below it, no
module imports another in a circle, and only run/ talks to other ranks."""

import ast
import pathlib
import sys

import mimo_ckpt

ROOT = pathlib.Path(mimo_ckpt.__file__).parent
ORDER = ["errors", "model", "format", "plan", "io", "run", "offline", "interop", "cli"]
"""Lowest first; a module may import its own folder and the folders before it."""
PURE = {"model", "format", "plan", "io"}
"""Layers that never reach other ranks: no torch.distributed, nothing from run/."""


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                submodule = (ROOT.parent / full.replace(".", "/")).with_suffix(".py").exists()
                out.add(full if submodule else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in ROOT.rglob("*.py")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mimo_ckpt" and len(parts) > 1 else None


def test_every_module_sits_in_a_known_layer():
    assert {_layer(m) for m in _graph()} - {None} <= set(ORDER)


def test_folders_import_only_downwards():
    bad = []
    for module, imports in _graph().items():
        layer = _layer(module)
        if layer is None:  # the package's front door re-exports from every layer
            continue
        for target in imports:
            other = _layer(target)
            if other is not None and ORDER.index(other) > ORDER.index(layer):
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_pure_layers_never_reach_other_ranks():
    bad = [f"{module} -> {target}" for module, imports in _graph().items() if _layer(module) in PURE
           for target in imports if target.startswith("torch.distributed") or _layer(target) == "run"]
    assert bad == []


def test_no_import_cycle():
    imports = _graph()
    graph = {m: {t for t in targets if t in imports} for m, targets in imports.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """A planted upward import and cycle are caught, so the tests above can fail."""
    pkg = tmp_path / "mimo_ckpt"
    (pkg / "model").mkdir(parents=True)
    (pkg / "run").mkdir()
    for f in ("__init__.py", "model/__init__.py", "run/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "model" / "a.py").write_text("import torch.distributed\nfrom mimo_ckpt.run.b import x\n")
    (pkg / "run" / "b.py").write_text("from mimo_ckpt.model.a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    graph = _graph()
    assert graph["mimo_ckpt.model.a"] == {"torch.distributed", "mimo_ckpt.run.b"}
    for check in (test_folders_import_only_downwards, test_pure_layers_never_reach_other_ranks, test_no_import_cycle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} missed the planted violation")
