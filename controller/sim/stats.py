"""Latency statistics over a fleet: nearest-rank percentiles and what never arrived."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencySummary:
    """Seconds; `missing` counts agents whose measurement never came (None in the input)."""

    count: int
    missing: int
    minimum: float
    p50: float
    p90: float
    p99: float
    maximum: float

    def describe(self) -> str:
        if self.count == 0:
            return f"no arrivals ({self.missing} missing)"
        return (
            f"p50 {_ms(self.p50)}  p90 {_ms(self.p90)}  p99 {_ms(self.p99)}  "
            f"max {_ms(self.maximum)}  (min {_ms(self.minimum)}, n={self.count}, "
            f"missing {self.missing})"
        )


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ORDERED (ascending, not empty): the smallest value with at
    least FRACTION of the values at or below it."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    rank = math.ceil(fraction * len(ordered))
    return ordered[rank - 1]


def summarize(samples: Sequence[float | None]) -> LatencySummary:
    """Summary of SAMPLES, where None marks an agent whose measurement never came."""
    values = sorted(sample for sample in samples if sample is not None)
    missing = len(samples) - len(values)
    if not values:
        return LatencySummary(0, missing, math.nan, math.nan, math.nan, math.nan, math.nan)
    return LatencySummary(
        count=len(values),
        missing=missing,
        minimum=values[0],
        p50=percentile(values, 0.50),
        p90=percentile(values, 0.90),
        p99=percentile(values, 0.99),
        maximum=values[-1],
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
