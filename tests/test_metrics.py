"""Metric functions against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from trainer.examples import Truth
from trainer.metrics import evaluate_predictions, log_errors, ranking_sums, spearman, top_k

ITEMS = np.array(["a", "b", "c", "d", "e"], dtype=object)  # codes 0..4


def g(pos: int) -> float:
    """Gain of a hit at 0-based position pos."""
    return 1.0 / math.log2(pos + 2)


def frame(rows: list[tuple[int, str, float]]) -> pd.DataFrame:
    return pd.DataFrame({"cutoff_ms": [r[0] for r in rows], "item_id": pd.Series([r[1] for r in rows], dtype=object),
                         "label_count": [r[2] for r in rows]})


def test_ranking_sums_by_hand():
    ranked = np.array([0, 1, 2, 3, 4])  # a b c d e
    # user 7: {a, c}; user 9: {e}; user 8: {b, d, x(code 5, not in the list)}
    user = np.array([7, 7, 9, 8, 8, 8])
    item = np.array([0, 2, 4, 1, 3, 5])
    n, s = ranking_sums(ranked, user, item, ks=(1, 3))
    assert n == 3
    # K=1: only user 7 hits (a at 0)
    assert s["hr@1"] == 1 and s["recall@1"] == pytest.approx(0.5)
    assert s["ndcg@1"] == pytest.approx(1.0)  # ideal DCG over min(2, 1) = 1 hit
    # K=3: user 7 hits a(0), c(2); user 8 hits b(1); user 9 misses
    assert s["hr@3"] == 2
    assert s["recall@3"] == pytest.approx(1.0 + 1 / 3)
    ndcg7 = (g(0) + g(2)) / (g(0) + g(1))
    ndcg8 = g(1) / (g(0) + g(1) + g(2))
    assert s["ndcg@3"] == pytest.approx(ndcg7 + ndcg8)


def test_no_truth_pairs_score_nothing():
    n, s = ranking_sums(np.array([0, 1]), np.zeros(0, np.int64), np.zeros(0, np.int64), ks=(5,))
    assert n == 0 and s == {"hr@5": 0.0, "ndcg@5": 0.0, "recall@5": 0.0}


def test_ties_break_by_item_id():
    assert top_k(np.array(["b", "a", "c"], object), np.array([1.0, 1.0, 2.0]), 3).tolist() == [2, 1, 0]
    truth = Truth(ITEMS, {100: (np.array([0]), np.array([1]))})  # one user wants "b"
    f = frame([(100, "b", 1), (100, "a", 0)])
    tied = evaluate_predictions(f, np.array([5.0, 5.0]), truth, ks=(1, 2))
    # "a" < "b": the list is [a, b]; b is a miss at K=1 and a hit at position 1 at K=2
    assert tied["hr@1"] == 0 and tied["ndcg@1"] == 0
    assert tied["hr@2"] == 1 and tied["ndcg@2"] == pytest.approx(g(1) / g(0))
    untied = evaluate_predictions(f, np.array([5.0, 4.9]), truth, ks=(1, 2))
    assert untied["ndcg@1"] == 1 and untied["ndcg@2"] == 1


def test_users_without_items_and_empty_cutoffs_contribute_nothing():
    # cut-off 100: user 0 wants a, user 1 wants d; cut-off 200 has candidates but no user
    # interacted in its horizon; cut-off 300 has a user but lost all candidates.
    truth = Truth(ITEMS, {100: (np.array([0, 1]), np.array([0, 3]))})
    f = frame([(100, "a", 3), (100, "b", 0), (100, "c", 0), (200, "a", 0), (200, "b", 0)])
    pred = np.array([3.0, 2.0, 1.0, 1.0, 0.5])
    out = evaluate_predictions(f, pred, truth, ks=(1, 5))
    # only cut-off 100 is scored: user 0 hits at 0, user 1 misses (d is no candidate)
    assert out["hr@1"] == pytest.approx(0.5) and out["ndcg@5"] == pytest.approx(0.5)
    assert out["recall@5"] == pytest.approx(0.5)
    assert all(v is not None and np.isfinite(v) for v in out.values())
    # a cut-off with users but no candidate rows scores zero for them (it is not skipped)
    truth.pairs[300] = (np.array([4]), np.array([1]))
    out2 = evaluate_predictions(f, pred, truth, cutoffs=[100, 200, 300], ks=(1, 5))
    assert out2["hr@1"] == pytest.approx(0.25)
    # nothing scored at all: None, not NaN, and no crash
    empty = evaluate_predictions(frame([]), np.zeros(0), Truth(ITEMS), ks=(5,))
    assert empty == {"ndcg@5": None, "hr@5": None, "recall@5": None, "mae_log": None, "rmse_log": None,
                     "spearman": None}


def test_spearman_by_hand():
    # truth ranks 1, 2.5, 2.5, 4 (ties share the average); prediction ranks 1, 2, 3, 4
    a, b = np.array([1, 2, 3, 4.0]), np.array([0, 5, 5, 9.0])
    ra, rb = np.array([1, 2, 3, 4.0]) - 2.5, np.array([1, 2.5, 2.5, 4]) - 2.5
    want = (ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum())
    assert spearman(a, b) == pytest.approx(want)
    assert spearman(-a, b) == pytest.approx(-want)
    assert spearman(a, np.full(4, 3.0)) is None  # nothing to rank
    assert spearman(np.ones(4), b) == 0.0  # a constant forecast ranks nothing


def test_spearman_averages_over_cutoffs_skipping_constant_truth():
    truth = Truth(ITEMS)
    f = frame([(1, "a", 1), (1, "b", 2), (2, "a", 0), (2, "b", 0), (3, "a", 5), (3, "b", 1)])
    out = evaluate_predictions(f, np.array([1.0, 2.0, 7.0, 3.0, 1.0, 2.0]), truth, ks=(5,))
    assert out["spearman"] == pytest.approx(0.0)  # +1 and -1; cut-off 2 has constant truth


def test_log_errors_by_hand():
    mae, rmse = log_errors(np.array([0.0, math.e - 1, -3.0]), np.array([0, 0, 0]))
    assert mae == pytest.approx(1 / 3) and rmse == pytest.approx(math.sqrt(1 / 3))
    with pytest.raises(ValueError, match="predictions"):
        log_errors(np.zeros(2), np.zeros(3))


def test_bad_predictions_are_refused():
    f = frame([(1, "a", 1), (1, "b", 2)])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_predictions(f, np.array([1.0, np.nan]), Truth(ITEMS))
    with pytest.raises(ValueError, match="shape"):
        evaluate_predictions(f, np.array([1.0]), Truth(ITEMS))
