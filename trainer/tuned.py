"""Baselines tuned on the rolling-origin folds (trainer.folds), as carefully as TRAIL is.

- exp_decay_tuned: ranks by the decayed count whose half-life has the best mean fold NDCG@10
  (the signals' ema, ema_7d, ema_14d: 3, 7, 14 days by default); its count is that decay's rate
  times the scale with the best mean fold MAE log.
- gbm_l1: LightGBM on the same signals with the L1 objective on log1p(count) (it fits the
  conditional median, the minimiser of the reported MAE); leaves and rounds chosen on the folds
  (early stopping on each fold's validation), then refitted on every pre-test cut-off.
- lgbm_rank: LightGBM lambdarank on the same signals, one query per cut-off, relevance from
  `label_gain` (the metric's own per-item weight); relevance labels, truncation level,
  learning rate, leaves and rounds chosen on the folds by the metric's NDCG@10 (a staged
  search: labels first, then truncation, then rate x leaves; rounds read off every config's
  trees at 25/50/100/200); refitted on every pre-test cut-off. Its training queries keep every
  candidate with a gain and a seeded quarter of the others (the cost is per pair; the folds
  score it on every candidate). It ranks; its count is
  gbm_l1's when given one, else none of its own (the exp_decay_tuned count).

Each exposes `fit(examples, folds)`, `predict(frame) -> (count, score)` and `report` (what was
tried and chosen, for the JSON). Nothing here reads a test cut-off.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as trainer.baselines: idle OpenMP threads sleep

import lightgbm as lgb  # noqa: E402
import numpy as np
import pandas as pd
import structlog

from trainer.examples import Examples
from trainer.folds import Fold
from trainer.metrics import evaluate_predictions

log = structlog.get_logger(__name__)

ROUNDS = (25, 50, 100, 200)
NEGATIVE_SHARE = 0.25  # of a training query's zero-gain candidates, kept (seeded): lambdarank's cost is per pair
SCALES = tuple(float(s) for s in np.round(np.exp(np.linspace(-1.0, 1.0, 21)), 4))


def _ndcg(examples: Examples, frame: pd.DataFrame, score: np.ndarray) -> float:
    return evaluate_predictions(frame, score, examples.truth, ks=(10,))["ndcg@10"] or 0.0


def _mae(frame: pd.DataFrame, count: np.ndarray) -> float:
    return float(np.abs(np.log1p(np.maximum(count, 0.0)) - frame["label_log"].to_numpy(np.float64)).mean())


def _pre_test(examples: Examples, folds: list[Fold]) -> pd.DataFrame:
    cut = np.union1d(np.concatenate([f.train for f in folds]), np.concatenate([f.valid for f in folds]))
    return examples.rows(cut)


class ExpDecayTuned:
    name = "exp_decay_tuned"

    def __init__(self, examples: Examples) -> None:
        cfg = examples.config
        self.halflife = {"ema": cfg.ema_halflife_buckets} | {f"ema_{n}": h for n, h in cfg.decays}
        ages = np.arange(cfg.longest)
        self.rate = {c: examples.horizon_ms / cfg.bucket_ms / np.exp2(-ages / h).sum() for c, h in self.halflife.items()}
        self.column, self.scale, self.report = "ema", 1.0, {}

    def fit(self, examples: Examples, folds: list[Fold]) -> "ExpDecayTuned":
        valid = [examples.rows(f.valid) for f in folds]
        tried = {c: float(np.mean([_ndcg(examples, v, v[c].to_numpy(np.float64)) for v in valid]))
                 for c in self.halflife}
        self.column = max(tried, key=tried.get)
        maes = {s: float(np.mean([_mae(v, s * self.rate[self.column] * v[self.column].to_numpy(np.float64))
                                  for v in valid])) for s in SCALES}
        self.scale = min(maes, key=maes.get)
        self.report = {"chosen": {"column": self.column, "halflife_buckets": self.halflife[self.column],
                                  "scale": self.scale},
                       "folds_ndcg@10": {c: round(v, 5) for c, v in tried.items()},
                       "folds_mae_log": round(maes[self.scale], 5)}
        log.info("tuned.exp_decay", **self.report["chosen"])
        return self

    def predict(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        value = frame[self.column].to_numpy(np.float64)
        return np.maximum(self.scale * self.rate[self.column] * value, 0.0), value


class _LightGBM:
    def __init__(self, features: list[str], seed: int, num_threads: int) -> None:
        self.features = list(features)
        self.base = {"seed": seed, "deterministic": True, "force_row_wise": True, "num_threads": num_threads,
                     "verbosity": -1, "feature_fraction": 0.9, "bagging_fraction": 0.8, "bagging_freq": 1,
                     "lambda_l2": 1.0, "min_data_in_leaf": 50}
        self.booster: lgb.Booster | None = None
        self.report: dict = {}

    def _x(self, frame: pd.DataFrame) -> np.ndarray:
        return frame[self.features].to_numpy(np.float32)


class GBML1(_LightGBM):
    name = "gbm_l1"
    LEAVES = (15, 63)

    def fit(self, examples: Examples, folds: list[Fold]) -> "GBML1":
        tried = []
        for leaves in self.LEAVES:
            params = self.base | {"objective": "l1", "learning_rate": 0.05, "num_leaves": leaves}
            maes, rounds = [], []
            for f in folds:
                tr, va = examples.rows(f.train), examples.rows(f.valid)
                dtr = lgb.Dataset(self._x(tr), tr["label_log"].to_numpy(np.float64), free_raw_data=True)
                dva = lgb.Dataset(self._x(va), va["label_log"].to_numpy(np.float64), reference=dtr)
                b = lgb.train(params, dtr, num_boost_round=2000, valid_sets=[dva],
                              callbacks=[lgb.early_stopping(50, verbose=False)])
                maes.append(_mae(va, np.expm1(b.predict(self._x(va), num_iteration=b.best_iteration))))
                rounds.append(max(1, b.best_iteration))
            tried.append({"num_leaves": leaves, "folds_mae_log": round(float(np.mean(maes)), 5),
                          "rounds": int(np.median(rounds))})
        best = min(tried, key=lambda t: t["folds_mae_log"])
        full = _pre_test(examples, folds)
        params = self.base | {"objective": "l1", "learning_rate": 0.05, "num_leaves": best["num_leaves"]}
        self.booster = lgb.train(params, lgb.Dataset(self._x(full), full["label_log"].to_numpy(np.float64)),
                                 num_boost_round=best["rounds"])
        self.report = {"chosen": best, "tried": tried, "refit_rows": len(full)}
        log.info("tuned.gbm_l1", **best)
        return self

    def predict(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        count = np.maximum(np.expm1(self.booster.predict(self._x(frame))), 0.0)
        return count, count


def relevance(gain: np.ndarray, users: np.ndarray, scheme: str, edges: np.ndarray | None = None
              ) -> tuple[np.ndarray, list[float], np.ndarray | None]:
    """(integer labels, LightGBM label_gain, the level edges) of a relevance scheme.

    "gainN": label_gain quantised into N levels at quantiles of the positive gains (edges fitted
    on the training rows, reused on others), each level worth its mean gain: the lambdarank
    weight is then ~ the metric's own linear gain. "users": distinct next-period users, capped at 30, linear."""
    if scheme == "users":
        return np.minimum(users, 30).astype(np.int32), [float(i) for i in range(31)], None
    levels = int(scheme.removeprefix("gain"))
    positive = gain[gain > 0]
    if edges is None:
        edges = np.unique(np.quantile(positive, np.linspace(0, 1, levels + 1)[1:-1])) if len(positive) else np.zeros(0)
    label = np.where(gain > 0, 1 + np.searchsorted(edges, gain, side="right"), 0).astype(np.int32)
    worth = [0.0] + [float(gain[label == lv].mean()) if (label == lv).any() else 0.0 for lv in range(1, len(edges) + 2)]
    scale = max(worth) or 1.0
    return label, [w / scale * 30.0 for w in worth], edges


class LGBMRank(_LightGBM):
    name = "lgbm_rank"
    LABELS = ("gain31", "gain8", "users")
    TRUNCATION = (10, 30)
    RATE_LEAVES = ((0.1, 31), (0.1, 15), (0.05, 63))

    def __init__(self, features: list[str], seed: int, num_threads: int, count_of=None) -> None:
        super().__init__(features, seed, num_threads)
        self.count_of = count_of  # frame -> predicted counts (lambdarank's score is no count)

    def _dataset(self, frame: pd.DataFrame, scheme: str, edges=None):
        rng = np.random.default_rng(self.base["seed"])
        keep = (frame["label_gain"].to_numpy(np.float64) > 0) | (rng.random(len(frame)) < NEGATIVE_SHARE)
        frame = frame[keep]
        label, gains, edges = relevance(frame["label_gain"].to_numpy(np.float64),
                                        frame["label_users"].to_numpy(np.int64), scheme, edges)
        group = frame.groupby("cutoff_ms", sort=False).size().to_numpy()
        return lgb.Dataset(self._x(frame), label, group=group, free_raw_data=True), gains

    def _params(self, cfg: dict, gains: list[float]) -> dict:
        return self.base | {"objective": "lambdarank", "label_gain": gains, "min_data_in_leaf": 50,
                            "lambdarank_truncation_level": cfg["truncation"], "learning_rate": cfg["lr"],
                            "num_leaves": cfg["leaves"], "eval_at": [10]}

    def _score_config(self, examples: Examples, folds: list[Fold], cfg: dict) -> dict:
        per_round = {r: [] for r in ROUNDS}
        for f in folds:
            tr, va = examples.rows(f.train), examples.rows(f.valid)
            dtr, gains = self._dataset(tr, cfg["labels"])
            b = lgb.train(self._params(cfg, gains), dtr, num_boost_round=max(ROUNDS))
            x = self._x(va)
            for r in ROUNDS:
                per_round[r].append(_ndcg(examples, va, b.predict(x, num_iteration=r)))
        means = {r: float(np.mean(v)) for r, v in per_round.items()}
        best = max(means, key=means.get)
        return cfg | {"rounds": best, "folds_ndcg@10": round(means[best], 5)}

    def fit(self, examples: Examples, folds: list[Fold]) -> "LGBMRank":
        tried: list[dict] = []

        def search(configs: list[dict]) -> dict:
            for cfg in configs:
                tried.append(self._score_config(examples, folds, cfg))
                log.info("tuned.lgbm_rank.tried", **tried[-1])
            return max(tried, key=lambda t: t["folds_ndcg@10"])

        cfg = {"truncation": self.TRUNCATION[0], "lr": self.RATE_LEAVES[0][0], "leaves": self.RATE_LEAVES[0][1]}
        best = search([cfg | {"labels": lab} for lab in self.LABELS])
        best = search([{k: v for k, v in best.items() if k in ("labels", "lr", "leaves")} | {"truncation": t}
                       for t in self.TRUNCATION[1:]])
        best = search([{"labels": best["labels"], "truncation": best["truncation"], "lr": lr, "leaves": lv}
                       for lr, lv in self.RATE_LEAVES[1:]])
        full = _pre_test(examples, folds)
        dfull, gains = self._dataset(full, best["labels"])
        self.booster = lgb.train(self._params(best, gains), dfull, num_boost_round=best["rounds"])
        self.report = {"chosen": best, "tried": tried, "refit_rows": len(full)}
        log.info("tuned.lgbm_rank", **best)
        return self

    def predict(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        score = self.booster.predict(self._x(frame))
        count = self.count_of(frame) if self.count_of is not None else np.zeros(len(frame))
        return count, score


def fit_tuned(examples: Examples, folds: list[Fold], seed: int = 0, num_threads: int = 2) -> tuple[dict, dict]:
    """({name: frame -> (count, score)}, {name: report}) of the three tuned baselines."""
    features = list(examples.config.signal_names)
    exp = ExpDecayTuned(examples).fit(examples, folds)
    l1 = GBML1(features, seed, num_threads).fit(examples, folds)
    rank = LGBMRank(features, seed, num_threads, count_of=lambda f: l1.predict(f)[0]).fit(examples, folds)
    fitted = {m.name: m for m in (exp, l1, rank)}
    return {n: m.predict for n, m in fitted.items()}, {n: m.report for n, m in fitted.items()}
