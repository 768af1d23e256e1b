"""Object values <-> the JSON the manifest holds (format version 3, docs/format.md): no pickle.

Plain JSON (dicts with str keys, lists, str, int, finite float, bool, None) is stored as itself.
Other values become a one-key object `{"__mimo__": [tag, payload]}`:

    ["tuple", [item, ...]]   ["set", [item, ...]]   ["frozenset", [item, ...]]
    ["bytes", base64]        ["bytesio", base64]    ["dtype", "float32"]
    ["dict", [[key, value], ...]]   a dict with a key that is not a str, or is "__mimo__"

Items, keys and values are encoded alike, to any depth; set items are sorted by their encoded
JSON text (compact, keys sorted), so equal sets are stored alike in every process. Pure: no I/O.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys
from typing import Any, Callable

from mimo_ckpt.errors import ManifestError, ShardError

__all__ = ["TAG", "MAX_JSON_DEPTH", "encode", "decode", "check", "path_text", "check_json_value", "check_plain_json", "encode_checked"]

MAX_JSON_DEPTH = 64
"""Deepest nesting of a metadata or object value (a guard against stack exhaustion in readers)."""

TAG = "__mimo__"
SUPPORTED = ("JSON values (dicts with str keys, lists, str, int, finite float, bool, None), tuple, set, "
             "frozenset, bytes, io.BytesIO, torch.dtype, and dicts keyed by any of these that is hashable")


def encode(value: Any, where: str = "value") -> Any:
    """The JSON form of `value`; ShardError naming `where` and the place at fault for anything
    else than the supported kinds (or NaN, infinity, a value that contains itself)."""
    try:
        return _encode(value, None)
    except _Refused as exc:
        raise ShardError(f"{where}: {exc.what} at {path_text(exc.path)} cannot be stored; objects "
                         f"hold {SUPPORTED}; store tensors as shards") from None
    except RecursionError:
        raise ShardError(f"{where}: nests too deeply (or contains itself)") from None
    except ValueError as exc:  # a closed BytesIO; sorting a set holding an int too long to print
        raise ShardError(f"{where}: {exc}") from None


def decode(doc: Any, where: str = "value") -> Any:
    """The value `encode` made `doc` from; ManifestError naming `where` if `doc` is no encoding."""
    return _decode_as(doc, where, _torch_dtype)


def check(doc: Any, where: str = "value") -> None:
    """Raises as `decode` does, without importing torch (reading a manifest needs none): a dtype
    name is checked for its form here, and against torch by `decode`."""
    _decode_as(doc, where, lambda name: (_DTYPE, name))


def _decode_as(doc: Any, where: str, dtype: Callable[[str], Any]) -> Any:
    try:
        return _decode(doc, dtype)
    except (ValueError, TypeError) as exc:  # TypeError: an unhashable set item or dict key
        raise ManifestError(f"{where}: bad {TAG} encoding: {exc}") from None


class _Refused(Exception):
    def __init__(self, what: str, path: Any) -> None:
        self.what, self.path = what, path


def _encode(v: Any, path: Any) -> Any:
    # Paths are linked (parent, key) pairs, built in O(1) and spelled out only for an error.
    if isinstance(v, float) and not math.isfinite(v):
        raise _Refused(f"{v} (the manifest is standard JSON)", path)
    if v is None or isinstance(v, (str, int, float)):  # int covers bool
        return v
    if isinstance(v, list):
        return [_encode(x, (path, i)) for i, x in enumerate(v)]
    if isinstance(v, dict):
        if all(isinstance(k, str) and k != TAG for k in v):
            return {k: _encode(x, (path, k)) for k, x in v.items()}
        return _tagged("dict", [[_encode(k, (path, "<key>")), _encode(x, (path, k))] for k, x in v.items()])
    if isinstance(v, tuple):
        return _tagged("tuple", [_encode(x, (path, i)) for i, x in enumerate(v)])
    if isinstance(v, (set, frozenset)):
        items = sorted((_encode(x, (path, "<item>")) for x in v), key=_json_text)
        return _tagged("frozenset" if isinstance(v, frozenset) else "set", items)
    if isinstance(v, bytes):
        return _tagged("bytes", base64.b64encode(v).decode())
    if isinstance(v, io.BytesIO):  # megatron keeps some state torch.save'd into one
        return _tagged("bytesio", base64.b64encode(v.getvalue()).decode())
    torch = sys.modules.get("torch")  # a dtype exists only once torch is imported
    if torch is not None and isinstance(v, torch.dtype):
        return _tagged("dtype", str(v).removeprefix("torch."))
    raise _Refused(f"value of type {type(v).__name__}", path)


def _json_text(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _tagged(tag: str, payload: Any) -> dict[str, Any]:
    return {TAG: [tag, payload]}


def path_text(path: Any) -> str:
    """A linked (parent, key) path, root first, as `value['a'][0]...` (8 keys at most)."""
    keys: list[Any] = []
    while path is not None:
        path, key = path
        keys.append(key)
    keys.reverse()
    shown = "".join(f"[{k[:80]!r}]" if isinstance(k, str) else f"[{k}]" for k in keys[:8])
    return "value" + shown + ("..." if len(keys) > 8 else "")


_DTYPE = object()
"""What `check` pairs a dtype name with: equal to no value a decoder builds otherwise."""
_DTYPE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _decode(doc: Any, dtype: Callable[[str], Any]) -> Any:
    if isinstance(doc, list):
        return [_decode(x, dtype) for x in doc]
    if not isinstance(doc, dict):
        return doc
    if TAG not in doc:
        return {k: _decode(x, dtype) for k, x in doc.items()}
    _need(len(doc) == 1 and isinstance(doc[TAG], list) and len(doc[TAG]) == 2,
          f"{{{TAG!r}: [tag, payload]}} must be the object's only key")
    tag, payload = doc[TAG]
    if tag in ("tuple", "set", "frozenset"):
        _need(isinstance(payload, list), "payload must be a list")
        items = [_decode(x, dtype) for x in payload]
        return tuple(items) if tag == "tuple" else set(items) if tag == "set" else frozenset(items)
    if tag in ("bytes", "bytesio"):
        _need(isinstance(payload, str), "payload must be a base64 string")
        data = base64.b64decode(payload, validate=True)  # binascii.Error is a ValueError
        return data if tag == "bytes" else io.BytesIO(data)
    if tag == "dtype":
        _need(isinstance(payload, str) and _DTYPE_NAME.fullmatch(payload) is not None,
              f"{str(payload)[:40]!r} is not a torch dtype name")
        return dtype(payload)
    if tag == "dict":
        _need(isinstance(payload, list) and all(isinstance(p, list) and len(p) == 2 for p in payload),
              "payload must be a list of [key, value] pairs")
        out = {_decode(k, dtype): _decode(x, dtype) for k, x in payload}
        _need(len(out) == len(payload), "a dict key repeats")  # as the manifest refuses repeated keys
        return out
    raise ValueError(f"unknown tag {str(tag)[:40]!r}")


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _torch_dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    _need(isinstance(dtype, torch.dtype), f"{name!r} is not a torch dtype")
    return dtype


def check_json_value(value: Any, where: str, *, max_depth: int | None = MAX_JSON_DEPTH) -> None:
    """Raises ManifestError naming `where` and the place at fault if `value`, made of JSON types,
    nests deeper than `max_depth` or holds a string or key that is not valid unicode (a lone
    surrogate: JSON escapes let one through, UTF-8 cannot hold it). Iterative, so a hostile depth
    cannot exhaust the stack."""
    # Paths are linked (parent, key) pairs, built in O(1) and spelled out only for an error.
    stack: list[tuple[Any, int, Any]] = [(value, 0, None)]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, where, path)
        elif isinstance(item, (dict, list, tuple)):
            if max_depth is not None and depth >= max_depth:
                raise ManifestError(f"{where}: {path_text(path)} nests deeper than {max_depth} levels")
            if isinstance(item, dict):
                for k, v in item.items():
                    _check_text(k, where, path, key=True)
                    stack.append((v, depth + 1, (path, k)))
            else:  # tuples too: writers store them as lists
                stack.extend((v, depth + 1, (path, i)) for i, v in enumerate(item))


def _check_text(text: Any, where: str, path: Any, key: bool = False) -> None:
    if not isinstance(text, str):
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        what = f"key {text[:80]!r} at" if key else f"string {text[:80]!r} at"
        raise ManifestError(f"{where}: {what} {path_text(path)} is not valid unicode (lone surrogate)") from None


def check_plain_json(what: str, value: Any) -> None:
    """Raises ShardError naming `what` unless `value` is plain JSON that every reader takes: no NaN
    or infinity, no lone surrogate in a string or key, at most MAX_JSON_DEPTH levels deep (the
    checks `Manifest.from_bytes` makes on load)."""
    try:
        check_json_value(value, what)
    except ManifestError as exc:
        raise ShardError(str(exc)) from None
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ShardError(
            f"{what}: value of type {type(value).__name__} is not JSON-serialisable ({exc}); store "
            f"tensors as shards, and NaN or infinity in a tensor or as a string"
        ) from exc


def encode_checked(what: str, value: Any) -> Any:
    """`value` as the manifest stores it (`encode`), with the checks `check_plain_json`
    makes, on the encoded form: the limits a reader holds the manifest to apply to it."""
    doc = encode(value, what)
    check_plain_json(what, doc)
    return doc
