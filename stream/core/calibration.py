"""The count range's calibration: conformalised quantile regression (Romano, Patterson & Candès 2019).

The range head's 10% / 90% quantiles of log1p(count) are fitted by the pinball loss, which does not
guarantee that 10% of rows fall below the one and 10% above the other on data the head has not seen
(on ML-100K test rows the raw 80% range held 65%). CQR widens (or narrows) each side by a constant
in log1p units, chosen on out-of-fold predictions (trainer.quantiles: the rolling-origin folds'
heads, scored on their validation blocks; never on test cut-offs):

    c_low  = the ceil((1 - a)(n + 1))/n empirical quantile of  q10 - y     (a = 0.1: 10% miss below)
    c_high = the same of                                        y - q90    (10% miss above)
    low = min(q10 - c_low, q50),  high = max(q90 + c_high, q50),  q50 unchanged

so the published median never moves and low <= mid <= high keeps holding.

Whole counts (`counts: "whole"` in the record, when every calibration row's count is a whole number, as
events are): the published bounds are whole counts too, the floor of the low and the ceiling of the high,
and the scores are taken at the count just past each bound,

    c_low  from  q10 - log1p(y + 1)      (y >= floor(L)  <=>  log1p(y + 1) > log1p(L))
    c_high from  log1p(y - 1) - q90      (y <= ceil(H)   <=>  log1p(y - 1) < log1p(H); y = 0 always inside)

Why: with continuous bounds, every row with y = 0 has the score q10 - 0, and the many items with no event
next period put an atom of rows on a knife edge: an offset of -0.0004 lifted each low bound that sat at 0
just above it, and ML-100K's test coverage fell to 0.487 while the same ranges rounded covered 0.934
(docs/evaluation.md "Shipped v10"). Whole bounds move the edge to one count, where no atom sits.

The offsets are chosen per
forecast horizon (one dataset or event log per horizon in practice) and once on every fold row
(`pooled`), and stored in the artefact (range_head.json, `calibration`). `apply_offsets` is the one
function that applies them: the stream (stream.model.count_range) after the head's ONNX export, the
trainer (trainer.quantiles.calibrated_range: trainer.evaluate, trainer.targets) after the PyTorch head.
An artefact without the record is served with offsets 0 (and says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MISS = 0.1  # the share of rows each bound aims to miss on its side (the 10% and 90% quantiles)
POOLED = "pooled"
NONE = "none"
WHOLE, CONTINUOUS = "whole", "continuous"  # the record's `counts`
_WHOLE_TOL = 1e-6  # a log1p round trip of a whole count is exact to ~1e-12 (float64), ~5e-4 (float32, ~2000)


@dataclass(frozen=True)
class Offsets:
    low: float  # log1p units taken off the 10% quantile
    high: float  # added to the 90% quantile
    key: str  # the horizon key these came from ("7", "3"), POOLED (the fallback) or NONE (uncalibrated)
    whole: bool = False  # publish whole-count bounds: the floor of the low, the ceiling of the high


def horizon_key(horizon_days: float) -> str:
    return f"{float(horizon_days):g}"


def conformal_offset(scores: np.ndarray, miss: float = MISS) -> float:
    """The finite-sample CQR offset of one side: the ceil((1 - miss)(n + 1))-th smallest score."""
    s = np.sort(np.asarray(scores, np.float64))
    if not len(s):
        raise ValueError("no out-of-fold rows to calibrate on")
    k = min(len(s), math.ceil((1.0 - miss) * (len(s) + 1)))
    return float(s[k - 1])


def whole_counts(counts: np.ndarray) -> bool:
    """Whether every count is a whole number."""
    c = np.asarray(counts, np.float64)
    return bool(len(c)) and bool(np.all(np.abs(c - np.round(c)) < _WHOLE_TOL))


def apply_offsets(q: np.ndarray, offsets: Offsets) -> np.ndarray:
    """(N, 3) log1p quantiles (10/50/90%) -> the calibrated range around the same median; with `offsets.whole`,
    bounds at whole counts (float64: a float32 log1p would not give the count back)."""
    q = np.asarray(q)
    out = q.astype(np.float64) if offsets.whole else q.copy()
    out[:, 0] = np.minimum(q[:, 0] - offsets.low, q[:, 1])
    out[:, 2] = np.maximum(q[:, 2] + offsets.high, q[:, 1])
    if offsets.whole:
        low = np.log1p(np.floor(np.maximum(np.expm1(out[:, 0]), 0.0) + _WHOLE_TOL))
        high = np.log1p(np.maximum(np.ceil(np.expm1(out[:, 2]) - _WHOLE_TOL), 0.0))
        out[:, 0] = np.minimum(low, out[:, 1])  # a median below 0 (a count of 0) keeps low <= mid
        out[:, 2] = np.maximum(high, out[:, 1])
    return out


def whole_bounds(counts: np.ndarray) -> np.ndarray:
    """Bound counts read back from whole-count log1p bounds (expm1(log1p(3)) = 3.0000000000000004) as the
    whole numbers they are; other counts unchanged."""
    counts = np.asarray(counts, np.float64)
    r = np.round(counts)
    return np.where(np.abs(counts - r) < _WHOLE_TOL, r, counts)


def coverage(q: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Share of rows below / inside / above the log1p range [q10, q90] (y: log1p(count))."""
    below, above = y < q[:, 0], y > q[:, 2]
    return {"below": float(below.mean()), "inside": float((~below & ~above).mean()), "above": float(above.mean())}


def _above(score: float) -> float:
    """The smallest 6-decimal number strictly above `score` (the record keeps offsets to 6 decimals)."""
    return (math.floor(score * 1e6) + 1) / 1e6


def fit_offsets(q: np.ndarray, y: np.ndarray, miss: float = MISS, whole: bool = False) -> dict:
    """The two offsets of out-of-fold quantiles `q` (N, 3) against y (N,), with the folds' coverage before and after.
    `whole`: whole-count bounds, scored at the count just past each bound (module doc)."""
    q, y = np.asarray(q, np.float64), np.asarray(y, np.float64)
    if whole:
        n = np.round(np.expm1(y))
        high_scores = np.where(n >= 1, np.log1p(np.maximum(n - 1, 0)) - q[:, 2], -50.0)  # y = 0: never above
        # covered iff offset > score (strict): stored to 6 decimals strictly above the chosen score
        low, high = (_above(conformal_offset(q[:, 0] - np.log1p(n + 1), miss)),
                     _above(conformal_offset(high_scores, miss)))
    else:
        low, high = round(conformal_offset(q[:, 0] - y, miss), 6), round(conformal_offset(y - q[:, 2], miss), 6)
    after = apply_offsets(q, Offsets(low, high, "", whole))  # the offsets as stored and served
    return {"low": low, "high": high, "rows": int(len(y)),
            "fold_coverage_before": {k: round(v, 4) for k, v in coverage(q, y).items()},
            "fold_coverage_after": {k: round(v, 4) for k, v in coverage(after, y).items()}}


@dataclass(frozen=True)
class RangeCalibration:
    """The artefact's calibration record (range_head.json `calibration`): offsets by horizon key and pooled."""

    by_horizon: dict[str, dict]
    pooled: dict | None
    whole: bool = False  # the record's `counts` is "whole": bounds published as whole counts

    @classmethod
    def of(cls, record: dict | None) -> RangeCalibration:
        record = record or {}
        return cls(dict(record.get("by_horizon") or {}), record.get(POOLED), record.get("counts") == WHOLE)

    @property
    def calibrated(self) -> bool:
        return self.pooled is not None or bool(self.by_horizon)

    def offsets(self, horizon_days: float | None) -> Offsets:
        """The offsets of this horizon, else the pooled ones, else 0 (an artefact from before calibration)."""
        if horizon_days is not None:
            for key, o in self.by_horizon.items():
                if abs(float(key) - float(horizon_days)) < 1e-6:
                    return Offsets(float(o["low"]), float(o["high"]), key, self.whole)
        if self.pooled is not None:
            return Offsets(float(self.pooled["low"]), float(self.pooled["high"]), POOLED, self.whole)
        return Offsets(0.0, 0.0, NONE)

    def describe(self, horizon_days: float | None) -> dict:
        """What a start log states: which offsets serve this horizon and why."""
        o = self.offsets(horizon_days)
        why = {NONE: "the artefact has no calibration record: the raw quantiles are served (offsets 0)",
               POOLED: ("no horizon given" if horizon_days is None else
                        f"no calibration for horizon {horizon_days:g} d (calibrated: {sorted(self.by_horizon)} d)")
                       + ": the pooled offsets serve it"}.get(o.key, f"calibrated on horizon {o.key} d's folds")
        return {"calibration": o.key, "offset_low": o.low, "offset_high": o.high,
                "counts": WHOLE if o.whole else CONTINUOUS, "why": why}
