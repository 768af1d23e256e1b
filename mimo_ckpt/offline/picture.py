"""An SVG picture of a checkpoint's layouts: which ranks hold which boxes of a tensor, per module."""

from __future__ import annotations

from html import escape

from mimo_ckpt.format.manifest import Manifest, ModuleEntry, StoredTensor
from mimo_ckpt.model.split import box_for_rank
from mimo_ckpt.plan.save import writer_of

__all__ = ["write_picture", "render_svg"]

_PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
            "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f"]
_W, _H = 560, 220


def _holders(entry: ModuleEntry, t: StoredTensor) -> dict[int, list[int]]:
    """Shard index -> ranks of the saved layout holding that box (from the split hint)."""
    out: dict[int, list[int]] = {i: [] for i in range(len(t.shards))}
    if t.split is None:
        return out
    index = {s.box: i for i, s in enumerate(t.shards)}
    for rank in entry.layout.ranks:
        i = index.get(box_for_rank(t.split, t.global_shape, entry.layout, rank))
        if i is not None:
            out[i].append(rank)
    return out


def _axes(t: StoredTensor) -> tuple[int | None, int | None]:
    nd = len(t.global_shape)
    if nd == 0:
        return None, None
    if nd == 1:
        return None, 0
    cuts = [len({s.box.offset[d] for s in t.shards}) for d in range(nd)]
    a, b = sorted(sorted(range(nd), key=lambda d: (-cuts[d], -d))[:2])
    return a, b


def _module_svg(name: str, entry: ModuleEntry, key: str, y0: int) -> list[str]:
    t = entry.tensors[key]
    out = [f'<text x="10" y="{y0 + 18}" font-size="15" font-weight="bold">module {escape(name)}: '
           f'{escape(entry.layout.describe())}</text>',
           f'<text x="10" y="{y0 + 38}" font-size="12">tensor {escape(key)} {t.dtype} {list(t.global_shape)}</text>']
    rows, cols = _axes(t)
    shape = t.global_shape
    top = y0 + 50
    holders = _holders(entry, t)
    for i, s in enumerate(t.shards):
        def span(axis: int | None, extent: int) -> tuple[float, float]:
            if axis is None or shape[axis] == 0:
                return 0.0, float(extent)
            return extent * s.box.offset[axis] / shape[axis], extent * s.box.shape[axis] / shape[axis]
        x, w = span(cols, _W)
        y, h = span(rows, _H)
        writer = writer_of(s.file)
        colour = _PALETTE[writer % len(_PALETTE)] if writer is not None else "#ffffff"
        ranks = holders[i]
        label = (("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))) if ranks \
            else f"written by {s.file.rsplit('/', 1)[-1]}"
        out.append(f'<rect x="{10 + x:.1f}" y="{top + y:.1f}" width="{max(w, 1):.1f}" height="{max(h, 1):.1f}" '
                   f'fill="{colour}" stroke="#333" stroke-width="1"><title>{escape(str(s.box))} in '
                   f'{escape(s.file)}</title></rect>')
        out.append(f'<text x="{10 + x + w / 2:.1f}" y="{top + y + h / 2:.1f}" font-size="11" '
                   f'text-anchor="middle" dominant-baseline="middle">{escape(label)}</text>')
    def name(axis: int | None) -> str:
        cut = "-".join(t.split[axis]) if t.split is not None and axis is not None and t.split[axis] else ""
        return f"dim {axis}" + (f" (cut by {cut})" if cut else "")
    axis_text = f"rows: {name(rows)}, columns: {name(cols)}" if rows is not None else f"columns: {name(cols)}"
    out.append(f'<text x="10" y="{top + _H + 16}" font-size="11" fill="#555">{axis_text}</text>')
    out.append(f'<text x="10" y="{top + _H + 30}" font-size="11" fill="#555">label: ranks holding the box; '
               f'colour: rank that wrote it (white: a file not named by rank)</text>')
    return out


def render_svg(manifest: Manifest, modules: list[str], key: str | None = None) -> str:
    parts: list[str] = []
    y = 0
    for name in modules:
        entry = manifest.modules[name]
        if not entry.tensors or (key is not None and key not in entry.tensors):
            continue
        chosen = key or max(entry.tensors, key=lambda k: (len(entry.tensors[k].shards), entry.tensors[k].nbytes))
        parts += _module_svg(name, entry, chosen, y)
        y += _H + 100
    height = max(y, 40)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W + 20}" height="{height}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(parts) + "\n</svg>\n")


def write_picture(manifest: Manifest, modules: list[str], path: str, key: str | None = None) -> None:
    with open(path, "w") as f:
        f.write(render_svg(manifest, modules, key))
