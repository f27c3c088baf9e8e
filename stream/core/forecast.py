"""The forecast direction: one definition of "rise", "steady" and "fall" for a next-period count.

A prediction's direction compares the predicted count for the horizon with the item's current
pace (the count of the window closest to the horizon, scaled to the horizon's length). Within
the steady band, max(STEADY_ABS, STEADY_REL x pace), it is "steady". The trainer's target
explanations, the explainer's record (`forecast_agrees`) and the evaluation all use `outlook`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from stream.core.prompts import main_window, signal_windows, window_hours

OUTLOOKS = ("rise", "steady", "fall")
STEADY_ABS = 1.0  # events: a count of 3 against a pace of 2 is noise, not a rise
STEADY_REL = 0.2  # of the pace


def pace(signals: Mapping[str, float], horizon_days: float) -> float:
    """The current count at the horizon's length: the closest window's count, scaled."""
    w = main_window(signal_windows(signals), horizon_days)
    return pace_of(signals[f"count_{w}"], w, horizon_days)


def pace_of(count, window: str, horizon_days):
    """A window's count scaled to the horizon's length (floats or numpy arrays): the one formula `pace` and the
    drivers' pace gap (stream.core.drivers, on the head's whole batch) share."""
    return count * horizon_days * 24 / window_hours(window)


def outlook(next_count: float, current_pace: float) -> str:
    """"rise" / "steady" / "fall" of a next-period count against the current pace."""
    if abs(next_count - current_pace) <= max(STEADY_ABS, STEADY_REL * current_pace):
        return "steady"
    return "rise" if next_count > current_pace else "fall"


# ---- the forecast's size and range in words (the claim grammar writes them, the checker verifies them) ----
# A predicted count is stated to a round number a reader takes in at a glance: to the unit under 20,
# to 5 under 100, to 10 under 1000, then to two significant figures ("about 40 next week"). A range
# is widened to those units ("likely 25–55" for 27.6–54.1), so the stated range holds the model's.
# The checker accepts a stated size or bound within one unit of the model's value.


def size_unit(x: float) -> int:
    """The rounding unit of a stated count: 1 under 20, 5 under 100, 10 under 1000, then 2 significant figures."""
    x = abs(float(x))
    if x < 20:
        return 1
    if x < 100:
        return 5
    if x < 1000:
        return 10
    return 10 ** (len(str(int(x))) - 2)


def stated_size(x: float) -> int:
    """A predicted count as the text states it: 38.6 -> 40, 7.4 -> 7, 1234 -> 1200."""
    u = size_unit(x)
    return int(round(float(x) / u) * u)


def stated_range(low: float, high: float) -> tuple[int, int]:
    """A predicted range as the text states it: the low bound rounded down, the high one up, to their units."""
    lo, hi = float(low), float(high)
    u_lo, u_hi = size_unit(lo), size_unit(hi)
    return int(math.floor(lo / u_lo) * u_lo), int(math.ceil(hi / u_hi) * u_hi)


@dataclass(frozen=True)
class PredictedCount:
    """What the model predicts for the next `horizon_days`: the count and, from a model with quantile
    heads, its 80% range (10% and 90% quantiles), and from a model that attributes it, its `drivers` (each input
    group's share of the median's gap from the item's pace, log1p(count) - log1p(pace): trend, level, season,
    text; stream.core.drivers). The checker verifies a text's forecast
    clauses against it, and its driver claims ("this time of year lifts it") against the drivers."""

    count: float
    horizon_days: float
    low: float | None = None
    high: float | None = None
    drivers: Mapping[str, float] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if (self.low is None) != (self.high is None):
            raise ValueError(f"give both low and high or neither, got low={self.low}, high={self.high}")
        if self.low is not None and not 0 <= self.low <= self.high:
            raise ValueError(f"the range must have 0 <= low <= high, got {self.low}..{self.high}")

    @property
    def has_range(self) -> bool:
        return self.low is not None

    def direction(self, signals: Mapping[str, float]) -> str:
        """outlook() of the predicted count against the item's current pace."""
        return outlook(self.count, pace(signals, self.horizon_days))

    @classmethod
    def of(cls, prediction, horizon_days: float) -> "PredictedCount":
        """From a stream.core.records.Prediction (its predicted_count, predicted_low, predicted_high)."""
        return cls(prediction.predicted_count, horizon_days, prediction.predicted_low, prediction.predicted_high,
                   getattr(prediction, "drivers", None))
