"""Baselines: formulas, finite predictions on real data, gbm learning a pattern, the evaluate CLI contract."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stream.core.trends import TrendConfig
from trainer.baselines import GBM, ExpDecay, Forecaster, Markov, MostPop, RecentPop, make_baselines, reference_window
from stream.core.datasets import Dataset
from trainer.evaluate import evaluate_methods, fit_baselines, main
from trainer.examples import DAY_MS, build_examples, split_cutoffs

HOUR = 3_600_000
T0 = pd.Timestamp("2021-01-04", tz="UTC").value // 10**6  # a Monday, UTC midnight


def alternating_stream(weeks: int = 26, n_items: int = 80, seed: int = 0) -> pd.DataFrame:
    """Items busy every other week (level L) and quiet in between (1 event): next week = the week before last.

    Last week's count (recent_pop) is exactly wrong here; the signals hold the answer
    (prev_count_7d), so a model that learns from them must do better.
    """
    rng = np.random.default_rng(seed)
    level = rng.integers(3, 40, n_items)
    phase = rng.integers(0, 2, n_items)
    rows = []
    for w in range(weeks):
        for i in range(n_items):
            n = int(level[i]) if (w + phase[i]) % 2 == 0 else 1
            ts = T0 + w * 7 * DAY_MS + rng.integers(0, 7 * DAY_MS, n)
            users = rng.integers(0, 300, n)
            rows += [(f"i{i:03d}", f"u{u}", int(t)) for u, t in zip(users, ts)]
    df = pd.DataFrame(rows, columns=["item_id", "user_id", "ts"]).sort_values("ts", kind="stable")
    df["event_type"] = "view"
    df["weight"] = 1.0
    return df.reset_index(drop=True)


def synthetic_dataset() -> Dataset:
    ev = alternating_stream()
    ev["user_id"] = ev["user_id"].astype(object)
    ev["item_id"] = ev["item_id"].astype(object)
    ids = sorted(ev["item_id"].unique())
    items = pd.DataFrame({"item_id": pd.Series(ids, dtype=object), "title": pd.Series(ids, dtype=object),
                          "category": None, "price": np.nan, "description": None})
    return Dataset("alternating", ev, items, 7.0)


def test_heuristic_formulas_by_hand():
    cfg = TrendConfig()
    h = 3 * DAY_MS
    assert reference_window(cfg, h) == ("7d", 7 * DAY_MS)
    assert reference_window(cfg, 60 * DAY_MS) == ("28d", 28 * DAY_MS)
    row = pd.DataFrame({"count_7d": [14.0, 7.0], "velocity_7d": [4.0, -10.0], "total_count": [100.0, 5.0],
                        "age_h": [1000.0, 10.0], "ema": [0.0, 0.0]})
    assert RecentPop(cfg, h).predict(row).tolist() == pytest.approx([6.0, 3.0])
    assert Markov(cfg, h).predict(row).tolist() == pytest.approx([18 * 3 / 7, 0.0])  # clipped at zero
    assert MostPop(cfg, h).predict(row).tolist() == pytest.approx([100 * 72 / 1000, 5.0])  # young: count so far
    # one event in every hour bucket of the longest window: a rate of one per hour
    weights = np.exp2(-np.arange(cfg.longest) / cfg.ema_halflife_buckets).sum()
    assert ExpDecay(cfg, h).predict(pd.DataFrame({"ema": [weights]})).tolist() == pytest.approx([72.0])


@pytest.fixture(scope="module")
def retail_examples(retail_between):
    return build_examples(retail_between("2010-01-01", "2010-05-01"))


def test_baselines_give_finite_counts_on_real_data(retail_examples):
    ex = retail_examples
    split = split_cutoffs(ex.cutoffs, ex.horizon_ms)
    test = ex.rows(split.test)
    models = make_baselines(ex.config, ex.horizon_ms)
    assert list(models) == ["most_pop", "recent_pop", "exp_decay", "markov", "gbm"]
    for name, model in models.items():
        assert isinstance(model, Forecaster)
        pred = model.fit(ex.rows(split.train), ex.rows(split.valid)).predict(test)
        assert pred.shape == (len(test),), name
        assert np.isfinite(pred).all() and (pred >= 0).all(), name
        assert pred.std() > 0, name
    results = evaluate_methods(ex, split, fit_baselines(ex, split))
    for name, m in results.items():
        assert 0 < m["ndcg@10"] <= 1 and 0 <= m["recall@20"] <= 1 and -1 <= m["spearman"] <= 1, name


def test_gbm_learns_a_pattern_recent_pop_cannot():
    ex = build_examples(synthetic_dataset())
    split = split_cutoffs(ex.cutoffs, ex.horizon_ms)
    methods = fit_baselines(ex, split) | {"oracle": lambda f: f["label_count"].to_numpy(np.float64)}
    results = evaluate_methods(ex, split, methods)
    gbm, recent, oracle = results["gbm"], results["recent_pop"], results["oracle"]
    # users buy ~9 random items a week, so even the true counts reach only NDCG@10 ~0.2
    assert gbm["ndcg@10"] > 0.9 * oracle["ndcg@10"] > 2 * recent["ndcg@10"]
    assert gbm["mae_log"] < 0.6 * recent["mae_log"]
    assert gbm["spearman"] > 0.8 > recent["spearman"]


def test_gbm_is_deterministic_and_refuses_use_before_fit():
    ex = build_examples(synthetic_dataset())
    split = split_cutoffs(ex.cutoffs, ex.horizon_ms)
    train, valid, test = ex.rows(split.train), ex.rows(split.valid), ex.rows(split.test)
    with pytest.raises(RuntimeError, match="fit"):
        GBM(ex.feature_names).predict(test)
    a = GBM(ex.feature_names, seed=3).fit(train, valid).predict(test)
    b = GBM(ex.feature_names, seed=3).fit(train, valid).predict(test)
    np.testing.assert_array_equal(a, b)


def test_evaluate_cli_writes_the_json_contract(tmp_path, capsys):
    ev = alternating_stream(weeks=16, n_items=30)
    ev["ts"] = pd.to_datetime(ev["ts"], unit="ms", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # ISO strings
    events = tmp_path / "events.csv"
    ev.to_csv(events, index=False)
    items = tmp_path / "items.csv"
    pd.DataFrame({"item_id": sorted(ev["item_id"].unique()), "title": "thing", "category": "toys"}).to_csv(
        items, index=False)
    out, png = tmp_path / "r.json", tmp_path / "ndcg.png"
    assert main(["--events", str(events), "--items", str(items), "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"dataset", "cutoffs", "methods", "slices", "protocol", "per_cutoff", "method_seconds",
                           "seconds"}
    assert report["dataset"] == "events" and report["cutoffs"] == 2  # 11 cut-offs: 20% test
    assert report["protocol"]["horizon_days"] == 7 and report["protocol"]["min_history_days"] == 28
    assert list(report["methods"]) == ["most_pop", "recent_pop", "exp_decay", "markov", "gbm", "exp_decay_tuned",
                                       "gbm_l1", "lgbm_rank"]
    keys = {f"{m}@{k}" for m in ("ndcg", "hr", "recall") for k in (5, 10, 20)} | {"mae_log", "rmse_log", "spearman"}
    for metrics in report["methods"].values():
        assert set(metrics) == keys
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "gbm" in printed and "ndcg@10" in printed and "wall time" in printed
    assert main(["--events", str(tmp_path / "nope.csv")]) == 2
