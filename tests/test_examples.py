"""Examples on a slice of the real Online Retail II log: cut-offs, labels, truth, no leakage, split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stream.core.datasets import Dataset
from trainer.examples import DAY_MS, ExamplesError, build_examples, make_cutoffs, split_cutoffs

H = 7 * DAY_MS



@pytest.fixture(scope="module")
def examples(retail_slice):
    return build_examples(retail_slice)


def test_cutoffs_are_midnights_inside_the_log(retail_slice, examples):
    ts = retail_slice.events["ts"].to_numpy()
    c = examples.cutoffs
    assert len(c) >= 3
    assert (c % DAY_MS == 0).all() and (np.diff(c) == H).all()
    assert c[0] >= ts[0] + 28 * DAY_MS and c[0] - DAY_MS < ts[0] + 28 * DAY_MS
    assert c[-1] + H <= ts[-1] and c[-1] + 2 * H > ts[-1]
    assert examples.frame["cutoff_ms"].unique().tolist() == c.tolist()


def test_labels_candidates_and_truth_against_pandas(retail_slice, examples):
    ev = retail_slice.events
    f = examples.frame
    for t in examples.cutoffs.tolist():
        rows = f[f["cutoff_ms"] == t].set_index("item_id")
        past = ev[(ev["ts"] >= t - 28 * DAY_MS) & (ev["ts"] < t)]
        future = ev[(ev["ts"] >= t) & (ev["ts"] < t + H)]
        assert set(rows.index) == set(past["item_id"])  # candidates: active in the longest window
        assert rows.index.is_monotonic_increasing
        want = future["item_id"].value_counts().reindex(rows.index, fill_value=0)
        assert (rows["label_count"] == want).all()
        assert np.allclose(rows["label_log"], np.log1p(want))
        bigger = np.array([(want > v).sum() for v in want])
        assert (rows["label_rank"].to_numpy() == bigger + 1).all()
        week = past[past["ts"] >= t - H]
        assert (rows["count_7d"] == week["item_id"].value_counts().reindex(rows.index, fill_value=0)).all()
        users = week.dropna(subset=["user_id"]).groupby("item_id")["user_id"].nunique()
        assert (rows["users_7d"] == users.reindex(rows.index, fill_value=0)).all()
        u, i = examples.truth.at(t)
        got = {(int(a), examples.truth.items[b]) for a, b in zip(u, i)}
        pairs = future.dropna(subset=["user_id"])[["user_id", "item_id"]].drop_duplicates()
        assert len(got) == len(pairs)
        assert {b for _, b in got} == set(pairs["item_id"])  # includes items that are no candidate
        assert len({a for a, _ in got}) == pairs["user_id"].nunique()


def test_item_metadata_and_columns(retail_slice, examples):
    f = examples.frame
    assert list(f.columns[:2]) == ["cutoff_ms", "item_id"]
    assert set(examples.feature_names) <= set(f.columns)
    assert {"label_count", "label_log", "label_rank", "title", "category"} <= set(f.columns)
    titles = retail_slice.items.set_index("item_id")["title"]
    assert (f["title"] == f["item_id"].map(titles)).all()
    assert f["category"].isna().all()  # Online Retail II has no categories


def test_future_events_never_reach_features(retail_slice, examples):
    """Replace everything from a cut-off on with other events: features up to it stay, its labels move."""
    ev = retail_slice.events
    t = int(examples.cutoffs[1])
    rng = np.random.default_rng(0)
    future = ev[ev["ts"] >= t].copy()
    future["item_id"] = rng.permutation(future["item_id"].to_numpy())
    future["user_id"] = rng.permutation(future["user_id"].to_numpy())
    future["ts"] = np.sort(rng.integers(t, int(ev["ts"].max()) + 1, len(future)))
    changed = Dataset("changed", pd.concat([ev[ev["ts"] < t], future], ignore_index=True),
                      retail_slice.items, 7.0)
    other = build_examples(changed)
    assert other.cutoffs.tolist() == examples.cutoffs.tolist()
    feats = examples.feature_names
    for c in examples.cutoffs[:2].tolist():
        a = examples.frame[examples.frame["cutoff_ms"] == c].reset_index(drop=True)
        b = other.frame[other.frame["cutoff_ms"] == c].reset_index(drop=True)
        assert a["item_id"].tolist() == b["item_id"].tolist()
        np.testing.assert_array_equal(a[feats].to_numpy(), b[feats].to_numpy())
    a = examples.frame[examples.frame["cutoff_ms"] == t]["label_count"].to_numpy()
    b = other.frame[other.frame["cutoff_ms"] == t]["label_count"].to_numpy()
    assert not np.array_equal(a, b)
    later = examples.cutoffs[2]
    a = examples.frame[examples.frame["cutoff_ms"] == later][feats].to_numpy()
    b = other.frame[other.frame["cutoff_ms"] == later][feats].to_numpy()
    assert a.shape != b.shape or not np.array_equal(a, b)  # features after the change do see it


def test_split_is_time_ordered_and_purges_overlapping_labels():
    c = np.arange(20, dtype=np.int64) * DAY_MS
    s = split_cutoffs(c, DAY_MS)
    assert s.describe() == {"train": 14, "valid": 2, "test": 4}
    assert s.train.max() < s.valid.min() and s.valid.max() < s.test.min()
    # a 3-day horizon with daily cut-offs: days 14, 15 (labels reach into test) and 10, 11
    # (labels reach into validation) are left out
    s3 = split_cutoffs(c, 3 * DAY_MS)
    assert s3.test.tolist() == c[16:].tolist() and s3.valid.tolist() == c[12:14].tolist()
    assert s3.train.tolist() == c[:10].tolist()
    with pytest.raises(ExamplesError, match="too few"):
        split_cutoffs(c[:3], 3 * DAY_MS)
    with pytest.raises(ExamplesError, match="test_frac"):
        split_cutoffs(c, DAY_MS, test_frac=0.7, valid_frac=0.4)


def test_bad_settings_are_explained(retail_slice):
    with pytest.raises(ExamplesError, match="too short"):
        build_examples(retail_slice, min_history_days=60)
    with pytest.raises(ExamplesError, match="whole number of trend buckets"):
        make_cutoffs(0, 100 * DAY_MS, DAY_MS, DAY_MS + 1, 0, 3_600_000)
    short = build_examples(retail_slice, horizon_days=3, period_days=3.5)
    assert (np.diff(short.cutoffs) == 84 * 3_600_000).all()
    assert short.horizon_ms == 3 * DAY_MS
