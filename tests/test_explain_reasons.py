"""The evaluation's reason and size figures (issue 20): reason_accuracy beside its base rate, the size and range
shares, and the forecast clauses checked against each row's prediction."""

from __future__ import annotations

import pandas as pd
import pytest

from stream.core.forecast import PredictedCount
from trainer.explain_eval import predicted_sizes, reason_accuracy, score_trail

# a spike: 33 a week against a 28-day pace of 21.5, up from 24
SPIKE = {"count_1d": 5.0, "count_7d": 33.0, "prev_count_7d": 24.0, "users_7d": 20.0, "count_28d": 86.0,
         "prev_count_28d": 70.0, "users_28d": 40.0, "age_h": 2880.0}
LEVEL = "Likely to fall: 33 events in the last 7 days, up from 24 the week before, but already above its 28-day pace."
PLAIN = "Likely to fall: 33 events in the last 7 days, up from 24 the week before."


def test_reason_accuracy_beside_its_base_rate():
    stated = [("level", "fall", "fall"), ("level", "fall", "rise"), ("trend", "rise", "rise")]
    realised = ["fall", "rise", "rise", "rise"]
    out = reason_accuracy(stated, realised)
    assert out["level"] == {"n": 2, "accuracy": 0.5, "base_rate": 0.25, "directions": {"fall": 2}}
    assert out["trend"]["accuracy"] == 1.0 and out["trend"]["base_rate"] == 0.75


def test_score_trail_reports_reasons_sizes_and_ranges():
    sized = [PredictedCount(12.0, 7, 8.0, 17.0), PredictedCount(12.0, 7), PredictedCount(12.0, 7)]
    raw = [LEVEL + " About 12 events next week, likely 8–17.", LEVEL + " About 12 events next week.", PLAIN]
    report, samples = score_trail(raw, [SPIKE] * 3, ["A"] * 3, ["a", "b", "c"], predicted=["fall"] * 3,
                                  realised=["fall", "rise", "fall"], horizon_days=7, sizes=sized)
    m = report["trail_raw"]
    assert m["faithful_share"] == 1.0 and m["size_stated_share"] == pytest.approx(2 / 3)
    assert m["range_stated_share"] == pytest.approx(1 / 3)
    assert m["reason_accuracy"]["level"]["n"] == 2 and m["reason_accuracy"]["level"]["accuracy"] == 0.5
    assert m["reason_accuracy"]["level"]["base_rate"] == pytest.approx(2 / 3)
    # a wrong size is a false claim against the row's prediction, repaired for publishing
    report, _ = score_trail([PLAIN + " About 30 events next week."], [SPIKE], ["A"], ["a"], sizes=sized[1:2])
    assert report["trail_raw"]["faithful_share"] == 0.0 and report["trail"]["faithful_share"] == 1.0
    assert report["trail_raw"]["false_claims"] == {"forecast:count": 1}


def test_predicted_sizes_take_the_range_where_the_rows_have_one():
    rows = pd.DataFrame({"predicted_low": [8.0, float("nan")], "predicted_high": [17.0, float("nan")]})
    a, b = predicted_sizes(rows, [12.0, 5.0], 7)
    assert (a.count, a.low, a.high, a.has_range) == (12.0, 8.0, 17.0, True)
    assert (b.count, b.has_range) == (5.0, False)
    assert not predicted_sizes(pd.DataFrame(index=[0]), [3.0], 7)[0].has_range
