"""Loss scalers with JSON state. One scaler serves all modules of a MimoOptimizer.

Gradients of every module come from one scaled loss (an encoder's grads flow back from the LLM's
loss), so a single scale and a single, global overflow decision are the only consistent choice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from mimo_ckpt.errors import ShardError

__all__ = ["ConstantLossScaler", "DynamicLossScaler"]


@dataclass(slots=True)
class ConstantLossScaler:
    scale: float = 1.0

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "constant", "scale": self.scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_kind(state, "constant")
        self.scale = float(state["scale"])


@dataclass(slots=True)
class DynamicLossScaler:
    """Megatron's dynamic scaling: back off after `hysteresis` overflows, grow after clean intervals."""

    scale: float = 2.0**16
    min_scale: float = 1.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    hysteresis: int = 2
    growth_tracker: int = 0
    hysteresis_tracker: int = -1

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)) or self.min_scale <= 0:
            raise ValueError(f"loss scale {self.scale} and min_scale {self.min_scale} must be positive")
        if not (self.growth_factor > 1 and 0 < self.backoff_factor < 1):
            raise ValueError("growth_factor must be > 1 and backoff_factor in (0, 1)")
        if self.growth_interval < 1 or self.hysteresis < 1:
            raise ValueError("growth_interval and hysteresis must be >= 1")
        if self.hysteresis_tracker < 0:
            self.hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "dynamic", **asdict(self)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_kind(state, "dynamic")
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))


def _check_kind(state: Mapping[str, Any], kind: str) -> None:
    if not isinstance(state, Mapping) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
        raise ShardError(f"loss scaler state is of kind {got!r}, expected {kind!r}")
