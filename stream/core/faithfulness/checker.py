"""The checker: every number and direction of an explanation tied to a window and a measure,
then verified against the item's signals within the tolerances (stream.core.faithfulness has the rules)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from stream.core.faithfulness.vocabulary import (BRAND_NEW_DAYS, FILLER_WORDS, NEW_DAYS, SLIGHT_RATIO, STRONG_RATIO,
    COUNT_NOUNS, UNIT, USER_NOUNS, ADJECTIVES, CHANGE_WORD_AFTER,
    DOWN_WORDS, FORECAST, FUNCTION_WORDS, CI, MARK_CHANGE, MARK_CUR, MARK_PREV, OUTLOOK_OF, OUTLOOK_WORD,
    UNIT_HOURS, UP_WORDS, WORD)
from stream.core.faithfulness.parse import Clause, Item, Parser, trailing_qualifier
from stream.core.forecast import PredictedCount, outlook, pace, size_unit
from stream.core.prompts import main_window, short_category, short_title, signal_windows, window_hours


# ---- results ---------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One checkable statement of an explanation."""

    text: str  # the explanation's characters that make the claim
    start: int
    end: int
    # "number" | "direction" | "comparison" | "level" | "acceleration" | "magnitude" | "age" (new, established)
    # | "forecast" (direction or size of the next period, against the prediction) | "range" (against its range)
    # | "driver" (the way an input group, season or text, moved the prediction: against its drivers)
    # | "unverifiable" (a statement no signal backs: customers, ranks, causes, stock, or a clause with no claim)
    kind: str
    measure: str | None  # count, prev_count, users, change, ratio, percent, age, idle, total; None if unknown
    window: str | None  # the signals' window name ("7d"); None for age/idle/total or when unattributed
    stated: float | str  # the number, the direction ("rise", "not fall", "steady" ...) or the level ("above", "not below")
    true: float | str | None  # what the signals say; None when the claim could not be tied to a signal
    ok: bool
    reason: str = ""  # why a claim is false


@dataclass(frozen=True)
class FaithfulnessResult:
    claims: list[Claim]
    checked: int  # claims verified (all of `claims`)
    false: int  # claims that are wrong or cannot be tied to a signal
    faithful: bool  # at least one claim, and no false one
    outlook: str | None = None  # forecast direction ("rise"/"fall"/"steady"); a checked claim only with a prediction
    unattributed: int = field(default=0)  # of `false`: claims not tied to any signal
    unverifiable: int = field(default=0)  # of `unattributed`: statements no signal can back (kind "unverifiable")

    def to_dict(self) -> dict:
        return asdict(self)


def _true_direction(c: float, p: float) -> str:
    v = c - p
    if abs(v) <= max(1.0, 0.1 * max(c, p)):
        return "steady" if v == 0 else ("steady/rise" if v > 0 else "steady/fall")
    return "rise" if v > 0 else "fall"


def _direction_ok(rel: str, neg: bool, c: float, p: float) -> bool:
    v = c - p
    steady = abs(v) <= max(1.0, 0.1 * max(c, p))
    holds = {"rise": v > 0, "fall": v < 0, "steady": steady}[rel]
    return holds != neg


def _number_ok(stated: float, true: float, q: str, tol_abs: float = 1.0, tol_rel: float = 0.1) -> bool:
    if q == "approx":
        return abs(stated - true) <= max(tol_abs, tol_rel * abs(true))
    if q == "gt":
        return true > stated
    if q == "ge":
        return true >= stated
    if q == "lt":
        return true < stated
    if q == "le":
        return true <= stated
    return math.isclose(stated, true, abs_tol=1e-9)


def _unit_hours(unit: str) -> float:
    u = unit.lower()
    u = u.rstrip("s") if len(u) > 1 else u
    h = UNIT_HOURS.get(u, 24.0)
    return 730.5 if h < 0 else h  # a month as an age: 30.4 days


class _Checker:
    def __init__(self, text: str, signals: Mapping[str, float], windows: tuple[str, ...], default_window: str,
                 prediction: PredictedCount | None = None) -> None:
        self.text = text
        self.pred = prediction
        self.s = signals
        self.windows = windows
        self.default_window = default_window
        self.claims: list[Claim] = []
        self.outlook: str | None = None

    def add(self, it: Item, kind: str, measure: str | None, window: str | None, stated, true, ok: bool, reason: str = "") -> None:
        self.claims.append(Claim(self.text[it.start : it.end], it.start, it.end, kind, measure, window, stated, true, ok, reason))

    def unattributed(self, it: Item, kind: str, measure: str | None, window: str | None, stated, reason: str) -> None:
        self.add(it, kind, measure, window, stated, None, False, reason)

    def sig(self, name: str) -> float | None:
        v = self.s.get(name)
        return None if v is None else float(v)

    def run(self, parser: Parser) -> None:
        clauses = parser.clauses()
        items = parser.items
        ci = 0
        for it in items:
            while ci + 1 < len(clauses) and it.start >= clauses[ci + 1].start:
                ci += 1
            it.clause = ci
        by_clause: list[list[Item]] = [[] for _ in clauses]
        for it in items:
            by_clause[it.clause].append(it)
        for c, its in zip(clauses, by_clause):
            c.forecast = any(i.kind == "future" for i in its) or bool(FORECAST.search(self.text, c.start, c.end))
            phrases = [i for i in its if i.kind == "window"]
            if phrases:
                c.own = phrases[-1].data["w"]
        # window in force: own; else the next clause's if joined by "and"; else the one before; else the
        # next one in the same sentence
        context: str | None = None
        for k, c in enumerate(clauses):
            if c.own is not None:
                c.window = c.own
            elif c.soft_next and k + 1 < len(clauses) and clauses[k + 1].own is not None:
                c.window = clauses[k + 1].own
            elif context is not None:
                c.window = context
            else:
                c.window = next((d.own for d in clauses[k + 1 :] if d.sentence == c.sentence and d.own), None)
            if c.window is not None:
                context = c.window
        last_measure: dict[int, str] = {}  # sentence -> base measure of its last number
        for c, its in zip(clauses, by_clause):
            if c.forecast and not any(i.kind in ("direction", "comparison") for i in its):
                m = OUTLOOK_WORD.search(self.text, c.start, c.end)  # "expect more interactions next week"
                if m:
                    self.outlook = OUTLOOK_OF[m.group(1).lower()]
                    self._forecast(Item(m.start(1), m.end(1), "direction", {}), self.outlook)
            phrases = [i for i in its if i.kind in ("window", "future")]
            for it in its:
                if it.kind in ("window", "future"):
                    continue
                near = self._nearest(it, phrases)
                if it.kind in ("direction", "comparison"):
                    self._direction(it, c, near)
                elif it.kind in ("age", "idle"):
                    self._age_idle(it)
                elif it.kind == "total":
                    if it.data["soft"] and near is not None and near.kind == "window":
                        # "41 interactions in total over the last 7 days": the window's count
                        self._count_number(it, c, near, its, last_measure, force_noun="count")
                    else:
                        self._simple(it, "total", "total_count", it.data["n"], it.data["q"])
                elif it.kind in ("ratio", "percent"):
                    self._ratio(it, c, near, its)
                elif it.kind == "level":
                    self._level(it, c)
                elif it.kind == "number":
                    self._count_number(it, c, near, its, last_measure)
                elif it.kind == "unverifiable":
                    what = it.data["what"]
                    self.unattributed(it, "unverifiable", what, None, self.text[it.start : it.end],
                                      f"no signal says this ({what})")
                elif it.kind == "acceleration":
                    self._acceleration(it, c, near)
                elif it.kind == "age_word":
                    self._age_word(it)
                elif it.kind == "range":
                    self._range(it, c, near)
                elif it.kind == "magnitude":
                    self._magnitude(it, c, near)
                elif it.kind == "neighbourhood":
                    self._neighbourhood(it, c)
                elif it.kind == "last_year":
                    self._last_year(it)
                elif it.kind == "driver":
                    self._driver(it)
        self._coverage(parser, clauses, by_clause)

    def _coverage(self, parser: Parser, clauses: list[Clause], by_clause: list[list[Item]]) -> None:
        """A clause with words that make no claim the checker reads ("Customers love it") states something no
        signal backs: one unverifiable claim over the clause (words of the title, function words and fillers
        such as "it", "demand", "likely" make no statement)."""
        for c, its in zip(clauses, by_clause):
            if its:
                continue
            words = [m for m in WORD.finditer(self.text, c.start, c.end)
                     if not parser.taken[m.start()] and not m.group(0).isdigit()
                     and m.group(0).lower() not in FUNCTION_WORDS and m.group(0).lower() not in FILLER_WORDS]
            if words:
                span = Item(words[0].start(), words[-1].end(), "unverifiable", {})
                self.unattributed(span, "unverifiable", "statement", None, self.text[span.start : span.end],
                                  "a statement the checker cannot tie to a signal")

    def _forecast(self, it: Item, stated: str) -> None:
        """A forecast direction ("likely to rise", "not rise") against the prediction's, when one is given."""
        if self.pred is None:
            return
        true = self.pred.direction(self.s)
        ok = (true == stated) if not stated.startswith("not ") else (true != stated[4:])
        self.add(it, "forecast", "direction", None, stated, true, ok,
                 "" if ok else f"the model predicts {self.pred.count:.3g} against a pace of {pace(self.s, self.pred.horizon_days):.3g}")

    def _size(self, it: Item, stated: float, q: str) -> None:
        """A forecast count ("about 40 next week") against the predicted count: within one rounding unit
        (stream.core.forecast.size_unit), or the bound a qualifier states."""
        if self.pred is None:
            self.unattributed(it, "forecast", "count", None, stated, "a forecast number without the prediction")
            return
        true = self.pred.count
        ok = abs(stated - true) <= size_unit(true) if q in ("exact", "approx") else _number_ok(stated, true, q)
        self.add(it, "forecast", "count", None, stated, round(true, 2), ok, "" if ok else f"the model predicts {true:.3g}")

    def _range(self, it: Item, c: Clause, near: Item | None) -> None:
        a, b = it.data["a"], it.data["b"]
        stated = f"{a:g}–{b:g}"
        _, _, future = self._window_of(c, near)
        if not (c.forecast or future):
            self.unattributed(it, "range", "count", None, stated, "a range of counts that is no forecast")
            return
        if self.pred is None or not self.pred.has_range:
            self.unattributed(it, "range", "count", None, stated, "no predicted range to hold it against")
            return
        lo, hi = self.pred.low, self.pred.high
        ok = a <= b and abs(a - lo) <= size_unit(lo) and abs(b - hi) <= size_unit(hi)
        self.add(it, "range", "count", None, stated, f"{lo:.3g}–{hi:.3g}", ok,
                 "" if ok else f"the model's 80% range is {lo:.3g}–{hi:.3g}")

    def _pair(self, it: Item, c: Clause, near: Item | None) -> tuple[float, float, str | None] | str:
        """(count, the count it is compared with, window) a change word speaks of: the clause's window against the
        one before, or in a forecast the predicted count against the current pace; a reason string when neither."""
        window, _, future = self._window_of(c, near)
        if c.forecast or future:
            if self.pred is None:
                return "a forecast's size without the prediction"
            return self.pred.count, pace(self.s, self.pred.horizon_days), None
        window = window or self.default_window
        if window == "?":
            return "a window the signals do not have"
        cur, prev = self.sig(f"count_{window}"), self.sig(f"prev_count_{window}")
        if cur is None or prev is None:
            return f"no count_{window} / prev_count_{window} signal"
        return cur, prev, window

    def _magnitude(self, it: Item, c: Clause, near: Item | None) -> None:
        """"surging", "a sharp drop", "slightly up": the size of the change (vocabulary.STRONG_RATIO / SLIGHT_RATIO),
        and the direction a word implies ("exploded" is a rise)."""
        size, rel = it.data["size"], it.data["rel"]
        stated = size if rel is None else f"{size} {rel}"
        pair = self._pair(it, c, near)
        if isinstance(pair, str):
            self.unattributed(it, "magnitude", "count", None, stated, pair)
            return
        cur, prev, window = pair
        hi, lo = max(cur, prev), min(cur, prev)
        steady = abs(cur - prev) <= max(1.0, 0.1 * hi)
        if size == "strong":
            ok = not steady and hi >= STRONG_RATIO * lo
        else:
            ok = cur != prev and hi <= SLIGHT_RATIO * lo
        if rel is not None:
            ok = ok and (cur > prev if rel == "rise" else cur < prev)
        true = f"{cur:g} vs {prev:g}"
        self.add(it, "magnitude", "count", window, stated, true, ok, "" if ok else f"{true}: not a {stated} change")

    def _neighbourhood(self, it: Item, c: Clause) -> None:
        """"like 11 similar items, up 35% this week": nbr_n neighbours, whose pooled count of the window in force
        (nbr_count_<w>) changed by that share against the window before (nbr_prev_<w>)."""
        n, pct, rel = it.data["n"], it.data["pct"], it.data["rel"]
        window = c.window or self.default_window
        signed = pct if rel == "rise" else -pct
        stated = f"{n:g} items, {signed:+g}%"
        nn, cur, prev = self.sig("nbr_n"), self.sig(f"nbr_count_{window}"), self.sig(f"nbr_prev_{window}")
        if nn is None or cur is None or prev is None or prev == 0:
            self.unattributed(it, "neighbourhood", "nbr", window, stated, f"no nbr_n / nbr_count_{window} / nbr_prev_{window} signal")
            return
        true_pct = 100.0 * (cur - prev) / prev
        ok = n == nn and abs(signed - true_pct) <= max(1.0, 0.05 * abs(true_pct))
        self.add(it, "neighbourhood", "nbr", window, stated, f"{nn:g} items, {true_pct:+.3g}%", ok,
                 "" if ok else f"{nn:g} neighbours, {cur:g} vs {prev:g} before")

    def _last_year(self, it: Item) -> None:
        """"last year it rose from 20 to 61 over these weeks": ly_count (last year's count at this point) and
        ly_next (over the horizon after it), the verb's direction strict."""
        rel, a, b = it.data["rel"], it.data["a"], it.data["b"]
        stated = f"{rel} {a:g}" + ("" if b is None else f" to {b:g}")
        ly, nxt = self.sig("ly_count"), self.sig("ly_next")
        if ly is None or nxt is None:
            self.unattributed(it, "last_year", "ly", None, stated, "no ly_count / ly_next signal")
            return
        true_rel = "rise" if nxt > ly else "fall" if nxt < ly else "steady"
        ok = round(ly) == a and (b is None or round(nxt) == b) and rel == true_rel
        self.add(it, "last_year", "ly", None, stated, f"{true_rel} {ly:g} to {nxt:g}", ok,
                 "" if ok else f"last year {ly:g} then {nxt:g}")

    def _driver(self, it: Item) -> None:
        """"this time of year lifts it" / "the kind of item it is holds it back": the way the named input group
        (season: the calendar; text: the item state) moved the forecast against the item's current pace, against the
        prediction's driver of that group (PredictedCount.drivers, exact group Shapley values of the median's gap from
        the pace, stream.core.drivers); a claim without drivers is unverifiable."""
        group, rel, neg = it.data["group"], it.data["rel"], it.data["neg"]
        stated = ("not " if neg else "") + rel
        phi = None if self.pred is None or not self.pred.drivers else self.pred.drivers.get(group)
        if phi is None or not math.isfinite(float(phi)):
            self.unattributed(it, "driver", group, None, stated, f"no {group} driver to hold it against")
            return
        phi = float(phi)
        ok = ((phi > 0) if rel == "rise" else (phi < 0)) != neg
        self.add(it, "driver", group, None, stated, round(phi, 4), ok,
                 "" if ok else f"the {group} driver is {phi:+.3g} (log count)")

    def _acceleration(self, it: Item, c: Clause, near: Item | None) -> None:
        """"accelerating": the window's change is larger than the change before it (accel_<w> > 0)."""
        rel, neg = it.data["rel"], it.data["neg"]
        stated = ("not " if neg else "") + ("accelerating" if rel == "rise" else "decelerating")
        window, _, future = self._window_of(c, near)
        if c.forecast or future:
            self.unattributed(it, "acceleration", "accel", None, stated, "a forecast of acceleration is no signal")
            return
        window = window or self.default_window
        accel = self.sig(f"accel_{window}") if window != "?" else None
        if accel is None:
            self.unattributed(it, "acceleration", "accel", None, stated, f"no accel_{window} signal")
            return
        ok = ((accel > 0) if rel == "rise" else (accel < 0)) != neg
        self.add(it, "acceleration", "accel", window, stated, accel, ok, "" if ok else f"accel_{window} is {accel:g}")

    def _age_word(self, it: Item) -> None:
        """"new" (under NEW_DAYS days of history), "brand-new" (under BRAND_NEW_DAYS), "established" (NEW_DAYS or more)."""
        age, neg = it.data["age"], it.data["neg"]
        hours = self.sig("age_h")
        stated = ("not " if neg else "") + age
        if hours is None:
            self.unattributed(it, "age", "age", None, stated, "no age_h signal")
            return
        days = hours / 24
        holds = days < BRAND_NEW_DAYS if age == "brand" else days < NEW_DAYS if age == "new" else days >= NEW_DAYS
        ok = holds != neg
        self.add(it, "age", "age", None, stated, round(days, 1), ok, "" if ok else f"{days:.0f} days old")

    @staticmethod
    def _nearest(it: Item, phrases: list[Item]) -> Item | None:
        best, best_d = None, None
        end = it.data.get("ext", it.end)  # a number with its noun: "41 interactions"
        for p in phrases:
            d = (it.start - p.end) if p.end <= it.start else (p.start - end)
            d = d * 2 + (1 if p.end <= it.start else 0)  # ties: the phrase after the claim
            if best_d is None or d < best_d:
                best, best_d = p, d
        return best

    def _window_of(self, c: Clause, near: Item | None) -> tuple[str | None, bool, bool]:
        """(window, phrase says previous window, phrase is in the future)."""
        if near is not None:
            if near.kind == "future":
                return None, False, True
            return near.data["w"], near.data["prev"], False
        return c.window, False, False

    def _direction(self, it: Item, c: Clause, near: Item | None) -> None:
        rel, neg = it.data["rel"], it.data["neg"]
        stated = ("not " if neg else "") + rel
        window, _, future = self._window_of(c, near)
        if c.forecast or future:
            self.outlook = stated if stated in ("rise", "fall", "steady") else self.outlook
            self._forecast(it, stated)
            return
        kind = it.kind
        window = window or self.default_window
        if window == "?":
            self.unattributed(it, kind, "count", None, stated, "window the signals do not have")
            return
        cur, prev = self.sig(f"count_{window}"), self.sig(f"prev_count_{window}")
        if cur is None or prev is None:
            self.unattributed(it, kind, "count", window, stated, f"no count_{window} signal")
            return
        self.add(it, kind, "count", window, stated, _true_direction(cur, prev), _direction_ok(rel, neg, cur, prev),
                 "" if _direction_ok(rel, neg, cur, prev) else f"{cur:g} vs {prev:g} before")

    def _level(self, it: Item, c: Clause) -> None:
        """"above its 28-day pace": the count of the window in force against the named longer
        window's count scaled to its length (stream.core.faithfulness.grammar.level_reason)."""
        rel, neg, long = it.data["rel"], it.data["neg"], it.data["w"]
        stated = ("not " if neg else "") + rel
        if c.forecast:
            return  # "likely to stay above its 28-day pace": about the future, not a signal
        main = c.window or self.default_window
        if long == "?":
            self.unattributed(it, "level", "count", None, stated, "a window the signals do not have")
            return
        if main == "?" or window_hours(main) >= window_hours(long):
            self.unattributed(it, "level", "count", main, stated, f"no shorter window to hold against the {long} pace")
            return
        cur, total = self.sig(f"count_{main}"), self.sig(f"count_{long}")
        if cur is None or total is None:
            self.unattributed(it, "level", "count", main, stated, f"no count_{main} / count_{long} signal")
            return
        pace = total * window_hours(main) / window_hours(long)
        true = "above" if cur > pace else "below" if cur < pace else "at"
        ok = (true == rel) != neg
        self.add(it, "level", "count", main, stated, true, ok,
                 "" if ok else f"{cur:g} in {main} against a {long} pace of {pace:.3g}")

    def _simple(self, it: Item, measure: str, signal: str, stated: float, q: str) -> None:
        true = self.sig(signal)
        if true is None:
            self.unattributed(it, "number", measure, None, stated, f"no {signal} signal")
            return
        ok = _number_ok(stated, true, q)
        self.add(it, "number", measure, None, stated, true, ok, "" if ok else f"{signal} is {true:g}")

    def _age_idle(self, it: Item) -> None:
        signal = "age_h" if it.kind == "age" else "idle_h"
        hours = self.sig(signal)
        stated, q, unit = it.data["n"], it.data["q"], it.data["unit"]
        if hours is None:
            self.unattributed(it, "number", it.kind, None, stated, f"no {signal} signal")
            return
        true = hours / _unit_hours(unit)
        # ages are stated rounded either way: within one unit of the truth
        ok = abs(stated - true) < 1 if q == "exact" else _number_ok(stated, true, q)
        self.add(it, "number", it.kind, None, stated, round(true, 2), ok, "" if ok else f"{signal} is {hours:g}h")

    def _ratio(self, it: Item, c: Clause, near: Item | None, its: list[Item]) -> None:
        window, _, future = self._window_of(c, near)
        window = window or (self.default_window if it.kind == "ratio" else None)
        measure = it.kind
        stated, q = it.data["n"], it.data["q"]
        if future or c.forecast:
            if self.pred is None or it.kind != "ratio":
                self.unattributed(it, "comparison", measure, None, stated, "a forecast number without the prediction")
                return
            true = self.pred.count / max(pace(self.s, self.pred.horizon_days), 1e-9)
            ok = _number_ok(stated, true, "approx", 0.0, 0.2)  # "likely to double": within 20%
            self.add(it, "forecast", "ratio", None, stated, round(true, 3), ok,
                     "" if ok else f"the model predicts {true:.2g}x the current pace")
            return
        if window in (None, "?"):
            self.unattributed(it, "comparison", measure, None, stated, "no window")
            return
        cur, prev = self.sig(f"count_{window}"), self.sig(f"prev_count_{window}")
        if cur is None or prev is None or prev == 0:
            self.unattributed(it, "comparison", measure, window, stated, "no previous count to compare with")
            return
        if it.kind == "ratio":
            true = cur / prev
            ok = abs(true - stated) <= 0.1 * stated if q == "exact" else _number_ok(stated, true, q, 0.0, 0.2)
        else:
            sign = it.data["sign"]
            if sign:
                signed = -stated if sign in "-−" else stated
            else:
                rel = self._clause_direction(it, its)
                if rel is None:
                    self.unattributed(it, "comparison", measure, window, stated, "a percentage without up/down")
                    return
                signed = stated if rel == "rise" else -stated
            stated = signed
            true = 100.0 * (cur - prev) / prev
            ok = _number_ok(signed, true, q, 2.0, 0.1) if q != "exact" else abs(signed - true) <= max(1.0, 0.05 * abs(true))
        self.add(it, "comparison", measure, window, stated, round(true, 3), ok, "" if ok else f"{cur:g} vs {prev:g} before")

    def _clause_direction(self, it: Item, its: list[Item]) -> str | None:
        dirs = [i for i in its if i.kind in ("direction", "comparison") and i.data["rel"] in ("rise", "fall")]
        if not dirs:
            after = self.text[it.end : it.end + 25].lower()
            m = CHANGE_WORD_AFTER.match(after)
            if not m:
                return None
            return "rise" if m.group(1) in ("more", "higher", "increase", "rise", "jump", "gain", "growth") else "fall"
        d = min(dirs, key=lambda i: abs(i.start - it.start))
        return d.data["rel"] if not d.data["neg"] else ("fall" if d.data["rel"] == "rise" else "rise")

    def _count_number(self, it: Item, c: Clause, near: Item | None, its: list[Item],
                      last_measure: dict[int, str], force_noun: str | None = None) -> None:
        text = self.text
        stated = it.data["n"]
        before = text[c.start : it.start]
        before, q = trailing_qualifier(before)
        if it.kind == "total":
            q = it.data["q"]
        # the words after the number: its noun
        words = [w.lower() for w in WORD.findall(text[it.end : c.end])[:4]]
        change_sign = 0
        noun = force_noun
        rest = words
        while rest and rest[0] in ADJECTIVES:
            rest = rest[1:]
        if rest and rest[0] in ("more", "extra", "additional", "fewer", "less"):
            change_sign = 1 if rest[0] in ("more", "extra", "additional") else -1
            rest = rest[1:]
        if noun is None and rest:
            w = rest[0]
            if w in COUNT_NOUNS:
                noun = "count"
            elif w in USER_NOUNS:
                noun = "users"
            elif re.fullmatch(UNIT, w):
                self.unattributed(it, "number", None, None, stated,
                                  f"a duration ('{stated:g} {w}') that is no window, age or idle time")
                return
            elif w == "of" and rest[1:2] == ["them"]:
                noun = None
            elif w not in FUNCTION_WORDS and not w.isdigit():
                self.unattributed(it, "number", None, None, stated, f"unknown measure '{w}'")
                return
        m_change = MARK_CHANGE.search(before)
        m_prev = MARK_PREV.search(before)
        m_cur = MARK_CUR.search(before)
        if m_change and not (m_change.group("dir") or m_change.group("noun")) and noun == "users":
            m_change = None  # "bought by 29 customers": who, not how much it changed
        if m_change and not change_sign and not (m_prev or m_cur):
            word = (m_change.group("dir") or m_change.group("noun") or "").lower()
            if word in UP_WORDS:
                change_sign = 1
            elif word in DOWN_WORDS:
                change_sign = -1
            else:
                rel = self._clause_direction(it, its)
                change_sign = 0 if rel is None else (1 if rel == "rise" else -1)
                if rel is None:
                    self.unattributed(it, "number", "change", None, stated, "a change without up/down")
                    return
        window, phrase_prev, future = self._window_of(c, near)
        labelled = near is not None and near.end <= it.start and not text[near.end : it.start].strip(" :")
        # a bare number takes the measure of the sentence's previous number ("29 buyers vs 20"),
        # unless a window labels it ("1d:6", "last day: 6"): then it is that window's count
        base = noun or ("count" if labelled else last_measure.get(c.sentence, "count"))
        if noun is None and base == "users" and (m_prev or (phrase_prev and not m_cur)):
            base = "count"  # "from 29 users, compared with 12 the week before": there is no previous-window user count
        if noun:
            last_measure[c.sentence] = noun
        if future or (c.forecast and near is None):
            self._size(it, stated, q)
            return
        if window is None:
            self.unattributed(it, "number", base, None, stated, "no window")
            return
        if window == "?":
            self.unattributed(it, "number", base, None, stated, "a window the signals do not have")
            return
        if change_sign:
            if base != "count":
                self.unattributed(it, "number", "change", window, stated, "no previous-window user signal")
                return
            cur, prev = self.sig(f"count_{window}"), self.sig(f"prev_count_{window}")
            if cur is None or prev is None:
                self.unattributed(it, "number", "change", window, stated, f"no count_{window} signal")
                return
            true = cur - prev
            signed = change_sign * stated
            ok = _number_ok(signed, true, q)
            self.add(it, "number", "change", window, signed, true, ok, "" if ok else f"{cur:g} vs {prev:g} before")
            return
        # "41 against 12 the week before": when another number of the clause is marked as the
        # previous one, an unmarked number is the current window's, whatever phrase is nearest
        sibling_prev = any(
            o is not it and o.kind == "number" and MARK_PREV.search(trailing_qualifier(text[c.start : o.start])[0])
            for o in its
        )
        is_prev = bool(m_prev) or (phrase_prev and not m_cur and not sibling_prev)
        if is_prev and base == "users":
            if m_prev and m_prev.group(0).strip().lower() == "from":
                is_prev = False  # "bought by ... from 29 customers": the users of the window itself
            else:
                self.unattributed(it, "number", "users", window, stated, "no previous-window user signal")
                return
        signal = f"{'prev_count' if is_prev else ('users' if base == 'users' else 'count')}_{window}"
        measure = signal.rsplit("_", 1)[0]
        true = self.sig(signal)
        if true is None:
            self.unattributed(it, "number", measure, window, stated, f"no {signal} signal")
            return
        if is_prev and q in ("gt", "lt") and phrase_prev:
            # "41 sales, more than 12 the week before": 12 is the previous count, and the current is higher
            cur = self.sig(f"count_{window}")
            ok = math.isclose(stated, true) and cur is not None and ((cur > true) if q == "gt" else (cur < true))
        else:
            ok = _number_ok(stated, true, q)
        self.add(it, "number", measure, window, stated, true, ok, "" if ok else f"{signal} is {true:g}")



def check(explanation: str, signals: Mapping[str, float], *, default_window: str | None = None,
          title: str | None = None, prediction: PredictedCount | None = None,
          category: str | None = None) -> FaithfulnessResult:
    """Extract the checkable claims of `explanation` and verify each against `signals`.

    `default_window` is the window a direction with no window anywhere in the text
    talks about ("Demand is rising."); by default the window closest to 7 days.
    `title`: the item's title; where the text repeats it (or its prompt form), its
    words make no claims ("Pack of 72 cake cases" states no count); `category` likewise.
    `prediction`: the model's predicted count (and range) for the horizon; with it, the forecast
    clauses are claims too (direction, "about 40 next week", "likely 28–55", "likely to double"),
    without it a forecast's direction is only `outlook` and a forecast's number is unattributed.
    Faithful: at least one claim, and every claim true (a statement the checker cannot tie to a
    signal, kind "unverifiable", is a false claim).
    """
    if not isinstance(explanation, str):
        raise TypeError(f"explanation must be str, got {type(explanation).__name__}")
    windows = signal_windows(signals)
    if not windows:
        raise ValueError(f"signals row has no count_<window> keys: {sorted(signals)}")
    default = default_window or main_window(windows, 7)
    if default not in windows:
        raise ValueError(f"default_window {default!r} is not among the signals' windows {windows}")
    parser = Parser(explanation, windows)
    forms = set()
    if isinstance(title, str) and title.strip():
        forms |= {title.strip(), short_title(title).rstrip("…")}
    if isinstance(category, str) and category.strip():
        forms |= {category.strip(), short_category(category)}
    if forms:
        for form in forms:
            if not re.search(r"[^\W\d_]", form):
                continue  # a title without a letter ("22077", an item id standing in for one) is only a number here
            # whole words only, and a one-word title as written: "A" is not the a in "last", the film "Up"
            # not the direction in "up from" (a longer title is matched in any case)
            flags = CI if " " in form or len(form) > 5 else 0
            for m in re.finditer(rf"(?<!\w){re.escape(form)}(?!\w)", explanation, flags):
                parser.taken[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
    parser.parse()
    checker = _Checker(explanation, signals, windows, default, prediction)
    checker.run(parser)
    claims = sorted(checker.claims, key=lambda c: c.start)
    false = sum(not c.ok for c in claims)
    return FaithfulnessResult(
        claims=claims,
        checked=len(claims),
        false=false,
        faithful=false == 0 and len(claims) > 0,
        outlook=checker.outlook,
        unattributed=sum(c.true is None for c in claims),
        unverifiable=sum(c.kind == "unverifiable" for c in claims),
    )
