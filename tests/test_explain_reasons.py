"""The evaluation's reason and size figures (issue 20): reason_accuracy beside its base rate, the size and range
shares, and the forecast clauses checked against each row's prediction."""

from __future__ import annotations

from dataclasses import replace

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


# ---- the model's top driver as the reason (20.2 text part) ------------------------------------------------

from stream.core.faithfulness import check  # noqa: E402
from stream.core.faithfulness.grammar import claim_grammar, reason_of, reason_plan, top_driver  # noqa: E402

ROW = {"count_1d": 5.0, "count_7d": 26.0, "prev_count_7d": 21.0, "users_7d": 20.0, "count_28d": 80.0,
       "prev_count_28d": 70.0, "users_28d": 40.0, "age_h": 2880.0,
       "nbr_n": 11.0, "nbr_count_7d": 135.0, "nbr_prev_7d": 100.0, "ly_count": 20.0, "ly_next": 61.0}


def test_top_driver_is_the_largest_push_the_forecasts_way():
    d = {"trend": 0.2, "level": -0.5, "neighbourhood": 0.4, "season": 0.1, "text": 0.0}
    assert top_driver(d, "rise") == "neighbourhood" and top_driver(d, "fall") == "level"
    assert top_driver(d, "steady") == "level" and top_driver(None, "rise") is None
    # a fall that every group pushes up (a busy item above the average item, forecast below its own pace):
    # no group moved it the forecast's way, so there is no top driver to state
    assert top_driver({"trend": 0.2, "level": 0.5, "season": 0.1, "text": 0.3}, "fall") is None
    assert top_driver({"trend": 0.2, "level": 0.0}, "fall") is None


def test_rows_without_a_push_the_forecasts_way_are_counted_apart():
    up = {"trend": 0.3, "level": 0.8}  # a fall that every driver holds up: no top driver
    report, _ = score_trail([LEVEL, PLAIN], [SPIKE] * 2, ["A"] * 2, ["a", "b"], predicted=["fall"] * 2,
                            horizon_days=7, drivers=[up, {"trend": 0.3, "level": -0.8}])
    m = report["trail_raw"]
    assert (m["driver_rows"], m["driver_rows_against"]) == (1, 1)
    assert m["driver_agreement"] == 0.0  # PLAIN gives no reason where the level was the top driver


@pytest.mark.parametrize("driver,words", [
    ("trend", ("up 24% on",)), ("neighbourhood", ("like 11 similar items, up 35%",)),
    # 26 this week is above its 28-day pace (20): no reason for a rise in those words, the level's own push is
    ("level", ("its long-term level lifts it",)),
    # the season: last year's same weeks where the signals hold them, or the calendar's own push
    ("season", ("last year it rose from 20 to 61 over", "time of year lifts it")),
    ("text", ("kind of item it is lifts it", "its kind of item lifts it")),
])
def test_each_driver_is_said_in_words_the_checker_verifies(driver, words):
    import random

    drivers = {g: (1.0 if g == driver else 0.1) for g in ("trend", "level", "neighbourhood", "season", "text")}
    plan = reason_plan(ROW, 7, "rise", drivers)
    assert (plan.kind, plan.source, plan.driver) == (driver, "drivers", driver)
    g = claim_grammar(ROW, 7, "rise", drivers=drivers)
    pred = PredictedCount(40.0, 7, drivers=drivers)  # the checker holds the driver claims to these
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        text = g.sample(rng)
        r = check(text, ROW, prediction=pred)
        assert r.faithful and any(w in text for w in words), (text, [c for c in r.claims if not c.ok])
        assert reason_of(r.claims, ROW, 7, "rise", drivers) == driver
        seen |= {w for w in words if w in text}
    assert seen == set(words)  # every form is in the language


@pytest.mark.parametrize("group", ["season", "text"])
def test_a_driver_against_the_forecast_is_no_reason_for_it(group):
    # a rise whose top driver still pulls down (every group below the average item): no words say it lifts
    drivers = {"trend": -0.6, "level": -0.5, "season": -0.5, "text": -0.5} | {group: -0.05}
    bare = {k: v for k, v in ROW.items() if not k.startswith(("nbr_", "ly_"))}
    plan = reason_plan(bare, 7, "rise", drivers)
    assert plan is None or plan.source == "rule"
    # the same driver for a fall: "... holds it back"
    plan = reason_plan(bare, 7, "fall", {g: -v for g, v in drivers.items()} | {group: -1.0})
    assert plan.kind == group and all("holds it back" in p for p in plan.phrases), plan


def test_without_drivers_or_words_the_rule_gives_the_reason():
    # a fall against a rising week with the count above its 28-day pace (26 > 20): today's level rule
    plan = reason_plan(ROW, 7, "fall", None)
    assert (plan.kind, plan.source, plan.driver) == ("level", "rule", None)
    # the top driver is the item text: its own words ("the kind of item it is holds it back"), checked against it
    plan = reason_plan(ROW, 7, "fall", {"text": -1.0, "trend": 0.3})
    assert (plan.kind, plan.source, plan.driver) == ("text", "drivers", "text")
    # a top driver with no words at all (no neighbourhood signal): the rule, and the record says so
    bare = {k: v for k, v in ROW.items() if not k.startswith(("nbr_", "ly_"))}
    plan = reason_plan(bare, 7, "fall", {"neighbourhood": -1.0, "trend": 0.3})
    assert (plan.kind, plan.source, plan.driver) == ("level", "rule", "neighbourhood")
    # a rise with the trend and no drivers: no reason is due
    assert reason_plan(ROW, 7, "rise", None) is None
    # neighbourhood signals absent (today's model): the neighbourhood driver has no words
    bare = {k: v for k, v in ROW.items() if not k.startswith(("nbr_", "ly_"))}
    assert reason_plan(bare, 7, "rise", {"neighbourhood": 1.0}) is None


def test_false_neighbourhood_and_last_year_claims_are_caught():
    bad = ["Likely to rise: 26 events in the last 7 days, up from 21 the week before; like 12 similar items, up 35% "
           "in the last 7 days.",
           "Likely to rise: 26 events in the last 7 days, up from 21 the week before; like 11 similar items, down 35% "
           "in the last 7 days.",
           "Likely to rise: 26 events in the last 7 days, up from 21 the week before; last year it fell from 20 to 61 "
           "over these weeks.",
           "Likely to rise: 26 events in the last 7 days, up from 21 the week before; last year it rose from 20 to 60 "
           "over these weeks."]
    for text in bad:
        assert not check(text, ROW).faithful, text
    bare = {k: v for k, v in ROW.items() if not k.startswith(("nbr_", "ly_"))}
    assert not check(bad[0].replace("12", "11"), bare).faithful  # no neighbourhood signal: unattributed


def test_driver_agreement_is_null_without_drivers_and_a_share_with_them():
    drivers = {"trend": 0.3, "level": -0.8}
    report, _ = score_trail([LEVEL, PLAIN], [SPIKE] * 2, ["A"] * 2, ["a", "b"], predicted=["fall"] * 2,
                            realised=["fall", "fall"], horizon_days=7)
    assert report["trail_raw"]["driver_agreement"] is None and report["trail_raw"]["driver_rows"] == 0
    report, _ = score_trail([LEVEL, PLAIN], [SPIKE] * 2, ["A"] * 2, ["a", "b"], predicted=["fall"] * 2,
                            realised=["fall", "rise"], horizon_days=7, drivers=[drivers, drivers])
    m = report["trail_raw"]
    assert (m["driver_agreement"], m["driver_rows"]) == (0.5, 2)
    assert m["reason_accuracy"]["level"] == {"n": 1, "accuracy": 1.0, "base_rate": 0.5, "directions": {"fall": 1}}
    # the text states the level, but the model's top driver was its trend: no agreement
    report, _ = score_trail([LEVEL], [SPIKE], ["A"], ["a"], predicted=["fall"], horizon_days=7,
                            drivers=[{"trend": -0.9, "level": -0.1}])
    assert report["trail_raw"]["driver_agreement"] == 0.0
    # every driver pulls against the forecast (fall): no top driver; the row leaves driver_agreement's rows
    # but counts as a disagreement in driver_agreement_all_rows
    report, _ = score_trail([LEVEL, LEVEL], [SPIKE] * 2, ["A"] * 2, ["a", "b"], predicted=["fall"] * 2,
                            horizon_days=7, drivers=[{"trend": 0.9, "level": 0.1}, drivers])
    m = report["trail_raw"]
    assert (m["driver_rows"], m["driver_rows_against"], m["driver_agreement"]) == (1, 1, 1.0)
    assert m["driver_agreement_all_rows"] == 0.5


def test_targets_give_the_top_driver_as_the_grammar_does():
    import random

    from trainer.explanations import target_explanation

    rng = random.Random(2)
    for driver in ("trend", "level", "neighbourhood", "season", "text"):
        for fc in ("rise", "fall"):
            drivers = {g: (-1.0 if fc == "fall" else 1.0) * (1.0 if g == driver else 0.1)
                       for g in ("trend", "level", "neighbourhood", "season", "text")}
            pred = PredictedCount(60.0 if fc == "rise" else 5.0, 7, drivers=drivers)
            for _ in range(10):
                text = target_explanation(ROW, 7, rng, outlook=fc, drivers=drivers)
                r = check(text, ROW, prediction=pred)
                assert r.faithful and r.outlook == fc, (text, [c for c in r.claims if not c.ok])
                assert reason_of(r.claims, ROW, 7, fc, drivers) == driver, text
                # in the words the grammar holds the model to
                assert any(p in text for p in reason_plan(ROW, 7, fc, drivers).phrases), text


def test_grammars_with_size_range_and_drivers_are_valid_for_llguidance(smollm2_tokenizer):
    """Every sentence the grammar admits, with the range's dash and a driver reason, tokenises into steps the
    llguidance matcher allows, ending at the end token."""
    import random

    import numpy as np

    from stream.model.constraint import ClaimConstraint

    cc = ClaimConstraint(smollm2_tokenizer.backend_tokenizer.to_str(), smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    rng = random.Random(4)
    for driver in ("trend", "neighbourhood", "season", "text"):
        for size in (PredictedCount(38.6, 7, 27.6, 54.1), PredictedCount(3.2, 7)):
            drivers = {driver: 1.0 if size.direction(ROW) != "fall" else -1.0, "level": 0.2}
            size = replace(size, drivers=drivers)
            g = claim_grammar(ROW, 7, size.direction(ROW), size=size, drivers=drivers)
            guide = cc.guide([g.lark()])
            text = g.sample(rng)
            assert check(text, ROW, prediction=size).faithful, text
            ids = smollm2_tokenizer(" " + text, add_special_tokens=False).input_ids + [cc.end_id]
            for t in ids:
                guide.mask(logits := np.zeros((1, cc.vocab_size), np.float32), [0])
                assert np.isfinite(logits[0, t]), (text, t)
                guide.advance([0], [t])
            assert guide.matchers[0].is_stopped()
