"""The count's range and drivers in the stream: the range head's ONNX export (export.range) on a tick.

For the published items of a tick: predicted_count, the median (50% quantile) of the next-period
count (with a range head the scorer publishes it instead of the score head's count, so the count
always lies inside its range), predicted_low / predicted_high, the 10% / 90% quantiles, and drivers:
what moved the forecast away from the item's current pace, the exact Shapley values of
g = median log1p(count) - log1p(pace) over the input groups trend / level / season / text against the
steady reference (an average item at an average time that the model forecasts to hold its pace), so
they add up to the gap (stream.core.drivers.pace_drivers, which trainer.quantiles calls too), 16 head
evaluations per item in one batch. An artefact without a range head gives neither (records carry the
score head's count, null range and no drivers). The weights (range_head.safetensors) are the
artefact's, in DIR; the ONNX file and its parity record are export outputs, in the git-ignored DIR/onnx/
beside the other ONNX files.

The published range is calibrated (stream.core.calibration, conformalised quantile regression on the
rolling-origin folds): the offsets of the served horizon, read from DIR/range_head.json `calibration`
at start, else its pooled offsets, else none (an artefact from before calibration: offsets 0); the
start log says which. They are applied after the ONNX head, not inside its graph, so the export stays
the trained head (its parity check compares like with like) and a recalibrated artefact
(python -m trainer.quantiles --calibrate-only) needs no new export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from stream.core.attribution import DRIVER_GROUPS
from stream.core.calibration import RangeCalibration, apply_offsets, whole_bounds
from stream.core.drivers import pace_drivers
from stream.core.features import Normalisation, predicted_count, week_of_year
from stream.model.artefact import ONNX_DIR, RANGE_ONNX, RANGE_PARITY, RANGE_WEIGHTS, ArtefactError
from stream.model.onnx_models import CPU, open_session

log = structlog.get_logger(__name__)

ONNX_FILE = RANGE_ONNX
PARITY_FILE = RANGE_PARITY
WEIGHTS_FILE = RANGE_WEIGHTS
CONFIG_FILE = "range_head.json"


@dataclass
class TickRange:
    log_mid: np.ndarray  # (N,) the median of log1p(count): the published count's log
    low: np.ndarray  # (N,) counts
    high: np.ndarray  # (N,)
    # (N, G) contributions to the gap log1p(count) - log1p(pace), DRIVER_GROUPS order; NaN rows: not attributed
    drivers: np.ndarray


class CountRange:
    def __init__(self, directory: Path, features: Normalisation, threads: int | None = None,
                 horizon_days: float | None = None) -> None:
        from safetensors.numpy import load_file

        feature_names = features.names
        onnx_dir = directory / ONNX_DIR
        record = json.loads((onnx_dir / PARITY_FILE).read_text())
        if tuple(record["feature_names"]) != tuple(feature_names):
            raise ValueError(f"{onnx_dir / ONNX_FILE} reads other inputs ({record['feature_names']}) than the "
                             f"score head ({list(feature_names)}); export again")
        self.sess = open_session(onnx_dir / ONNX_FILE, [CPU], threads, "range_head", spin=False)
        self.z_ref = load_file(str(directory / WEIGHTS_FILE))["z_ref"].astype(np.float32)
        self.features = features  # the drivers read the item's pace back from the input
        self._steady_warned = False
        self.parity = record.get("max_abs_diff")
        config = directory / CONFIG_FILE
        calibration = RangeCalibration.of(json.loads(config.read_text()).get("calibration") if config.is_file() else None)
        self.offsets = calibration.offsets(horizon_days)
        log.info("range.calibration", directory=str(directory), horizon_days=horizon_days,
                 **calibration.describe(horizon_days))

    @classmethod
    def open(cls, directory: str | Path, features: Normalisation, threads: int | None = None,
             horizon_days: float | None = None) -> CountRange | None:
        """The artefact's range head, or None when it has none. Weights without their ONNX export
        (DIR/onnx/range_head.onnx, written by python -m export.onnx) are refused: serving the score
        head's count alone would silently drop the range the model was shipped with."""
        directory = Path(directory)
        onnx_dir = directory / ONNX_DIR
        if not (directory / WEIGHTS_FILE).is_file():
            return None
        if not ((onnx_dir / ONNX_FILE).is_file() and (onnx_dir / PARITY_FILE).is_file()):
            raise ArtefactError(f"{directory} has a range head ({WEIGHTS_FILE}) but no {ONNX_DIR}/{ONNX_FILE}: "
                                    f"export it (python -m export.onnx --model {directory})")
        return cls(directory, features, threads, horizon_days)

    def quantiles(self, x: np.ndarray, cal: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.sess.run(["q"], {"x": np.ascontiguousarray(x, np.float32), "cal": np.ascontiguousarray(cal, np.float32),
                                     "item_state": np.ascontiguousarray(z, np.float32)})[0]

    def calibrated(self, x: np.ndarray, cal: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The published range's log1p quantiles: the head's, with this horizon's offsets (same median)."""
        return apply_offsets(self.quantiles(x, cal, z), self.offsets)

    def __call__(self, as_of_ms: int, x: np.ndarray, z: np.ndarray, attribute: np.ndarray | None = None) -> TickRange:
        """Range of a tick's rows (x (N, S) normalised input, z (N, H) item states) and the drivers of
        the rows `attribute` (indices; default all): 16 head evaluations each, so a worker attributes
        its top items only and the others' drivers are NaN (records: none)."""
        n = len(x)
        cal = np.repeat(week_of_year(as_of_ms), n, axis=0)
        out = np.full((n, len(DRIVER_GROUPS)), np.nan)
        if n == 0:
            return TickRange(np.zeros(0), np.zeros(0), np.zeros(0), out)
        q = self.calibrated(x, cal, z)
        mid = q[:, 1].astype(np.float64)
        low, high = (whole_bounds(predicted_count(q[:, 0].astype(np.float64))),
                     whole_bounds(predicted_count(q[:, 2].astype(np.float64))))
        rows = np.arange(n) if attribute is None else np.asarray(attribute, np.int64)
        if len(rows) == 0:
            return TickRange(mid, low, np.maximum(high, low), out)
        got = pace_drivers(lambda xb, cb, zb: self.quantiles(xb, cb, zb)[:, 1], self.features, x[rows], cal[rows],
                           z[rows], self.z_ref)
        if not self._steady_warned and np.abs(got.baseline).max() > 1e-3:
            self._steady_warned = True  # once: the model has no steady reference (stream.core.drivers)
            log.warning("range.no_steady_reference", baseline=round(float(np.abs(got.baseline).max()), 4))
        out[rows] = got.matrix()
        return TickRange(mid, low, np.maximum(high, low), out)
