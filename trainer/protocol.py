"""The evaluation protocol of an event log: how many cut-offs a horizon gives, and which horizon, period
and history to use for a log of a given span (shared by trainer.evaluate, trainer.fit and trainer.quantiles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream.core.datasets import ALIASES, BUILTIN
from trainer.examples import DAY_MS, ExamplesError, make_cutoffs

# Adaptive protocol for event logs (choose_protocol)
HORIZON_CHOICES_DAYS = (7.0, 3.0, 1.0, 0.5, 0.25, 0.125, 1 / 24)
TARGET_CUTOFFS = 10
DEFAULT_MIN_HISTORY_DAYS = 28.0


def count_cutoffs(ts_min: int, ts_max: int, horizon_days: float, period_days: float, min_history_days: float,
                  bucket_ms: int) -> int:
    """How many cut-offs make_cutoffs gives (0 when the log is too short or the settings invalid)."""
    try:
        return len(make_cutoffs(ts_min, ts_max, round(horizon_days * DAY_MS), round(period_days * DAY_MS),
                                round(min_history_days * DAY_MS), bucket_ms))
    except ExamplesError:
        return 0


def choose_protocol(ts_min: int, ts_max: int, bucket_ms: int, horizon_days: float | None = None,
                    period_days: float | None = None,
                    min_history_days: float | None = None) -> dict[str, float | int]:
    """Horizon, period and history for an event log of this span; the given values are kept.

    History: 28 days (the longest trend window) or, for a log shorter than 84 days, a
    third of its span (rounded down to half days; at least one trend bucket).
    Horizon (period = horizon unless given): the longest of 7 d, 3 d, 1 d, 12 h, 6 h,
    3 h, 1 h (whole trend buckets only) that yields at least TARGET_CUTOFFS (10) cut-offs,
    else the one yielding the most. Returns {"horizon_days", "period_days",
    "min_history_days", "n_cutoffs"}.
    """
    span_days = (ts_max - ts_min) / DAY_MS
    if min_history_days is None:  # a third of the span, in half days, at most 28 days
        mh = max(min(DEFAULT_MIN_HISTORY_DAYS, np.floor(span_days / 3 * 2) / 2), bucket_ms / DAY_MS)
    else:
        mh = float(min_history_days)
    if horizon_days is not None:
        choices = [float(horizon_days)]
    else:
        choices = [h for h in HORIZON_CHOICES_DAYS if round(h * DAY_MS) % bucket_ms == 0] or [bucket_ms / DAY_MS]
    best = None
    for h in choices:
        p = h if period_days is None else period_days
        n = count_cutoffs(ts_min, ts_max, h, p, mh, bucket_ms)
        if n >= TARGET_CUTOFFS:
            best = (h, p, n)
            break
        if best is None or n > best[2]:
            best = (h, p, n)
    h, p, n = best
    return {"horizon_days": h, "period_days": p, "min_history_days": mh, "n_cutoffs": n}


def is_builtin(name: str) -> bool:
    """As load_dataset decides: an existing path is an event log, else a built-in name or alias."""
    return not Path(name).exists() and ALIASES.get(name.lower(), name.lower()) in BUILTIN
