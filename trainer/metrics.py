"""Forecast and ranking metrics of the evaluation protocol (../shared/DESIGN.md).

Count error: MAE and RMSE of log1p(predicted count) against log1p(true count),
pooled over every candidate row of the evaluated cut-offs.

Spearman: rank correlation (average ranks for ties) of predicted and true counts
over one cut-off's candidates, averaged over cut-offs. A cut-off whose true counts
are all equal has no order to recover and is skipped; a constant prediction at a
cut-off with varying truth scores 0 (it ranks nothing).

Global ranking (PARE, CIKM 2023): at a cut-off every user gets the same list, the
top K candidates by predicted count, ties broken by item id ascending (so a run is
deterministic). A user's ground truth is the set of items they interact with in
the horizon. Per user: HR@K = 1 if any truth item is in the list; Recall@K = hits /
|truth|; NDCG@K = sum over hits of 1/log2(position + 1) divided by the ideal DCG of
min(|truth|, K) hits (binary relevance). Users without truth items are not scored.
Each metric is the mean over a cut-off's scored users, then the mean over cut-offs
that have any scored user: every period weighs the same, however busy. A cut-off
without scored users contributes nothing (no NaN); a metric with nothing at all
to average is None (null in the JSON).

A model may rank by a score that is not its count forecast (`rank_by`): then the
global-ranking metrics and Spearman use the score, MAE/RMSE the count.

`cutoff_metrics` keeps the per-cut-off pieces, `aggregate` turns them into the
numbers above (so a bootstrap over cut-offs, `paired_bootstrap`, recomputes
exactly the headline aggregate on each resample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from trainer.examples import Truth

KS: tuple[int, ...] = (5, 10, 20)


def log_errors(pred_count: np.ndarray, true_count: np.ndarray) -> tuple[float | None, float | None]:
    """(MAE, RMSE) of log1p(count); predictions below zero count as zero; None for no rows."""
    p = np.log1p(np.maximum(np.asarray(pred_count, np.float64), 0.0))
    t = np.log1p(np.asarray(true_count, np.float64))
    if len(p) != len(t):
        raise ValueError(f"{len(p)} predictions for {len(t)} labels")
    if len(p) == 0:
        return None, None
    d = p - t
    return float(np.abs(d).mean()), float(np.sqrt((d * d).mean()))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    bounds = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    avg = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of 1-based positions start+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, np.diff(bounds))
    return ranks


def spearman(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Spearman's rho; None when the truth is constant (nothing to rank), 0 for a constant prediction."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if len(truth) < 2 or truth.min() == truth.max():
        return None
    if pred.min() == pred.max():
        return 0.0
    a, b = _ranks(pred), _ranks(truth)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def top_k(item_ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best scores, best first; equal scores in item id order."""
    item_ids = np.asarray(item_ids, dtype=object)
    scores = np.asarray(scores, np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.lexsort((item_ids, -scores))  # last key is primary
    return order[:k]


def ranking_sums(ranked: np.ndarray, user: np.ndarray, item: np.ndarray, ks: Sequence[int] = KS,
                 ) -> tuple[int, dict[str, float]]:
    """Sums over the users of one cut-off: (users scored, {"hr@K"|"ndcg@K"|"recall@K": sum}).

    `ranked`: item codes of the shared list, best first (at least max(ks) long when
    there are that many candidates). `user`, `item`: the truth pairs (codes), unique.
    """
    ranked = np.asarray(ranked, np.int64)
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "ndcg", "recall")}
    if len(user) == 0:
        return 0, sums
    ucode, uidx = np.unique(user, return_inverse=True)
    n_users = len(ucode)
    n_truth = np.bincount(uidx, minlength=n_users)
    position = np.full(max(int(item.max()), int(ranked.max(initial=-1))) + 1, np.iinfo(np.int64).max)
    position[ranked[::-1]] = np.arange(len(ranked))[::-1]  # first occurrence wins
    pos = position[item]  # 0-based position of each truth pair's item in the list
    gain = 1.0 / np.log2(np.arange(max(ks)) + 2.0)
    ideal = np.cumsum(gain)
    for k in ks:
        hit = pos < k
        hits = np.bincount(uidx[hit], minlength=n_users)
        dcg = np.bincount(uidx[hit], weights=gain[pos[hit]], minlength=n_users)
        idcg = ideal[np.minimum(n_truth, k) - 1]
        sums[f"hr@{k}"] = float((hits > 0).sum())
        sums[f"recall@{k}"] = float((hits / n_truth).sum())
        sums[f"ndcg@{k}"] = float((dcg / idcg).sum())
    return n_users, sums


def cutoff_metrics(frame: pd.DataFrame, pred: np.ndarray, truth: Truth, cutoffs: Sequence[int] | None = None,
                   ks: Sequence[int] = KS, rank_by: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per test cut-off, the pieces every aggregate metric is built from (arrays, one entry per cut-off).

    `pred`: predicted counts, row-aligned with `frame` (cutoff_ms, item_id, label_count);
    `rank_by` (default `pred`): the score the shared list and Spearman rank by (a model
    may rank by a score that is not its count forecast). Keys: "cutoff_ms", "users"
    (scored users), "rows" (candidates), "abs_err" / "sq_err" (sums over the rows of the
    log1p error), "spearman" (NaN where undefined), and "ndcg@K" / "hr@K" / "recall@K"
    (mean over the cut-off's scored users; NaN where it has none).
    `cutoffs` (default: those in the frame) may name cut-offs without candidate rows:
    their users are scored with an empty list.
    """
    pred = np.asarray(pred, np.float64)
    score = pred if rank_by is None else np.asarray(rank_by, np.float64)
    for name, arr in (("predictions", pred), ("ranking scores", score)):
        if arr.shape != (len(frame),):
            raise ValueError(f"{name} have shape {arr.shape}, expected ({len(frame)},)")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contain NaN or infinite values")
    labels = frame["label_count"].to_numpy(np.float64)
    cut = frame["cutoff_ms"].to_numpy(np.int64)
    items = frame["item_id"].to_numpy(dtype=object)
    bounds = np.flatnonzero(np.r_[True, cut[1:] != cut[:-1], True]) if len(cut) else np.zeros(1, np.int64)
    rows = {int(cut[a]): (a, b) for a, b in zip(bounds[:-1], bounds[1:])}
    if len(rows) != len(bounds) - 1:
        raise ValueError("frame rows must be grouped by cutoff_ms")
    cutoffs = sorted(rows) if cutoffs is None else sorted(int(c) for c in cutoffs)
    missing = set(rows) - set(cutoffs)
    if missing:
        raise ValueError(f"frame has rows of {len(missing)} cut-off(s) not in `cutoffs`")
    n = len(cutoffs)
    keys = [f"{m}@{k}" for k in ks for m in ("ndcg", "hr", "recall")]
    out: dict[str, np.ndarray] = {"cutoff_ms": np.asarray(cutoffs, np.int64), "users": np.zeros(n, np.int64),
                                  "rows": np.zeros(n, np.int64), "abs_err": np.zeros(n), "sq_err": np.zeros(n),
                                  "spearman": np.full(n, np.nan)} | {key: np.full(n, np.nan) for key in keys}
    d = np.log1p(np.maximum(pred, 0.0)) - np.log1p(labels)
    for i, c in enumerate(cutoffs):
        a, b = rows.get(c, (0, 0))
        out["rows"][i] = b - a
        out["abs_err"][i] = np.abs(d[a:b]).sum()
        out["sq_err"][i] = (d[a:b] * d[a:b]).sum()
        rho = spearman(score[a:b], labels[a:b])
        if rho is not None:
            out["spearman"][i] = rho
        ranked = truth.item_codes(items[a:b][top_k(items[a:b], score[a:b], max(ks))])
        n_users, sums = ranking_sums(ranked, *truth.at(c), ks)
        out["users"][i] = n_users
        if n_users:
            for key in keys:
                out[key][i] = sums[key] / n_users
    return out


def aggregate(per_cutoff: dict[str, np.ndarray], weights: np.ndarray | None = None) -> dict[str, float | None]:
    """The reported metrics from `cutoff_metrics`; `weights` (default all 1) repeat cut-offs (a bootstrap draw).

    Ranking metrics and Spearman: mean over the cut-offs where they are defined;
    MAE / RMSE: pooled over every row of the cut-offs. None where nothing to average.
    """
    n = len(per_cutoff["cutoff_ms"])
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    keys = sorted((k for k in per_cutoff if "@" in k), key=_metric_order)
    out: dict[str, float | None] = {}
    for key in keys + ["spearman"]:
        v = per_cutoff[key]
        ok = ~np.isnan(v) & (w > 0)
        out[key] = float((w[ok] * v[ok]).sum() / w[ok].sum()) if ok.any() else None
    n_rows = float((w * per_cutoff["rows"]).sum())
    out["mae_log"] = float((w * per_cutoff["abs_err"]).sum() / n_rows) if n_rows else None
    out["rmse_log"] = float(np.sqrt((w * per_cutoff["sq_err"]).sum() / n_rows)) if n_rows else None
    out["spearman"] = out.pop("spearman")
    return out


def evaluate_predictions(frame: pd.DataFrame, pred: np.ndarray, truth: Truth, cutoffs: Sequence[int] | None = None,
                         ks: Sequence[int] = KS, rank_by: np.ndarray | None = None) -> dict[str, float | None]:
    """All metrics of one method on the rows of `frame` (cutoff_ms, item_id, label_count).

    `truth` is a `trainer.examples.Truth`; `pred` the predicted counts, row-aligned;
    `rank_by` the ranking score when it is not `pred` (see `cutoff_metrics`).
    A metric with nothing to average (no rows, no scored user, no cut-off with
    varying truth) is None.
    """
    return aggregate(cutoff_metrics(frame, pred, truth, cutoffs, ks, rank_by))


def metric_values(per_cutoff: dict[str, np.ndarray], metric: str, weights: np.ndarray) -> np.ndarray:
    """`aggregate(per_cutoff, w)[metric]` for each row w of `weights` (B, n cut-offs), vectorised; NaN = None."""
    w = np.asarray(weights, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric in ("mae_log", "rmse_log"):
            n_rows = w @ per_cutoff["rows"].astype(np.float64)
            if metric == "mae_log":
                return (w @ per_cutoff["abs_err"]) / np.where(n_rows > 0, n_rows, np.nan)
            return np.sqrt((w @ per_cutoff["sq_err"]) / np.where(n_rows > 0, n_rows, np.nan))
        v = per_cutoff[metric]
        ok = ~np.isnan(v)
        den = w[:, ok].sum(axis=1)
        return (w[:, ok] @ v[ok]) / np.where(den > 0, den, np.nan)


def paired_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], metric: str, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float | int | None]:
    """Interval of metric(a) - metric(b) by resampling cut-offs with replacement (percentile method).

    `a`, `b`: `cutoff_metrics` of two methods on the same cut-offs. Each draw takes
    n cut-offs with replacement, the same ones for both methods (paired), and
    recomputes each method's aggregate exactly as the headline number is computed
    (`aggregate` with the draw's multiplicities). Returns {"diff" (on all cut-offs),
    "low", "high", "n_boot", "seed", "level", "cutoffs"}; None where undefined.
    """
    if not np.array_equal(a["cutoff_ms"], b["cutoff_ms"]):
        raise ValueError("paired bootstrap needs both methods on the same cut-offs")
    n = len(a["cutoff_ms"])
    full_a, full_b = aggregate(a)[metric], aggregate(b)[metric]
    out: dict[str, float | int | None] = {
        "diff": None if full_a is None or full_b is None else full_a - full_b,
        "low": None, "high": None, "n_boot": int(n_boot), "seed": int(seed), "level": level, "cutoffs": n}
    if out["diff"] is None or n == 0 or n_boot <= 0:
        return out
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    weights = np.zeros((n_boot, n))
    np.add.at(weights, (np.repeat(np.arange(n_boot), n), draws.ravel()), 1.0)
    diffs = metric_values(a, metric, weights) - metric_values(b, metric, weights)
    diffs = diffs[~np.isnan(diffs)]
    if len(diffs):
        tail = (1.0 - level) / 2 * 100
        low, high = np.percentile(diffs, [tail, 100 - tail])
        out["low"], out["high"] = float(low), float(high)
    return out


def _metric_order(key: str) -> tuple[int, int]:
    name, k = key.split("@")
    return int(k), ("ndcg", "hr", "recall").index(name)
