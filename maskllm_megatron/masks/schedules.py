"""Annealing schedules driven by an explicit step counter (no global state)."""
from __future__ import annotations

import math
from dataclasses import dataclass

_KINDS = ("linear", "exp", "cosine", "constant")


@dataclass(frozen=True)
class Anneal:
    """A value moving from ``start`` to ``end`` over ``steps`` iterations, then held at ``end``.

    ``linear`` is the MaskLLM default (temperature 4 -> 0.05, logit scale 1e2 -> 5e2); ``exp`` moves
    geometrically (start and end must be positive); ``cosine`` follows half a cosine.
    """

    start: float
    end: float
    steps: int
    kind: str = "linear"

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}: use one of {', '.join(_KINDS)}")
        if self.steps < 1:
            raise ValueError(f"schedule needs steps >= 1, got {self.steps}: set it to the training iterations")
        if self.kind == "exp" and (self.start <= 0 or self.end <= 0):
            raise ValueError("an 'exp' schedule needs positive start and end values: use 'linear' instead")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return float(self.start)
        frac = min(max(step, 0), self.steps) / self.steps
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        if self.kind == "exp":
            return self.start * (self.end / self.start) ** frac
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))
