"""trainer.evaluate: paired bootstrap, cold-start slice, the report's JSON contract, any event log."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from trainer.evaluate import (BASELINES, CI_METRICS, TRAIL_VARIANTS, choose_protocol, cold_start_mask, load_trail, main,
                              restrict_truth, run, trail_methods)
from trainer.examples import DAY_MS, Truth
from trainer.metrics import KS, aggregate, cutoff_metrics, evaluate_predictions, paired_bootstrap

HOUR = 3_600_000
T0 = pd.Timestamp("2021-01-04", tz="UTC").value // 10**6  # a Monday, UTC midnight
METRIC_KEYS = {f"{m}@{k}" for m in ("ndcg", "hr", "recall") for k in KS} | {"mae_log", "rmse_log", "spearman"}


# --- metrics: per cut-off pieces and the bootstrap ------------------------------------------------------

def ranking_case(n_cut: int = 12, n_items: int = 30, seed: int = 0):
    """Candidates at n_cut cut-offs; users want the items with the largest counts (so counts rank well)."""
    rng = np.random.default_rng(seed)
    items = np.array([f"i{i:02d}" for i in range(n_items)], dtype=object)
    rows, pairs = [], {}
    for c in range(n_cut):
        counts = rng.poisson(rng.gamma(1.0, 4.0, n_items))
        rows += [(c, it, n) for it, n in zip(items, counts)]
        users, its = [], []
        for u in range(20):
            want = rng.choice(n_items, 3, replace=False, p=(counts + 0.1) / (counts + 0.1).sum())
            users += [u] * 3
            its += want.tolist()
        pairs[c] = (np.array(users, np.int64), np.array(its, np.int64))
    frame = pd.DataFrame(rows, columns=["cutoff_ms", "item_id", "label_count"])
    frame["item_id"] = frame["item_id"].astype(object)
    return frame, Truth(items, pairs), list(range(n_cut))


def test_per_cutoff_pieces_aggregate_to_the_headline_numbers():
    frame, truth, cuts = ranking_case()
    rng = np.random.default_rng(1)
    pred = frame["label_count"].to_numpy(float) + rng.normal(0, 2, len(frame)).clip(-1, None) + 1
    table = cutoff_metrics(frame, pred, truth, cuts)
    agg = aggregate(table)
    assert set(agg) == METRIC_KEYS
    # NDCG@10: mean over cut-offs of the per-cut-off mean over users
    assert agg["ndcg@10"] == pytest.approx(np.nanmean(table["ndcg@10"]))
    # MAE: pooled over rows, as before
    d = np.log1p(pred) - np.log1p(frame["label_count"].to_numpy(float))
    assert agg["mae_log"] == pytest.approx(np.abs(d).mean())
    assert agg["rmse_log"] == pytest.approx(np.sqrt((d * d).mean()))
    assert agg == pytest.approx(evaluate_predictions(frame, pred, truth, cuts))
    # a draw that repeats cut-offs is the aggregate over the repeated rows
    w = np.zeros(len(cuts))
    w[[0, 3]] = [2, 1]
    twice = pd.concat([frame[frame.cutoff_ms == 0], frame[frame.cutoff_ms == 0].assign(cutoff_ms=100),
                       frame[frame.cutoff_ms == 3]])
    pairs = {0: truth.at(0), 100: truth.at(0), 3: truth.at(3)}
    p2 = np.concatenate([pred[frame.cutoff_ms == 0], pred[frame.cutoff_ms == 0], pred[frame.cutoff_ms == 3]])
    direct = evaluate_predictions(twice.reset_index(drop=True), p2, Truth(truth.items, pairs), [0, 3, 100])
    assert aggregate(table, w) == pytest.approx(direct)


def test_rank_by_separates_the_ranking_from_the_count():
    frame, truth, cuts = ranking_case(n_cut=3)
    good = frame["label_count"].to_numpy(float)
    flat = np.ones(len(frame))
    mixed = evaluate_predictions(frame, flat, truth, cuts, rank_by=good)
    assert mixed["ndcg@10"] == pytest.approx(evaluate_predictions(frame, good, truth, cuts)["ndcg@10"])
    assert mixed["mae_log"] == pytest.approx(evaluate_predictions(frame, flat, truth, cuts)["mae_log"])


def test_bootstrap_identical_methods_give_zero():
    frame, truth, cuts = ranking_case()
    pred = frame["label_count"].to_numpy(float) * 0.5 + 1
    a = cutoff_metrics(frame, pred, truth, cuts)
    for metric in CI_METRICS:
        ci = paired_bootstrap(a, a, metric, n_boot=500, seed=3)
        assert ci["diff"] == 0 and ci["low"] == 0 and ci["high"] == 0
        assert ci["n_boot"] == 500 and ci["seed"] == 3 and ci["cutoffs"] == len(cuts)


def test_bootstrap_strictly_better_method_has_a_positive_interval():
    frame, truth, cuts = ranking_case()
    rng = np.random.default_rng(5)
    good = frame["label_count"].to_numpy(float)
    noisy = rng.permutation(good)  # counts of other items: ranks badly, errs a lot
    a, b = cutoff_metrics(frame, good, truth, cuts), cutoff_metrics(frame, noisy, truth, cuts)
    ndcg = paired_bootstrap(a, b, "ndcg@10", n_boot=1000, seed=0)
    assert ndcg["diff"] == pytest.approx(aggregate(a)["ndcg@10"] - aggregate(b)["ndcg@10"])
    assert 0 < ndcg["low"] <= ndcg["diff"] <= ndcg["high"]
    mae = paired_bootstrap(a, b, "mae_log", n_boot=1000, seed=0)
    assert mae["diff"] == pytest.approx(-aggregate(b)["mae_log"])  # a's MAE is 0
    assert mae["low"] <= mae["diff"] <= mae["high"] < 0
    assert paired_bootstrap(a, b, "ndcg@10", n_boot=1000, seed=0) == ndcg  # seeded: reproducible
    with pytest.raises(ValueError, match="same cut-offs"):
        paired_bootstrap(a, cutoff_metrics(frame[frame.cutoff_ms < 5], good[frame.cutoff_ms < 5], truth,
                                           cuts[:5]), "ndcg@10")


# --- cold-start slice -----------------------------------------------------------------------------------

def test_cold_start_slice_ranks_only_young_items_against_their_own_truth():
    items = np.array(["a", "b", "c", "d"], dtype=object)  # codes 0..3
    frame = pd.DataFrame({"cutoff_ms": [1, 1, 1, 1, 2, 2], "item_id": pd.Series(list("abcdab"), dtype=object),
                          "label_count": [5, 1, 2, 0, 3, 3],
                          "age_h": [10.0, 5000.0, 600.0, 671.9, 700.0, 100.0]})
    # cut-off 1: user 0 wants a (young) and b (old); user 1 only b (old); cut-off 2: user 0 wants a (now old)
    truth = Truth(items, {1: (np.array([0, 0, 1]), np.array([0, 1, 1])), 2: (np.array([0]), np.array([0]))})
    cold = cold_start_mask(frame, 28)
    assert cold.tolist() == [True, False, True, True, False, True]
    sliced = restrict_truth(truth, frame, cold, [1, 2])
    assert [x.tolist() for x in sliced.at(1)] == [[0], [0]]  # only user 0's wish for "a" is left
    assert [x.tolist() for x in sliced.at(2)] == [[], []]  # "a" is not young at cut-off 2
    pred = np.array([1.0, 100.0, 3.0, 2.0, 1.0, 1.0])  # the old "b" would top the global list
    sub = frame[cold].reset_index(drop=True)
    m = evaluate_predictions(sub, pred[cold], sliced, [1, 2], ks=(1, 2, 3))
    # slice list at cut-off 1: c, d, a -> user 0's "a" at position 2; cut-off 2 scores nobody
    assert m["hr@2"] == 0 and m["hr@3"] == 1 and m["ndcg@3"] == pytest.approx(0.5)
    assert m["mae_log"] == pytest.approx(np.abs(np.log1p(pred[cold]) - np.log1p([5, 2, 0, 3])).mean())


# --- the report -----------------------------------------------------------------------------------------

def event_log(days: int = 112, n_items: int = 30, seed: int = 0, start: int = T0) -> pd.DataFrame:
    """Items with a level and a slow trend, plus items that first appear late (cold starts)."""
    rng = np.random.default_rng(seed)
    rows = []
    level = rng.gamma(1.5, 2.0, n_items)
    # every 4th item first appears in the second half of the log
    born = np.where(np.arange(n_items) % 4 == 0, rng.integers(days // 2, max(days // 2 + 1, days - 3), n_items), 0)
    for i in range(n_items):
        for d in range(int(born[i]), days):
            n = rng.poisson(level[i] * (1 + 0.5 * np.sin(d / 9 + i)))
            ts = start + d * DAY_MS + rng.integers(0, DAY_MS, n)
            rows += [(f"item{i:02d}", f"u{u}", int(t)) for u, t in zip(rng.integers(0, 60, n), ts)]
    return pd.DataFrame(rows, columns=["item_id", "user_id", "ts"]).sort_values("ts", kind="stable")


def fake_score_frame(model, frame, horizon_days, *, variant="full", seed=0):
    """Stand-in for trainer.inference.score_frame: the numeric ablation is recent_pop, full adds the truth."""
    base = np.log1p(frame["count_7d"].to_numpy(float) * horizon_days / 7)
    if variant == "full":
        return base + 0.5 * frame["label_log"].to_numpy(float), 0.5 * base + 0.5 * frame["label_log"].to_numpy()
    if variant == "shuffled":
        return np.random.default_rng(seed).permutation(base), base
    return base, base


def check_report(report: dict, trail: bool) -> None:
    base = list(BASELINES)
    names = base + (list(TRAIL_VARIANTS) if trail else [])
    assert list(report["methods"]) == names
    for metrics in report["methods"].values():
        assert set(metrics) == METRIC_KEYS
    cold = report["slices"]["cold_start"]
    assert cold["max_age_days"] == 28 and list(cold["methods"]) == names
    for metrics in cold["methods"].values():
        assert set(metrics) == METRIC_KEYS
    assert {"horizon_days", "period_days", "min_history_days", "split"} <= set(report["protocol"])
    if trail:
        assert set(report["ci"]) == {"ndcg@10", "mae_log"}
        for ci in report["ci"].values():
            assert {"best_baseline", "diff", "low", "high", "n_boot", "seed"} <= set(ci)
            assert ci["best_baseline"] in base
        assert set(report["ci_ablations"]) == {"trail_numeric", "trail_text_shuffled"}
    else:
        assert "ci" not in report
    json.dumps(report)  # plain JSON types only


def test_report_contract_with_a_stand_in_trail(tmp_path, cache_dir):
    path = tmp_path / "log.csv"
    event_log(days=168).to_csv(path, index=False)
    report, _ = run(str(path), extra_methods=trail_methods(None, 7.0, seed=0, score_frame=fake_score_frame),
                    n_boot=300, cache_dir=cache_dir)
    check_report(report, trail=True)
    m, ci = report["methods"], report["ci"]
    assert m["trail_numeric"] == pytest.approx(m["recent_pop"])  # same score, same count
    best = max(BASELINES, key=lambda n: m[n]["ndcg@10"])
    assert ci["ndcg@10"]["best_baseline"] == best
    assert ci["ndcg@10"]["diff"] == pytest.approx(m["trail"]["ndcg@10"] - m[best]["ndcg@10"])
    assert ci["ndcg@10"]["low"] <= ci["ndcg@10"]["diff"] <= ci["ndcg@10"]["high"]
    assert report["slices"]["cold_start"]["rows"] > 0
    per = report["per_cutoff"]  # what the bootstrap resamples: averages back to the headline numbers
    assert len(per["cutoff_ms"]) == report["cutoffs"]
    trail = per["methods"]["trail"]
    assert np.mean([v for v in trail["ndcg@10"] if v is not None]) == pytest.approx(m["trail"]["ndcg@10"])
    rows = np.array(per["rows"], float)
    assert (np.array(trail["mae_log"]) * rows).sum() / rows.sum() == pytest.approx(m["trail"]["mae_log"])


def test_v1_artefact_is_refused_clearly(tmp_path, capsys, cache_dir):
    (tmp_path / "manifest.json").write_text(json.dumps({"model_version": "trail-smollm2-v1"}))
    with pytest.raises(ValueError, match="predates item-state-v2; retrain"):
        load_trail(str(tmp_path), None, cache_dir=cache_dir)
    assert main(["--dataset", "ml100k", "--model", str(tmp_path)]) == 2
    assert "predates item-state-v2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="variant"):
        trail_methods(None, 7.0, score_frame=lambda model, frame, horizon_days, top_n=100: None)


# --- --events on logs we have never seen ------------------------------------------------------------

def write_log(tmp_path, ev: pd.DataFrame, ts: str = "iso", users: bool = True, name: str = "log.csv"):
    ev = ev.copy()
    if ts == "iso":
        ev["ts"] = pd.to_datetime(ev["ts"], unit="ms", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if not users:
        ev = ev.drop(columns="user_id")
    path = tmp_path / name
    ev.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("ts,users,days,partial_items", [
    ("iso", True, 112, False), ("ms", True, 112, True), ("ms", False, 112, False), ("iso", True, 10, True),
])
def test_events_cli_on_any_log(tmp_path, capsys, ts, users, days, partial_items):
    ev = event_log(days=days, seed=days)
    path = write_log(tmp_path, ev, ts=ts, users=users)
    args = ["--events", str(path), "--json", str(tmp_path / "r.json"), "--n-boot", "200"]
    if partial_items:
        some = sorted(ev["item_id"].unique())[::3]
        pd.DataFrame({"item_id": some, "title": [f"thing {i}" for i in some], "category": "toys"}).to_csv(
            tmp_path / "items.csv", index=False)
        args += ["--items", str(tmp_path / "items.csv")]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    check_report(report, trail=False)
    assert report["cutoffs"] >= 1 and report["protocol"]["adaptive"]
    if days == 10:  # a short log gets a sub-day horizon and a short history
        assert report["protocol"]["horizon_days"] < 1 and report["protocol"]["min_history_days"] == 3
    else:
        assert report["protocol"]["horizon_days"] == 7
    ranking = report["methods"]["gbm"]["ndcg@10"]
    assert (ranking is None) == (not users)  # no users: nothing to rank against, counts still scored
    assert ("no test cut-off has an event with a user_id" in capsys.readouterr().out) == (not users)
    assert report["methods"]["gbm"]["mae_log"] is not None


def test_events_cli_explains_too_few_cutoffs(tmp_path, capsys):
    path = write_log(tmp_path, event_log(days=10), ts="ms")
    assert main(["--events", str(path), "--horizon-days", "7"]) == 2
    err = capsys.readouterr().err
    assert "spans" in err and "--horizon-days" in err and "--period-days" in err
    tiny = write_log(tmp_path, event_log(days=1), ts="ms", name="tiny.csv")
    assert main(["--events", str(tiny)]) == 2
    assert "error:" in capsys.readouterr().err


def test_choose_protocol_adapts_to_the_span():
    year = choose_protocol(T0, T0 + 365 * DAY_MS, HOUR)
    assert year["horizon_days"] == 7 and year["min_history_days"] == 28 and year["n_cutoffs"] >= 10
    two_months = choose_protocol(T0, T0 + 60 * DAY_MS, HOUR)
    assert two_months["horizon_days"] == 3 and two_months["min_history_days"] == 20
    ten_days = choose_protocol(T0, T0 + 10 * DAY_MS, HOUR)
    assert ten_days["horizon_days"] == 0.5 and ten_days["n_cutoffs"] >= 10
    kept = choose_protocol(T0, T0 + 60 * DAY_MS, HOUR, horizon_days=7, min_history_days=28)
    assert kept["horizon_days"] == 7 and kept["period_days"] == 7 and kept["min_history_days"] == 28


def test_distinct_per_block_does_not_fall_with_the_sample_size():
    from trainer.explain_eval import distinct_n, distinct_per_block

    texts = [f"item {i % 50} rose from {i % 7} last week" for i in range(200)]  # 50 texts, repeated 4 times
    assert distinct_per_block(texts) == pytest.approx(distinct_n(texts[:50]))
    assert distinct_n(texts) < distinct_per_block(texts)  # over all 200 the repeats count against it
    assert distinct_per_block(texts[:10]) == distinct_n(texts[:10])  # shorter than a block: the whole list


def test_forced_forecast_accuracy_over_all_candidates():
    import pandas as pd

    from trainer.explain_eval import forecast_accuracy_all

    # pace = count_7d at a 7-day horizon; steady within max(1, 0.2 x pace)
    frame = pd.DataFrame({"count_1d": [1, 1, 1, 1], "count_7d": [10, 10, 10, 10], "count_28d": [40, 40, 40, 40],
                          "label_count": [20, 10, 2, 11]})  # realised: rise, steady, fall, steady
    out = forecast_accuracy_all(frame, np.array([30.0, 10.0, 10.0, 3.0]), 7.0)  # stated: rise, steady, steady, fall
    assert out == {"forecast_accuracy_all_candidates": 0.5, "majority_accuracy_all_candidates": 0.5,
                   "all_candidates": 4}
    assert forecast_accuracy_all(frame.iloc[:0], np.zeros(0), 7.0) == {}
