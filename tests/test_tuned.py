"""Rolling-origin folds, the baselines tuned on them, the seasonal slice and the gain-ranked oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tests.test_baselines import synthetic_dataset
from trainer.evaluate import evaluate_methods, fit_baselines
from trainer.examples import DAY_MS, build_examples, make_cutoffs, split_cutoffs
from trainer.folds import make_folds
from trainer.slices import seasonal_slice
from trainer.tuned import GBML1, ExpDecayTuned, LGBMRank, relevance

WEEK = 7 * DAY_MS


def test_folds_on_retails_calendar_cover_the_season_and_never_touch_test():
    # retail's protocol: weekly cut-offs from 2009-12-30 to 2011-11-30 (101), the last 20 test
    first = pd.Timestamp("2009-12-02", tz="UTC").value // 10**6
    last = pd.Timestamp("2011-12-09", tz="UTC").value // 10**6
    cutoffs = make_cutoffs(first, last, WEEK, WEEK, 28 * DAY_MS, 3_600_000)
    split = split_cutoffs(cutoffs, WEEK)
    folds = make_folds(split, WEEK)
    assert len(folds) == 4
    np.testing.assert_array_equal(folds[-1].valid, split.valid)  # the split's own validation is the last fold
    months = set()
    for f in folds:
        assert f.train.max() + WEEK <= f.valid.min()  # rolling origin: a fold trains on its past only
        assert not np.isin(f.valid, split.test).any() and not np.isin(f.train, split.test).any()
        assert len(f.valid) == len(split.valid)
        months |= set(pd.to_datetime(f.valid, unit="ms", utc=True).month)
    assert months & {10, 11, 12}  # a fold in the season the single validation period lacked
    starts = [f.valid[0] for f in folds]
    assert starts == sorted(starts) and len(set(starts)) == 4


def test_relevance_levels_follow_the_gain():
    gain = np.array([0.0, 0.01, 0.02, 0.05, 0.2, 0.9, 0.0])
    label, worth, edges = relevance(gain, np.zeros(7, np.int64), "gain8")
    assert label[0] == label[-1] == 0 and (np.diff(label[1:6]) >= 0).all() and label[5] > label[1]
    assert worth[0] == 0 and all(b >= a for a, b in zip(worth, worth[1:]) if b)  # a level is worth its mean gain
    again, _, _ = relevance(gain, np.zeros(7, np.int64), "gain8", edges)  # edges reused on other rows
    np.testing.assert_array_equal(label, again)
    users, worth_u, _ = relevance(gain, np.array([0, 1, 2, 50, 3, 4, 0]), "users")
    assert users.tolist() == [0, 1, 2, 30, 3, 4, 0] and len(worth_u) == 31


def test_tuned_baselines_choose_on_the_folds_and_learn_what_the_signals_hold():
    ex = build_examples(synthetic_dataset())  # next week = the week before last: recent_pop is exactly wrong
    split = split_cutoffs(ex.cutoffs, ex.horizon_ms)
    folds = make_folds(split, ex.horizon_ms)
    assert len(folds) >= 2
    features = list(ex.config.signal_names)
    exp = ExpDecayTuned(ex).fit(ex, folds)
    assert exp.report["chosen"]["column"] in ("ema", "ema_7d", "ema_14d")
    l1 = GBML1(features, 0, 1).fit(ex, folds)
    rank = LGBMRank(features, 0, 1, count_of=lambda f: l1.predict(f)[0]).fit(ex, folds)
    assert len(rank.report["tried"]) == 6 and rank.report["chosen"]["rounds"] in (25, 50, 100, 200)
    assert rank.report["chosen"]["folds_ndcg@10"] == max(t["folds_ndcg@10"] for t in rank.report["tried"])
    tuning: dict = {}
    methods = fit_baselines(ex, split, folds=folds, tuning=tuning)
    assert set(tuning) == {"exp_decay_tuned", "gbm_l1", "lgbm_rank"}
    res = evaluate_methods(ex, split, methods)
    assert res["lgbm_rank"]["ndcg@10"] > res["recent_pop"]["ndcg@10"]
    assert res["gbm_l1"]["mae_log"] < res["recent_pop"]["mae_log"]
    assert res["lgbm_rank"]["mae_log"] == res["gbm_l1"]["mae_log"]  # the ranker borrows gbm_l1's count


def test_seasonal_slice_by_hand():
    sep = pd.Timestamp("2011-09-07", tz="UTC").value // 10**6
    jul = pd.Timestamp("2011-07-06", tz="UTC").value // 10**6
    frame = pd.DataFrame({"cutoff_ms": [sep, sep, sep, jul], "item_id": ["a", "b", "c", "a"],
                          "title": ["PAPER CHAIN KIT CHRISTMAS", "LUNCH BAG RED", "SANTA MUG", "PAPER CHAIN KIT CHRISTMAS"],
                          "label_log": np.log1p([9.0, 4.0, 1.0, 50.0])})
    got = seasonal_slice(frame, {"m": np.array([4.0, 4.0, 1.0, 0.0])})
    assert got["rows"] == 2 and got["items"] == 2 and got["other_rows"] == 1 and got["cutoffs"] == 1
    err = [np.log1p(9.0) - np.log1p(4.0), 0.0]  # July is out of the season: its miss does not count
    assert np.isclose(got["methods"]["m"]["bias_log"], np.mean(err))
    assert np.isclose(got["methods"]["m"]["mae_log"], np.mean(np.abs(err)))
    assert got["other_items"]["m"] == {"mae_log": 0.0, "bias_log": 0.0}
    assert seasonal_slice(frame.iloc[[1, 3]], {"m": np.zeros(2)}) is None


def test_the_oracle_ranks_by_the_metrics_own_gain(tmp_path, cache_dir):
    from tests.test_evaluate import event_log
    from trainer.evaluate import run

    path = tmp_path / "log.csv"
    event_log(days=168).to_csv(path, index=False)
    report, _ = run(str(path), oracle=True, n_boot=50, cache_dir=cache_dir)
    m = report["methods"]
    assert all(m["oracle"]["ndcg@10"] >= v["ndcg@10"] - 1e-12 for v in m.values())
    assert m["oracle"]["mae_log"] == 0.0
    assert len(report["protocol"]["folds"]) >= 2 and set(report["protocol"]["tuned"]) == {
        "exp_decay_tuned", "gbm_l1", "lgbm_rank"}
