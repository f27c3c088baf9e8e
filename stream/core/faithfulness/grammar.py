"""The claim grammar: every true explanation of one item, as a grammar the decoder is held to.

`claim_grammar(signals, horizon_days, forecast)` builds, per item, the language of the
sentences the model was trained to write (the shapes, templates and synonym banks of
`trainer.explanations.target_explanation`) with the item's own numbers substituted and
every direction and comparison word fixed to the truth of the comparison it states:

- numbers: only whole values the prompt shows (`count_w` of every window, `prev_count_w`
  and `users_w` of the detailed windows, the age), each in the phrase that names its
  window and measure, so a number is only ever emitted where it is true; a second fact
  says its window or measure before its number ("; in the last 28 days, 379 events";
  "; from 29 users"), so the words that pick the fact come before the digits;
- directions: "up from / rose from / down from / the same as ..." of the main window
  follow its count against the previous one (strict: ties are "the same as");
- the forecast clause ("Likely to rise next week.", "Expect fewer events ...") is the
  given `forecast` (`stream.core.forecast.outlook` of the model's own prediction); the
  joining word is "and" when it agrees with the current trend, "but" when it does not.

The model still chooses: which of the four sentence shapes, which lead and verb, which
window phrase, which noun, which second fact (users, the shortest window, the longest
window with or without its previous count, the age, or none). A mover whose forecast goes
against the main window's trend while the longer window's trend points the forecast's way
(`why_window`) must say so: "..., but" that trend, in shape 0 or 3; with no such window, a
mover whose main count is clearly off the longest window's pace the forecast's way
(`level_reason`) must say that: "..., but already above its 28-day pace". The grammar is written as
Lark for llguidance (`lark()`), which turns it into per-step token masks in the stream
(numpy, stream.model.onnx_models) and in the trainer (a transformers LogitsProcessor);
`sample()` draws random sentences of the same language, so tests can check that
everything it admits passes `stream.core.faithfulness.check` with the forced forecast.
Generation follows the prompt's separator: the decoded text starts with one space.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stream.core.faithfulness.vocabulary import (DRIVER_CLAIM_PHRASES, LAST_YEAR_PHRASES, NEIGHBOURHOOD_PHRASES, GRAMMAR_COUNT_NOUNS, GRAMMAR_USER_NOUNS, LEADS, LEVEL_PHRASES, ONE_USER,
                                                 OUTLOOK_LEADS, OUTLOOK_SENTENCES, OUTLOOKS, RANGE_TAILS, SIZE_SENTENCES,
                                                 UPDOWN, USER_LEADS, VERB_PAST, WINDOW_LEADS)
from stream.core.forecast import PredictedCount, outlook, stated_range, stated_size
from stream.core.prompts import (PromptForecast, detailed_windows, direction, main_window, signal_windows,
                                 window_hours)


# the decoding budget of a constrained text: the grammar ends every text itself; room for its longest shapes (a
# mover's reason and the size and range sentence: ~75 SmolLM2 tokens with 3-4 digit counts)
CONSTRAINED_MAX_NEW_TOKENS = 96


def whole_days(horizon_days: float) -> float:
    """A horizon as the texts say it: 7.0 -> 7 ("the next 7 days"), a fractional one as it is."""
    return int(horizon_days) if float(horizon_days).is_integer() else horizon_days


def why_window(count: Mapping[str, int], prev: Mapping[str, int], main: str, long: str | None,
               forecast: str) -> str | None:
    """The window whose trend says why `forecast` goes against the main window's trend: the
    longest window, when its own trend points the forecast's way ("29 in the last 7 days, down
    from 34 the week before, but 109 in the last 28 days, up from 97 the 28 days before").
    None when the forecast follows the main trend, is "steady", or no window backs it."""
    if long is None or long == main or forecast == "steady" or forecast == direction(count[main], prev[main]):
        return None
    return long if direction(count[long], prev[long]) == forecast else None


def level_reason(count: Mapping[str, int], prev: Mapping[str, int], main: str, long: str | None,
                 forecast: str) -> str | None:
    """"above" / "below" when a forecast against the main window's trend is backed by the main
    count's level: clearly (`outlook`'s steady band) above the longest window's pace, scaled to the
    main window's length, for a fall; below it for a rise ("33 in the last 7 days, up from 24,
    but already above its 28-day pace": a spike cools off). None otherwise. The checker verifies
    the words ("above its 28-day pace") without the band."""
    if long is None or long == main or forecast == "steady" or forecast == direction(count[main], prev[main]):
        return None
    level = outlook(count[main], count[long] * window_hours(main) / window_hours(long))
    return {("rise", "fall"): "above", ("fall", "rise"): "below"}.get((level, forecast))


def against_trend(signals: Mapping[str, float], horizon_days: float, forecast: str | None):
    """(count, prev, main, long) of a row whose `forecast` ("rise"/"fall") goes against its main window's
    trend, the case that wants a reason; None otherwise (also when the main window shows no previous count)."""
    windows = signal_windows(signals)
    main = main_window(windows, horizon_days)
    if forecast not in ("rise", "fall") or f"prev_count_{main}" not in signals:
        return None
    count = {w: int(round(signals[f"count_{w}"])) for w in windows}
    prev = {w: int(round(signals[f"prev_count_{w}"])) for w in windows if f"prev_count_{w}" in signals}
    if forecast == direction(count[main], prev[main]):
        return None
    return count, prev, main, windows[-1] if len(windows) > 1 else None


def stated_reason(claims, signals: Mapping[str, float], horizon_days: float, forecast: str | None) -> str | None:
    """Which true reason a text gives for a forecast against the main window's trend: "trend" (another
    window's trend pointing the forecast's way, `why_window`'s kind), "level" (the main count above or
    below the longest window's pace, `level_reason`'s kind) or None (no such forecast, or no reason
    given). `claims`: the checker's claims of the text (stream.core.faithfulness.check)."""
    mover = against_trend(signals, horizon_days, forecast)
    if mover is None:
        return None
    count, prev, main, _ = mover
    if any(c.kind == "direction" and c.ok and c.window not in (None, main) and c.window in prev
           and direction(count[c.window], prev[c.window]) == forecast for c in claims):
        return "trend"
    backs = "below" if forecast == "rise" else "above"
    return "level" if any(c.kind == "level" and c.ok and c.stated == backs for c in claims) else None


def top_driver(drivers: Mapping[str, float] | None, forecast: str | None) -> str | None:
    """The input group that moved the prediction most the forecast's way: the largest contribution for a rise,
    the most negative for a fall, the largest in size otherwise. The drivers split the forecast's gap from the
    item's own pace (stream.core.drivers: they add up to log1p(count) - log1p(pace), which is above the steady
    band for a rise and below it for a fall), so a rise or fall always has one. None without drivers, and for
    a rise or fall that no group pushes its way (drivers that do not add up to the gap: a model without a steady
    reference, or records stored with the earlier drivers of the median's level); the rule then gives its reason."""
    if not drivers:
        return None
    sign = {"rise": 1.0, "fall": -1.0}.get(forecast or "")
    if sign is None:
        return max(drivers, key=lambda g: (abs(drivers[g]), g))
    top = max(drivers, key=lambda g: (sign * drivers[g], g))
    return top if sign * drivers[top] > 0 else None


@dataclass(frozen=True)
class ReasonPlan:
    """The reason a mover's text must give: its `kind` ("trend", "level", "neighbourhood", "season", "text"), where it
    came from (`source`: "drivers", the model's top driver; "rule", why_window / level_reason when the model
    gives no drivers or its top driver has no words the checker verifies) and the phrases that state it."""

    kind: str
    source: str
    phrases: tuple[str, ...]
    driver: str | None = None  # the model's top driver (also when the rule gave the reason)


def _pct(cur: float, prev: float) -> tuple[str, int] | None:
    if prev <= 0 or cur == prev:
        return None
    pct = int(round(100.0 * (cur - prev) / prev))
    return (("up", pct) if pct > 0 else ("down", -pct)) if pct else None


def driver_phrases(group: str, signals: Mapping[str, float], horizon_days: float,
                   drivers: Mapping[str, float] | None = None, forecast: str | None = None) -> tuple[str, ...]:
    """A driver group in merchandiser words, each a claim the checker verifies; () when nothing can back it.
    trend: the main window's change ("up 24% on the week before"); level: its count against the longest window's
    pace; neighbourhood: "like 11 similar items, up 35% in the last 7 days" (nbr_n, nbr_count_<w>, nbr_prev_<w>);
    season: "last year it rose from 20 to 61 over these weeks" (ly_count, ly_next) where the signals hold last
    year, and the calendar's own push, "this time of year lifts it" / "... holds it back"; text: "the kind of item
    it is lifts it" / "... holds it back". With `forecast`, the trend's change and the level are said only where
    they point its way (up / below its pace for a rise); else the group's own push: "its recent trend lifts it",
    "its long-term level holds it back". Those push phrases state the sign of the group's driver (checked against
    the prediction's drivers), so they are offered only when it points `forecast`'s way ("rise": > 0, "fall": < 0):
    a driver that pulls against the forecast is no reason for it."""
    phi = None if not drivers else drivers.get(group)
    way = None if phi is None else "rise" if phi > 0 else "fall" if phi < 0 else None
    own = (DRIVER_CLAIM_PHRASES[group][way] if group in DRIVER_CLAIM_PHRASES and way is not None
           and way == (forecast or way) else ())
    if group == "text":
        return own
    if group == "season":
        return _signal_driver_phrases(group, signals, horizon_days, forecast) + own if own else ()
    # trend and level: the signals' words where they point the forecast's way, else the group's own push
    return _signal_driver_phrases(group, signals, horizon_days, forecast) or own


def _signal_driver_phrases(group: str, signals: Mapping[str, float], horizon_days: float,
                           forecast: str | None = None) -> tuple[str, ...]:
    """The signal words of a driver group; with `forecast`, the trend's change and the level only where they point
    its way (up / below its pace for a rise, down / above it for a fall)."""
    windows = signal_windows(signals)
    if not windows:
        return ()
    w = main_window(windows, horizon_days)
    s = {k: float(v) for k, v in signals.items()}
    if group == "trend" and f"prev_count_{w}" in s:
        p = _pct(round(s[f"count_{w}"]), round(s[f"prev_count_{w}"]))
        if p is None or (forecast is not None and p[0] != {"rise": "up", "fall": "down"}.get(forecast)):
            return ()
        return tuple(f"{p[0]} {p[1]}% on {prv}" for prv in previous_phrases(w))
    if group == "level" and len(windows) > 1 and windows[-1] != w:
        long = windows[-1]
        cur, pace_ = round(s[f"count_{w}"]), s[f"count_{long}"] * window_hours(w) / window_hours(long)
        rel = "above" if cur > pace_ else "below" if cur < pace_ else None
        if rel is None or (forecast is not None and rel != {"rise": "below", "fall": "above"}.get(forecast)):
            return ()
        return tuple(p.format(n) for p in LEVEL_PHRASES[rel] for n in length_phrases(long))
    if group == "neighbourhood" and {"nbr_n", f"nbr_count_{w}", f"nbr_prev_{w}"} <= s.keys() and s["nbr_n"] >= 1:
        p = _pct(s[f"nbr_count_{w}"], s[f"nbr_prev_{w}"])
        if p is None or abs(100.0 * (s[f"nbr_count_{w}"] - s[f"nbr_prev_{w}"]) / s[f"nbr_prev_{w}"] - (p[1] if p[0] == "up" else -p[1])) > 0.5:
            return ()
        return tuple(ph.format(n=int(round(s["nbr_n"])), updown=p[0], pct=p[1], window=f"in {cur}")
                     for ph in NEIGHBOURHOOD_PHRASES[:1] for cur in current_phrases(w))
    if group == "season" and {"ly_count", "ly_next"} <= s.keys():
        a, b = int(round(s["ly_count"])), int(round(s["ly_next"]))
        if a == b:
            return ()
        verb = "rose" if b > a else "fell"
        return tuple(ph.format(verb=verb, a=a, b=b) for ph in LAST_YEAR_PHRASES)
    return ()


def reason_plan(signals: Mapping[str, float], horizon_days: float, forecast: str,
                drivers: Mapping[str, float] | None = None) -> ReasonPlan | None:
    """The reason a text for this forecast must give: with drivers, the top driver's words (for a rise or fall);
    else, or when those have no words, today's rule for a forecast against the main trend (why_window, then
    level_reason). None: no reason is due."""
    driver = top_driver(drivers, forecast) if forecast in ("rise", "fall") else None
    if driver is not None:
        phrases = driver_phrases(driver, signals, horizon_days, drivers, forecast)
        if phrases:
            return ReasonPlan(driver, "drivers", phrases, driver)
    mover = against_trend(signals, horizon_days, forecast)
    if mover is None:
        return None
    count, prev, main, long = mover
    why = why_window(count, prev, main, long, forecast)
    if why is not None:
        return ReasonPlan("trend", "rule", (), driver)  # the grammar writes the window's trend itself
    level = level_reason(count, prev, main, long, forecast)
    if level is not None:
        return ReasonPlan("level", "rule", tuple(p.format(n) for p in LEVEL_PHRASES[level] for n in length_phrases(long)),
                          driver)
    return None


def prompt_forecast(size: PredictedCount, signals: Mapping[str, float], horizon_days: float) -> PromptForecast:
    """What the prompt shows of a prediction (stream.core.prompts.PromptForecast): the size and range as the
    text states them, the direction the forecast clause must say, and the kind of reason `reason_plan` makes due."""
    forecast = size.direction(signals)
    hd = whole_days(horizon_days)
    plan = reason_plan(signals, hd, forecast, size.drivers)
    low, high = stated_range(size.low, size.high) if size.has_range else (None, None)
    return PromptForecast(stated_size(size.count), forecast, low, high, None if plan is None else plan.kind)


def stated_reasons(claims) -> set[str]:
    """The driver kinds a text's true claims state: "neighbourhood", "season" (last year, or the calendar's
    push), "text" (the item's kind), "level", "trend" (a percentage change of a count)."""
    kinds = set()
    for c in claims:
        if not c.ok:
            continue
        if c.kind == "neighbourhood":
            kinds.add("neighbourhood")
        elif c.kind == "last_year":
            kinds.add("season")
        elif c.kind == "level":
            kinds.add("level")
        elif c.kind == "driver":
            kinds.add(c.measure)  # "season" (the calendar) or "text" (the item)
        elif c.kind == "comparison" and c.measure == "percent":
            kinds.add("trend")
    return kinds


def reason_of(claims, signals: Mapping[str, float], horizon_days: float, forecast: str | None,
              drivers: Mapping[str, float] | None = None) -> str | None:
    """The kind of reason a text gives: with drivers, the top driver's kind when its words are among the text's
    true claims (else the other driver kinds it states, else today's rule); without, `stated_reason`."""
    if drivers and forecast in ("rise", "fall"):
        kinds = stated_reasons(claims)
        driver = top_driver(drivers, forecast)
        if driver in kinds:
            return driver
        for k in ("neighbourhood", "season", "text", "level", "trend"):
            if k in kinds:
                return k
    return stated_reason(claims, signals, horizon_days, forecast)


def length_phrases(window: str) -> tuple[str, ...]:
    """A window's length as an adjective: 28d -> "28-day", "4-week"; 6h -> "6-hour"."""
    hours = window_hours(window)
    if hours % 24:
        return (f"{hours:g}-hour",)
    days = int(hours // 24)
    return (f"{days}-day",) + ((f"{days // 7}-week",) if days % 7 == 0 and days > 7 else ())


def _unit_phrase(hours: float) -> tuple[int, str]:
    if hours % 168 == 0 and hours >= 168 and hours != 168:
        return int(hours // 168), "weeks"
    if hours % 24 == 0:
        return int(hours // 24), "days"
    if hours == int(hours):
        return int(hours), "hours"
    return int(round(hours * 60)), "minutes"


def current_phrases(window: str) -> tuple[str, ...]:
    """Ways to name the window ending at the cut-off ("the last 7 days")."""
    h = window_hours(window)
    named = {1.0: ("the last hour", "the past hour"),
             24.0: ("the last day", "the past day", "the last 24 hours", "the past 24 hours"),
             168.0: ("the last 7 days", "the past 7 days", "the past week", "the last week"),
             672.0: ("the last 28 days", "the past 28 days", "the last 4 weeks", "the past four weeks")}
    if h in named:
        return named[h]
    n, unit = _unit_phrase(h)
    days = (f"the last {int(h // 24)} days", f"the past {int(h // 24)} days") if unit == "weeks" else ()
    return (f"the last {n} {unit}", f"the past {n} {unit}") + days


def previous_phrases(window: str) -> tuple[str, ...]:
    """Ways to name the window before it ("the week before")."""
    h = window_hours(window)
    named = {1.0: ("the hour before", "the previous hour"),
             24.0: ("the day before", "the previous day", "the prior day"),
             168.0: ("the week before", "the previous week", "the prior week", "the previous 7 days", "the 7 days before"),
             672.0: ("the previous 28 days", "the 28 days before", "the prior 4 weeks", "the previous four weeks")}
    if h in named:
        return named[h]
    n, unit = _unit_phrase(h)
    return (f"the previous {n} {unit}", f"the {n} {unit} before", f"the prior {n} {unit}")


def horizon_phrases(horizon_days: float) -> tuple[str, ...]:
    d = whole_days(horizon_days)
    if d == 1:
        return ("tomorrow", "over the next day")
    if d == 7:
        return ("next week", "over the coming week", "in the next 7 days")
    return (f"over the next {d} days", f"in the coming {d} days")


def plural(n: int, noun: str) -> str:
    """'1 interactions' -> '1 interaction' (nouns here are regular plurals, or 'people')."""
    if n != 1:
        return f"{n} {noun}"
    if noun.endswith("people"):
        return f"{n} {noun[:-6]}person"
    return f"{n} {noun[:-1]}"


def size_sentences(size: PredictedCount, noun: str) -> tuple[str, ...]:
    """The sentences that state a prediction's size and, when it has one, its range: "About 40 events next week,
    likely 25–55." (stream.core.forecast's rounding rules; the checker verifies them against the prediction)."""
    head = plural(stated_size(size.count), noun)
    if size.has_range:
        lo, hi = stated_range(size.low, size.high)
        tails = tuple(t.format(lo=lo, hi=hi) for t in RANGE_TAILS)
    else:
        tails = (".",)
    return tuple(s.format(n=head, h=h) + tail for s in SIZE_SENTENCES for h in horizon_phrases(size.horizon_days)
                 for tail in tails)


# ---- a tiny grammar algebra: a Seq is a tuple of parts; a part is a literal or an Alt ----------------
@dataclass(frozen=True)
class Alt:
    """One of several sequences (each a tuple of parts: str literals or Alts)."""

    options: tuple[tuple, ...]

    @staticmethod
    def of(*options) -> "Alt":
        return Alt(tuple(o if isinstance(o, tuple) else (o,) for o in options))


def _cap_seq(seq: tuple) -> tuple:
    first, rest = seq[0], seq[1:]
    if isinstance(first, str):
        return (first[:1].upper() + first[1:],) + rest
    return (Alt(tuple(_cap_seq(o) for o in first.options)),) + rest


def _lower_seq(seq: tuple) -> tuple:
    first, rest = seq[0], seq[1:]
    if isinstance(first, str):
        return (first[:1].lower() + first[1:],) + rest
    return (Alt(tuple(_lower_seq(o) for o in first.options)),) + rest


def cap(part: Alt) -> Alt:
    return Alt(tuple(_cap_seq(o) for o in part.options))


EMPTY: tuple = ()
WINDOW_LEAD = Alt.of(*(f"{lead} " for lead in WINDOW_LEADS))  # "in " / "over ": before a second fact's window


@dataclass(frozen=True)
class ClaimGrammar:
    """The per-item language of true explanations (see the module doc)."""

    root: Alt
    forecast: str

    def lark(self) -> str:
        """The grammar in llguidance's Lark dialect (the decoded text starts with a space)."""
        rules: dict[Alt, str] = {}
        lines: list[str] = []

        def name(alt: Alt) -> str:
            if alt not in rules:
                rules[alt] = f"r{len(rules)}"
                body = " | ".join(seq_text(s) for s in alt.options)
                lines.append(f"{rules[alt]}: {body}")
            return rules[alt]

        def seq_text(seq: tuple) -> str:
            merged: list = []
            for p in seq:  # adjacent literals are one literal
                if isinstance(p, str) and merged and isinstance(merged[-1], str):
                    merged[-1] += p
                elif p != "":
                    merged.append(p)
            if not merged:
                return '""'
            return " ".join(json.dumps(p) if isinstance(p, str) else name(p) for p in merged)

        top = name(self.root)  # (json.dumps writes "–" as \u2013, which Lark reads back as the character)
        return "\n".join([f'start: " " {top}'] + lines) + "\n"

    def sample(self, rng: random.Random) -> str:
        """One random sentence of the language (without the leading space)."""
        def walk(part) -> str:
            if isinstance(part, str):
                return part
            return "".join(walk(p) for p in rng.choice(part.options))
        return walk(self.root)


def claim_grammar(signals: Mapping[str, float], horizon_days: float, forecast: str,
                  nouns: Sequence[str] = GRAMMAR_COUNT_NOUNS, size: PredictedCount | None = None,
                  drivers: Mapping[str, float] | None = None) -> ClaimGrammar:
    """The true explanations of one item whose forecast clause says `forecast`; with `size` (the model's
    predicted count and range) every text ends with the forecast's size and range (`size_sentences`); with
    `drivers` (the prediction's attribution) a rise or fall gives the top driver as its reason (`reason_plan`)."""
    if forecast not in OUTLOOKS:
        raise ValueError(f"forecast must be one of {OUTLOOKS}, got {forecast!r}")
    windows = signal_windows(signals)
    if not windows:
        raise ValueError(f"signals row has no count_<window> keys: {sorted(signals)}")
    hd = whole_days(horizon_days)
    w = main_window(windows, hd)
    shown = detailed_windows(windows, hd)
    count = {x: int(round(signals[f"count_{x}"])) for x in windows}
    prev = {x: int(round(signals[f"prev_count_{x}"])) for x in shown}
    users = {x: int(round(signals[f"users_{x}"])) for x in shown}
    age_h = int(round(signals["age_h"]))
    short = windows[0] if len(windows) > 1 and windows[0] != w else None
    long = windows[-1] if len(windows) > 1 and windows[-1] != w else None
    c, p = count[w], prev[w]
    rel = direction(c, p)
    agrees = forecast == rel
    plan = reason_plan(signals, hd, forecast, drivers)
    why = why_window(count, prev, w, long, forecast) if plan is not None and plan.phrases == () else None
    cur, prv = Alt.of(*current_phrases(w)), Alt.of(*previous_phrases(w))
    hz = Alt.of(*horizon_phrases(hd))

    def per_noun(noun: str) -> Alt:
        # the main window against the one before (trainer.explanations._trend_clause)
        if rel == "steady" and c == 0:
            trend = Alt.of((f"no {noun} in ", cur, " or ", prv), (f"no {noun} in ", cur, ", the same as ", prv))
        elif rel == "steady":
            head = plural(c, noun)
            trend = Alt.of((head, " in ", cur, ", the same as ", prv), (head, " in ", cur, ", unchanged from ", prv),
                           (head, " in ", cur, f" and {p} in ", prv), (head, " over ", cur, ", level with ", prv))
        else:
            head = plural(c, noun)
            trend = Alt.of((head, " in ", cur, ", ", Alt.of(*UPDOWN[rel]), f" {p} ", prv),
                           (head, " in ", cur, f" vs {p} ", prv),
                           (f"{noun} ", Alt.of(*VERB_PAST[rel]), f" from {p} to {c} over ", cur),
                           (head, " over ", cur, f" against {p} ", prv),
                           (head, " in ", cur, f" ({p} ", prv, ")"))

        def count_clause(x: str, with_prev: bool | None) -> Alt:
            # the window before the number (trainer.explanations._count_clause)
            head = Alt.of(f"no {noun}", f"zero {noun}") if count[x] == 0 else plural(count[x], noun)
            base = (WINDOW_LEAD, Alt.of(*current_phrases(x)), ", ", head)
            if not with_prev:
                return Alt.of(base)
            px, pp = prev[x], Alt.of(*previous_phrases(x))
            tail = Alt.of((f" vs {px} ", pp), (f" ({px} ", pp, ")"))
            return Alt.of(base + (tail,), base) if with_prev is None else Alt.of(base + (tail,))

        extras: list[tuple[str, Alt]] = []
        # a count without users is from events that carry no user id (guest purchases, a log
        # without users): "from 0 users" would read as a fact about the item, so it is not said
        if users.get(w, 0) > 0:
            u = users[w]
            if u == 1:
                extras.append(("users", Alt.of(*ONE_USER)))
            else:
                un = Alt.of(*(plural(u, n) for n in GRAMMAR_USER_NOUNS))
                extras.append(("users", Alt.of(*((f"{lead} ", un) for lead in USER_LEADS))))
        if short:
            extras.append(("pulse", count_clause(short, None if short in prev else False)))
        if long:
            extras.append(("long", count_clause(long, None)))
        if age_h < 48:
            hrs = plural(age_h, "hours")
            extras.append(("age", Alt.of(f"first seen {hrs} ago", f"only {hrs} old")))
        else:
            d = round(age_h / 24)
            extras.append(("age", Alt.of(f"first seen {d} days ago", f"now {d} days old", f"around for {d} days")))
        extra = Alt(tuple(o for _, e in extras for o in e.options))
        other = Alt(tuple(o for k, e in extras if k != "users" for o in e.options))
        user = [e for k, e in extras if k == "users"]

        sentences = Alt(tuple(tuple(_split(s.format(noun=noun, h="\0"), hz)) for s in OUTLOOK_SENTENCES[forecast]))
        opt = lambda sep, a: Alt.of((sep, a), EMPTY)  # noqa: E731 - "(sep a)?"
        if why:
            # a mover with a reason (why_window) must give it (trainer.explanations._why_clause): the longer
            # window's trend, its direction word fixed, after the forecast and the main trend
            cw, pw, cur_w = count[why], prev[why], Alt.of(*current_phrases(why))
            because = Alt.of((WINDOW_LEAD, cur_w, ", ", plural(cw, noun), ", ", Alt.of(*UPDOWN[forecast]),
                              f" {pw} ", Alt.of(*previous_phrases(why))),
                             (f"{noun} ", Alt.of(*VERB_PAST[forecast]), f" from {pw} to {cw} over ", cur_w))
        elif plan is not None:
            # the model's top driver, or no window's trend backs the forecast and the level does
            # (trainer.explanations._level_clause)
            because = Alt.of(*plan.phrases)
        if plan is not None:
            join = "; " if agrees and plan.source == "drivers" else ", but "
            return Alt.of((Alt.of(*OUTLOOK_LEADS[forecast]), ": ", trend, join, because, "."),
                          (sentences, " ", cap(trend), join, because, "."))
        shapes = [
            # 0: "Likely to rise: 41 interactions in the last 7 days, up from 12 the week before; from 29 users."
            (Alt.of(*OUTLOOK_LEADS[forecast]), ": ", trend, opt("; ", extra), "."),
            # 2: "41 interactions in the last 7 days vs 12 the week before, but likely to cool off next week."
            (cap(trend), opt("; ", extra), ", and " if agrees else ", but ", Alt(tuple(_lower_seq(o) for o in sentences.options))),
            # 3: "Likely to fall next week. Interactions fell from 60 to 41 over the last 7 days; in the last day, 6
            # interactions."
            (sentences, " ", cap(trend), opt("; ", extra), "."),
        ]
        if agrees:
            # 1: "Demand is rising: ... . Expect more interactions next week."
            body = (trend, opt(", ", user[0])) if user else (trend,)
            second = Alt.of((cap(other), ". "), EMPTY) if other.options else ""
            shapes.append((Alt.of(*LEADS[rel]), ": ") + body + (". ", second, sentences))
        return Alt(tuple(shapes))

    if size is None:
        root = Alt(tuple(o for n in nouns for o in per_noun(n).options))
    else:
        root = Alt(tuple(o + (" ", Alt.of(*size_sentences(size, n))) for n in nouns for o in per_noun(n).options))
    return ClaimGrammar(root, forecast)


def _split(template: str, hz: Alt) -> list:
    """'Likely to rise \\0.' -> ['Likely to rise ', hz, '.']"""
    head, _, tail = template.partition("\0")
    return [head, hz, tail] if _ else [template]


__all__ = ["ClaimGrammar", "ReasonPlan", "claim_grammar", "reason_plan", "reason_of", "top_driver", "driver_phrases", "why_window", "level_reason", "against_trend", "stated_reason", "OUTLOOKS", "current_phrases", "previous_phrases", "horizon_phrases"]
