"""Verify and revise (`repair`): rewrite the false claims `check` finds to what the signals say,
or drop the clauses of those that cannot be rewritten."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from stream.core.faithfulness.vocabulary import (OUTLOOK_OF, COUNT_NOUNS, NUM, NUMW, USER_NOUNS, ADJECTIVES, DIRECTION_OF, CI,
    SENTENCE_END, TRAILING_QUALIFIER)
from stream.core.faithfulness.parse import qualifier
from stream.core.faithfulness.checker import Claim, check
from stream.core.forecast import PredictedCount, stated_range, stated_size


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
    outlook: str | None = None  # check(text).outlook: the forecast direction the text states

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
    ("rising", "slowing", "holding steady"), ("rose", "slowed", "held steady"),  # "accelerating" is acceleration
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
_NOUN_AFTER_NUMBER = re.compile(rf"(\s+(?:(?:{'|'.join(ADJECTIVES)})\s+)*)([a-z]+)\b", CI)
_FIRST_NUMBER = re.compile(rf"(?<![\w.,])(?:{NUM})|\b(?:{NUMW}|a single)\b", CI)
_FORECAST_LEAD = re.compile(r"\b(?:(?:likely|expected|set|poised|going|predicted|projected|forecast) to|should|will)\b", CI)
_ARTICLE_BEFORE = re.compile(r"\b(a|an)\s+$", CI)
_DROP_DELIMS = re.compile(r";\s*|,\s+|:\s+|\s+(?:and|but)\s+|\s*\(\s*|\s*\)", CI)


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


def direction_phrase(word: str, rel: str, next_word: str) -> str | None:
    w = " ".join(word.lower().split())
    if next_word == "from" and w in ("steady", "stable", "flat"):
        triple: tuple[str, ...] = ("up", "down", "unchanged")  # "up from 26" -> "down from 26"
    elif w in _SWAP_OF:
        triple = _SWAP_OF[w]
    elif w in DIRECTION_OF:
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

    def __init__(self, text: str, signals: Mapping[str, float], prediction: PredictedCount | None = None) -> None:
        self.text = text
        self.s = signals
        self.pred = prediction

    def sig(self, name: str) -> float | None:
        v = self.s.get(name)
        return None if v is None else float(v)

    # each fix: (start, end, replacement, "number" | "direction"), or None when the claim cannot be rewritten
    def fix(self, c: Claim) -> tuple[int, int, str, str] | None:
        if c.true is None:
            return None
        if c.kind == "forecast" and c.measure == "direction" and isinstance(c.true, str) and not str(c.stated).startswith("not "):
            # "Likely to rise" against a steady prediction -> "Likely to hold steady"; "Expect more" -> "Expect similar"
            word = c.text.lower()
            if word in OUTLOOK_OF:
                new = _keep_case(c.text, {"rise": "more", "fall": "fewer", "steady": "similar"}[c.true])
            else:
                # "Likely to stay steady" -> "Likely to fall": the verb phrase from its forecast word on
                lead = None
                for lead in _FORECAST_LEAD.finditer(self.text, max(0, c.start - 40), c.start):
                    pass
                if lead is not None and not re.search(r"[.;:,!?]", self.text[lead.end() : c.start]):
                    verb = {"rise": "rise", "fall": "fall", "steady": "hold steady"}[c.true]
                    return lead.start(), c.end, _keep_case(lead.group(0), lead.group(0).lower().split()[0]) + " " + (
                        "to " + verb if lead.group(0).lower().endswith(" to") else verb), "direction"
                after = re.match(r"\s*([a-z]+)", self.text[c.end :], CI)
                new = direction_phrase(c.text, c.true, after.group(1).lower() if after else "")
            return None if new is None or new == c.text else (c.start, c.end, new, "direction")
        if c.kind == "forecast" and c.measure == "count" and self.pred is not None:
            # "about 60 next week" -> "about 40 next week": the stated size of the prediction
            return self._with_noun(c.start, c.end, stated_size(self.pred.count))
        if c.kind == "range" and self.pred is not None and self.pred.has_range:
            lo, hi = stated_range(self.pred.low, self.pred.high)
            m = re.match(rf"(between\s+)?({NUM})(\s*(?:[–—-]|and)\s*)({NUM})", c.text, CI)
            if m is None:
                return None
            return c.start, c.end, f"{m.group(1) or ''}{lo}{m.group(3)}{hi}" + c.text[m.end():], "number"
        if c.kind in ("direction", "comparison") and c.measure == "count":
            return self._fix_direction(c)
        if c.kind == "comparison" and c.measure in ("percent", "ratio"):
            return self._fix_relative(c)
        if c.kind == "number":
            return self._fix_number(c)
        if c.kind == "level" and c.true in ("above", "below") and not str(c.stated).startswith("not "):
            # "below its 28-day pace" -> "above its 28-day pace" (a count at its pace exactly is dropped)
            return c.start, c.end, re.sub(r"\b(above|below)\b", c.true, c.text, count=1, flags=CI), "direction"
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
            after = re.match(r"\s*([a-z]+)", self.text[c.end :], CI)
            new = direction_phrase(c.text, rel, after.group(1).lower() if after else "")
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
        q = TRAILING_QUALIFIER.search(text, max(0, start - 24), start)
        q_kind = qualifier(q.group(1)) if q else "exact"
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
        return self._with_noun(start, end, n, text[c.start : c.end].lower())

    def _with_noun(self, start: int, end: int, n: int, word: str = "") -> tuple[int, int, str, str]:
        """`n` in place of text[start:end], the noun after it agreeing ("1 interactions" -> "1 interaction")."""
        text = self.text
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
                lead = re.sub(r"\bsingle\s+", "", lead, flags=CI)
                return start, noun.end(), new + lead + _keep_case(w, _NOUN_PLURAL[w.lower()]), "number"
        return start, end, new, "number"

    # ---- dropping clauses ----
    def drop_spans(self, claims: list[Claim]) -> list[tuple[int, int]]:
        """The character ranges to delete so that the clauses of `claims` go."""
        text = self.text
        bounds = [0] + [m.end() for m in SENTENCE_END.finditer(text)] + [len(text)]
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
    t = re.sub(r"(^|[.!?]\s+)(?:and|but)\s+", r"\1", t, flags=CI)
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


def repair(explanation: str, signals: Mapping[str, float], *, title: str | None = None,
           prediction: PredictedCount | None = None) -> Repair:
    """Verify and revise: rewrite the false claims of `explanation` to what `signals` say.

    Each round checks the text; false numbers are replaced by the signal's value (integers,
    as the prompt shows them; a bound "more than 60" becomes the number), false directions and
    comparisons by the word of the same grammatical slot that matches the truth ("up from 26" ->
    "down from 26"; steady words only on a tie, else the strict direction). Claims that cannot
    be rewritten (unattributable numbers, "doubled", a window the signals lack) have their
    clause dropped (split at ; , : ( ) "and" "but", else the whole sentence). Forecasts are
    not claims and stay as they are, unless `prediction` is given: then a wrong forecast size or range is
    rewritten to the prediction's stated size and range, and a wrong forecast direction loses its clause. When the repair cannot reach a faithful text with at
    least one checked claim, the input comes back unchanged (`faithful` then says whether it
    was faithful: the caller picks a fallback). `faithful` is always check(text).faithful.
    """
    first = check(explanation, signals, title=title, prediction=prediction)
    if first.faithful:
        return Repair(explanation, False, 0, 0, 0, True, first.checked, first.outlook)
    text, result = explanation, first
    fixed = {"number": 0, "direction": 0}
    dropped = 0
    seen = {explanation}
    for _ in range(_REPAIR_ROUNDS):
        repairer = _Repairer(text, signals, prediction)
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
        result = check(text, signals, title=title, prediction=prediction)
        if result.faithful:
            break
    if not text.strip() or not result.faithful or result.checked == 0:
        return Repair(explanation, False, 0, 0, 0, False, first.checked, first.outlook)
    return Repair(text, text != explanation, fixed["number"], fixed["direction"], dropped, True, result.checked,
                  result.outlook)
