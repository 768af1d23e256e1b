"""The CLI's argument forms: sizes ("512M") and module layouts ("images=tp1,dp2"), also used
by the examples' own command lines."""

from __future__ import annotations

import argparse
import re

from mimo_ckpt.errors import LayoutError
from mimo_ckpt.model.layout import PARALLEL_DIMS, ModuleLayout

__all__ = ["parse_size", "parse_layout_arg"]


def parse_size(text: str) -> int:
    """Bytes from "512M", "2G", "1.5k" or a plain count (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 512M, 2G, 1048576)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_layout_arg(text: str, old: ModuleLayout | None) -> tuple[str, ModuleLayout]:
    """`images=tp1,dp2[,offset=0][,order=tp-cp-ep-pp-dp]` -> ("images", layout).

    Sizes, offset and order not named keep the module's saved ones (`old`; 1, 0 and the default
    order without it): `language=tp4` on a tp2 x pp2 module means tp4 x pp2, not tp4 x pp1.
    """
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise LayoutError(f"--module {text!r}: expected NAME=tp1,dp2,...")
    sizes = {p: getattr(old, p) for p in PARALLEL_DIMS} if old else {}
    offset = old.rank_offset if old else 0
    order = old.order if old else None
    named: set[str] = set()
    for token in filter(None, spec.split(",")):
        item = token.partition("=")[0] if "=" in token else token[:2]
        if item in named or (item in ("offset", "rank_offset") and named & {"offset", "rank_offset"}):
            raise LayoutError(f"--module {text!r}: {item} is given more than once")
        named.add(item)
        if item in ("offset", "rank_offset"):
            offset = _int_token(text, token, token.split("=", 1)[1], minimum=0)
        elif item == "order":
            order = tuple(token.split("=", 1)[1].split("-"))
        elif item in PARALLEL_DIMS:
            sizes[item] = _int_token(text, token, token[2:], minimum=1)
        else:
            raise LayoutError(f"--module {text!r}: unknown item {token!r} (use tpN, cpN, epN, ppN, dpN, offset=N, order=a-b-c-d-e)")
    kwargs = {"order": order} if order else {}
    try:
        return name, ModuleLayout(**sizes, rank_offset=offset, **kwargs)
    except LayoutError as exc:
        raise LayoutError(f"--module {text!r}: {exc}") from None


def _int_token(text: str, token: str, value: str, minimum: int) -> int:
    # digits only: int() would also take "-1", " 2" and "1_0"
    if not value.isascii() or not value.isdigit() or int(value) < minimum:
        raise LayoutError(f"--module {text!r}: {token!r} needs an integer >= {minimum}, got {value!r}")
    return int(value)
