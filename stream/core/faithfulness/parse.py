"""Parsing an explanation into the items of the claim grammar (windows, numbers, ratios,
percentages, directions, comparisons, forecasts) and cutting it into sentences and clauses."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from stream.core.faithfulness.vocabulary import (DRIVER_CLAIM, DRIVER_CLAIM_DOWN, DRIVER_CLAIM_GATE, LAST_YEAR, NEIGHBOURHOOD, ACCELERATION, AGE_WORD, MAGNITUDE, RANGE, UNVERIFIABLE_PATTERNS, AGAINST, AGE, CLAUSE_SPLIT, COMPARE, CUR_WINDOWS,
    DIRECTION_MAX_WORDS, DIRECTION_OF, FUTURE, FUTURE_GATE, IDLE, LETTERS, LEVEL, NEGATION, NOUN_AFTER, NUMBER,
    NUMBER_WORDS, PERCENT, PREV_WINDOWS, QUALIFIERS, RATIO_ADJ, RATIO_TIMES, RATIO_WORD, SENTENCE_END, TOTAL,
    TOTAL_GATE, TRAILING_QUALIFIER, UNIT_HOURS)
from stream.core.prompts import window_hours


# ---- parsing ---------------------------------------------------------------


@dataclass
class Item:
    start: int
    end: int
    kind: str  # window, number, ratio, percent, age, idle, total, direction, comparison, future, level,
    # unverifiable, acceleration, age_word, range, magnitude
    data: dict
    clause: int = -1


@dataclass
class Clause:
    start: int
    end: int
    sentence: int
    soft_next: bool  # joined to the next clause by "and": "41 sales and 29 buyers in the last 7 days"
    forecast: bool = False
    own: str | None = None  # window of the last window phrase in it
    window: str | None = None  # window in force for its items without a phrase of their own


def _num(text: str) -> float:
    t = text.lower().strip()
    if t in NUMBER_WORDS:
        return float(NUMBER_WORDS[t])
    return float(t.replace(",", ""))


def qualifier(text: str | None) -> str:
    if not text or not text.strip():
        return "exact"
    t = " ".join(text.lower().split())
    for name, pattern in QUALIFIERS.items():
        if re.fullmatch(pattern, t):
            return name
    return "exact"


def trailing_qualifier(before: str) -> tuple[str, str]:
    """('up from about', ...) -> ('up from', 'approx')."""
    m = TRAILING_QUALIFIER.search(before)
    if m:
        return before[: m.start(1)].rstrip(), qualifier(m.group(1))
    return before, "exact"


class Parser:
    def __init__(self, text: str, windows: tuple[str, ...]) -> None:
        self.text = text
        self.windows = windows
        self.taken = bytearray(len(text))
        self.items: list[Item] = []

    def _free(self, start: int, end: int) -> bool:
        return not any(self.taken[start:end])

    def _take(self, m: re.Match, kind: str, data: dict, span: tuple[int, int] | None = None) -> bool:
        start, end = span or m.span()
        if data.get("q") == "lookback":
            # a hedge right before the claim ("about 40%", "more than doubled"), found backwards:
            # a leading optional alternation in the patterns would be tried at every position
            q = TRAILING_QUALIFIER.search(self.text, max(0, start - 24), start)
            data["q"] = qualifier(q.group(1)) if q else "exact"
            if q and self._free(q.start(1), start):
                start = q.start(1)
        while start < end and self.text[start].isspace():
            start += 1
        if start == end or not self._free(start, end):
            return False
        self.taken[start:end] = b"\x01" * (end - start)
        self.items.append(Item(start, end, kind, data))
        return True

    def _take_span(self, start: int, end: int, kind: str, data: dict) -> bool:
        if not self._free(start, end):
            return False
        self.taken[start:end] = b"\x01" * (end - start)
        self.items.append(Item(start, end, kind, data))
        return True

    def window_for(self, n: str | None, unit: str) -> str | None:
        """A duration phrase -> the signals' window of that length, '?' when there is none."""
        u = unit.lower().rstrip("s") if len(unit) > 1 else unit.lower()
        u = {"min": "min", "hr": "hr", "wk": "wk"}.get(u, u)
        hours = UNIT_HOURS.get(u)
        if hours is None:
            return "?"
        count = 1.0 if n is None else _num(n)
        for w in self.windows:
            wh = window_hours(w)
            if hours < 0:  # months: 28 to 31 days each
                if 672 * count <= wh <= 744 * count:
                    return w
            elif math.isclose(wh, hours * count, rel_tol=1e-9):
                return w
        return "?"

    def _scan(self, pattern: re.Pattern, gate: tuple[str, ...]):
        """finditer, skipped when none of the gate words occurs (most patterns rarely apply)."""
        if any(g in self.lower for g in gate):
            yield from pattern.finditer(self.text)

    def parse(self) -> None:
        t = self.text
        self.lower = t.lower()
        masked = bytes(self.taken)  # the title's characters, masked before parsing
        for m in NEIGHBOURHOOD.finditer(t) if "similar" in self.lower else ():  # taken whole: "up 35%" is theirs
            self._take(m, "neighbourhood", {"n": _num(m.group("n")), "pct": _num(m.group("pct")),
                                            "rel": "rise" if m.group("dir").lower() in ("up", "rising") else "fall"})
        for m in LAST_YEAR.finditer(t) if "last year" in self.lower else ():
            verb = m.group("verb").lower()
            rel = "rise" if verb in ("rose", "grew", "climbed") else "fall" if verb in ("fell", "dropped", "declined") else "steady"
            self._take(m, "last_year", {"rel": rel, "a": _num(m.group("a")),
                                        "b": None if m.group("b") is None else _num(m.group("b"))})
        for m in self._scan(DRIVER_CLAIM, DRIVER_CLAIM_GATE):  # "this time of year lifts it": the model's driver
            g = m.group("g").lower()
            group = ("trend" if g.endswith("trend") else "level" if g.endswith("level") else "text" if "item" in g
                     else "season")
            self._take(m, "driver", {"group": group, "neg": bool(m.group("neg")),
                                     "rel": "fall" if DRIVER_CLAIM_DOWN.search(m.group("v")) else "rise"})
        for what, pattern in UNVERIFIABLE_PATTERNS:  # what no signal says: taken first ("new customers" is no age)
            for m in pattern.finditer(t):
                self._take(m, "unverifiable", {"what": what})
        for m in ACCELERATION.finditer(t):
            self._take(m, "acceleration", {"rel": "rise" if m.group("up") else "fall",
                                           "neg": bool(NEGATION.search(t, max(0, m.start() - 20), m.start()))})
        for m in AGE_WORD.finditer(t):
            age = next(k for k in ("brand", "new", "old") if m.group(k))
            self._take(m, "age_word", {"age": age, "neg": bool(NEGATION.search(t, max(0, m.start() - 20), m.start()))})
        for m in RANGE.finditer(t):
            a, b = (m.group("a"), m.group("b")) if m.group("a") else (m.group("a2"), m.group("b2"))
            self._take(m, "range", {"a": _num(a), "b": _num(b)})
        for m in FUTURE.finditer(t) if any(g in self.lower for g in FUTURE_GATE) else ():
            self._take(m, "future", {})
        for m in self._scan(LEVEL, ("above", "below")):
            self._take(m, "level", {"rel": m.group("rel").lower(), "w": self.window_for(m.group("n"), m.group("u")),
                                    "neg": bool(NEGATION.search(t, max(0, m.start() - 20), m.start()))})
        for kind, patterns in (("age", AGE), ("idle", IDLE)):
            for p, gate in patterns:
                for m in self._scan(p, gate):
                    self._take(m, kind, {"n": _num(m.group("n")), "unit": m.group("u"),
                                         "q": qualifier(m.group("q")) if "q" in m.groupdict() else "lookback"})
        for m in self._scan(TOTAL, TOTAL_GATE):
            n = m.group("n") or m.group("n2")
            self._take(m, "total", {"n": _num(n), "q": "lookback",
                                    "soft": (m.group("m") or "").lower() in ("in total", "overall")})
        for m in self._scan(RATIO_WORD, ("doubl", "tripl", "trebl", "quadrupl", "halv")):
            w = m.group("w").lower()
            k = 2.0 if w.startswith("doubl") else 3.0 if w.startswith(("tripl", "trebl")) else 4.0 if w.startswith("quad") else 0.5
            self._take(m, "ratio", {"n": k, "q": "lookback"})
        for m in self._scan(RATIO_TIMES, ("times", "x", "×")):
            n = m.group("n") or m.group("n2") or m.group("n3")
            k = {"twice": 2.0, "thrice": 3.0}.get(n.lower()) or _num(n)
            self._take(m, "ratio", {"n": k, "q": "lookback"})
        for m in self._scan(RATIO_ADJ, ("twice", "thrice", "double", "triple", "treble", "quadruple", "half")):
            w = m.group("w").lower()
            k = {"twice": 2.0, "double": 2.0, "thrice": 3.0, "triple": 3.0, "treble": 3.0, "quadruple": 4.0}.get(w, 0.5)
            self._take(m, "ratio", {"n": k, "q": "lookback"})
        for m in self._scan(PERCENT, ("%", "percent", "per cent")):
            self._take(m, "percent", {"n": _num(m.group("n")), "sign": m.group("sign"), "q": "lookback"})
        for p, gate in PREV_WINDOWS:
            for m in self._scan(p, gate):
                self._take(m, "window", {"w": self.window_for(m.group("n"), m.group("u")), "prev": True})
        for p in CUR_WINDOWS:
            for m in p.finditer(t):
                g = m.groupdict()
                if g.get("day") or g.get("week") or g.get("month") or g.get("hour"):
                    unit = next(k for k in ("day", "week", "month", "hour") if g.get(k))
                    w = self.window_for(None, unit)
                else:
                    w = self.window_for(g.get("n") or g.get("n2"), g.get("u") or g.get("u2"))
                against = bool(AGAINST.search(t[max(0, m.start() - 20) : m.start()]))
                self._take(m, "window", {"w": w, "prev": against})
        for m in COMPARE.finditer(t):
            c = (m.group("c") or "").lower()
            if m.group("s"):
                rel = "steady"
            elif c in ("more", "higher", "greater", "bigger", "busier", "stronger", "up"):
                rel = "rise"
            else:
                rel = "fall"
            neg = bool(NEGATION.search(t[max(0, m.start() - 20) : m.start()]))
            self._take(m, "comparison", {"rel": rel, "neg": neg})
        for m in NUMBER.finditer(t):
            if m.group("n"):
                n = _num(m.group("n")) * (1000 if m.group("k") else 1)
            else:
                n = float(NUMBER_WORDS[(m.group("w") or m.group("w2")).lower()])
            ext = NOUN_AFTER.match(t, m.end())
            self._take(m, "number", {"n": n, "ext": ext.end() if ext else m.end()})
        words = [(m.start(), m.end(), m.group(0).lower()) for m in LETTERS.finditer(t)]
        i = 0
        while i < len(words):
            for n in range(min(DIRECTION_MAX_WORDS, len(words) - i), 0, -1):
                group = words[i : i + n]
                if any(not t[a[1] : b[0]].isspace() for a, b in zip(group, group[1:])):
                    continue  # words of a phrase are separated by white space only
                rel = DIRECTION_OF.get(" ".join(w for _, _, w in group))
                if rel is None:
                    continue
                start, end = group[0][0], group[-1][1]
                if (start == 0 or not t[start - 1].isalnum()) and (end == len(t) or not t[end].isalnum()):
                    neg = bool(NEGATION.search(t, max(0, start - 20), start))
                    if self._take_span(start, end, "direction", {"rel": rel, "neg": neg}):
                        i += n - 1
                        break
            i += 1
        # magnitude words qualify a direction word or stand alone ("surging", "a sharp drop", "exploded"): they take
        # no characters, so the direction they carry is still read
        for m in MAGNITUDE.finditer(t):
            if not any(masked[m.start() : m.end()]) and not any(
                    i.kind == "unverifiable" and i.start <= m.start() < i.end for i in self.items):
                size = "slight" if m.group("slight") else "strong"
                rel = "rise" if m.group("up") else "fall" if m.group("down") else None
                self.items.append(Item(m.start(), m.end(), "magnitude", {"size": size, "rel": rel}))
        self.items.sort(key=lambda it: it.start)

    def clauses(self) -> list[Clause]:
        t = self.text
        sentence_ends = [m.end() for m in SENTENCE_END.finditer(t)]
        cuts: list[tuple[int, int, bool]] = []  # (clause end, next clause start, soft)
        windows = [i for i in self.items if i.kind == "window"]
        for m in CLAUSE_SPLIT.finditer(t):
            if not (self._free(m.start(), m.end()) or m.group(0) in "()"):
                continue
            if m.group(0)[0] == ":" and cuts:
                # a window used as a label, "(previous 7 days: 12)": its number belongs to it
                seg_start = cuts[-1][1]
                seg = t[seg_start : m.start()]
                lead = len(seg) - len(seg.lstrip(" ("))
                if any(w.start <= seg_start + lead and w.end >= m.start() for w in windows):
                    continue
            cuts.append((m.start(), m.end(), bool(m.group("soft"))))
        for e in sentence_ends:
            cuts.append((e, e, False))
        cuts.sort()
        out: list[Clause] = []
        pos, sentence = 0, 0
        for end, nxt, soft in cuts + [(len(t), len(t), False)]:
            if end > pos or not out:
                out.append(Clause(pos, max(end, pos), sentence, soft))
            if end in sentence_ends:
                sentence += 1
            pos = max(pos, nxt)
        return out



def window_spans(text: str, windows: tuple[str, ...]) -> list[tuple[int, int, str, bool]]:
    """The window phrases of a text as (start, end, window or '?', names the previous window)."""
    parser = Parser(text, windows)
    parser.parse()
    return [(i.start, i.end, i.data["w"], i.data["prev"]) for i in parser.items if i.kind == "window"]
