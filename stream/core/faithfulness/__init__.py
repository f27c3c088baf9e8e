"""Checks the claims of an explanation against the item's trend signals.

Pure and regex-only (no torch): the trainer filters targets with it, the
evaluation scores explanations with it, and the stream marks every published
explanation `faithful: true/false` with it. The grammar, tolerances and what
counts as unfaithful are documented in docs/explanations.md; in short:

- The text is cut into sentences and clauses (at , ; : ( ) dashes, "and",
  "but", "while" ...). Window phrases ("in the last 7 days", "the week before",
  "7d", "yesterday"), numbers, ratios ("doubled", "3x", "+25%"), direction words
  ("rising", "down", "flat") and comparisons ("more than the week before") are
  found first; then every number and direction is tied to a window: the
  nearest window phrase in its clause, else the window in force from earlier in
  the text, else the next one in the sentence.
- A number's measure comes from the noun after it ("41 purchases", "29
  distinct customers", "7 days old"), from the word before it ("from 12" is the
  previous window, "up by 29" a change, "to 41" the current window), or, with
  neither, from the sentence's previous number (default: the event count).
- Every claim is checked: integers exactly, hedged numbers ("about 40") within
  10%, ratios within 10%, percentages within max(1 point, 5%), ages within one
  unit. A number that cannot be tied to a signal (no window, an unknown noun, a
  window the signals lack, a predicted number) is a false claim: faithfulness
  is strict.
- Clauses that forecast ("likely to rise", "expect more next week") are not
  claims about the signals: their direction becomes `outlook`, unchecked.

`repair` (verify and revise) rewrites what `check` finds false: a wrong number
becomes the signal's value, a wrong direction or comparison word the word of
the same form that matches the truth ("up from 26" -> "down from 26"); a claim
it cannot rewrite (unattributable, "doubled", a window the signals lack) loses
its clause. The stream serves the repaired text; the evaluation reports both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from stream.core.prompts import main_window, short_title, signal_windows, window_hours

# ---- vocabulary ----------------------------------------------------------

_NUMBER_WORDS = {
    "zero": 0, "no": 0, "none": 0, "one": 1, "a single": 1, "single": 1, "once": 1, "two": 2, "twice": 2,
    "three": 3, "thrice": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "a hundred": 100, "hundred": 100, "a": 1, "an": 1,
}
NUMW = ("zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
        "sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|a hundred")
NUM = r"\d+(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?"
_ANYNUM = rf"(?:{NUM}|{NUMW})"

COUNT_NOUNS = frozenset(
    "event events interaction interactions sale sales purchase purchases order orders rating ratings view "
    "views click clicks time times hit hits transaction transactions review reviews play plays visit visits "
    "action actions buy buys rental rentals download downloads listen listens watch watches".split()
)
USER_NOUNS = frozenset(
    "user users buyer buyers customer customers people person persons shopper shoppers viewer viewers "
    "rater raters reviewer reviewers visitor visitors fan fans account accounts household households "
    "member members client clients watcher watchers listener listeners".split()
)
_ADJECTIVES = frozenset("distinct unique different separate individual single new total recent repeat active".split())
_UNIT_HOURS = {
    "minute": 1 / 60, "min": 1 / 60, "hour": 1.0, "hr": 1.0, "h": 1.0, "day": 24.0, "d": 24.0,
    "week": 168.0, "wk": 168.0, "w": 168.0, "fortnight": 336.0, "month": -1.0, "year": 8766.0,
}
UNIT = r"(?:minutes?|mins?|hours?|hrs?|days?|weeks?|wks?|fortnights?|months?|years?)"
_QUALIFIERS = {
    "exact": r"exactly|only|just|precisely|a total of|total of",
    "approx": r"about|around|roughly|approximately|approx\.?|nearly|almost|some|close to|~|circa|an estimated",
    "gt": r"more than|over|above|upwards of|greater than|higher than|exceeding|beyond|in excess of",
    "ge": r"at least|no fewer than|no less than",
    "lt": r"fewer than|less than|under|below|lower than",
    "le": r"at most|no more than",
}
_QUAL_ANY = "|".join(_QUALIFIERS.values())

# ---- patterns (case-insensitive; applied in this order, earlier ones claim their characters) ----

_I = re.IGNORECASE
_FORECAST = re.compile(
    r"\b(?:likely|unlikely|expect\w*|should|will|would|set to|poised|forecast\w*|predict\w*|projected|"
    r"may|might|could|going to|outlook|anticipat\w*|probably|bound to|on track|headed|heading|next)\b|'ll\b", _I
)
_FUTURE = re.compile(
    rf"\b(?:(?:in|over|during|for|across|within)\s+)?(?:the\s+)?(?:next|coming|following|upcoming)\s+"
    rf"(?:{_ANYNUM}\s*)?(?:{UNIT}|period|[hdw]\b)|\b(?:ahead|tomorrow|going forward|from now on|in the future)\b", _I
)
# (pattern, gate): a pattern runs only when one of its gate words is in the text
_AGE = [
    (re.compile(rf"\b(?P<n>{_ANYNUM})[- ](?P<u>{UNIT})[- ]old\b", _I), ("old",)),
    (re.compile(rf"\bfirst\s+(?:\w+\s+){{0,2}}?(?P<q>{_QUAL_ANY})?\s*(?P<n>{_ANYNUM})\s+(?P<u>{UNIT})\s+ago\b", _I),
     ("first",)),
    (re.compile(
        rf"\b(?:around|listed|available|on sale|on the market|in the catalog(?:ue)?|selling|active|live|known|tracked)"
        rf"\s+for\s+(?P<q>{_QUAL_ANY})?\s*(?P<n>{_ANYNUM})\s+(?P<u>{UNIT})\b", _I), (" for ",)),
    (re.compile(rf"\bage[d:]?\s+(?:of\s+)?(?P<q>{_QUAL_ANY})?\s*(?P<n>{NUM})\s*(?P<u>{UNIT}|[hdw]\b)", _I), ("age",)),
]
_IDLE = [
    (re.compile(rf"\blast\s+(?:\w+\s+){{0,3}}?(?P<q>{_QUAL_ANY})?\s*(?P<n>{_ANYNUM})\s*(?P<u>{UNIT}|[hdw]\b)\s+ago\b", _I),
     ("ago",)),
    (re.compile(rf"\b(?:idle|quiet|silent|inactive|dormant)\s+(?:for\s+)?(?P<q>{_QUAL_ANY})?\s*(?P<n>{_ANYNUM})\s*"
                rf"(?P<u>{UNIT}|[hdw]\b)", _I), ("idle", "quiet", "silent", "inactive", "dormant")),
    (re.compile(rf"(?:\bno\b|\bnot\b|n't)\s+(?:\w+\s+){{0,2}}?(?:for|in)\s+(?P<q>{_QUAL_ANY})?\s*(?P<n>{_ANYNUM})\s+"
                rf"(?P<u>{UNIT})\b", _I), ("no", "n't")),
    (re.compile(rf"\b(?P<n>{_ANYNUM})\s+(?P<u>{UNIT})\s+since\s+(?:its|the)\s+last\b", _I), ("since",)),
]
_TOTAL_GATE = ("total", "overall", "all-time", "all time", "so far", "to date", "since", "lifetime")
_FUTURE_GATE = ("next", "coming", "following", "upcoming", "ahead", "tomorrow", "going forward", "from now", "future")
_TOTAL = re.compile(
    rf"(?<![\w.,])(?P<n>{NUM})\s+(?:(?:\w+\s+){{0,2}}?)(?P<m>in total|overall|all[- ]time|so far|to date|"
    rf"since (?:launch|it was first seen|first seen|it appeared)|lifetime)\b"
    rf"|\b(?:total of|in total|lifetime total of|all[- ]time total of)\s+(?P<n2>{NUM})\b", _I
)
_RATIO_WORD = re.compile(
    r"\b(?P<w>doubled|doubling|doubles|tripled|trebled|tripling|triples|quadrupled|halved|halving|halves)\b", _I
)
_RATIO_TIMES = re.compile(
    rf"(?<![\w.,])(?P<n>{NUM}|{NUMW}|twice|thrice)"
    rf"\s*(?:times|x|×)\s+(?:as\s+(?:many|much|high)\b|more\b|higher\b|what\b|that\s+of\b|(?=the\s+(?!last|past)))"
    rf"|\b(?P<n2>{NUM})\s*[x×](?!\w)|[x×]\s*(?P<n3>{NUM})\b", _I
)
_RATIO_ADJ = re.compile(
    r"\b(?P<w>twice|thrice|double|triple|treble|quadruple|half)\s+(?:that of\b|what\b|as\s+(?:many|much|high)\b|(?=the\b))", _I
)
_PERCENT = re.compile(rf"(?P<sign>[+\-−])?(?P<n>{NUM})\s*(?:%|percent\b|per\s*cent\b)", _I)

_PREV_WINDOWS = [
    (re.compile(
        rf"\b(?:the\s+|a\s+|an\s+)?(?:(?:previous|prior|preceding|earlier)\s+)?(?:(?P<n>{_ANYNUM})\s+)?"
        rf"(?P<u>{UNIT})\s+(?:before|prior|earlier|ago)(?:\s+that)?\b", _I), ("before", "prior", "earlier", "ago")),
    (re.compile(rf"\b(?:the\s+)?(?:previous|prior|preceding|prev\.?)\s+(?:(?P<n>{_ANYNUM})\s*)?(?P<u>{UNIT}|[hdw]\b)", _I),
     ("previous", "prior", "preceding", "prev")),
]
_CUR_WINDOWS = [
    re.compile(
        rf"\b(?:(?:in|over|during|across|for|within|of)\s+)?(?:the\s+)?(?:last|past|latest|most\s+recent|recent|this|current)"
        rf"\s+(?:(?P<n>{_ANYNUM})\s+)?(?P<u>{UNIT})\b", _I),
    re.compile(rf"\b(?:(?:in|over|during|across|within)\s+)(?:the\s+)?(?P<n>{_ANYNUM})\s+(?P<u>{UNIT})\b", _I),
    re.compile(rf"(?<![\w.])(?P<n>{NUM})\s?(?P<u>[hdw])\b|\b(?P<n2>{_ANYNUM})-(?P<u2>minute|hour|day|week|month)\b", _I),
    re.compile(r"\b(?P<day>yesterday|today|overnight|daily)\b|\b(?P<week>weekly)\b|\b(?P<month>monthly)\b"
               r"|\b(?P<hour>hourly)\b", _I),
    re.compile(r"\b(?P<u>day|week|month)[- ](?:on|over)[- ](?:day|week|month)\b", _I),
]
# A current-window phrase right after one of these names the window compared against:
# "more than last week", "up from the last 7 days" -> the previous window.
_AGAINST = re.compile(r"(?:\bthan|\bfrom|\bvs\.?|\bversus|\bcompared\s+(?:to|with)|\bagainst)\s*$", _I)

_COMPARE = re.compile(
    rf"\b(?P<c>more|fewer|less|higher|lower|greater|bigger|smaller|busier|quieter|stronger|weaker|up|down)\b"
    rf"(?:\s+[a-z]+){{0,3}}?\s+(?:than|on|over|versus|vs\.?|compared\s+(?:to|with))\b"
    rf"(?!\s+(?:(?:{_QUAL_ANY})\s+)?(?:{_ANYNUM})\b)"
    rf"|\b(?P<s>the\s+same\s+as|as\s+many\s+as|on\s+par\s+with|in\s+line\s+with|level\s+with|matching|unchanged\s+from)\b"
    rf"(?!\s+(?:(?:{_QUAL_ANY})\s+)?(?:{_ANYNUM})\b)", _I
)
_DIRECTIONS = {
    "rise": "picking up|picked up|picks up|pick up|heating up|on the rise|trending up|trending upward|trending upwards|"
            "more popular|rising|rises|rise|rose|risen|upward|upwards|uptick|up|growing|grows|grow|grew|grown|growth|"
            "increasing|increases|increased|increase|climbing|climbs|climbed|climb|gaining|gained|gains|gain|"
            "accelerating|accelerated|accelerates|accelerate|surging|surged|surges|surge|jumped|jumping|jumps|jump|"
            "soaring|soared|soars|higher|rebounding|rebounded|recovering|recovered|strengthening|booming|spiking|"
            "spiked|spike|hotter|stronger|busier",
    "fall": "cooling off|cooled off|cool off|slowing down|slowed down|slow down|losing steam|losing momentum|"
            "tailing off|tailed off|"
            "on the decline|trending down|trending downward|trending downwards|less popular|falling|falls|fall|fell|"
            "fallen|downward|downwards|down|declining|declines|declined|decline|dropping|dropped|drops|drop|"
            "decreasing|decreased|decreases|decrease|slowing|slowed|slows|slowdown|cooling|cooled|cools|cool|fading|"
            "faded|fades|fade|shrinking|shrank|shrunk|shrinks|slipping|slipped|slips|sliding|slid|slides|lower|"
            "weakening|weakened|waning|waned|dipping|dipped|dips|dip|slumping|slumped|slump|plunging|plunged|"
            "tumbling|tumbled|sinking|sank|easing|eased|eases|softening|softened|quieter|weaker|tapering|tapered",
    "steady": "holding steady|held steady|holding flat|no change|steady|stable|flat|unchanged|levelled|leveled|"
              "constant|flatlining|plateaued|plateauing|plateau|holding",
}
# phrase (lower case, words joined by one space) -> rise/fall/steady; matched word by word, longest first
_DIRECTION_OF = {phrase: rel for rel, phrases in _DIRECTIONS.items() for phrase in phrases.split("|")}
_DIRECTION_MAX_WORDS = max(len(p.split()) for p in _DIRECTION_OF)
_LETTERS = re.compile(r"[A-Za-z]+")
_NEGATION = re.compile(
    r"(?:\bunlikely to|\bnot|\bno longer|n't|\bnever|\bneither|\bnor|\bno sign of|\bwithout|\bno)\s+(?:\w+\s+)?$", _I
)
# Direction-free number claims: words as numbers only before a measure noun ("two buyers", "no sales").
_OUTLOOK_WORD = re.compile(r"\b(more|fewer|less|similar|same|higher|lower)\b", _I)
_OUTLOOK_OF = {"more": "rise", "higher": "rise", "fewer": "fall", "less": "fall", "lower": "fall",
               "similar": "steady", "same": "steady"}
_NUMBER = re.compile(
    rf"(?<![\w.,])(?P<n>{NUM})(?P<k>k\b)?"
    rf"|\b(?P<w>{NUMW}|a single|no|twice|once)\b(?=\s+(?:(?:{'|'.join(_ADJECTIVES)})\s+){{0,2}}"
    rf"(?:{'|'.join(sorted(COUNT_NOUNS | USER_NOUNS))})\b)"
    rf"|\b(?P<w2>none|twice|once)\b", _I
)
_NOUN_AFTER = re.compile(
    rf"(?:\s+(?:{'|'.join(_ADJECTIVES)}))*\s+(?:{'|'.join(sorted(COUNT_NOUNS | USER_NOUNS))})\b", _I
)
_TRAILING_QUALIFIER = re.compile(rf"(?:^|\s|\b)({_QUAL_ANY})\s*$", _I)

_SENTENCE_END = re.compile(r"(?<!\bvs)(?<!\bapprox)[.!?]+(?=\s|$)|\n+", _I)
_CLAUSE_SPLIT = re.compile(
    r"[;:](?=\s|$)|,(?=\s)|\s[-–—]+\s|[()]|\s(?P<soft>and)\s|\s(?:but|while|whereas|though|although|yet|which|so|as)\s",
    _I,
)
_WORD = re.compile(r"[a-z%~]+(?:'[a-z]+)?|\d+", _I)

_MARK_PREV = re.compile(
    r"(?:\bfrom|\bvs\.?|\bversus|\bagainst|\bcompared\s+(?:to|with)|\bprev\.?|\bprevious(?:ly)?|\bbefore|\bearlier"
    r")\s*:?\s*$", _I
)
_MARK_CUR = re.compile(r"(?:\bto|\breaching|\breached|\bnow|\bat|\bhit|\bcurrently|\bthis\s+week)\s*:?\s*$", _I)
_MARK_CHANGE = re.compile(
    r"(?:\b(?P<dir>up|down|rose|fell|grew|dropped|gained|lost|climbed|slipped|jumped|declined|increased|decreased|rising|falling)"
    r"(?:\s+by)?|\b(?P<noun>increase|decrease|rise|drop|fall|jump|gain|loss|decline|change|swing)\s+of|\bby)\s*$", _I
)
_CHANGE_WORD_AFTER = re.compile(
    r"\s*(?:\w+\s+)?(more|fewer|less|higher|lower|increase|decrease|rise|drop|fall|jump|gain|growth|decline)\b", _I
)
_UP_WORDS = frozenset("up rose grew gained climbed jumped increased rising increase rise jump gain".split())
_DOWN_WORDS = frozenset("down fell dropped lost slipped declined decreased falling decrease drop fall loss decline".split())


# ---- results ---------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One checkable statement of an explanation."""

    text: str  # the explanation's characters that make the claim
    start: int
    end: int
    kind: str  # "number" | "direction" | "comparison"
    measure: str | None  # count, prev_count, users, change, ratio, percent, age, idle, total; None if unknown
    window: str | None  # the signals' window name ("7d"); None for age/idle/total or when unattributed
    stated: float | str  # the number, or the direction ("rise", "not fall", "steady" ...)
    true: float | str | None  # what the signals say; None when the claim could not be tied to a signal
    ok: bool
    reason: str = ""  # why a claim is false


@dataclass(frozen=True)
class FaithfulnessResult:
    claims: list[Claim]
    checked: int  # claims verified (all of `claims`)
    false: int  # claims that are wrong or cannot be tied to a signal
    faithful: bool  # no false claim (also True when nothing was checkable: see checked)
    outlook: str | None = None  # forecast direction ("rise"/"fall"/"steady"), not a checked claim
    unattributed: int = field(default=0)  # of `false`: claims not tied to any signal

    def to_dict(self) -> dict:
        return asdict(self)


# ---- parsing ---------------------------------------------------------------


@dataclass
class _Item:
    start: int
    end: int
    kind: str  # window, number, ratio, percent, age, idle, total, direction, comparison, future
    data: dict
    clause: int = -1


@dataclass
class _Clause:
    start: int
    end: int
    sentence: int
    soft_next: bool  # joined to the next clause by "and": "41 sales and 29 buyers in the last 7 days"
    forecast: bool = False
    own: str | None = None  # window of the last window phrase in it
    window: str | None = None  # window in force for its items without a phrase of their own


def _num(text: str) -> float:
    t = text.lower().strip()
    if t in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[t])
    return float(t.replace(",", ""))


def _qualifier(text: str | None) -> str:
    if not text or not text.strip():
        return "exact"
    t = " ".join(text.lower().split())
    for name, pattern in _QUALIFIERS.items():
        if re.fullmatch(pattern, t):
            return name
    return "exact"


def _trailing_qualifier(before: str) -> tuple[str, str]:
    """('up from about', ...) -> ('up from', 'approx')."""
    m = _TRAILING_QUALIFIER.search(before)
    if m:
        return before[: m.start(1)].rstrip(), _qualifier(m.group(1))
    return before, "exact"


class _Parser:
    def __init__(self, text: str, windows: tuple[str, ...]) -> None:
        self.text = text
        self.windows = windows
        self.taken = bytearray(len(text))
        self.items: list[_Item] = []

    def _free(self, start: int, end: int) -> bool:
        return not any(self.taken[start:end])

    def _take(self, m: re.Match, kind: str, data: dict, span: tuple[int, int] | None = None) -> bool:
        start, end = span or m.span()
        if data.get("q") == "lookback":
            # a hedge right before the claim ("about 40%", "more than doubled"), found backwards:
            # a leading optional alternation in the patterns would be tried at every position
            q = _TRAILING_QUALIFIER.search(self.text, max(0, start - 24), start)
            data["q"] = _qualifier(q.group(1)) if q else "exact"
            if q and self._free(q.start(1), start):
                start = q.start(1)
        while start < end and self.text[start].isspace():
            start += 1
        if start == end or not self._free(start, end):
            return False
        self.taken[start:end] = b"\x01" * (end - start)
        self.items.append(_Item(start, end, kind, data))
        return True

    def _take_span(self, start: int, end: int, kind: str, data: dict) -> bool:
        if not self._free(start, end):
            return False
        self.taken[start:end] = b"\x01" * (end - start)
        self.items.append(_Item(start, end, kind, data))
        return True

    def window_for(self, n: str | None, unit: str) -> str | None:
        """A duration phrase -> the signals' window of that length, '?' when there is none."""
        u = unit.lower().rstrip("s") if len(unit) > 1 else unit.lower()
        u = {"min": "min", "hr": "hr", "wk": "wk"}.get(u, u)
        hours = _UNIT_HOURS.get(u)
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
        for m in self._scan(_FUTURE, _FUTURE_GATE):
            self._take(m, "future", {})
        for kind, patterns in (("age", _AGE), ("idle", _IDLE)):
            for p, gate in patterns:
                for m in self._scan(p, gate):
                    self._take(m, kind, {"n": _num(m.group("n")), "unit": m.group("u"),
                                         "q": _qualifier(m.group("q")) if "q" in m.groupdict() else "lookback"})
        for m in self._scan(_TOTAL, _TOTAL_GATE):
            n = m.group("n") or m.group("n2")
            self._take(m, "total", {"n": _num(n), "q": "lookback",
                                    "soft": (m.group("m") or "").lower() in ("in total", "overall")})
        for m in self._scan(_RATIO_WORD, ("doubl", "tripl", "trebl", "quadrupl", "halv")):
            w = m.group("w").lower()
            k = 2.0 if w.startswith("doubl") else 3.0 if w.startswith(("tripl", "trebl")) else 4.0 if w.startswith("quad") else 0.5
            self._take(m, "ratio", {"n": k, "q": "lookback"})
        for m in self._scan(_RATIO_TIMES, ("times", "x", "×")):
            n = m.group("n") or m.group("n2") or m.group("n3")
            k = {"twice": 2.0, "thrice": 3.0}.get(n.lower()) or _num(n)
            self._take(m, "ratio", {"n": k, "q": "lookback"})
        for m in self._scan(_RATIO_ADJ, ("twice", "thrice", "double", "triple", "treble", "quadruple", "half")):
            w = m.group("w").lower()
            k = {"twice": 2.0, "double": 2.0, "thrice": 3.0, "triple": 3.0, "treble": 3.0, "quadruple": 4.0}.get(w, 0.5)
            self._take(m, "ratio", {"n": k, "q": "lookback"})
        for m in self._scan(_PERCENT, ("%", "percent", "per cent")):
            self._take(m, "percent", {"n": _num(m.group("n")), "sign": m.group("sign"), "q": "lookback"})
        for p, gate in _PREV_WINDOWS:
            for m in self._scan(p, gate):
                self._take(m, "window", {"w": self.window_for(m.group("n"), m.group("u")), "prev": True})
        for p in _CUR_WINDOWS:
            for m in p.finditer(t):
                g = m.groupdict()
                if g.get("day") or g.get("week") or g.get("month") or g.get("hour"):
                    unit = next(k for k in ("day", "week", "month", "hour") if g.get(k))
                    w = self.window_for(None, unit)
                else:
                    w = self.window_for(g.get("n") or g.get("n2"), g.get("u") or g.get("u2"))
                against = bool(_AGAINST.search(t[max(0, m.start() - 20) : m.start()]))
                self._take(m, "window", {"w": w, "prev": against})
        for m in _COMPARE.finditer(t):
            c = (m.group("c") or "").lower()
            if m.group("s"):
                rel = "steady"
            elif c in ("more", "higher", "greater", "bigger", "busier", "stronger", "up"):
                rel = "rise"
            else:
                rel = "fall"
            neg = bool(_NEGATION.search(t[max(0, m.start() - 20) : m.start()]))
            self._take(m, "comparison", {"rel": rel, "neg": neg})
        for m in _NUMBER.finditer(t):
            if m.group("n"):
                n = _num(m.group("n")) * (1000 if m.group("k") else 1)
            else:
                n = float(_NUMBER_WORDS[(m.group("w") or m.group("w2")).lower()])
            ext = _NOUN_AFTER.match(t, m.end())
            self._take(m, "number", {"n": n, "ext": ext.end() if ext else m.end()})
        words = [(m.start(), m.end(), m.group(0).lower()) for m in _LETTERS.finditer(t)]
        i = 0
        while i < len(words):
            for n in range(min(_DIRECTION_MAX_WORDS, len(words) - i), 0, -1):
                group = words[i : i + n]
                if any(not t[a[1] : b[0]].isspace() for a, b in zip(group, group[1:])):
                    continue  # words of a phrase are separated by white space only
                rel = _DIRECTION_OF.get(" ".join(w for _, _, w in group))
                if rel is None:
                    continue
                start, end = group[0][0], group[-1][1]
                if (start == 0 or not t[start - 1].isalnum()) and (end == len(t) or not t[end].isalnum()):
                    neg = bool(_NEGATION.search(t, max(0, start - 20), start))
                    if self._take_span(start, end, "direction", {"rel": rel, "neg": neg}):
                        i += n - 1
                        break
            i += 1
        self.items.sort(key=lambda it: it.start)

    def clauses(self) -> list[_Clause]:
        t = self.text
        sentence_ends = [m.end() for m in _SENTENCE_END.finditer(t)]
        cuts: list[tuple[int, int, bool]] = []  # (clause end, next clause start, soft)
        windows = [i for i in self.items if i.kind == "window"]
        for m in _CLAUSE_SPLIT.finditer(t):
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
        out: list[_Clause] = []
        pos, sentence = 0, 0
        for end, nxt, soft in cuts + [(len(t), len(t), False)]:
            if end > pos or not out:
                out.append(_Clause(pos, max(end, pos), sentence, soft))
            if end in sentence_ends:
                sentence += 1
            pos = max(pos, nxt)
        return out


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
    h = _UNIT_HOURS.get(u, 24.0)
    return 730.5 if h < 0 else h  # a month as an age: 30.4 days


class _Checker:
    def __init__(self, text: str, signals: Mapping[str, float], windows: tuple[str, ...], default_window: str) -> None:
        self.text = text
        self.s = signals
        self.windows = windows
        self.default_window = default_window
        self.claims: list[Claim] = []
        self.outlook: str | None = None

    def add(self, it: _Item, kind: str, measure: str | None, window: str | None, stated, true, ok: bool, reason: str = "") -> None:
        self.claims.append(Claim(self.text[it.start : it.end], it.start, it.end, kind, measure, window, stated, true, ok, reason))

    def unattributed(self, it: _Item, kind: str, measure: str | None, window: str | None, stated, reason: str) -> None:
        self.add(it, kind, measure, window, stated, None, False, reason)

    def sig(self, name: str) -> float | None:
        v = self.s.get(name)
        return None if v is None else float(v)

    def run(self, parser: _Parser) -> None:
        clauses = parser.clauses()
        items = parser.items
        ci = 0
        for it in items:
            while ci + 1 < len(clauses) and it.start >= clauses[ci + 1].start:
                ci += 1
            it.clause = ci
        by_clause: list[list[_Item]] = [[] for _ in clauses]
        for it in items:
            by_clause[it.clause].append(it)
        for c, its in zip(clauses, by_clause):
            c.forecast = any(i.kind == "future" for i in its) or bool(_FORECAST.search(self.text, c.start, c.end))
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
                m = _OUTLOOK_WORD.search(self.text, c.start, c.end)  # "expect more interactions next week"
                if m:
                    self.outlook = _OUTLOOK_OF[m.group(1).lower()]
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
                elif it.kind == "number":
                    self._count_number(it, c, near, its, last_measure)

    @staticmethod
    def _nearest(it: _Item, phrases: list[_Item]) -> _Item | None:
        best, best_d = None, None
        end = it.data.get("ext", it.end)  # a number with its noun: "41 interactions"
        for p in phrases:
            d = (it.start - p.end) if p.end <= it.start else (p.start - end)
            d = d * 2 + (1 if p.end <= it.start else 0)  # ties: the phrase after the claim
            if best_d is None or d < best_d:
                best, best_d = p, d
        return best

    def _window_of(self, c: _Clause, near: _Item | None) -> tuple[str | None, bool, bool]:
        """(window, phrase says previous window, phrase is in the future)."""
        if near is not None:
            if near.kind == "future":
                return None, False, True
            return near.data["w"], near.data["prev"], False
        return c.window, False, False

    def _direction(self, it: _Item, c: _Clause, near: _Item | None) -> None:
        rel, neg = it.data["rel"], it.data["neg"]
        stated = ("not " if neg else "") + rel
        window, _, future = self._window_of(c, near)
        if c.forecast or future:
            self.outlook = stated if stated in ("rise", "fall", "steady") else self.outlook
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

    def _simple(self, it: _Item, measure: str, signal: str, stated: float, q: str) -> None:
        true = self.sig(signal)
        if true is None:
            self.unattributed(it, "number", measure, None, stated, f"no {signal} signal")
            return
        ok = _number_ok(stated, true, q)
        self.add(it, "number", measure, None, stated, true, ok, "" if ok else f"{signal} is {true:g}")

    def _age_idle(self, it: _Item) -> None:
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

    def _ratio(self, it: _Item, c: _Clause, near: _Item | None, its: list[_Item]) -> None:
        window, _, future = self._window_of(c, near)
        window = window or (self.default_window if it.kind == "ratio" else None)
        measure = it.kind
        stated, q = it.data["n"], it.data["q"]
        if future:
            self.unattributed(it, "comparison", measure, None, stated, "a forecast number, not a signal")
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

    def _clause_direction(self, it: _Item, its: list[_Item]) -> str | None:
        dirs = [i for i in its if i.kind in ("direction", "comparison") and i.data["rel"] in ("rise", "fall")]
        if not dirs:
            after = self.text[it.end : it.end + 25].lower()
            m = _CHANGE_WORD_AFTER.match(after)
            if not m:
                return None
            return "rise" if m.group(1) in ("more", "higher", "increase", "rise", "jump", "gain", "growth") else "fall"
        d = min(dirs, key=lambda i: abs(i.start - it.start))
        return d.data["rel"] if not d.data["neg"] else ("fall" if d.data["rel"] == "rise" else "rise")

    def _count_number(self, it: _Item, c: _Clause, near: _Item | None, its: list[_Item],
                      last_measure: dict[int, str], force_noun: str | None = None) -> None:
        text = self.text
        stated = it.data["n"]
        before = text[c.start : it.start]
        before, q = _trailing_qualifier(before)
        if it.kind == "total":
            q = it.data["q"]
        # the words after the number: its noun
        words = [w.lower() for w in _WORD.findall(text[it.end : c.end])[:4]]
        change_sign = 0
        noun = force_noun
        rest = words
        while rest and rest[0] in _ADJECTIVES:
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
            elif w not in _FUNCTION_WORDS and not w.isdigit():
                self.unattributed(it, "number", None, None, stated, f"unknown measure '{w}'")
                return
        m_change = _MARK_CHANGE.search(before)
        m_prev = _MARK_PREV.search(before)
        m_cur = _MARK_CUR.search(before)
        if m_change and not (m_change.group("dir") or m_change.group("noun")) and noun == "users":
            m_change = None  # "bought by 29 customers": who, not how much it changed
        if m_change and not change_sign and not (m_prev or m_cur):
            word = (m_change.group("dir") or m_change.group("noun") or "").lower()
            if word in _UP_WORDS:
                change_sign = 1
            elif word in _DOWN_WORDS:
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
        if future:
            self.unattributed(it, "number", base, None, stated, "a forecast number, not a signal")
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
            o is not it and o.kind == "number" and _MARK_PREV.search(_trailing_qualifier(text[c.start : o.start])[0])
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


_FUNCTION_WORDS = frozenset(
    "in over during across within for this the last past vs versus than compared against before earlier ago "
    "previously a an so and or but with from to up down on at per while this that these its it of s total "
    "overall each apiece yesterday today week day month hour weekly daily monthly prior preceding previous "
    "recent latest most is was were are has had have been".split()
)


def window_spans(text: str, windows: tuple[str, ...]) -> list[tuple[int, int, str, bool]]:
    """The window phrases of a text as (start, end, window or '?', names the previous window)."""
    parser = _Parser(text, windows)
    parser.parse()
    return [(i.start, i.end, i.data["w"], i.data["prev"]) for i in parser.items if i.kind == "window"]


def check(explanation: str, signals: Mapping[str, float], *, default_window: str | None = None,
          title: str | None = None) -> FaithfulnessResult:
    """Extract the checkable claims of `explanation` and verify each against `signals`.

    `default_window` is the window a direction with no window anywhere in the text
    talks about ("Demand is rising."); by default the window closest to 7 days.
    `title`: the item's title; where the text repeats it (or its prompt form), its
    words make no claims ("Pack of 72 cake cases" states no count).
    """
    if not isinstance(explanation, str):
        raise TypeError(f"explanation must be str, got {type(explanation).__name__}")
    windows = signal_windows(signals)
    if not windows:
        raise ValueError(f"signals row has no count_<window> keys: {sorted(signals)}")
    default = default_window or main_window(windows, 7)
    if default not in windows:
        raise ValueError(f"default_window {default!r} is not among the signals' windows {windows}")
    parser = _Parser(explanation, windows)
    if isinstance(title, str) and title.strip():
        for form in {title.strip(), short_title(title).rstrip("…")}:
            for m in re.finditer(re.escape(form), explanation, _I):
                parser.taken[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
    parser.parse()
    checker = _Checker(explanation, signals, windows, default)
    checker.run(parser)
    claims = sorted(checker.claims, key=lambda c: c.start)
    false = sum(not c.ok for c in claims)
    return FaithfulnessResult(
        claims=claims,
        checked=len(claims),
        false=false,
        faithful=false == 0,
        outlook=checker.outlook,
        unattributed=sum(c.true is None for c in claims),
    )


# ---- repair: verify and revise ----------------------------------------------


@dataclass(frozen=True)
class Repair:
    """An explanation after checker-guided repair (`repair`)."""

    text: str  # the repaired text; the input itself when it could not be repaired
    changed: bool  # text differs from the input
    fixed_numbers: int  # numbers rewritten to the signal's value
    fixed_directions: int  # direction/comparison words (and bound qualifiers) rewritten to the true direction
    dropped_clauses: int  # clauses removed because a claim in them could not be rewritten
    faithful: bool  # check(text).faithful
    checked: int  # check(text).checked

    def to_dict(self) -> dict:
        return asdict(self)


_REPAIR_ROUNDS = 8
# (rise, fall, steady) forms of one grammatical slot; a false direction word is replaced by the
# form of the same slot that matches the truth ("up from 26" -> "down from 26")
_DIRECTION_SWAPS = [
    ("up", "down", "unchanged"), ("upward", "downward", "flat"), ("upwards", "downwards", "flat"),
    ("rising", "falling", "holding steady"), ("rise", "fall", "hold steady"), ("rises", "falls", "holds steady"),
    ("rose", "fell", "held steady"), ("risen", "fallen", "held steady"),
    ("growing", "declining", "holding steady"), ("grow", "decline", "hold steady"),
    ("grows", "declines", "holds steady"), ("grew", "declined", "held steady"), ("grown", "declined", "held steady"),
    ("increasing", "decreasing", "holding steady"), ("increase", "decrease", "hold steady"),
    ("increases", "decreases", "holds steady"), ("increased", "decreased", "held steady"),
    ("climbing", "dropping", "holding steady"), ("climb", "drop", "hold steady"), ("climbs", "drops", "holds steady"),
    ("climbed", "dropped", "held steady"),
    ("jumping", "slipping", "holding steady"), ("jump", "dip", "hold steady"), ("jumps", "slips", "holds steady"),
    ("jumped", "slipped", "held steady"),
    ("gaining", "declining", "holding steady"), ("gained", "declined", "held steady"),
    ("accelerating", "slowing", "holding steady"), ("accelerated", "slowed", "held steady"),
    ("picking up", "slowing down", "holding steady"), ("picked up", "slowed down", "held steady"),
    ("picks up", "slows down", "holds steady"), ("pick up", "slow down", "hold steady"),
    ("heating up", "cooling off", "holding steady"), ("trending up", "trending down", "holding steady"),
    ("trending upward", "trending downward", "holding steady"),
    ("trending upwards", "trending downwards", "holding steady"), ("on the rise", "on the decline", "holding steady"),
    ("more popular", "less popular", "unchanged"), ("higher", "lower", "unchanged"),
    ("stronger", "weaker", "unchanged"), ("busier", "quieter", "unchanged"), ("hotter", "weaker", "unchanged"),
    ("growth", "decline", "no change"), ("uptick", "dip", "no change"),
    ("surging", "sliding", "holding steady"), ("surged", "slid", "held steady"),
]
# steady words name no rise/fall form of their own: (rise, fall, the word itself)
_STEADY_SWAPS = [
    ("rising", "falling", "steady"), ("rising", "falling", "stable"), ("rising", "falling", "flat"),
    ("rising", "falling", "constant"), ("rose", "fell", "plateaued"), ("rose", "fell", "levelled"),
    ("rose", "fell", "leveled"), ("rising", "falling", "flatlining"), ("rising", "falling", "plateauing"),
    ("rising", "falling", "holding"), ("growth", "decline", "no change"), ("growth", "decline", "plateau"),
]
_SWAP_OF: dict[str, tuple[str, str, str]] = {}
for _triple in _DIRECTION_SWAPS:
    for _word in _triple:
        _SWAP_OF.setdefault(_word, _triple)
_SWAP_OF.update((t[2], t) for t in _STEADY_SWAPS)
_REL_INDEX = {"rise": 0, "fall": 1, "steady": 2}
# any other direction word, by its ending
_FORM_SWAPS = {"ing": ("rising", "falling", "holding steady"), "ed": ("rose", "fell", "held steady"),
               "s": ("rises", "falls", "holds steady"), "": ("rising", "falling", "steady")}
_IRREGULAR_PAST = frozenset("rose risen grew grown fell fallen shrank shrunk sank slid soared spiked".split())

_COMPARATIVE_SWAPS = {
    "more": ("more", "fewer"), "fewer": ("more", "fewer"), "less": ("more", "less"), "higher": ("higher", "lower"),
    "lower": ("higher", "lower"), "greater": ("greater", "smaller"), "bigger": ("bigger", "smaller"),
    "smaller": ("bigger", "smaller"), "busier": ("busier", "quieter"), "quieter": ("busier", "quieter"),
    "stronger": ("stronger", "weaker"), "weaker": ("stronger", "weaker"), "up": ("up", "down"), "down": ("up", "down"),
}

_NOUN_SINGULAR = {"people": "person", "watches": "watch", "times": "time"}
for _noun in COUNT_NOUNS | USER_NOUNS:
    if _noun.endswith("s") and _noun[:-1] in COUNT_NOUNS | USER_NOUNS:
        _NOUN_SINGULAR.setdefault(_noun, _noun[:-1])
for _unit in ("minute", "hour", "day", "week", "fortnight", "month", "year"):
    _NOUN_SINGULAR[_unit + "s"] = _unit
_NOUN_PLURAL = {s: p for p, s in _NOUN_SINGULAR.items() if p != "persons"}
_NOUN_AFTER_NUMBER = re.compile(rf"(\s+(?:(?:{'|'.join(_ADJECTIVES)})\s+)*)([a-z]+)\b", _I)
_FIRST_NUMBER = re.compile(rf"(?<![\w.,])(?:{NUM})|\b(?:{NUMW}|a single)\b", _I)
_ARTICLE_BEFORE = re.compile(r"\b(a|an)\s+$", _I)
_DROP_DELIMS = re.compile(r";\s*|,\s+|:\s+|\s+(?:and|but)\s+|\s*\(\s*|\s*\)", _I)


def _int_text(x: float) -> str:
    return str(int(round(x)))


def _keep_case(old: str, new: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _direction_target(cur: float, prev: float, negated: bool) -> str:
    """The direction word that makes the (possibly negated) claim true: strict rise/fall, steady only on a tie."""
    v = cur - prev
    if negated:
        return "fall" if v > 0 else "rise"  # "not rising" holds on a fall and on a tie
    return "rise" if v > 0 else "fall" if v < 0 else "steady"


def _direction_phrase(word: str, rel: str, next_word: str) -> str | None:
    w = " ".join(word.lower().split())
    if next_word == "from" and w in ("steady", "stable", "flat"):
        triple: tuple[str, ...] = ("up", "down", "unchanged")  # "up from 26" -> "down from 26"
    elif w in _SWAP_OF:
        triple = _SWAP_OF[w]
    elif w in _DIRECTION_OF:
        last = w.split()[-1]
        ending = "ing" if last.endswith("ing") else "ed" if last.endswith("ed") or last in _IRREGULAR_PAST else (
            "s" if last.endswith("s") and not last.endswith("ss") else "")
        triple = _FORM_SWAPS[ending]
    else:
        return None
    return _keep_case(word, triple[_REL_INDEX[rel]])


def _comparison_phrase(span: str, rel: str) -> str:
    """'more interactions than' -> 'fewer interactions than' / 'the same as'; 'the same as' -> 'more than'."""
    first = span.split()[0]
    swap = _COMPARATIVE_SWAPS.get(first.lower())
    if rel == "steady":
        return _keep_case(span, "unchanged from" if span.lower().endswith("from") else "the same as")
    if swap is not None:
        return _keep_case(first, swap[_REL_INDEX[rel]]) + span[len(first) :]
    if span.lower().startswith("unchanged from"):
        return _keep_case(span, ("up from", "down from")[_REL_INDEX[rel]])
    return _keep_case(span, ("more than", "fewer than")[_REL_INDEX[rel]])


class _Repairer:
    """Rewrites the false claims of one text (one round), or drops their clauses."""

    def __init__(self, text: str, signals: Mapping[str, float]) -> None:
        self.text = text
        self.s = signals

    def sig(self, name: str) -> float | None:
        v = self.s.get(name)
        return None if v is None else float(v)

    # each fix: (start, end, replacement, "number" | "direction"), or None when the claim cannot be rewritten
    def fix(self, c: Claim) -> tuple[int, int, str, str] | None:
        if c.true is None:
            return None
        if c.kind in ("direction", "comparison") and c.measure == "count":
            return self._fix_direction(c)
        if c.kind == "comparison" and c.measure in ("percent", "ratio"):
            return self._fix_relative(c)
        if c.kind == "number":
            return self._fix_number(c)
        return None

    def _fix_direction(self, c: Claim) -> tuple[int, int, str, str] | None:
        cur, prev = self.sig(f"count_{c.window}"), self.sig(f"prev_count_{c.window}")
        if cur is None or prev is None:
            return None
        negated = str(c.stated).startswith("not ")
        rel = _direction_target(cur, prev, negated)
        if c.kind == "comparison":
            new = _comparison_phrase(c.text, rel)
        else:
            after = re.match(r"\s*([a-z]+)", self.text[c.end :], _I)
            new = _direction_phrase(c.text, rel, after.group(1).lower() if after else "")
        if new is None or new == c.text:
            return None
        return self._with_article(c.start, c.end, new, "direction")

    def _with_article(self, start: int, end: int, new: str, kind: str) -> tuple[int, int, str, str]:
        """'an uptick' -> 'a dip': the article agrees with the new word."""
        m = _ARTICLE_BEFORE.search(self.text, max(0, start - 4), start)
        if m:
            article = "an" if new[:1].lower() in "aeiou" else "a"
            if m.group(1).lower() != article:
                return m.start(), end, _keep_case(m.group(1), article) + self.text[m.end(1) : start] + new, kind
        return start, end, new, kind

    def _fix_relative(self, c: Claim) -> tuple[int, int, str, str] | None:
        m = re.search(NUM, c.text)
        if m is None:
            return None  # "doubled", "twice the": no number to rewrite
        true = float(c.true)
        if c.measure == "ratio":
            if true < 1.5:
                return None  # "3x" of a count that barely moved: no multiple reads right, the clause goes
            value = f"{true:.1f}".rstrip("0").rstrip(".")
        else:
            value = _int_text(abs(true))
        new = c.text[: m.start()] + value + c.text[m.end() :]
        sign = re.match(r"[+\-−]", new)
        if sign:
            new = ("+" if true >= 0 else "-") + new[1:]
        return c.start, c.end, new, "number"

    def _fix_number(self, c: Claim) -> tuple[int, int, str, str] | None:
        text = self.text
        true = float(c.true)
        if c.measure in ("age", "idle", "total"):
            m = _FIRST_NUMBER.search(c.text)
            if m is None:
                return None
            start, end = c.start + m.start(), c.start + m.end()
            value = round(abs(true)) if c.measure != "total" else true
        else:
            start, end = c.start, c.end
            value = abs(true) if c.measure == "change" else true
        n = int(round(value))
        q = _TRAILING_QUALIFIER.search(text, max(0, start - 24), start)
        q_kind = _qualifier(q.group(1)) if q else "exact"
        if q_kind in ("gt", "lt") and c.measure == "prev_count":
            cur = self.sig(f"count_{c.window}")
            if int(round(float(c.stated))) == n and cur is not None:
                # "41, fewer than 12 the week before": the number is right, the comparison is not
                if cur == true:
                    return q.start(1), start, "the same as ", "direction"
                bound = "more than" if cur > true else "fewer than"
                return q.start(1), q.end(1), _keep_case(q.group(1), bound), "direction"
        elif q_kind in ("gt", "ge", "lt", "le"):
            start = q.start(1)  # "more than 60 interactions" -> "41 interactions": a bound becomes the number
        word = text[c.start : c.end].lower()
        if word in ("once", "twice"):
            new = {1: "once", 2: "twice"}.get(n, f"{n} times")
            return start, end, new, "number"
        new = str(n)
        # the noun agrees with the new number: "1 interactions" -> "1 interaction", "a single user" -> "3 users"
        noun = _NOUN_AFTER_NUMBER.match(text, end)
        if noun:
            lead, w = noun.group(1), noun.group(2)
            if n == 1 and w.lower() in _NOUN_SINGULAR:
                return start, noun.end(), new + lead + _keep_case(w, _NOUN_SINGULAR[w.lower()]), "number"
            if n != 1 and w.lower() in _NOUN_PLURAL:
                lead = re.sub(r"\bsingle\s+", "", lead, flags=_I)
                return start, noun.end(), new + lead + _keep_case(w, _NOUN_PLURAL[w.lower()]), "number"
        return start, end, new, "number"

    # ---- dropping clauses ----
    def drop_spans(self, claims: list[Claim]) -> list[tuple[int, int]]:
        """The character ranges to delete so that the clauses of `claims` go."""
        text = self.text
        bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
        spans = []
        for c in claims:
            s_start = max(b for b in bounds if b <= c.start)
            s_end = min((b for b in bounds if b > c.start), default=len(text))
            delims = [m for m in _DROP_DELIMS.finditer(text, s_start, s_end)]
            left = next((m for m in reversed(delims) if m.end() <= c.start), None)
            right = next((m for m in delims if m.start() >= c.end), None)
            if left is None and right is None:
                spans.append((s_start, s_end))  # the whole sentence
                continue
            seg_start = left.end() if left else s_start
            seg_end = right.start() if right else _content_end(text, s_start, s_end)
            l_tok = left.group(0).strip() if left else ""
            r_tok = right.group(0).strip() if right else ""
            if l_tok == "(" and r_tok == ")":
                spans.append((left.start(), right.end()))  # " (12 the week before)"
            elif (left is None or l_tok == ":") and right is not None and r_tok not in ("(", ")"):
                spans.append((seg_start, right.end()))  # the first clause goes with the delimiter after it
            elif left is not None and l_tok not in ("(", ")"):
                spans.append((left.start(), seg_end))  # a later clause goes with the delimiter before it
            else:
                spans.append((s_start, s_end))
        return _merge(spans)


def _content_end(text: str, start: int, end: int) -> int:
    """Where a sentence's words end: before its final punctuation and white space."""
    k = end
    while k > start and (text[k - 1].isspace() or text[k - 1] in ".!?"):
        k -= 1
    return k


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _tidy(text: str) -> str:
    """Punctuation and capitals after clauses were cut out."""
    t = re.sub(r"[ \t]+", " ", text)
    t = re.sub(r"\(\s*\)", "", t)
    t = re.sub(r"\s+([,;:.!?)])", r"\1", t)
    t = re.sub(r"[,;:]+(?=[.!?]|$)", "", t)  # "Likely to rise:." -> "Likely to rise."
    t = re.sub(r"([,;:])[,;:]+", r"\1", t)
    t = re.sub(r"(^|[.!?]\s+)[,;:\s]+", r"\1", t)  # a sentence that now starts with a delimiter
    t = re.sub(r"(^|[.!?]\s+)(?:and|but)\s+", r"\1", t, flags=_I)
    t = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), t)
    t = re.sub(r"(?:^|(?<=[.!?]))\s*[.!?]+", "", t)  # sentences left empty
    return t.strip()


def _apply(text: str, edits: list[tuple[int, int, str, str]]) -> tuple[str, list[tuple[int, int, str, str]]]:
    """Apply non-overlapping edits from the end backwards so earlier spans stay valid."""
    kept: list[tuple[int, int, str, str]] = []
    for e in sorted(edits, key=lambda e: e[0]):
        if not kept or e[0] >= kept[-1][1]:
            kept.append(e)
    for start, end, new, _ in reversed(kept):
        text = text[:start] + new + text[end:]
    return text, kept


def repair(explanation: str, signals: Mapping[str, float], *, title: str | None = None) -> Repair:
    """Verify and revise: rewrite the false claims of `explanation` to what `signals` say.

    Each round checks the text; false numbers are replaced by the signal's value (integers,
    as the prompt shows them; a bound "more than 60" becomes the number), false directions and
    comparisons by the word of the same grammatical slot that matches the truth ("up from 26" ->
    "down from 26"; steady words only on a tie, else the strict direction). Claims that cannot
    be rewritten (unattributable numbers, "doubled", a window the signals lack) have their
    clause dropped (split at ; , : ( ) "and" "but", else the whole sentence). Forecasts are
    not claims and stay as they are. When the repair cannot reach a faithful text with at
    least one checked claim, the input comes back unchanged (`faithful` then says whether it
    was faithful: the caller picks a fallback). `faithful` is always check(text).faithful.
    """
    first = check(explanation, signals, title=title)
    if first.faithful:
        return Repair(explanation, False, 0, 0, 0, True, first.checked)
    text, result = explanation, first
    fixed = {"number": 0, "direction": 0}
    dropped = 0
    seen = {explanation}
    for _ in range(_REPAIR_ROUNDS):
        repairer = _Repairer(text, signals)
        false = [c for c in result.claims if not c.ok]
        edits = [e for e in (repairer.fix(c) for c in false) if e is not None]
        new, kept = _apply(text, edits) if edits else (text, [])
        if kept and new not in seen:
            for e in kept:
                fixed[e[3]] += 1
        else:
            # nothing left to rewrite (or rewriting goes round in circles): drop the false claims' clauses
            spans = repairer.drop_spans(false)
            new = text
            for a, b in reversed(spans):
                new = new[:a] + " " + new[b:]
            new = _tidy(new)
            dropped += len(spans)
        text = new
        seen.add(text)
        if not text.strip():
            break
        result = check(text, signals, title=title)
        if result.faithful:
            break
    if not text.strip() or not result.faithful or result.checked == 0:
        return Repair(explanation, False, 0, 0, 0, False, first.checked)
    return Repair(text, text != explanation, fixed["number"], fixed["direction"], dropped, True, result.checked)
