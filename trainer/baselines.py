"""Baseline forecasters over the examples frame: each predicts an item's event count in the horizon.

All read only the trend-signal columns of a row (computed from events before the
cut-off), so they rank the same candidates at the same cut-offs as any model.
With h the horizon and w the reference window (the shortest signal window at
least as long as h, else the longest):

- most_pop: the item's average rate over its whole history times h:
  total_count * h / max(age, h). Items younger than one horizon predict their
  count so far. (The rate, not the raw total, so an item seen for two years is
  not ranked above a busier one seen for two months.)
- recent_pop: count_w * h / w.
- exp_decay: the exponentially decayed count `ema` turned into a rate (divided by
  the sum of the decay weights over the longest window, i.e. what an item with one
  event every bucket would have) times h.
- markov: last count plus last change, count_w + (count_w - prev_count_w) =
  count_w + velocity_w, clipped at zero, times h / w.
- gbm: LightGBM regression of log1p(label_count) on all signal columns, trained on
  the train cut-offs with early stopping on the validation cut-offs; predicts
  expm1 of its output, clipped at zero.

The heuristics have no parameters; their `fit` does nothing.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

# LightGBM's OpenMP threads spin while idle; on a busy 2-core machine that made a
# 2-thread fit ~10x slower than 1 thread (22 s vs 2 s on Online Retail). Sleeping
# waiters remove the penalty. Only a default: read when libgomp loads, an explicit
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightgbm as lgb  # noqa: E402
import numpy as np
import pandas as pd
import structlog

from stream.core.trends import TrendConfig

log = structlog.get_logger(__name__)

HOUR_MS = 3_600_000


@runtime_checkable
class Forecaster(Protocol):
    name: str

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame) -> "Forecaster": ...

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Predicted event count in the horizon, one per row, finite and >= 0."""
        ...


def reference_window(config: TrendConfig, horizon_ms: int) -> tuple[str, int]:
    """(name, length in ms) of the shortest window at least as long as the horizon, else the longest."""
    windows = [(name, w * config.bucket_ms) for name, w in config.windows]
    for name, length in windows:
        if length >= horizon_ms:
            return name, length
    return windows[-1]


class _Heuristic(ABC):
    name = ""

    def __init__(self, config: TrendConfig, horizon_ms: int) -> None:
        self.config = config
        self.horizon_ms = horizon_ms
        self.window, self.window_ms = reference_window(config, horizon_ms)

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame) -> "_Heuristic":
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return np.maximum(self._predict(frame), 0.0)

    @abstractmethod
    def _predict(self, frame: pd.DataFrame) -> np.ndarray: ...


class MostPop(_Heuristic):
    name = "most_pop"

    def _predict(self, frame: pd.DataFrame) -> np.ndarray:
        age_ms = frame["age_h"].to_numpy(np.float64) * HOUR_MS
        return frame["total_count"].to_numpy(np.float64) * self.horizon_ms / np.maximum(age_ms, self.horizon_ms)


class RecentPop(_Heuristic):
    name = "recent_pop"

    def _predict(self, frame: pd.DataFrame) -> np.ndarray:
        return frame[f"count_{self.window}"].to_numpy(np.float64) * self.horizon_ms / self.window_ms


class ExpDecay(_Heuristic):
    name = "exp_decay"

    def _predict(self, frame: pd.DataFrame) -> np.ndarray:
        ages = np.arange(self.config.longest)
        weight_sum = np.exp2(-ages / self.config.ema_halflife_buckets).sum()
        per_bucket = frame["ema"].to_numpy(np.float64) / weight_sum
        return per_bucket * self.horizon_ms / self.config.bucket_ms


class Markov(_Heuristic):
    name = "markov"

    def _predict(self, frame: pd.DataFrame) -> np.ndarray:
        last = frame[f"count_{self.window}"].to_numpy(np.float64)
        change = frame[f"velocity_{self.window}"].to_numpy(np.float64)
        return (last + change) * self.horizon_ms / self.window_ms


class GBM:
    """LightGBM on the trend signals; deterministic for a given seed and thread count."""

    name = "gbm"

    def __init__(self, features: list[str], seed: int = 0, num_threads: int = 2, max_rounds: int = 2000,
                 early_stopping: int = 50, params: dict | None = None) -> None:
        self.features = list(features)
        self.max_rounds = max_rounds
        self.early_stopping = early_stopping
        self.params = {
            "objective": "regression",  # squared error on log1p(count): the MAE/RMSE scale we report
            "learning_rate": 0.05,
            "num_leaves": 31,
            "min_data_in_leaf": 50,
            "feature_fraction": 0.9,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            "seed": seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": num_threads,
            "verbosity": -1,
        } | (params or {})
        self.booster: lgb.Booster | None = None

    def _x(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [f for f in self.features if f not in frame.columns]
        if missing:
            raise ValueError(f"frame lacks feature column(s) {missing}")
        return frame[self.features].to_numpy(np.float32)

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame) -> "GBM":
        if len(train) == 0 or len(valid) == 0:
            raise ValueError(f"gbm needs train and validation rows (got {len(train)} and {len(valid)})")
        dtrain = lgb.Dataset(self._x(train), train["label_log"].to_numpy(np.float64), feature_name=self.features,
                             free_raw_data=True)
        dvalid = lgb.Dataset(self._x(valid), valid["label_log"].to_numpy(np.float64), reference=dtrain)
        self.booster = lgb.train(self.params, dtrain, num_boost_round=self.max_rounds, valid_sets=[dvalid],
                                 valid_names=["valid"],
                                 callbacks=[lgb.early_stopping(self.early_stopping, verbose=False)])
        log.info("gbm.fit", rows=len(train), valid_rows=len(valid), best_iteration=self.booster.best_iteration,
                 valid_l2=round(float(self.booster.best_score["valid"]["l2"]), 5))
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        if self.booster is None:
            raise RuntimeError("gbm: call fit() before predict()")
        out = self.booster.predict(self._x(frame), num_iteration=self.booster.best_iteration)
        return np.maximum(np.expm1(out), 0.0)


def make_baselines(config: TrendConfig, horizon_ms: int, seed: int = 0, num_threads: int = 2) -> dict[str, Forecaster]:
    """The five baselines, in report order."""
    methods: list[Forecaster] = [
        MostPop(config, horizon_ms),
        RecentPop(config, horizon_ms),
        ExpDecay(config, horizon_ms),
        Markov(config, horizon_ms),
        GBM(list(config.signal_names), seed=seed, num_threads=num_threads),
    ]
    return {m.name: m for m in methods}
