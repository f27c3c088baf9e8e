"""Target explanations built from the trend signals, and negatives for contrastive training.

`target_explanation` writes one or two short sentences that say whether the item
is likely to rise or fall and cite the signals the prompt shows (stream.core.prompts):
the main window's count against the window before, its distinct users, the
shortest window's pulse, the longest window, the age. A mover whose forecast goes against
the main window's trend is told why when the longer window's trend backs the forecast
("..., down from 34 the week before, but 109 in the last 28 days, up from 97 ...", `why_window`). Phrasings vary (templates,
synonyms, which facts to cite, their order) so the model learns to read the
numbers, not one sentence. Every target is faithful by construction and must
pass stream.core.faithfulness.check with at least one claim (tests/test_explanations.py
asserts it over thousands of random rows).

`negative_explanations` perturbs a faithful explanation into unfaithful ones
(flipped direction, one wrong number, a swapped window, another item's facts, a number cut
short, another of the prompt's numbers in a number's place); each is kept only if the checker
rejects it. The last two are the slips plain greedy decoding makes (v10, trail_unconstrained):
a digit-by-digit copy that stops a digit early ("4 interactions" for 48, "About 10" for 100)
and a number copied from the wrong prompt line (users_28d or the age cited as the 28-day count).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

from stream.core.faithfulness import check, window_spans
# one vocabulary: the targets draw from the claim grammar's phrase banks, so what the model
# practises is what constrained decoding lets it write
from stream.core.faithfulness.grammar import (current_phrases, horizon_phrases, length_phrases, level_reason, plural,
                                              previous_phrases, reason_plan, size_sentences, why_window)
from stream.core.faithfulness.vocabulary import (GRAMMAR_COUNT_NOUNS, GRAMMAR_USER_NOUNS, LEADS, LEVEL_PHRASES, ONE_USER,
                                                 OUTLOOK_LEADS, OUTLOOK_SENTENCES, OUTLOOKS, UPDOWN, USER_LEADS, VERB_PAST,
                                                 WINDOW_LEADS)

from stream.core.forecast import PredictedCount
from stream.core.prompts import detailed_windows, direction, main_window, signal_windows

# ~40 SmolLM2 tokens (numbers cost a token per digit): a longer draft drops its second fact
MAX_CHARS = 130
# A mover's reason (the longer window's trend, `why_window`) is what its explanation is for: most
# such targets cite it, and it may run to MAX_WHY_CHARS (~59 tokens with 3-4 digit counts, under max_explanation_tokens).
WHY_SHARE = 0.8
MAX_WHY_CHARS = 160


def _n(x: float) -> int:
    return int(round(x))


# the plain "up from" / "down from" twice as often as "rising from" / "falling from"
_UPDOWN = {k: v + v[:1] for k, v in UPDOWN.items()}


class _Facts:
    """The numbers a target may cite: those the prompt shows (stream.core.prompts.detailed_windows)."""

    def __init__(self, signals: Mapping[str, float], horizon_days: int) -> None:
        self.windows = signal_windows(signals)
        if not self.windows:
            raise ValueError(f"signals row has no count_<window> keys: {sorted(signals)}")
        self.main = main_window(self.windows, horizon_days)
        self.count = {w: _n(signals[f"count_{w}"]) for w in self.windows}
        # previous counts and users only where the prompt shows them
        shown = detailed_windows(self.windows, horizon_days)
        self.prev = {w: _n(signals[f"prev_count_{w}"]) for w in shown}
        self.users = {w: _n(signals[f"users_{w}"]) for w in shown}
        self.age_h = _n(signals["age_h"])
        self.short = self.windows[0] if len(self.windows) > 1 and self.windows[0] != self.main else None
        self.long = self.windows[-1] if len(self.windows) > 1 and self.windows[-1] != self.main else None


def _trend_clause(f: _Facts, w: str, noun: str, rng: random.Random) -> str:
    """Count of window w against the window before, with the direction."""
    c, p = f.count[w], f.prev[w]
    rel = direction(c, p)
    cur, prev = rng.choice(current_phrases(w)), rng.choice(previous_phrases(w))
    # forms 0 and 2 carry a direction word ("up from", "rose from"): weighted up, as
    # direction flips are the contrastive pairs that matter most
    form = rng.choices(range(5), weights=(3, 1, 2, 1, 1))[0]
    if rel == "steady" and c == 0:
        return rng.choice([f"no {noun} in {cur} or {prev}", f"no {noun} in {cur}, the same as {prev}"])
    if rel == "steady":
        return rng.choice([
            f"{plural(c, noun)} in {cur}, the same as {prev}",
            f"{plural(c, noun)} in {cur}, unchanged from {prev}",
            f"{plural(c, noun)} in {cur} and {p} in {prev}",
            f"{plural(c, noun)} over {cur}, level with {prev}",
        ])
    if form == 0:
        return f"{plural(c, noun)} in {cur}, {rng.choice(_UPDOWN[rel])} {p} {prev}"
    if form == 1:
        return f"{plural(c, noun)} in {cur} vs {p} {prev}"
    if form == 2:
        return f"{noun} {rng.choice(VERB_PAST[rel])} from {p} to {c} over {cur}"
    if form == 3:
        return f"{plural(c, noun)} over {cur} against {p} {prev}"
    return f"{plural(c, noun)} in {cur} ({p} {prev})"


def _count_clause(f: _Facts, w: str, noun: str, rng: random.Random, with_prev: bool) -> str:
    """The window first, then its count: "in the last 28 days, 379 interactions (213 the 28 days before)".
    The words before a number say which fact it is: v11's plain greedy wrote the digits first ("; 264")
    and chose between the prompt's numbers before it had said which one it meant (docs/evaluation.md)."""
    c = f.count[w]
    lead = rng.choice(WINDOW_LEADS)
    head = rng.choice([f"no {noun}", f"zero {noun}"]) if c == 0 else plural(c, noun)
    text = f"{lead} {rng.choice(current_phrases(w))}, {head}"
    if with_prev:
        p = f.prev[w]
        text += rng.choice([f" vs {p} {rng.choice(previous_phrases(w))}", f" ({p} {rng.choice(previous_phrases(w))})"])
    return text


def _users_clause(f: _Facts, w: str, rng: random.Random) -> str:
    u = f.users[w]
    noun = rng.choice(GRAMMAR_USER_NOUNS)
    if u == 1:
        return rng.choice(ONE_USER)
    return rng.choice([f"{lead} {u} {noun}" for lead in USER_LEADS])


def _why_clause(f: _Facts, w: str, outlook: str, noun: str, rng: random.Random) -> str:
    """The longer window's trend, always with a direction word: why the forecast goes against the main trend."""
    c, p, cur = f.count[w], f.prev[w], rng.choice(current_phrases(w))
    if rng.random() < 0.5:  # the window first, as _count_clause
        return f"{rng.choice(WINDOW_LEADS)} {cur}, {plural(c, noun)}, {rng.choice(_UPDOWN[outlook])} {p} {rng.choice(previous_phrases(w))}"
    return f"{noun} {rng.choice(VERB_PAST[outlook])} from {p} to {c} over {cur}"


def _level_clause(f: _Facts, level: str, rng: random.Random) -> str:
    """The main count against the longest window's pace: "already above its 28-day pace"."""
    return rng.choice(LEVEL_PHRASES[level]).format(rng.choice(length_phrases(f.long)))


def _age_clause(f: _Facts, rng: random.Random) -> str:
    if f.age_h < 48:
        return rng.choice([f"first seen {plural(f.age_h, 'hours')} ago", f"only {plural(f.age_h, 'hours')} old"])
    d = round(f.age_h / 24)
    return rng.choice([f"first seen {d} days ago", f"now {d} days old", f"around for {d} days"])


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _as_random(rng) -> random.Random:
    """A random.Random, or one seeded from a numpy Generator (the trainer's), so both drive the choices."""
    if isinstance(rng, random.Random):
        return rng
    if hasattr(rng, "integers"):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")


def target_explanation(signals: Mapping[str, float], horizon_days: int, rng,
                       outlook: str | None = None, size: PredictedCount | None = None,
                       drivers: Mapping[str, float] | None = None) -> str:
    """`size`: the predicted count (and range) the text ends with, as the claim grammar's `size_sentences`
    ("About 40 events next week, likely 25–55."); without it the text has no size sentence (v6's targets).
    `drivers`: the prediction's attribution; a rise or fall then gives its top driver as the reason, as the
    grammar requires (`reason_plan`); without them, today's targets."""
    rng = _as_random(rng)
    noun = rng.choice(GRAMMAR_COUNT_NOUNS)  # one noun for the whole text, as the grammar
    text = _target(signals, horizon_days, rng, outlook, drivers, noun)
    if size is None:
        return text
    return f"{text} {rng.choice(size_sentences(size, noun))}"


def _target(signals: Mapping[str, float], horizon_days: int, rng: random.Random, outlook: str | None,
            drivers: Mapping[str, float] | None, noun: str) -> str:
    """A faithful one- or two-sentence explanation of the item's trend.

    `outlook` ("rise"/"fall"/"steady") is what the explanation forecasts; the
    trainer may pass the direction of the true next-period count so the text
    agrees with the score head. By default it follows the main window's trend.
    Only numbers the prompt shows are cited; `noun` is the text's count noun (target_explanation draws it).
    """
    if outlook is not None and outlook not in OUTLOOKS:
        raise ValueError(f"outlook must be one of {OUTLOOKS}, got {outlook!r}")
    f = _Facts(signals, horizon_days)
    w = f.main
    rel = direction(f.count[w], f.prev[w])
    outlook = outlook or rel
    trend = _trend_clause(f, w, noun, rng)
    hz = rng.choice(horizon_phrases(horizon_days))
    plan = reason_plan(signals, horizon_days, outlook, drivers) if drivers else None
    if plan is not None and plan.source == "drivers":  # the model's top driver, always given (the grammar holds to it)
        return _assemble(rng.choice((0, 3)), trend, rng.choice(plan.phrases), "driver", rel, outlook, noun, hz, rng)
    why = why_window(f.count, f.prev, w, f.long, outlook)
    if why and rng.random() < WHY_SHARE:
        for _ in range(4):  # a long draft is drawn again: the reason is the point of a mover's text
            text = _assemble(rng.choice((0, 3)), trend, _why_clause(f, why, outlook, noun, rng), "why", rel,
                             outlook, noun, rng.choice(horizon_phrases(horizon_days)), rng)
            if len(text) <= MAX_WHY_CHARS:
                return text
    level = None if why else level_reason(f.count, f.prev, w, f.long, outlook)
    if level and rng.random() < WHY_SHARE:  # no trend backs the mover, its level does
        text = _assemble(rng.choice((0, 3)), trend, _level_clause(f, level, rng), "why", rel, outlook, noun, hz, rng)
        if len(text) <= MAX_WHY_CHARS:
            return text
    # optional second fact: users of the main window, the shortest window's pulse, the longest window, the age
    extras = []
    if f.users.get(w, 0) > 0:  # as the grammar: no "from 0 users" for events without a user id
        extras.append(("users", 3))
    if f.short:
        extras.append(("pulse", 2))
    if f.long:
        extras.append(("long", 3))
    # the extras are weighted up on v5 (long 2, age 1): the model cited them wrongly 40-80% of the
    # time while its main-window claims were 97-100% right, so it needs more practice copying them
    extras.append(("age", 2))
    extras.append(("none", 2))
    pick = rng.choices([e for e, _ in extras], weights=[wt for _, wt in extras])[0]
    extra = ""
    if pick == "users":
        extra = _users_clause(f, w, rng)
    elif pick == "pulse":
        extra = _count_clause(f, f.short, noun, rng, with_prev=f.short in f.prev and rng.random() < 0.4)
    elif pick == "long":
        extra = _count_clause(f, f.long, noun, rng, with_prev=rng.random() < 0.5)
    elif pick == "age":
        extra = _age_clause(f, rng)

    shape = rng.randrange(4)
    text = _assemble(shape, trend, extra, pick, rel, outlook, noun, hz, rng)
    if len(text) > MAX_CHARS and extra:
        text = _assemble(shape, trend, "", "none", rel, outlook, noun, hz, rng)
    return text


def _assemble(shape: int, trend: str, extra: str, pick: str, rel: str, outlook: str, noun: str, hz: str,
              rng: random.Random) -> str:
    agrees = outlook == rel
    but = pick == "why" or (pick == "driver" and not agrees)  # a reason against the trend: "..., but ..."
    if shape == 0:
        # "Likely to rise: 41 interactions in the last 7 days, up from 12 the week before; from 29 users."
        body = trend + ((", but " if but else "; ") + extra if extra else "")
        return f"{rng.choice(OUTLOOK_LEADS[outlook])}: {body}."
    if shape == 1 and agrees:
        # "Demand is rising: ... . Expect more interactions next week."
        body = trend + (f", {extra}" if extra and pick == "users" else "")
        second = _cap(extra) + ". " if extra and pick != "users" else ""
        return f"{rng.choice(LEADS[rel])}: {body}. {second}{rng.choice(OUTLOOK_SENTENCES[outlook]).format(noun=noun, h=hz)}"
    if shape == 2:
        # "41 interactions in the last 7 days vs 12 the week before, but likely to cool off next week."
        joint = ", and" if agrees else ", but"
        first = _cap(trend) + (f"; {extra}" if extra else "")
        tail = rng.choice(OUTLOOK_SENTENCES[outlook]).format(noun=noun, h=hz)
        return f"{first}{joint} {tail[0].lower()}{tail[1:]}"
    # "Likely to fall next week. Interactions fell from 60 to 41 over the last 7 days; in the last day, 6 interactions."
    body = _cap(trend) + ((", but " if but else "; ") + extra if extra else "")
    return f"{rng.choice(OUTLOOK_SENTENCES[outlook]).format(noun=noun, h=hz)} {body}."


# ---- negatives ---------------------------------------------------------------

_FLIP = {
    "rising": "falling", "falling": "rising", "up": "down", "down": "up", "rose": "fell", "fell": "rose",
    "climbed": "dropped", "dropped": "climbed", "grew": "declined", "declined": "grew", "jumped": "slipped",
    "slipped": "jumped", "growing": "shrinking", "climbing": "dropping", "dropping": "climbing",
    "trending up": "trending down", "trending down": "trending up", "picking up": "slowing down",
    "slowing down": "picking up", "on the rise": "on the decline", "on the decline": "on the rise",
    "cooling": "heating up", "fading": "growing", "steady": "rising", "holding steady": "falling",
    "flat": "rising", "stable": "falling", "unchanged": "rising", "the same as": "more than",
    "unchanged from": "down from", "level with": "up on", "more than": "fewer than", "fewer than": "more than",
    "higher": "lower", "lower": "higher", "increasing": "decreasing", "decreasing": "increasing",
}


def _flip_word(word: str) -> str | None:
    level = re.match(r"(.*?)\b(above|below)\b(.*)", word, re.S)
    if level and (" pace" in word or " average" in word):  # a level claim, "already above its 28-day pace"
        return f"{level.group(1)}{'below' if level.group(2) == 'above' else 'above'}{level.group(3)}"
    flipped = _FLIP.get(word.lower())
    if flipped is None:
        return None
    return _cap(flipped) if word[:1].isupper() else flipped


_SINGULAR_TO_PLURAL = {"interaction": "interactions", "event": "events", "user": "users", "person": "people"}
_PLURAL_TO_SINGULAR = {v: k for k, v in _SINGULAR_TO_PLURAL.items()}


def _pluralize_after(text: str, pos: int) -> str:
    m = re.match(r"(\s+(?:(?:distinct|different|unique|single)\s+)?)(\w+)", text[pos:])
    if not m or m.group(2) not in _SINGULAR_TO_PLURAL:
        return text
    lead = m.group(1).replace("single ", "")
    return text[:pos] + lead + _SINGULAR_TO_PLURAL[m.group(2)] + text[pos + m.end() :]


def _singularize_after(text: str, pos: int) -> str:
    m = re.match(r"(\s+(?:(?:distinct|different|unique)\s+)?)(\w+)", text[pos:])
    if not m or m.group(2) not in _PLURAL_TO_SINGULAR:
        return text
    return text[:pos] + m.group(1) + _PLURAL_TO_SINGULAR[m.group(2)] + text[pos + m.end() :]


def _replace(text: str, start: int, end: int, new: str) -> str:
    return text[:start] + new + text[end:]


def _renumber(text: str, start: int, end: int, old: int, new: int) -> str:
    """`text` with the number at [start, end) (`old`) written as `new`, its noun's plural kept in step
    ("1 interaction" -> "3 interactions", "48 interactions" -> "4 interactions" stays plural unless new is 1)."""
    out = _replace(text, start, end, str(new))
    after = start + len(str(new))
    if old == 1 and new != 1:
        return _pluralize_after(out, after)
    if new == 1 and old != 1:
        return _singularize_after(out, after)
    return out


def _shown_numbers(f: _Facts) -> set[int]:
    """The whole numbers the prompt shows for these facts (stream.core.prompts.render_prompt): every
    window's count, the previous count and users of the detailed windows, the age."""
    age = f.age_h if f.age_h < 48 else round(f.age_h / 24)
    return {*f.count.values(), *f.prev.values(), *f.users.values(), age}


# how often each kind is drawn as a step's negative (trainer.fit). The contrast loss of the first four
# stayed ~0 through v10's 944 steps (the margin already met) while plain greedy still wrote truncated
# and miscopied numbers, so the kinds that write those slips are drawn more. Their loss stayed near 0 too
# through v11's 1,225 steps: under teacher forcing the right number already wins by the margin; greedy
# writes the digits before the words that say which fact they are (docs/evaluation.md "Shipped v11").
NEGATIVE_WEIGHTS = {"direction": 1.0, "number": 1.0, "window": 1.0, "other": 1.0, "truncated": 3.0, "swapped": 3.0}


def negative_explanations(signals: Mapping[str, float], positive: str, rng,
                          other_signals: Mapping[str, float] | None = None,
                          horizon_days: int = 7, prediction: PredictedCount | None = None) -> list[tuple[str, str]]:
    """Unfaithful variants of a faithful explanation, as (kind, text).

    Kinds: "direction" (direction words flipped), "number" (one cited number
    changed), "window" (one window phrase swapped for another window), "other"
    (an explanation of `other_signals`), "truncated" (a number of two or more digits with its
    last digit dropped: a count, the forecast's size or a bound of its range), "swapped" (a cited
    count, previous count or user count replaced by another number the prompt shows). A variant the
    checker still accepts (say the swapped window has the same count) is left out. `prediction`: the
    forecast the positive states (its size and range are then claims too). `rng`: random.Random
    or numpy.random.Generator.
    """
    rng = _as_random(rng)
    result = check(positive, signals, prediction=prediction)
    out: list[tuple[str, str]] = []

    def keep(kind: str, text: str) -> None:
        if text != positive and not check(text, signals, prediction=prediction).faithful:
            out.append((kind, text))

    # flipped direction: every checked direction/comparison word, so the story is consistently wrong
    flips = [c for c in result.claims if c.kind in ("direction", "comparison", "level") and _flip_word(c.text)]
    if flips:
        text = positive
        for c in sorted(flips, key=lambda c: -c.start):
            text = _replace(text, c.start, c.end, _flip_word(c.text))
        keep("direction", text)

    # one wrong number
    numbers = [c for c in result.claims if c.kind == "number" and c.ok and c.measure in ("count", "prev_count", "users")]
    if numbers:
        c = rng.choice(numbers)
        true = int(round(c.true))
        delta = rng.choice([1, 2, 3, max(2, true // 2), max(3, true)])
        wrong = true + delta if (true - delta < 0 or rng.random() < 0.5) else true - delta
        if wrong == 1 and true != 1:
            wrong = true + 2  # keep the plural noun after it grammatical
        text = _replace(positive, c.start, c.end, str(wrong))
        if true == 1 or c.text.lower() in ("a single", "one"):
            # "1 interaction" -> "3 interactions": a singular noun would give the lie away
            text = _pluralize_after(text, c.start + len(str(wrong)))
        keep("number", text)

    # one window swapped for another of the signals' windows
    windows = signal_windows(signals)
    spans = [s for s in window_spans(positive, windows) if s[2] in windows]
    if spans and len(windows) > 1:
        start, end, w, prev = rng.choice(spans)
        other = rng.choice([x for x in windows if x != w])
        phrase = rng.choice(previous_phrases(other) if prev else current_phrases(other))
        span = positive[start:end]
        m = re.match(r"(?:in|over|during|across|for|within|of|from|than|vs\.?|versus|against)\s+", span, re.I)
        lead = m.group(0) if m else ""
        keep("window", _replace(positive, start, end, lead + phrase))

    if other_signals is not None:
        keep("other", target_explanation(other_signals, horizon_days, rng))

    # a number cut short by a digit: the greedy copy that ends a number early
    long = [c for c in result.claims if c.ok and c.text.isdigit() and len(c.text) >= 2
            and (c.kind == "number" and c.measure in ("count", "prev_count", "users")
                 or c.kind == "forecast" and c.measure == "count")]
    bounds = [c for c in result.claims if c.ok and c.kind == "range" and re.fullmatch(r"\d+–\d+", c.text)
              and any(len(b) >= 2 for b in c.text.split("–"))]
    if long or bounds:
        c = rng.choice(long + bounds)
        if c.kind == "range":
            low, high = c.text.split("–")
            cut = f"{low[:-1]}–{high}" if len(low) >= 2 and (len(high) < 2 or rng.random() < 0.5) else f"{low}–{high[:-1]}"
            keep("truncated", _replace(positive, c.start, c.end, cut))
        else:
            keep("truncated", _renumber(positive, c.start, c.end, int(c.text), int(c.text[:-1])))

    # another of the prompt's numbers in a cited count's place: the copy from the wrong line
    cited = [c for c in result.claims if c.ok and c.text.isdigit() and c.kind == "number"
             and c.measure in ("count", "prev_count", "users")]
    if cited:
        c = rng.choice(cited)
        f = _Facts(signals, horizon_days)
        # half the time a number of the claim's own prompt line (its users, its previous count, its count):
        # the copy greedy gets wrong most ("264 interactions in the last 28 days" where 264 is users_28d)
        line = sorted({d.get(c.window) for d in (f.count, f.prev, f.users)} - {None, int(c.text)})
        others = line if line and rng.random() < 0.5 else sorted(_shown_numbers(f) - {int(c.text)})
        if others:
            keep("swapped", _renumber(positive, c.start, c.end, int(c.text), rng.choice(others)))
    return out
