"""The forecast direction: one definition of "rise", "steady" and "fall" for a next-period count.

A prediction's direction compares the predicted count for the horizon with the item's current
pace (the count of the window closest to the horizon, scaled to the horizon's length). Within
the steady band, max(STEADY_ABS, STEADY_REL x pace), it is "steady". The trainer's target
explanations, the explainer's record (`forecast_agrees`) and the evaluation all use `outlook`.
"""

from __future__ import annotations

from collections.abc import Mapping

from stream.core.prompts import main_window, signal_windows, window_hours

OUTLOOKS = ("rise", "steady", "fall")
STEADY_ABS = 1.0  # events: a count of 3 against a pace of 2 is noise, not a rise
STEADY_REL = 0.2  # of the pace


def pace(signals: Mapping[str, float], horizon_days: float) -> float:
    """The current count at the horizon's length: the closest window's count, scaled."""
    w = main_window(signal_windows(signals), horizon_days)
    return signals[f"count_{w}"] * horizon_days * 24 / window_hours(w)


def outlook(next_count: float, current_pace: float) -> str:
    """"rise" / "steady" / "fall" of a next-period count against the current pace."""
    if abs(next_count - current_pace) <= max(STEADY_ABS, STEADY_REL * current_pace):
        return "steady"
    return "rise" if next_count > current_pace else "fall"
