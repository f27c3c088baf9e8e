"""The stricter checker (issue 20): a statement is either a claim tied to a signal and true, or the text is
unfaithful. A corpus of sentences with magnitude, acceleration, age, customer, rank, cause, stock and forecast
words, true and false both ways, against the issue's signals and against a prediction with and without a range."""

from __future__ import annotations

import pytest

from stream.core.faithfulness import check, repair
from stream.core.forecast import PredictedCount, size_unit, stated_range, stated_size

# the issue's row: 26 events in the last 7 days, 21 the week before, decelerating (accel_7d -14), 120 days old
S = {
    "count_1d": 3.0, "prev_count_1d": 4.0, "users_1d": 3.0, "velocity_1d": -1.0, "accel_1d": -2.0,
    "count_7d": 26.0, "prev_count_7d": 21.0, "users_7d": 20.0, "velocity_7d": 5.0, "accel_7d": -14.0,
    "count_28d": 90.0, "prev_count_28d": 80.0, "users_28d": 51.0, "velocity_28d": 10.0, "accel_28d": 4.0,
    "ema": 4.0, "total_count": 500.0, "age_h": 2880.0, "idle_h": 2.0,
}
# a young item that tripled: 36 against 12, accelerating, 5 days old
Y = dict(S, count_7d=36.0, prev_count_7d=12.0, velocity_7d=24.0, accel_7d=15.0, age_h=120.0)

ISSUE_SIX = [
    "Demand is accelerating: 26 events in the last 7 days, up from 21.",
    "A brand-new product: 26 events in the past week from 20 users.",
    "Sales exploded this week: 26 events against 21 the week before.",
    "26 events in the last 7 days, up from 21; likely to double next week.",
    "Thanks to a Christmas price cut, 26 events in the last 7 days.",
    "Loyal repeat customers keep buying it and stock is running low.",
]


@pytest.mark.parametrize("text", ISSUE_SIX)
def test_the_issues_six_are_unfaithful(text):
    r = check(text, S)
    assert not r.faithful, r
    # with the prediction too (a steady 26 next week): "likely to double" is then checked, and false
    assert not check(text, S, prediction=PredictedCount(26.0, 7)).faithful


def test_a_text_without_a_claim_is_not_faithful():
    r = check("Loyal repeat customers keep buying it and stock is running low.", S)
    assert r.unverifiable == r.false == r.checked >= 2
    assert all(c.kind == "unverifiable" and c.true is None for c in r.claims)
    assert not check("A popular item among shoppers.", S).faithful
    r = check("Customers love it.", S)  # no word of the lexicon: the clause itself is the unverifiable statement
    assert not r.faithful and [c.measure for c in r.claims] == ["statement"]


# (text, row, faithful): each kind of word verified where a signal backs it, refused where none can
CORPUS = [
    # acceleration: accel_<w>
    ("Demand is accelerating: 36 events in the last 7 days, up from 12.", Y, True),
    ("Demand is decelerating: 26 events in the last 7 days, up from 21.", S, True),
    ("Not accelerating: 26 events in the last 7 days.", S, True),
    ("Decelerating: 36 events in the last 7 days.", Y, False),
    # magnitude: strong needs 1.5x, slight at most 1.25x
    ("Sales exploded this week: 36 events against 12 the week before.", Y, True),
    ("Surging: 36 events in the last 7 days, up from 12.", Y, True),
    ("A sharp rise: 36 events in the last 7 days vs 12 the week before.", Y, True),
    ("A slight rise: 26 events in the last 7 days vs 21 the week before.", S, True),
    ("A slight rise: 36 events in the last 7 days vs 12 the week before.", Y, False),
    ("A sharp rise: 26 events in the last 7 days vs 21 the week before.", S, False),
    ("Plunging: 26 events in the last 7 days vs 21 the week before.", S, False),
    # ages: new < 28 days, brand-new < 7 days, established >= 28 days
    ("A brand-new product: 36 events in the past week.", Y, True),
    ("A new item with 36 events in the past week.", Y, True),
    ("A new item with 26 events in the past week.", S, False),
    ("An established item: 26 events in the past week.", S, True),
    ("An established item: 36 events in the past week.", Y, False),
    # customer kinds, ranks, causes, stock: no signal says them
    ("26 events in the last 7 days from returning customers.", S, False),
    ("26 events in the last 7 days from 20 new customers.", S, False),
    ("A best seller: 26 events in the last 7 days.", S, False),
    ("26 events in the last 7 days, the highest in a year.", S, False),
    ("26 events in the last 7 days because of a price cut.", S, False),
    ("26 events in the last 7 days after going viral.", S, False),
    ("26 events in the last 7 days; back in stock.", S, False),
    ("26 events in the last 7 days and customers love it.", S, False),
    # the plain claims still pass
    ("26 events in the last 7 days, up from 21 the week before.", S, True),
    ("First seen 5 days ago; 36 events in the last 7 days.", Y, True),
]


@pytest.mark.parametrize("text,row,ok", CORPUS)
def test_corpus(text, row, ok):
    r = check(text, row)
    assert r.faithful is ok, [c for c in r.claims if not c.ok] or r


P = PredictedCount(38.6, 7, 27.6, 54.1)  # about 40 next week, likely 25-55
P0 = PredictedCount(38.6, 7)  # today's model: no range


@pytest.mark.parametrize("text,pred,ok", [
    ("Likely to rise: 26 events in the last 7 days, up from 21. About 40 events next week, likely 25–55.", P, True),
    ("Likely to rise: 26 events in the last 7 days, up from 21. About 40 events next week, likely 28–55.", P, True),
    ("Likely to rise: 26 events in the last 7 days, up from 21. About 40 events next week, likely 10–90.", P, False),
    ("Likely to rise: 26 events in the last 7 days, up from 21. About 60 events next week.", P, False),
    ("Likely to fall: 26 events in the last 7 days, up from 21. About 40 events next week.", P, False),
    ("Likely to rise: 26 events in the last 7 days, up from 21. About 40 events next week.", P0, True),
    ("Likely to rise: 26 events in the last 7 days, up from 21. About 40 events next week, likely 25–55.", P0, False),
    ("26 events in the last 7 days, up from 21; likely to double next week.", PredictedCount(52.0, 7), True),
    ("26 events in the last 7 days, up from 21; likely to double next week.", P, False),
    ("26 events in the last 7 days, up from 21; a sharp rise expected next week.", PredictedCount(52.0, 7), True),
    ("26 events in the last 7 days, up from 21; a sharp rise expected next week.", PredictedCount(30.0, 7), False),
])
def test_forecasts_are_checked_against_the_prediction(text, pred, ok):
    r = check(text, S, prediction=pred)
    assert r.faithful is ok, [c for c in r.claims if not c.ok] or r
    assert any(c.kind == "forecast" for c in r.claims)


def test_without_a_prediction_a_forecast_number_is_unattributed():
    r = check("26 events in the last 7 days, up from 21. About 40 events next week.", S)
    assert not r.faithful and [c.kind for c in r.claims if not c.ok] == ["forecast"]
    # the direction alone stays an outlook, as before
    r = check("26 events in the last 7 days, up from 21, and likely to rise next week.", S)
    assert r.faithful and r.outlook == "rise" and all(c.kind != "forecast" for c in r.claims)


def test_a_range_is_a_claim_of_kind_range():
    r = check("Likely to rise: 26 events in the last 7 days, up from 21. About 40 events next week, likely 25–55.",
              S, prediction=P)
    (c,) = [c for c in r.claims if c.kind == "range"]
    assert (c.stated, c.ok) == ("25–55", True)
    # a dash between past counts is no forecast: unattributed
    assert not check("26–21 events in the last 7 days.", S).faithful


def test_rounding_rules():
    assert [stated_size(x) for x in (0.4, 7.4, 19.6, 21.0, 38.6, 99.0, 123.0, 1234.0)] == [0, 7, 20, 20, 40, 100, 120, 1200]
    assert [size_unit(x) for x in (3, 20, 150, 2500)] == [1, 5, 10, 100]
    assert stated_range(27.6, 54.1) == (25, 55) and stated_range(3.2, 9.7) == (3, 10)
    for x in (0.3, 7.4, 19.6, 38.6, 99.0, 123.0, 1234.0, 56789.0):  # what the grammar states, the checker accepts
        assert abs(stated_size(x) - x) <= size_unit(x)
    with pytest.raises(ValueError):
        PredictedCount(10.0, 7, 5.0, None)
    with pytest.raises(ValueError):
        PredictedCount(10.0, 7, 9.0, 5.0)


def test_repair_fixes_a_wrong_size_and_range_and_drops_the_unverifiable():
    text = "Likely to rise: 26 events in the last 7 days, up from 21. About 60 events next week, likely 10–90."
    r = repair(text, S, prediction=P)
    assert r.faithful and r.changed
    assert "About 40 events next week" in r.text and "25–55" in r.text, r.text
    r = repair("Thanks to a price cut, 26 events in the last 7 days, up from 21 the week before.", S)
    assert r.faithful and r.text == "26 events in the last 7 days, up from 21 the week before.", r.text


def test_grammar_and_targets_state_size_and_range_and_pass_the_checker():
    """Every sentence of the grammar with a size, and every target with one, is faithful against the prediction:
    with a range (the quantile heads) and without (today's model), on the targets' random rows."""
    import random

    from stream.core.faithfulness.grammar import OUTLOOKS, claim_grammar
    from test_explanations import cases
    from trainer.explanations import target_explanation

    rng = random.Random(3)
    for row, h, _, _ in cases(150, 5):
        count = rng.choice([0.3, 4.6, 38.6, 250.0, 4321.0])
        for pred in (PredictedCount(count, h, count * 0.6, count * 1.7), PredictedCount(count, h)):
            fc = pred.direction(row)
            text = claim_grammar(row, h, fc, size=pred).sample(rng)
            r = check(text, row, prediction=pred)
            assert r.faithful and r.outlook == fc, (text, [c for c in r.claims if not c.ok])
            kinds = {c.kind for c in r.claims}
            assert "forecast" in kinds and ("range" in kinds) == pred.has_range, text
            target = target_explanation(row, h, rng, outlook=fc, size=pred)
            r = check(target, row, prediction=pred)
            assert r.faithful, (target, [c for c in r.claims if not c.ok])
            assert f"{stated_size(count)}" in target


def test_one_vocabulary():
    """Issue 18.5: the grammar, parser, checker, repairer and the trainer's targets take their words from
    stream.core.faithfulness.vocabulary; no module imports another's private name; the nouns the grammar writes
    are nouns the checker reads."""
    import ast
    from pathlib import Path

    from stream.core.faithfulness import vocabulary as v

    root = Path(__file__).resolve().parent.parent
    files = list((root / "stream/core/faithfulness").glob("*.py")) + [root / "trainer/explanations.py"]
    defined: dict[str, list[str]] = {}
    for f in files:
        tree = ast.parse(f.read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith(("stream", "trainer")):
                assert not [a.name for a in n.names if a.name.startswith("_")], (f.name, n.module)
        for n in tree.body:
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    if isinstance(t, ast.Name) and t.id.isupper():
                        defined.setdefault(t.id, []).append(f.name)
    for name in ("COUNT_NOUNS", "USER_NOUNS", "GRAMMAR_COUNT_NOUNS", "LEADS", "OUTLOOK_SENTENCES", "LEVEL_PHRASES",
                 "WINDOW_LEADS", "USER_LEADS"):
        assert defined[name] == ["vocabulary.py"], (name, defined[name])
    for phrase in v.GRAMMAR_COUNT_NOUNS:
        assert phrase in v.COUNT_NOUNS
    for phrase in v.GRAMMAR_USER_NOUNS:
        assert phrase.split()[-1] in v.USER_NOUNS


# ---- the model's own drivers in words (issue 20.2): season (the calendar) and text (the item) ----------------
# the prediction's drivers: the calendar lifts it, the item's kind holds it back
UP_SEASON = PredictedCount(40.0, 7, 28.0, 55.0, drivers={"trend": 0.1, "level": -0.2, "season": 0.45, "text": -0.3})

DRIVER_CORPUS = [
    ("Likely to rise: 26 events in the last 7 days, up from 21 the week before; this time of year lifts it.", True),
    ("Likely to rise: 26 events in the last 7 days, up from 21 the week before; the time of year lifts it.", True),
    ("Likely to rise: 26 events in the last 7 days, up from 21 the week before; this time of year holds it back.",
     False),
    ("Likely to rise: 26 events in the last 7 days, up from 21 the week before; the kind of item it is lifts it.",
     False),
    ("26 events in the last 7 days, up from 21 the week before, but the kind of item it is holds it back.", True),
    ("26 events in the last 7 days, up from 21 the week before, but its kind of item holds it back.", True),
    ("26 events in the last 7 days; the season boosts it.", True),
    ("26 events in the last 7 days; the season drags it down.", False),
    ("26 events in the last 7 days; the time of year does not lift it.", False),
    ("26 events in the last 7 days; the kind of item doesn't lift it.", True),
    ("26 events in the last 7 days; what the item is weighs on it.", True),
    ("26 events in the last 7 days; what the item is lifts it.", False),
    ("26 events in the last 7 days, up from 21 the week before; its recent trend lifts it.", True),
    ("26 events in the last 7 days, up from 21 the week before; its recent trend holds it back.", False),
    ("26 events in the last 7 days; its long-term level holds it back.", True),
    ("26 events in the last 7 days; its long-term level lifts it.", False),
]


@pytest.mark.parametrize("text,ok", DRIVER_CORPUS)
def test_driver_claims_are_checked_against_the_drivers(text, ok):
    r = check(text, S, prediction=UP_SEASON)
    assert r.faithful == ok, [c for c in r.claims if not c.ok]
    assert any(c.kind == "driver" for c in r.claims)
    # the same sentence with no drivers to hold it against (a model without a range head): refused, both ways
    for pred in (None, PredictedCount(40.0, 7, 28.0, 55.0)):
        r = check(text, S, prediction=pred)
        assert not r.faithful
        assert [c.true for c in r.claims if c.kind == "driver"] == [None]


def test_a_false_driver_claim_loses_its_clause_in_repair():
    text = "Likely to rise: 26 events in the last 7 days, up from 21 the week before; this time of year holds it back."
    fixed = repair(text, S, prediction=UP_SEASON)
    assert fixed.changed and "time of year" not in fixed.text and fixed.faithful, fixed.text
