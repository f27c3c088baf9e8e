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


def evaluate_predictions(frame: pd.DataFrame, pred: np.ndarray, truth: Truth, cutoffs: Sequence[int] | None = None,
                         ks: Sequence[int] = KS) -> dict[str, float | None]:
    """All metrics of one method on the rows of `frame` (cutoff_ms, item_id, label_count).

    `truth` is a `trainer.examples.Truth`; `pred` the predicted counts, row-aligned.
    `cutoffs` (default: those in the frame) may name cut-offs without candidate rows:
    their users are scored with an empty list. A metric with nothing to average
    (no rows, no scored user, no cut-off with varying truth) is None.
    """
    pred = np.asarray(pred, np.float64)
    if pred.shape != (len(frame),):
        raise ValueError(f"predictions have shape {pred.shape}, expected ({len(frame)},)")
    if not np.isfinite(pred).all():
        raise ValueError("predictions contain NaN or infinite values")
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
    totals = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "ndcg", "recall")}
    scored_cutoffs = 0
    rhos = []
    for c in cutoffs:
        a, b = rows.get(c, (0, 0))
        rho = spearman(pred[a:b], labels[a:b])
        if rho is not None:
            rhos.append(rho)
        ranked = truth.item_codes(items[a:b][top_k(items[a:b], pred[a:b], max(ks))])
        n_users, sums = ranking_sums(ranked, *truth.at(c), ks)
        if n_users:
            scored_cutoffs += 1
            for key, value in sums.items():
                totals[key] += value / n_users
    mae, rmse = log_errors(pred, labels)
    out: dict[str, float | None] = {
        key: (totals[key] / scored_cutoffs if scored_cutoffs else None) for key in sorted(totals, key=_metric_order)
    }
    out.update({"mae_log": mae, "rmse_log": rmse, "spearman": float(np.mean(rhos)) if rhos else None})
    return out


def _metric_order(key: str) -> tuple[int, int]:
    name, k = key.split("@")
    return int(k), ("ndcg", "hr", "recall").index(name)
