"""stream.core.faithfulness: catches planted false claims, passes true ones, incl. free paraphrases."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from stream.core.faithfulness import Claim, FaithfulnessResult, check, window_spans

# An item bought 41 times in the last 7 days (12 the week before) by 29 customers.
S = {
    "count_1d": 6.0, "prev_count_1d": 3.0, "users_1d": 5.0, "velocity_1d": 3.0, "accel_1d": 1.0,
    "count_7d": 41.0, "prev_count_7d": 12.0, "users_7d": 29.0, "velocity_7d": 29.0, "accel_7d": 20.0,
    "count_28d": 90.0, "prev_count_28d": 80.0, "users_28d": 51.0, "velocity_28d": 10.0, "accel_28d": -3.0,
    "ema": 17.25, "total_count": 900.0, "age_h": 2880.0, "idle_h": 2.0,
}

# Free-form paraphrases a model might write; every claim in them is true of S.
TRUE = [
    "Bought 41 times in the last 7 days, up from 12 the week before; 29 distinct customers.",
    "Sales are rising: 41 purchases over the past week versus 12 in the previous week.",
    "It sold 6 times in the last day and 90 times over the past 28 days.",
    "Demand more than tripled week on week.",
    "29 different customers bought it in the last 7 days.",
    "Interactions rose from 12 to 41 over the last 7 days.",
    "In the past 24 hours it had 6 interactions, double the 3 of the day before.",
    "Up 242% on the previous week, with 41 interactions in the last 7 days.",
    "About 40 interactions in the last week, roughly 3x the week before.",
    "The item is 120 days old and was last bought 2 hours ago.",
    "No sign of slowing: 90 events in the last 28 days, more than the 80 of the 28 days before.",
    "Only 6 interactions in the last 24 hours but 41 this week.",
    "41 interactions in the last 7 days from 29 users, compared with 12 the week before.",
    "Weekly interactions jumped to 41 from 12.",
    "It has been bought 900 times in total.",
    "It's gaining momentum, with sales up by 29 on the previous week.",
    "Likely to keep rising next week after 41 interactions in the last 7 days.",
    "29 buyers and 41 sales in the last week.",  # "Popular item: ..." was here: a rank no signal states (issue 20)
    "This item is trending up with 41 interactions in the past 7 days (previous 7 days: 12).",
    "41 interactions this week vs. 12 last week; 6 today.",
    "Strong growth: 41 interactions from 29 users in the past week, compared to 12 the week prior.",
    "Its 28-day count of 90 is up from 80.",
    "Activity picked up in the last day (6 vs 3).",
    "Over the last four weeks it saw 90 interactions by 51 distinct users.",
    "Interactions have more than tripled, from 12 to 41 in the last week.",
    "Sold 41 times in the last week alone.",
    "41 sales in 7 days.",
    "Rising fast — 41 interactions this week, more than triple the 12 a week earlier.",
    "Not falling: 6 interactions in the last day, twice the 3 the day before.",
    "Over 40 interactions in the last 7 days, and 51 distinct users over the last 28 days.",
    "7d:41 (prev 12), 29 users; 1d:6",
    "It got 41 interactions in the last week from 29 users and 6 interactions yesterday from 5 users.",
    "Interactions are 3.4 times the previous week.",
]

# Each has at least one false claim: (text, why).
FALSE = [
    ("Bought 41 times in the last 7 days, down from 12 the week before.", "wrong direction"),
    ("Bought 14 times in the last 7 days, up from 12 the week before.", "wrong number"),
    ("Bought 41 times in the last 28 days.", "wrong window"),
    ("Sales are falling.", "wrong direction, default window 7d"),
    ("29 distinct customers in the last day.", "users of the wrong window"),
    ("Demand doubled week on week.", "ratio 3.4 is not 2"),
    ("Down 20% on the previous week.", "wrong percentage and sign"),
    ("It sold 6 times yesterday, the same as the day before.", "6 vs 3 is not the same"),
    ("The item is 30 days old.", "wrong age"),
    ("Interactions rose from 12 to 45 over the last 7 days.", "wrong current count"),
    ("41 interactions in the last 3 days.", "a window the signals lack"),
    ("Sold 41 units in the last 7 days.", "unknown measure (quantity is not counted)"),
    ("Interest is cooling, with 90 interactions in the last 28 days vs 80 before.", "wrong direction on 28d"),
    ("Ranked 3rd with 41 sales this week.", "a rank is no signal"),
    ("41 interactions in the last 7 days, up from 12 the week before, from 30 distinct users.", "wrong users"),
    ("Not rising: 41 interactions in the last week.", "negated true direction"),
    ("Sales have slowed in the last day: 6 vs 3 the day before.", "wrong direction on 1d"),
    ("Steady on the day: 6 events in the last day compared with 3 the day before.", "6 vs 3 is not steady"),
    ("Interactions fell from 41 to 12 over the last 7 days.", "swapped numbers"),
    ("The item had 41 interactions in the last 7 days and 12 in the last day.", "wrong 1d count"),
    ("Expect around 50 interactions next week.", "a forecast number is no signal"),
    ("Bought by 29 customers in the last 28 days.", "users of the wrong window"),
    ("Sold 41 times, up from 12.", "numbers without any window"),
    ("41 interactions in the last 7 days, 12 fewer than the week before.", "the change is +29"),
    ("Interactions rose from 12 to 41 over the last 7 days; 41 in the last day.", "wrong window for one number"),
]


@pytest.mark.parametrize("text", TRUE)
def test_true_paraphrases_pass(text):
    r = check(text, S)
    assert r.checked >= 1, r
    assert r.faithful, [c for c in r.claims if not c.ok]
    assert r.false == 0 and r.unattributed == 0


@pytest.mark.parametrize("text,why", FALSE)
def test_false_claims_are_caught(text, why):
    r = check(text, S)
    assert not r.faithful, f"{why}: {r}"
    assert r.false >= 1 and r.checked >= r.false


def _only_false(text: str) -> Claim:
    bad = [c for c in check(text, S).claims if not c.ok]
    assert len(bad) == 1, bad
    return bad[0]


def test_planted_wrong_number_is_pinned_to_its_signal():
    c = _only_false("41 interactions in the last 7 days, up from 13 the week before.")
    assert (c.kind, c.measure, c.window, c.stated, c.true, c.text) == ("number", "prev_count", "7d", 13.0, 12.0, "13")


def test_planted_wrong_direction_is_pinned_to_its_window():
    c = _only_false("6 interactions in the last day, falling from 3 the day before.")
    assert (c.kind, c.window, c.stated, c.text) == ("direction", "1d", "fall", "falling")


def test_planted_wrong_window_is_pinned_to_its_signal():
    c = _only_false("41 interactions in the last 7 days and 90 in the last day.")
    assert (c.measure, c.window, c.stated, c.true) == ("count", "1d", 90.0, 6.0)


def test_unattributable_numbers_are_false():
    r = check("41 interactions, 12 before.", S)
    assert not r.faithful and r.unattributed == 2
    assert all(c.true is None and c.reason for c in r.claims)


def test_no_checkable_claim_is_not_faithful():
    # issue 20: a text must make at least one checked claim (it was faithful with zero checked)
    r = check("Likely to rise next week.", S)
    assert (r.faithful, r.checked, r.false, r.outlook) == (False, 0, 0, "rise")
    r = check("A popular item among shoppers.", S)  # now an unverifiable rank, a false claim
    assert (r.faithful, r.false, r.unverifiable, r.outlook) == (False, 1, 1, None)


def test_forecast_is_outlook_not_a_claim():
    # the forecast disagrees with the trend: that is a prediction, not a false statement about the signals
    r = check("41 interactions in the last 7 days, up from 12, but likely to cool off next week.", S)
    assert r.faithful and r.outlook == "fall" and r.checked == 3
    assert check("Expect fewer interactions next week.", S).outlook == "fall"
    assert check("Unlikely to rise next week.", S).outlook is None


@pytest.mark.parametrize("text,ok", [
    ("About 40 interactions in the last 7 days.", True),   # hedged: within 10%
    ("About 30 interactions in the last 7 days.", False),
    ("More than 40 interactions in the last 7 days.", True),
    ("More than 41 interactions in the last 7 days.", False),
    ("Fewer than 50 interactions in the last 7 days.", True),
    ("At least 41 interactions in the last 7 days.", True),
    ("Up 240% on the previous week.", True),                 # true 241.7%: within max(1 pt, 5%)
    ("Up 200% on the previous week.", False),
    ("Interactions tripled week on week.", False),           # 3.42 is not within 10% of 3
    ("Interactions roughly tripled week on week.", True),    # hedged ratio: within 20%
    ("Interactions doubled in the last day.", True),         # 6/3
    ("Interactions halved in the last day.", False),
    ("Steady over the last 28 days.", False),                 # 90 vs 80: 10 > max(1, 10% of 90)
    ("Up by 29 interactions on the week before.", True),
    ("Up by 30 interactions on the week before.", False),
    ("First seen 120 days ago.", True),                      # ages: less than one unit off
    ("First seen 121 days ago.", False),                     # age_h 2880 is exactly 120 days
    ("About 4 months old.", True),
    ("Last bought 2 hours ago.", True),
    ("Last bought 5 hours ago.", False),
    ("900 interactions so far.", True),
])
def test_tolerances(text, ok):
    assert check(text, S).faithful is ok, check(text, S)


def test_ages_round_either_way():
    row = dict(S, age_h=2890.0)  # 120.4 days
    assert check("120 days old.", row).faithful and check("121 days old.", row).faithful
    assert not check("122 days old.", row).faithful


def test_steady_tolerance():
    row = dict(S, count_7d=41.0, prev_count_7d=40.0)
    assert check("Steady over the last 7 days.", row).faithful  # |1| <= max(1, 4.1)
    assert check("Rising over the last 7 days.", row).faithful  # and strictly up
    assert not check("Falling over the last 7 days.", row).faithful


def test_zero_counts_and_number_words():
    row = dict(S, count_1d=0.0, prev_count_1d=0.0, users_7d=2.0)
    assert check("No interactions in the last day.", row).faithful
    assert check("None in the last day, but two buyers this week.", row).faithful
    assert not check("No interactions in the last 7 days.", row).faithful
    assert not check("Three buyers this week.", row).faithful


def test_other_window_sets():
    row = {"count_2h": 3.0, "prev_count_2h": 5.0, "users_2h": 2.0, "count_5h": 9.0, "prev_count_5h": 9.0,
           "users_5h": 4.0, "ema": 1.0, "total_count": 20.0, "age_h": 30.0, "idle_h": 0.0}
    assert check("3 events in the last 2 hours, down from 5 the 2 hours before.", row).faithful
    assert check("9 events over the past 5 hours, the same as the previous 5 hours; 4 users.", row).faithful
    assert not check("3 events in the last 5 hours.", row).faithful
    assert not check("3 events in the last 7 days.", row).faithful  # no such window
    assert check("Flat.", row).faithful  # a windowless direction talks about the window nearest 7 days: 5h
    assert check("Falling.", row, default_window="2h").faithful
    with pytest.raises(ValueError, match="default_window"):
        check("Falling.", row, default_window="7d")


def test_window_spans():
    spans = window_spans("41 in the last 7 days vs 12 the week before; 6 today.", ("1d", "7d", "28d"))
    assert [(w, prev) for _, _, w, prev in spans] == [("7d", False), ("7d", True), ("1d", False)]


def test_deterministic_and_typed():
    a, b = check(TRUE[0], S), check(TRUE[0], S)
    assert a == b and isinstance(a, FaithfulnessResult)
    assert a.to_dict()["claims"][0]["text"] == "41"
    with pytest.raises(TypeError):
        check(None, S)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count_"):
        check("x", {"ema": 1.0})


def test_serving_path_stays_light():
    """The stream runs the checker and the prompt: no torch, trainer/ or export/ (not even numpy)."""
    import stream.core.prompts

    package = Path(sys.modules[check.__module__].__file__).parent  # every module of the checker's package
    files = sorted(package.glob("*.py"))
    assert len(files) > 1 and package / "__init__.py" in files
    for module in [*files, Path(stream.core.prompts.__file__)]:
        tree = ast.parse(module.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"torch", "trainer", "export", "faust", "transformers", "numpy"}, module


@pytest.mark.parametrize("title,category", [
    ("PACK OF 72 RETROSPOT CAKE CASES", None), ("Naked Gun 33 1/3: The Final Insult (1994)", "Comedy"),
    ("SET OF 3 CAKE TINS PANTRY DESIGN", None), ("Toy Story (1995)", "Animation"),
])
def test_the_prompts_own_facts_pass_and_title_numbers_make_no_claims(title, category):
    from stream.core.prompts import render_prompt

    for horizon in (1, 7):
        echo = render_prompt(title, category, S, horizon).rsplit("\n", 1)[0]  # a model that parrots its input
        r = check(echo, S, title=title, category=category)  # the category's words, like the title's, make no claim
        assert r.faithful, [c for c in r.claims if not c.ok]
        assert not check(echo, S).faithful  # without the title, its numbers are unattributable claims


@pytest.mark.parametrize("title", ["A", "Up", "Last", "Heat"])
def test_a_short_title_blanks_whole_words_only(title):
    """Title words make no claims, but only where the title stands as words: "A" is not the a in "last"."""
    text = "Likely to rise: 29 events in the last 7 days, up from 21 the week before."
    row = dict(S, count_7d=29.0, prev_count_7d=21.0)
    r = check(text, row, title=title)
    assert r.faithful and r.outlook == "rise", [(c.text, c.reason) for c in r.claims if not c.ok]
    assert [c.kind for c in r.claims] == [c.kind for c in check(text, row).claims]


def test_a_title_without_letters_is_no_mask():
    """An item id standing in for a title ("21", "7") is a number in the text and stays checked: masked,
    a wrong "21" would pass unchecked."""
    text = "Likely to rise: 29 events in the last 7 days, up from 21 the week before."
    row = dict(S, count_7d=29.0, prev_count_7d=21.0)
    for title in ("21", "7", "29"):
        assert len(check(text, row, title=title).claims) == len(check(text, row).claims), title
    assert not check(text, dict(row, prev_count_7d=20.0), title="21").faithful


def test_a_level_against_a_longer_windows_pace():
    """"above its 28-day pace": the window in force against the 28 days' count scaled to its length."""
    row = {"count_1d": 5.0, "prev_count_1d": 3.0, "count_7d": 33.0, "prev_count_7d": 24.0, "users_7d": 20.0,
           "count_28d": 86.0, "prev_count_28d": 70.0, "age_h": 900.0}  # 7d pace of the 28 days: 21.5

    def level(text):
        r = check(text, row)
        return [(c.window, c.stated, c.true, c.ok) for c in r.claims if c.kind == "level"], r.faithful

    assert level("33 events in the last 7 days, up from 24 the week before, but already above its 28-day pace.") \
        == ([("7d", "above", "above", True)], True)
    assert level("Interactions rose from 24 to 33 over the last 7 days, but well above its 4-week average.")[1]
    assert level("33 events in the last 7 days, below its four-week pace.") == ([("7d", "below", "above", False)], False)
    assert level("33 events in the last 7 days, not above its 28-day pace.")[1] is False
    assert level("5 events in the last day, above its 7-day pace.") == ([("1d", "above", "above", True)], True)
    # a window the signals lack, or one no shorter than the window in force: not checkable, so false
    assert level("33 events in the last 7 days, above its 3-day pace.")[1] is False
    assert level("86 events in the last 28 days, above its 7-day pace.")[1] is False
    # "above" as a hedge on a number is still a hedge; a forecast clause is not a claim about the signals
    assert check("Above 30 events in the last 7 days.", row).faithful
    assert level("33 events in the last 7 days; likely to stay above its 28-day pace next week.") == ([], True)
    from stream.core.faithfulness import repair

    fixed = repair("33 events in the last 7 days, but still below its 28-day pace.", row)
    assert fixed.text == "33 events in the last 7 days, but still above its 28-day pace." and fixed.faithful
