"""The one dtype table: names as safetensors spells them, their size, and their torch and numpy
equivalents. Every other dtype mapping in the package is derived from it."""

from __future__ import annotations

from typing import Any

from mimo_ckpt.errors import ShardError

__all__ = ["ITEMSIZE", "FLOATS", "NUMPY_NAMES", "TORCH_NAMES", "RAW_BY_ITEMSIZE", "castable", "from_torch", "to_torch"]

_TABLE: tuple[tuple[str, int, str, str | None], ...] = (
    # code, itemsize, torch name, numpy name (None: numpy has no such type; read through its bits)
    ("F64", 8, "float64", "float64"), ("F32", 4, "float32", "float32"), ("F16", 2, "float16", "float16"),
    ("BF16", 2, "bfloat16", None), ("F8_E4M3", 1, "float8_e4m3fn", None), ("F8_E5M2", 1, "float8_e5m2", None),
    ("I64", 8, "int64", "int64"), ("I32", 4, "int32", "int32"), ("I16", 2, "int16", "int16"), ("I8", 1, "int8", "int8"),
    ("U64", 8, "uint64", "uint64"), ("U32", 4, "uint32", "uint32"), ("U16", 2, "uint16", "uint16"), ("U8", 1, "uint8", "uint8"),
    ("BOOL", 1, "bool", "uint8"),
)

ITEMSIZE: dict[str, int] = {code: size for code, size, _, _ in _TABLE}
FLOATS: frozenset[str] = frozenset(code for code, *_ in _TABLE if code.startswith(("F", "BF")))
NUMPY_NAMES: dict[str, str] = {code: np_name for code, _, _, np_name in _TABLE if np_name}
"""Codes numpy reads directly (BOOL as its bytes)."""
RAW_BY_ITEMSIZE: dict[int, str] = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}
"""The unsigned type of each itemsize: how every dtype moves as bits (numpy and torch names)."""
TORCH_NAMES: dict[str, str] = {code: torch_name for code, _, torch_name, _ in _TABLE}


def castable(stored: str, wanted: str) -> bool:
    """Whether a load may cast `stored` values to `wanted`, as megatron's loader does: between
    floating-point types (fp32 master weights into bf16, and back); never between kinds."""
    return stored == wanted or (stored in FLOATS and wanted in FLOATS)


def from_torch(dtype: Any, *, key: str = "?") -> str:
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in TORCH_NAMES.items():
        if torch_name == name:
            return code
    raise ShardError(f"tensor {key!r}: dtype {dtype} cannot be stored (supported: {sorted(TORCH_NAMES.values())})")


def to_torch(code: str, *, key: str = "?") -> Any:
    import torch

    if code not in TORCH_NAMES:
        raise ShardError(f"tensor {key!r}: stored dtype {code!r} has no torch equivalent")
    return getattr(torch, TORCH_NAMES[code])
