"""The model-input transforms: one definition, used by the trainer and by the stream.

- `signal_transform`: signed log1p of the raw trend signals (counts span 0..10^4, velocities are signed);
- `Normalisation`: the transform, then the training mean/std the manifest records; it builds the
  score head's input from an examples frame (`of_frame`, the trainer) or from a tick's `Signals`
  (`of_signals`, the scorer), the signals in model order, then the forecast horizon; `invert` reads
  the raw values back (stream.core.drivers: the item's pace);
- `season_of`: the month shown in the prompt ("Dec");
- `week_of_year`: the calendar input of the count's range head ([sin, cos] of the UTC week);
- `predicted_count`: the score (log1p of the next-period count) back to a count, clipped.

trainer.model, trainer.inference, trainer.evaluate and stream.serving import these; nothing
else computes them (tests/test_features.py proves both paths give the same features).
Pure numpy: no torch, pandas only through the frame it is handed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from stream.core.trends import Signals

HORIZON = "horizon_days"  # the last model input, after the signals
MIN_STD = 1e-2  # a signal constant in a small training slice must not divide later inputs by ~0
MAX_LOG_COUNT = 40.0  # e^40 events: beyond any real count, and far from float overflow (~709)


class FeatureError(ValueError):
    """A normalisation that is inconsistent, or inputs it cannot be applied to."""


def signal_transform(values: np.ndarray) -> np.ndarray:
    """Signed log1p: counts span 0..10^4, velocities are signed."""
    return np.sign(values) * np.log1p(np.abs(values))


def season_of(as_of_ms: int) -> str:
    """The month shown in the prompt ("Dec") for a tick or cut-off at `as_of_ms` (UTC)."""
    return datetime.fromtimestamp(as_of_ms / 1000, UTC).strftime("%b")


WEEKS_PER_YEAR = 52.1775  # 365.2425 / 7


def week_of_year(as_of_ms: int | np.ndarray) -> np.ndarray:
    """(N, 2) float32 [sin, cos] of the UTC week of the year (0 for Jan 1-7) at `as_of_ms`: the
    calendar input, cyclic so that late December sits beside early January. One number per tick
    (the scorer) or per cut-off row (the trainer's frame), the same function for both."""
    ms = np.atleast_1d(np.asarray(as_of_ms, np.int64))
    day = ms // 86_400_000  # days since 1970-01-01 (UTC)
    year_start = (day.astype("datetime64[D]").astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64)
    angle = 2.0 * np.pi * ((day - year_start) // 7) / WEEKS_PER_YEAR
    return np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


def predicted_count(score: np.ndarray) -> np.ndarray:
    """log1p(count) -> count, clipped to [0, MAX_LOG_COUNT] first: a wild score must not become an
    infinite count that the record contract rejects."""
    return np.expm1(np.clip(score, 0.0, MAX_LOG_COUNT))


@dataclass(frozen=True)
class Normalisation:
    """Raw trend signals -> the score head's normalised input: signal_transform, then (t - mean) / std."""

    names: tuple[str, ...]  # the signals in model order, then HORIZON
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not (len(self.names) == len(self.mean) == len(self.std)) or not self.names:
            raise FeatureError(f"normalisation is inconsistent: {len(self.names)} names, {len(self.mean)} means, "
                               f"{len(self.std)} stds")

    @classmethod
    def fit(cls, names: Sequence[str], values: np.ndarray) -> Normalisation:
        """The training rows' (N, S) raw values in `names` order -> their mean/std after the transform."""
        t = signal_transform(values)
        return cls(tuple(names), tuple(t.mean(axis=0).tolist()), tuple(np.maximum(t.std(axis=0), MIN_STD).tolist()))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalisation:
        """From the manifest's "normalisation" section ({"names", "mean", "std"})."""
        return cls(d["names"], d["mean"], d["std"])

    def to_dict(self) -> dict[str, list]:
        """The manifest's "normalisation" section."""
        return {"names": list(self.names), "mean": list(self.mean), "std": list(self.std)}

    @property
    def signal_names(self) -> tuple[str, ...]:
        return self.names[:-1]

    def apply(self, values: np.ndarray) -> np.ndarray:
        """(N, S) raw values in `names` order -> (N, S) float32 model input."""
        return ((signal_transform(values) - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def invert(self, x: np.ndarray, cols: int | slice = slice(None)) -> np.ndarray:
        """(N, S) model input -> (N, S) float64 raw values, the inverse of `apply` (signed expm1 of the
        de-standardised input), or (N,) of one column `cols`: the drivers read the item's pace and the horizon
        back from the head's input."""
        t = np.asarray(x, np.float64)[:, cols] * np.asarray(self.std)[cols] + np.asarray(self.mean)[cols]
        return np.sign(t) * np.expm1(np.abs(t))

    def with_horizon(self, signals: np.ndarray, horizon_days: float) -> np.ndarray:
        """(N, S-1) raw signals in `signal_names` order -> (N, S) float64 raw input, the horizon last."""
        raw = np.empty((len(signals), len(self.names)), np.float64)
        raw[:, :-1] = signals
        raw[:, -1] = float(horizon_days)
        return raw

    def of_frame(self, frame: Any, horizon_days: float) -> np.ndarray:
        """(N, S) model input of an examples frame's rows (the trainer: one column per signal)."""
        missing = [n for n in self.signal_names if n not in frame.columns]
        if missing:
            raise FeatureError(f"the model reads signals the frame lacks: {missing}")
        return self.apply(self.with_horizon(frame[list(self.signal_names)].to_numpy(np.float64), horizon_days))

    def of_signals(self, signals: Signals, horizon_days: float) -> np.ndarray:
        """(N, S) model input of every item of a tick (the stream)."""
        missing = [n for n in self.signal_names if n not in signals.names]
        if missing:
            raise FeatureError(f"the model reads signals this stream does not compute: {missing}")
        cols = [signals.names.index(n) for n in self.signal_names]
        return self.apply(self.with_horizon(signals.values[:, cols], horizon_days))
