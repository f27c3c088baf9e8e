"""The drivers of a forecast: what moved the predicted count away from the item's current pace.

A forecast's direction (stream.core.forecast.outlook) compares the median count with the item's own pace
(its main window's count scaled to the horizon), so the drivers attribute that gap, not the count's level:

    g(x) = q50(x) - log1p(pace(x))

q50 is the range head's median of log1p(next-period count) (trainer.quantiles), pace(x) the item's pace read
back from the head's normalised input x (stream.core.features.Normalisation.invert, stream.core.forecast.pace_of;
the horizon is held at the row's value). `pace_drivers` gives the exact group Shapley values of g
(stream.core.attribution.group_shapley) over trend / level / season / text against the steady reference:
an average item at an average time (normalised signals 0, calendar (0, 0), the mean training item state) whose
current count is set to the pace at which the model forecasts it to hold that pace (g = 0; `steady_count`).
The drivers then add up to the forecast's gap itself, sum = g(x) - g(reference) = g(x): a rise (the count above
the steady band, so g(x) > 0) always has a group that lifts it, a fall one that holds it back, and a driver says
how much a group moved the forecast above (> 0) or below (< 0) the item's pace, in log counts.

A reference without a steady point (a head whose median stays above, or below, the pace at every count) keeps
the count whose gap is smallest; `PaceDrivers.baseline` is then g(reference) != 0, and the drivers add up to
g(x) - baseline. The stream (stream.model.count_range, the ONNX head) and the trainer (trainer.quantiles, the
torch head) both call `pace_drivers`: one definition. Pure numpy: `median` is the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stream.core.attribution import DRIVER_GROUPS, group_shapley, signal_group
from stream.core.features import HORIZON, FeatureError, Normalisation
from stream.core.forecast import pace_of
from stream.core.prompts import main_window, signal_windows

# (x (B, S) float32 normalised input, cal (B, 2) float32, z (B, H) float32 item states) -> (B,) median log1p(count)
Median = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

HORIZON_DECIMALS = 4  # the horizon read back from float32 input (7.0000005 -> 7.0): the pace's own horizon
MAX_STEADY_LOG_COUNT = 14.0  # the steady count's search: from 0 to e^14 (~1.2 million) events in the main window
GRID = 65  # points per round of the search
ROUNDS = 4  # a bracket narrowed 64^3 times after the first grid: ~1e-6 of the normalised count


@dataclass(frozen=True)
class PaceDrivers:
    """Each row's drivers (group -> (B,), DRIVER_GROUPS order), its gap g(x) (B,) and the reference's gap
    `baseline` (B,): 0 where the reference is steady, so that sum(drivers) = gap - baseline = gap."""

    phi: dict[str, np.ndarray]
    gap: np.ndarray
    baseline: np.ndarray

    def matrix(self) -> np.ndarray:
        """(B, G) float64, DRIVER_GROUPS order."""
        return np.stack([self.phi[g] for g in DRIVER_GROUPS], axis=1).astype(np.float64)


class PaceGap:
    """g(x) = q50(x) - log1p(pace(x)) on the head's normalised input, and the steady reference."""

    def __init__(self, norm: Normalisation) -> None:
        self.norm = norm
        names = norm.names
        if not names or names[-1] != HORIZON:
            raise FeatureError(f"the head's inputs must end with {HORIZON!r}, got {list(names)}")
        self.cols = {g: [i for i, n in enumerate(names) if signal_group(n) == g] for g in ("trend", "level")}
        self.fixed = [i for i, n in enumerate(names) if signal_group(n) is None]
        self.horizon_col = names.index(HORIZON)
        self.windows = signal_windows(dict.fromkeys(names))
        if not self.windows:
            raise FeatureError(f"the head reads no count_<window> input, so no pace: {list(names)}")

    def horizons(self, x: np.ndarray) -> np.ndarray:
        """(B,) each row's horizon in days, read back from its input."""
        return np.round(self.norm.invert(x, self.horizon_col), HORIZON_DECIMALS)

    def count_col(self, horizon_days: float) -> tuple[int, str]:
        """The input column of the pace's count (the main window's, stream.core.forecast.pace) and the window."""
        w = main_window(self.windows, float(horizon_days))
        name = f"count_{w}"
        if name not in self.norm.names:
            raise FeatureError(f"the head reads no {name}: no pace at a {horizon_days} d horizon")
        return self.norm.names.index(name), w

    def log_pace(self, x: np.ndarray) -> np.ndarray:
        """(B,) log1p(pace) of each row, from its de-normalised main-window count and horizon."""
        h = self.horizons(x)
        out = np.empty(len(x), np.float64)
        for hv in np.unique(h):
            rows = h == hv
            c, w = self.count_col(hv)
            count = np.maximum(self.norm.invert(x[rows], c), 0.0)  # a count is never below 0
            out[rows] = np.log1p(pace_of(count, w, float(hv)))
        return out

    def gap(self, median: Median, x: np.ndarray, cal: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(B,) g(x) = q50 - log1p(pace)."""
        return np.asarray(median(x, cal, z), np.float64) - self.log_pace(x)

    def steady_count(self, median: Median, horizon_input: float, z_ref: np.ndarray) -> np.ndarray:
        """(S,) float32: the reference input at a horizon (its normalised value), its main-window count set where
        the model forecasts that average item at an average time to hold its pace (g = 0). Several such counts:
        the one nearest the training mean; none: the count with the smallest |g|."""
        base = np.zeros(len(self.norm.names), np.float32)
        base[self.horizon_col] = horizon_input
        c, _ = self.count_col(float(self.horizons(base[None])[0]))
        m, s = self.norm.mean[c], self.norm.std[c]
        lo, hi = (0.0 - m) / s, (MAX_STEADY_LOG_COUNT - m) / s

        def f(us: np.ndarray) -> np.ndarray:
            xb = np.repeat(base[None], len(us), axis=0)
            xb[:, c] = us
            return self.gap(median, xb, np.zeros((len(us), 2), np.float32),
                            np.repeat(np.asarray(z_ref, np.float32)[None], len(us), axis=0))

        us = np.linspace(lo, hi, GRID).astype(np.float32)
        fs = f(us)
        change = np.flatnonzero(np.sign(fs[:-1]) != np.sign(fs[1:]))
        if len(change):
            k = change[np.argmin(np.abs(us[change] + us[change + 1]))]  # the bracket nearest the mean (0)
            for _ in range(ROUNDS - 1):
                us = np.linspace(us[k], us[k + 1], GRID).astype(np.float32)
                fs = f(us)
                change = np.flatnonzero(np.sign(fs[:-1]) != np.sign(fs[1:]))
                if not len(change):
                    break
                k = change[0]
        base[c] = us[np.argmin(np.abs(fs))]
        return base

    def drivers(self, median: Median, x: np.ndarray, cal: np.ndarray, z: np.ndarray, z_ref: np.ndarray) -> PaceDrivers:
        """The exact group Shapley values of g for each row against the steady reference at its horizon."""
        x = np.asarray(x, np.float32)
        cal, z = np.asarray(cal, np.float32), np.asarray(z, np.float32)
        ref = np.empty_like(x)
        h = self.horizons(x)
        for hv in np.unique(h):
            rows = h == hv
            ref[rows] = self.steady_count(median, float(x[np.flatnonzero(rows)[0], self.horizon_col]), z_ref)
        inputs = {"trend": x[:, self.cols["trend"]], "level": x[:, self.cols["level"]], "season": cal, "text": z}
        reference = {"trend": ref[:, self.cols["trend"]], "level": ref[:, self.cols["level"]],
                     "season": np.zeros(2, np.float32), "text": np.asarray(z_ref, np.float32)}

        def g(batch: dict[str, np.ndarray]) -> np.ndarray:
            xb = np.empty((len(batch["trend"]), len(self.norm.names)), np.float32)
            xb[:, self.cols["trend"]], xb[:, self.cols["level"]] = batch["trend"], batch["level"]
            xb[:, self.fixed] = batch["fixed"]
            return self.gap(median, xb, batch["season"], batch["text"])

        phi, gx, gr = group_shapley(g, inputs, reference, fixed={"fixed": x[:, self.fixed]})
        return PaceDrivers({k: phi[k] for k in DRIVER_GROUPS}, gx, gr)


def pace_drivers(median: Median, norm: Normalisation, x: np.ndarray, cal: np.ndarray, z: np.ndarray,
                 z_ref: np.ndarray) -> PaceDrivers:
    """The drivers of B predictions (x (B, S) normalised input, cal (B, 2), z (B, H) item states; z_ref (H,) the
    mean training item state): see the module doc. `median` is the range head (ONNX online, torch offline)."""
    if len(x) == 0:
        empty = np.zeros(0)
        return PaceDrivers({g: empty for g in DRIVER_GROUPS}, empty, empty)
    return PaceGap(norm).drivers(median, x, cal, z, z_ref)
