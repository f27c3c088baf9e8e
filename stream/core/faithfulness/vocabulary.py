"""The claim grammar's vocabulary: number and unit words, measure nouns, qualifiers (hedges and
bounds), window phrases (current and previous), direction and comparison words, forecast
phrases, and the regular expressions built from them (stream.core.faithfulness has the overview)."""

from __future__ import annotations

import re

from stream.core.forecast import OUTLOOKS


# ---- vocabulary ----------------------------------------------------------

NUMBER_WORDS = {
    "zero": 0, "no": 0, "none": 0, "one": 1, "a single": 1, "single": 1, "once": 1, "two": 2, "twice": 2,
    "three": 3, "thrice": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "a hundred": 100, "hundred": 100, "a": 1, "an": 1,
}
NUMW = ("zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
        "sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|a hundred")
NUM = r"\d+(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?"
ANYNUM = rf"(?:{NUM}|{NUMW})"

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
ADJECTIVES = frozenset("distinct unique different separate individual single new total recent repeat active".split())
UNIT_HOURS = {
    "minute": 1 / 60, "min": 1 / 60, "hour": 1.0, "hr": 1.0, "h": 1.0, "day": 24.0, "d": 24.0,
    "week": 168.0, "wk": 168.0, "w": 168.0, "fortnight": 336.0, "month": -1.0, "year": 8766.0,
}
UNIT = r"(?:minutes?|mins?|hours?|hrs?|days?|weeks?|wks?|fortnights?|months?|years?)"
QUALIFIERS = {
    "exact": r"exactly|only|just|precisely|a total of|total of",
    "approx": r"about|around|roughly|approximately|approx\.?|nearly|almost|some|close to|~|circa|an estimated",
    "gt": r"more than|over|above|upwards of|greater than|higher than|exceeding|beyond|in excess of",
    "ge": r"at least|no fewer than|no less than",
    "lt": r"fewer than|less than|under|below|lower than",
    "le": r"at most|no more than",
}
QUAL_ANY = "|".join(QUALIFIERS.values())

# ---- patterns (case-insensitive; applied in this order, earlier ones claim their characters) ----

CI = re.IGNORECASE
FORECAST = re.compile(
    r"\b(?:likely|unlikely|expect\w*|should|will|would|set to|poised|forecast\w*|predict\w*|projected|"
    r"may|might|could|going to|outlook|anticipat\w*|probably|bound to|on track|headed|heading|next)\b|'ll\b", CI
)
FUTURE = re.compile(
    rf"\b(?:(?:in|over|during|for|across|within)\s+)?(?:the\s+)?(?:next|coming|following|upcoming)\s+"
    rf"(?:{ANYNUM}\s*)?(?:{UNIT}|period|[hdw]\b)|\b(?:ahead|tomorrow|going forward|from now on|in the future)\b", CI
)
# (pattern, gate): a pattern runs only when one of its gate words is in the text
AGE = [
    (re.compile(rf"\b(?P<n>{ANYNUM})[- ](?P<u>{UNIT})[- ]old\b", CI), ("old",)),
    (re.compile(rf"\bfirst\s+(?:\w+\s+){{0,2}}?(?P<q>{QUAL_ANY})?\s*(?P<n>{ANYNUM})\s+(?P<u>{UNIT})\s+ago\b", CI),
     ("first",)),
    (re.compile(
        rf"\b(?:around|listed|available|on sale|on the market|in the catalog(?:ue)?|selling|active|live|known|tracked)"
        rf"\s+for\s+(?P<q>{QUAL_ANY})?\s*(?P<n>{ANYNUM})\s+(?P<u>{UNIT})\b", CI), (" for ",)),
    (re.compile(rf"\bage[d:]?\s+(?:of\s+)?(?P<q>{QUAL_ANY})?\s*(?P<n>{NUM})\s*(?P<u>{UNIT}|[hdw]\b)", CI), ("age",)),
]
IDLE = [
    (re.compile(rf"\blast\s+(?:\w+\s+){{0,3}}?(?P<q>{QUAL_ANY})?\s*(?P<n>{ANYNUM})\s*(?P<u>{UNIT}|[hdw]\b)\s+ago\b", CI),
     ("ago",)),
    (re.compile(rf"\b(?:idle|quiet|silent|inactive|dormant)\s+(?:for\s+)?(?P<q>{QUAL_ANY})?\s*(?P<n>{ANYNUM})\s*"
                rf"(?P<u>{UNIT}|[hdw]\b)", CI), ("idle", "quiet", "silent", "inactive", "dormant")),
    (re.compile(rf"(?:\bno\b|\bnot\b|n't)\s+(?:\w+\s+){{0,2}}?(?:for|in)\s+(?P<q>{QUAL_ANY})?\s*(?P<n>{ANYNUM})\s+"
                rf"(?P<u>{UNIT})\b", CI), ("no", "n't")),
    (re.compile(rf"\b(?P<n>{ANYNUM})\s+(?P<u>{UNIT})\s+since\s+(?:its|the)\s+last\b", CI), ("since",)),
]
TOTAL_GATE = ("total", "overall", "all-time", "all time", "so far", "to date", "since", "lifetime")
FUTURE_GATE = ("next", "coming", "following", "upcoming", "ahead", "tomorrow", "going forward", "from now", "future")
TOTAL = re.compile(
    rf"(?<![\w.,])(?P<n>{NUM})\s+(?:(?:\w+\s+){{0,2}}?)(?P<m>in total|overall|all[- ]time|so far|to date|"
    rf"since (?:launch|it was first seen|first seen|it appeared)|lifetime)\b"
    rf"|\b(?:total of|in total|lifetime total of|all[- ]time total of)\s+(?P<n2>{NUM})\b", CI
)
RATIO_WORD = re.compile(
    r"\b(?P<w>doubled|doubling|doubles|double|tripled|trebled|tripling|triples|triple|treble|quadrupled|quadruple|halved|halving|halves|halve)\b", CI
)
RATIO_TIMES = re.compile(
    rf"(?<![\w.,])(?P<n>{NUM}|{NUMW}|twice|thrice)"
    rf"\s*(?:times|x|×)\s+(?:as\s+(?:many|much|high)\b|more\b|higher\b|what\b|that\s+of\b|(?=the\s+(?!last|past)))"
    rf"|\b(?P<n2>{NUM})\s*[x×](?!\w)|[x×]\s*(?P<n3>{NUM})\b", CI
)
RATIO_ADJ = re.compile(
    r"\b(?P<w>twice|thrice|double|triple|treble|quadruple|half)\s+(?:that of\b|what\b|as\s+(?:many|much|high)\b|(?=the\b))", CI
)
PERCENT = re.compile(rf"(?P<sign>[+\-−])?(?P<n>{NUM})\s*(?:%|percent\b|per\s*cent\b)", CI)

PREV_WINDOWS = [
    (re.compile(
        rf"\b(?:the\s+|a\s+|an\s+)?(?:(?:previous|prior|preceding|earlier)\s+)?(?:(?P<n>{ANYNUM})\s+)?"
        rf"(?P<u>{UNIT})\s+(?:before|prior|earlier|ago)(?:\s+that)?\b", CI), ("before", "prior", "earlier", "ago")),
    (re.compile(rf"\b(?:the\s+)?(?:previous|prior|preceding|prev\.?)\s+(?:(?P<n>{ANYNUM})\s*)?(?P<u>{UNIT}|[hdw]\b)", CI),
     ("previous", "prior", "preceding", "prev")),
]
CUR_WINDOWS = [
    re.compile(
        rf"\b(?:(?:in|over|during|across|for|within|of)\s+)?(?:the\s+)?(?:last|past|latest|most\s+recent|recent|this|current)"
        rf"\s+(?:(?P<n>{ANYNUM})\s+)?(?P<u>{UNIT})\b", CI),
    re.compile(rf"\b(?:(?:in|over|during|across|within)\s+)(?:the\s+)?(?P<n>{ANYNUM})\s+(?P<u>{UNIT})\b", CI),
    re.compile(rf"(?<![\w.])(?P<n>{NUM})\s?(?P<u>[hdw])\b|\b(?P<n2>{ANYNUM})-(?P<u2>minute|hour|day|week|month)\b", CI),
    re.compile(r"\b(?P<day>yesterday|today|overnight|daily)\b|\b(?P<week>weekly)\b|\b(?P<month>monthly)\b"
               r"|\b(?P<hour>hourly)\b", CI),
    re.compile(r"\b(?P<u>day|week|month)[- ](?:on|over)[- ](?:day|week|month)\b", CI),
]
# A current-window phrase right after one of these names the window compared against:
# "more than last week", "up from the last 7 days" -> the previous window.
# the level of a window's count against a longer window's pace, "above its 28-day pace" (the
# longer window's count scaled to the shorter one's length): taken whole, so its window phrase
# does not become the clause's window
LEVEL = re.compile(
    rf"\b(?P<rel>above|below)\s+(?:its|the)\s+(?:usual\s+)?(?:(?P<n>{NUM}|{NUMW})[-\s])?(?P<u>{UNIT})\s+"
    r"(?:average\s+)?(?:pace|average|rate|norm)\b", CI)
AGAINST = re.compile(r"(?:\bthan|\bfrom|\bvs\.?|\bversus|\bcompared\s+(?:to|with)|\bagainst)\s*$", CI)

COMPARE = re.compile(
    rf"\b(?P<c>more|fewer|less|higher|lower|greater|bigger|smaller|busier|quieter|stronger|weaker|up|down)\b"
    rf"(?:\s+[a-z]+){{0,3}}?\s+(?:than|on|over|versus|vs\.?|compared\s+(?:to|with))\b"
    rf"(?!\s+(?:(?:{QUAL_ANY})\s+)?(?:{ANYNUM})\b)"
    rf"|\b(?P<s>the\s+same\s+as|as\s+many\s+as|on\s+par\s+with|in\s+line\s+with|level\s+with|matching|unchanged\s+from)\b"
    rf"(?!\s+(?:(?:{QUAL_ANY})\s+)?(?:{ANYNUM})\b)", CI
)
DIRECTIONS = {
    "rise": "picking up|picked up|picks up|pick up|heating up|on the rise|trending up|trending upward|trending upwards|"
            "more popular|rising|rises|rise|rose|risen|upward|upwards|uptick|up|growing|grows|grow|grew|grown|growth|"
            "increasing|increases|increased|increase|climbing|climbs|climbed|climb|gaining|gained|gains|gain|"
            "surging|surged|surges|surge|jumped|jumping|jumps|jump|"
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
    "steady": "holding steady|held steady|holding flat|no change|the same|steady|stable|flat|unchanged|levelled|leveled|"
              "constant|flatlining|plateaued|plateauing|plateau|holding",
}
# ---- words a reader takes as facts that the counts alone do not state (the stricter checker, issue 20) ----
# Each is verified against the signal that backs it, or is a false claim of kind "unverifiable".
# Magnitude: a strong change has the larger of the two counts at least STRONG_RATIO times the smaller one,
# outside the steady band; a slight one has them differ, by at most SLIGHT_RATIO. Implied directions
# ("exploded" is a rise, "plunged" a fall) must hold too. Checked on the clause's window (count vs the
# window before) or, in a forecast clause, on the predicted count vs the current pace.
STRONG_RATIO = 1.5
SLIGHT_RATIO = 1.25
MAGNITUDE = re.compile(
    r"\b(?:(?P<up>surg\w*|soar\w*|explod\w*|explosive\w*|skyrocket\w*|rocket\w*|boom\w*|spik\w*)"
    r"|(?P<down>plung\w*|tumbl\w*|slump\w*|collaps\w*|crash\w*|nosediv\w*)"
    r"|(?P<strong>sharp\w*|steep\w*|dramatic\w*|massive\w*|huge|rapid\w*|fast|quickly|strong|strongly|significant\w*)"
    r"|(?P<slight>slight\w*|modest\w*|marginal\w*|a little|a bit|gentl\w*|small))\b", CI)
# acceleration: the window's change against the change before it (accel_<w> = velocity - previous velocity)
ACCELERATION = re.compile(r"\b(?:(?P<up>accelerat\w*|gathering pace|gaining speed|speeding up)"
                          r"|(?P<down>decelerat\w*|losing speed))\b", CI)
# age words: "new" is under NEW_DAYS of history (the cold-start slice's bound), "brand-new" under BRAND_NEW_DAYS,
# "established" at least NEW_DAYS
NEW_DAYS = 28
BRAND_NEW_DAYS = 7
AGE_WORD = re.compile(r"\b(?:(?P<brand>brand[- ]new|just (?:launched|released|listed|added)|newly (?:launched|released|listed|added))"
                      r"|(?P<new>new|recently (?:launched|released|listed|added)|new arrival|newcomer)"
                      r"|(?P<old>established|long[- ]standing|long[- ]running))\b", CI)
# what no signal says: who buys it, where it ranks, why it moved, how much is in stock
UNVERIFIABLE = {
    "customers": r"\b(?:returning|loyal|repeat|regular|first[- ]time|new|existing|wholesale|trade|corporate|young|older)"
                 r"\s+(?:customers?|buyers?|shoppers?|users?|fans?|clients?|purchasers?|viewers?|people)\b|\bregulars\b"
                 r"|\brepeat (?:purchases?|orders?|buys?|business)\b|\bloyal\w*|\bcome back\b"
                 r"|\bkeeps? (?:buying|coming back|ordering)\b",
    "rank": r"\bbest[- ]?sell\w*|\btop[- ]sell\w*|\bnumber one\b|#\s?1\b|\btop \d+\b|\btop (?:ten|five|twenty)\b"
            r"|\bhighest\b|\blowest\b|\brecord\b|\ball[- ]time (?:high|low)\b|\bpeak\w*|\bmost (?:popular|sold|viewed|bought|"
            r"purchased|watched|rated)\b|\branked\b|\branks\b|\branking\b|\bchart\w*|(?<!more )(?<!less )\bpopular\b"
            r"|\bfavou?rites?\b|\bin demand\b|\bnew (?:highs?|lows?|records?|peaks?)\b",
    "cause": r"\bthanks to\b|\bbecause(?: of)?\b|\bdue to\b|\bdriven by\b|\bowing to\b|\bon the back of\b"
             r"|\bfuell?ed by\b|\bas a result of\b|\bcaused by\b|\bboosted by\b|\bprice (?:cut|drop|reduction|increase|rise)s?\b"
             r"|\bdiscount\w*|\bpromo\w*|\bon offer\b|\bclearance\b|\bmarketing\b|\bcampaigns?\b|\badvert\w*"
             r"|\bviral\b|\bsocial media\b|\btiktok\b|\binstagram\b|\binfluencers?\b|\bcelebrit\w*|\bweather\b"
             r"|\bholiday season\b|\bseasonal\w*|\bin season\b|\bchristmas\b|\bxmas\b|\bhalloween\b|\bvalentine\w*",
    "stock": r"\b(?:out of|low on|back in|in) stock\b|\bstock\w*|\brunning (?:low|out)\b|\bsold out\b"
             r"|\bsell(?:s|ing)? out\b|\binventory\b|\bsuppl(?:y|ies)\b|\bshortages?\b|\brestock\w*\b|\bavailability\b",
}
UNVERIFIABLE_PATTERNS = [(kind, re.compile(p, CI)) for kind, p in UNVERIFIABLE.items()]
# a forecast's range, "likely 28–55", "between 28 and 55" (a dash without spaces, or "between ... and")
RANGE = re.compile(rf"(?<![\w.,])(?P<a>{NUM})\s?[–—-]\s?(?P<b>{NUM})(?![\w%])|\bbetween\s+(?P<a2>{NUM})\s+and\s+(?P<b2>{NUM})\b", CI)
# words a clause may hold without making a statement of its own ("Likely to", "it is", "demand")
FILLER_WORDS = frozenset(
    "item items product products it its it's this demand interest sales activity interactions events likely expect "
    "expected still also though however now just even is are be being been has have had was were so the and but "
    "with after later then here there".split()
)

# phrase (lower case, words joined by one space) -> rise/fall/steady; matched word by word, longest first
DIRECTION_OF = {phrase: rel for rel, phrases in DIRECTIONS.items() for phrase in phrases.split("|")}
DIRECTION_MAX_WORDS = max(len(p.split()) for p in DIRECTION_OF)
LETTERS = re.compile(r"[A-Za-z]+")
NEGATION = re.compile(
    r"(?:\bunlikely to|\bnot|\bno longer|n't|\bnever|\bneither|\bnor|\bno sign of|\bwithout|\bno)\s+(?:\w+\s+)?$", CI
)
# Direction-free number claims: words as numbers only before a measure noun ("two buyers", "no sales").
OUTLOOK_WORD = re.compile(r"\b(more|fewer|less|similar|same|higher|lower)\b", CI)
OUTLOOK_OF = {"more": "rise", "higher": "rise", "fewer": "fall", "less": "fall", "lower": "fall",
               "similar": "steady", "same": "steady"}
NUMBER = re.compile(
    rf"(?<![\w.,])(?P<n>{NUM})(?P<k>k\b)?"
    rf"|\b(?P<w>{NUMW}|a single|no|twice|once)\b(?=\s+(?:(?:{'|'.join(ADJECTIVES)})\s+){{0,2}}"
    rf"(?:{'|'.join(sorted(COUNT_NOUNS | USER_NOUNS))})\b)"
    rf"|\b(?P<w2>none|twice|once)\b", CI
)
NOUN_AFTER = re.compile(
    rf"(?:\s+(?:{'|'.join(ADJECTIVES)}))*\s+(?:{'|'.join(sorted(COUNT_NOUNS | USER_NOUNS))})\b", CI
)
TRAILING_QUALIFIER = re.compile(rf"(?:^|\s|\b)({QUAL_ANY})\s*$", CI)

SENTENCE_END = re.compile(r"(?<!\bvs)(?<!\bapprox)[.!?]+(?=\s|$)|\n+", CI)
CLAUSE_SPLIT = re.compile(
    r"[;:](?=\s|$)|,(?=\s)|\s[-–—]+\s|[()]|\s(?P<soft>and)\s|\s(?:but|while|whereas|though|although|yet|which|so|as)\s",
    CI,
)
WORD = re.compile(r"[a-z%~]+(?:'[a-z]+)?|\d+", CI)

MARK_PREV = re.compile(
    r"(?:\bfrom|\bvs\.?|\bversus|\bagainst|\bcompared\s+(?:to|with)|\bprev\.?|\bprevious(?:ly)?|\bbefore|\bearlier"
    r")\s*:?\s*$", CI
)
MARK_CUR = re.compile(r"(?:\bto|\breaching|\breached|\bnow|\bat|\bhit|\bcurrently|\bthis\s+week)\s*:?\s*$", CI)
MARK_CHANGE = re.compile(
    r"(?:\b(?P<dir>up|down|rose|fell|grew|dropped|gained|lost|climbed|slipped|jumped|declined|increased|decreased|rising|falling)"
    r"(?:\s+by)?|\b(?P<noun>increase|decrease|rise|drop|fall|jump|gain|loss|decline|change|swing)\s+of|\bby)\s*$", CI
)
CHANGE_WORD_AFTER = re.compile(
    r"\s*(?:\w+\s+)?(more|fewer|less|higher|lower|increase|decrease|rise|drop|fall|jump|gain|growth|decline)\b", CI
)
UP_WORDS = frozenset("up rose grew gained climbed jumped increased rising increase rise jump gain".split())
DOWN_WORDS = frozenset("down fell dropped lost slipped declined decreased falling decrease drop fall loss decline".split())


FUNCTION_WORDS = frozenset(
    "in over during across within for this the last past vs versus than compared against before earlier ago "
    "previously a an so and or but with from to up down on at per while this that these its it of s total "
    "overall each apiece yesterday today week day month hour weekly daily monthly prior preceding previous "
    "recent latest most is was were are has had have been".split()
)


# ---- the phrase banks the claim grammar and the training targets write (grammar.py, trainer/explanations.py);
# every word of them is one the checker reads (tests/test_faithfulness.py::test_one_vocabulary) ----
GRAMMAR_COUNT_NOUNS = ("interactions", "events")
GRAMMAR_USER_NOUNS = ("users", "distinct users", "different users", "unique users", "people")
ONE_USER = ("from a single user", "all from one user", "from 1 distinct user", "by one person")
# a second fact says which fact it is before its number: "in the last 28 days, 379 events", "from 29 users"
# (a greedy decoder that meets the digits first picks among the prompt's numbers before it has said which)
WINDOW_LEADS = ("in", "over")
USER_LEADS = ("from", "by", "across")
LEADS = {
    "rise": ("Rising", "Trending up", "Demand is rising", "Interest is growing", "Picking up", "On the rise",
             "Growing", "Demand is climbing"),
    "fall": ("Falling", "Trending down", "Demand is cooling", "Interest is fading", "Slowing down",
             "On the decline", "Declining", "Demand is dropping"),
    "steady": ("Steady", "Holding steady", "Flat", "Demand is stable", "Unchanged"),
}
OUTLOOK_SENTENCES = {
    "rise": ("Likely to rise {h}.", "Expect more {noun} {h}.", "Should keep climbing {h}.", "Likely to grow {h}.",
             "Set to rise {h}.", "Likely to pick up {h}."),
    "fall": ("Likely to fall {h}.", "Expect fewer {noun} {h}.", "Likely to cool off {h}.", "Set to decline {h}.",
             "Likely to slow down {h}."),
    "steady": ("Likely to stay steady {h}.", "Expect similar demand {h}.", "Likely to hold steady {h}."),
}
OUTLOOK_LEADS = {
    "rise": ("Likely to rise", "Expected to grow", "Likely to keep rising", "Set to climb"),
    "fall": ("Likely to fall", "Expected to decline", "Likely to cool off", "Set to drop"),
    "steady": ("Likely to stay steady", "Expected to hold steady"),
}
VERB_PAST = {"rise": ("rose", "climbed", "grew", "jumped"), "fall": ("fell", "dropped", "declined", "slipped")}
UPDOWN = {"rise": ("up from", "rising from"), "fall": ("down from", "falling from")}
LEVEL_PHRASES = {"above": ("already above its {} pace", "well above its {} average"),
                 "below": ("still below its {} pace", "well below its {} average")}
# the forecast's size and range (stream.core.forecast.stated_size / stated_range): "About 40 events next week,
# likely 25–55." ({n}: the stated count with its noun, {h}: the horizon); without a range the sentence ends at the size
SIZE_SENTENCES = ("About {n} {h}", "Around {n} expected {h}")
RANGE_TAILS = (", likely {lo}–{hi}.", " (likely {lo}–{hi}).")
# the model's top driver as a mover's reason (stream.core.faithfulness.grammar.driver_reason), each a claim the checker
# verifies: its semantic neighbourhood ("like 11 similar items, up 35% this week": nbr_n, nbr_count_<w>,
# nbr_prev_<w>) and last year's same weeks ("last year it rose from 20 to 61 over these weeks": ly_count, ly_next)
NEIGHBOURHOOD_PHRASES = ("like {n} similar items, {updown} {pct}% {window}", "like {n} similar items, {updown} {pct}% {window}")
LAST_YEAR_PHRASES = ("last year it {verb} from {a} to {b} over these weeks", "last year it {verb} from {a} to {b} over the same weeks")
NEIGHBOURHOOD = re.compile(rf"\blike\s+(?P<n>{NUM})\s+similar\s+items?,?\s+(?P<dir>up|down|rising|falling)\s+(?P<pct>{NUM})\s*%",
                           CI)
LAST_YEAR = re.compile(rf"\blast\s+year\s+(?:it\s+)?(?P<verb>rose|fell|grew|dropped|climbed|declined|stayed|held)\s+"
                       rf"(?:from|at)\s+(?P<a>{NUM})(?:\s+to\s+(?P<b>{NUM}))?\s+over\s+(?:these|the\s+same)\s+weeks\b", CI)
DRIVER_GROUPS = ("trend", "level", "neighbourhood", "season", "text")
# the model's own drivers in words (issue 20.2): the calendar ("season": the week of the year the head reads),
# the item's text ("text": the item state of its title, category and description), and the item's own trend and
# level signals as groups ("its recent trend", "its long-term level"), each stated with the way it
# moved the forecast above or below the item's own pace (stream.core.drivers: the drivers split the gap
# log1p(count) - log1p(pace), against an average item that the model forecasts to hold its pace). The checker
# verifies the stated way against the prediction's driver of that group (PredictedCount.drivers): it is a claim
# about what moved the model, and the record publishes the drivers beside the text.
DRIVER_CLAIM_PHRASES = {
    # the item's own signals when their words point the other way ("down 20% on the week before" is no reason
    # for a rise, though the trend group as a whole lifted it: the day's count, the decays, the idle time)
    "trend": {"rise": ("its recent trend lifts it",), "fall": ("its recent trend holds it back",)},
    "level": {"rise": ("its long-term level lifts it",), "fall": ("its long-term level holds it back",)},
    "season": {"rise": ("this time of year lifts it", "the time of year lifts it"),
               "fall": ("this time of year holds it back", "the time of year holds it back")},
    "text": {"rise": ("the kind of item it is lifts it", "its kind of item lifts it"),
             "fall": ("the kind of item it is holds it back", "its kind of item holds it back")},
}
DRIVER_CLAIM = re.compile(
    r"\b(?P<g>its (?:recent|short-term) trend|its (?:long-term|usual) level|(?:this|the) time of (?:the )?year|the (?:week|month) of the year|the season"
    r"|the kind of item(?: it is)?|what the item is|its kind of item|the item's (?:kind|text|title))\s+"
    r"(?:(?P<neg>does not|doesn't|did not|didn't)\s+)?"
    r"(?P<v>lifts?|lifted|boosts?|boosted|raises?|raised|helps?|helped|pushes (?:it )?up|pulls (?:it )?up"
    r"|holds? (?:it )?back|held (?:it )?back|weighs? on|weighed on|drags? (?:it )?down|dragged (?:it )?down"
    r"|pulls (?:it )?down|pushes (?:it )?down)(?:\s+(?:it|its forecast|the forecast|the count))?\b", CI)
DRIVER_CLAIM_GATE = ("year", "season", "item", "trend", "level")
DRIVER_CLAIM_DOWN = re.compile(r"\b(?:back|down|weighs?|weighed|drags?|dragged)\b", CI)  # the verb's way: else up
