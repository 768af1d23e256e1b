"""Compare two checkpoints tensor by tensor and object by object, streaming under a budget.

The two may use different layouts: each stored box of A is read piece by piece and compared
with the same region assembled from B's boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mimo_ckpt.format.manifest import Manifest, StoredTensor
from mimo_ckpt.io.progress import Progress
from mimo_ckpt.io.storage import Storage
from mimo_ckpt.io.stream import Budget, iter_box
from mimo_ckpt.format.values import as_float64

__all__ = ["Difference", "diff_checkpoints"]


@dataclass(frozen=True, slots=True)
class Difference:
    module: str
    kind: str  # "tensor" or "object"
    key: str
    status: str  # identical, different, only in A, only in B, shape/dtype differ
    max_abs_diff: float | None = None
    elements_differing: int = 0

    def to_json(self) -> dict:
        return {"module": self.module, "kind": self.kind, "key": self.key, "status": self.status,
                "max_abs_diff": self.max_abs_diff, "elements_differing": self.elements_differing}


def _compare_tensor(sa: Storage, sb: Storage, module: str, key: str, ta: StoredTensor, tb: StoredTensor,
                    budget: Budget, bar: Progress | None) -> Difference:
    if ta.dtype != tb.dtype or ta.global_shape != tb.global_shape:
        return Difference(module, "tensor", key,
                          f"differ: {ta.dtype}{list(ta.global_shape)} vs {tb.dtype}{list(tb.global_shape)}")
    half = Budget(budget.chunk_bytes // 2, budget.temp_bytes)
    buf_b = np.empty(half.chunk_bytes, dtype=np.uint8)
    worst, count = 0.0, 0
    for shard in ta.shards:
        for piece, a in iter_box(sa, module, key, ta, shard.box, half):
            b = next(iter_box(sb, module, key, tb, piece, Budget(piece.volume * a.itemsize, budget.temp_bytes), buf_b))[1]
            if bar:
                bar.advance(2 * a.nbytes)
            unequal = a != b
            if not unequal.any():
                continue
            count += int(unequal.sum())
            fa, fb = as_float64(a[unequal], ta.dtype), as_float64(b[unequal], ta.dtype)
            with np.errstate(invalid="ignore"):
                delta = np.abs(fa - fb)
            worst = math.nan if np.isnan(delta).any() or math.isnan(worst) else max(worst, float(delta.max()))
    if count == 0:
        return Difference(module, "tensor", key, "identical", 0.0, 0)
    return Difference(module, "tensor", key, "different", worst, count)


def diff_checkpoints(sa: Storage, ma: Manifest, sb: Storage, mb: Manifest, *, budget: Budget,
                     progress: bool = True, modules: list[str] | None = None) -> list[Difference]:
    names = sorted(set(ma.modules) | set(mb.modules))
    if modules is not None:
        names = [n for n in names if n in modules]
    total = sum(2 * ma.modules[n].nbytes for n in names if n in ma.modules and n in mb.modules)
    bar = Progress("diff", total) if progress else None
    out: list[Difference] = []
    for name in names:
        a, b = ma.modules.get(name), mb.modules.get(name)
        if a is None or b is None:
            out.append(Difference(name, "module", "*", "only in B" if a is None else "only in A"))
            continue
        for key in sorted(set(a.tensors) | set(b.tensors)):
            if key not in b.tensors or key not in a.tensors:
                out.append(Difference(name, "tensor", key, "only in A" if key in a.tensors else "only in B"))
                continue
            out.append(_compare_tensor(sa, sb, name, key, a.tensors[key], b.tensors[key], budget, bar))
        for key in sorted(set(a.objects) | set(b.objects)):
            if key not in b.objects or key not in a.objects:
                out.append(Difference(name, "object", key, "only in A" if key in a.objects else "only in B"))
                continue
            oa, ob = a.objects[key], b.objects[key]
            # Compared as stored (object_codec): decoded, io.BytesIO values would compare by identity.
            same = oa.global_shape == ob.global_shape and dict(oa.values) == dict(ob.values)
            out.append(Difference(name, "object", key, "identical" if same else "different"))
    if bar:
        bar.close()
    return out
