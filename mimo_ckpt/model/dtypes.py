"""dtype names as safetensors spells them, and their torch equivalents."""

from __future__ import annotations

from typing import Any

from mimo_ckpt.errors import ShardError

__all__ = ["ITEMSIZE", "castable", "from_torch", "to_torch"]

ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

_TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def castable(stored: str, wanted: str) -> bool:
    """Whether a load may cast `stored` values to `wanted`, as megatron's loader does: between
    floating-point types (fp32 master weights into bf16, and back); never between kinds."""
    floats = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
    return stored == wanted or (stored in floats and wanted in floats)


def from_torch(dtype: Any, *, key: str = "?") -> str:
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return code
    raise ShardError(f"tensor {key!r}: dtype {dtype} cannot be stored (supported: {sorted(_TORCH_NAMES.values())})")


def to_torch(code: str, *, key: str = "?") -> Any:
    import torch

    if code not in _TORCH_NAMES:
        raise ShardError(f"tensor {key!r}: stored dtype {code!r} has no torch equivalent")
    return getattr(torch, _TORCH_NAMES[code])
