"""How the tools hand back a result: one JSON document, written where asked and printed if wanted."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(result: Any, path: str | None, *, echo: bool = False) -> None:
    """Write `result` to `path` (parent folders made; nothing when `path` is empty); print it too
    when `echo`, for runs whose files may not come back."""
    text = json.dumps(result, indent=1)
    if echo:
        print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
