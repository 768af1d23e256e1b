"""Raw stored values as float64 for summaries and comparisons (numpy only, every stored dtype)."""

from __future__ import annotations

import numpy as np

from mimo_ckpt.model.dtypes import NUMPY_NAMES

__all__ = ["as_float64", "Summary"]


def _e4m3fn_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    normal = sign * (1 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = sign * (man / 8.0) * np.exp2(-6.0)
    table = np.where(exp == 0, subnormal, normal)
    table[(exp == 0xF) & (man == 0x7)] = np.nan  # e4m3fn has no inf; S.1111.111 is NaN
    return table


_E4M3 = _e4m3fn_table()


def as_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Values of a raw (unsigned int) array holding elements of the stored `dtype`."""
    with np.errstate(invalid="ignore"):  # NaN payloads cast quietly
        return _as_float64(raw, dtype)


def _as_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "F8_E5M2":
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float64)
    if dtype == "F8_E4M3":
        return _E4M3[raw]
    return raw.view(np.dtype(NUMPY_NAMES[dtype])).astype(np.float64)


class Summary:
    """min / max / mean / L2 norm and non-finite counts, accumulated piece by piece."""

    def __init__(self) -> None:
        self.count = self.nan = self.inf = 0
        self.total = self.sumsq = 0.0
        self.min, self.max = float("inf"), float("-inf")

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)
        self.count += flat.size
        nan = np.isnan(flat)
        inf = np.isinf(flat)
        self.nan += int(nan.sum())
        self.inf += int(inf.sum())
        finite = flat[~(nan | inf)]
        if finite.size:
            self.min = min(self.min, float(finite.min()))
            self.max = max(self.max, float(finite.max()))
            self.total += float(finite.sum())
            self.sumsq += float(np.dot(finite, finite))

    def to_json(self) -> dict[str, float | int | None]:
        finite = self.count - self.nan - self.inf
        return {
            "count": self.count, "nan": self.nan, "inf": self.inf,
            "min": self.min if finite else None, "max": self.max if finite else None,
            "mean": self.total / finite if finite else None, "norm": self.sumsq ** 0.5,
        }
