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
- A level ("above its 28-day pace") holds the window in force against the named
  longer window's count scaled to its length (28 days' 86 is a 7-day pace of 21.5).
- Every claim is checked: integers exactly, hedged numbers ("about 40") within
  10%, ratios within 10%, percentages within max(1 point, 5%), ages within one
  unit. A number that cannot be tied to a signal (no window, an unknown noun, a
  window the signals lack, a predicted number) is a false claim: faithfulness
  is strict.
- Clauses that forecast ("likely to rise", "expect more next week") set `outlook`;
  with `prediction=` (the model's predicted count and range) their direction, size
  ("about 40 next week") and range ("likely 25–55") are claims checked against it.
- Driver claims ("this time of year lifts it", "the kind of item it is holds it back", "its long-term
  level lifts it") state the way an input group moved the prediction: with `prediction=` carrying the
  model's drivers, they are checked against that group's sign; without, they are unverifiable.
- What no signal says (magnitude words checked against the change, acceleration
  against accel_<w>, "new" against the age; customer kinds, ranks, causes, stock;
  a clause with no claim at all) is verified or is a false claim of kind
  `unverifiable`; a text with no claim is not faithful.

`repair` (verify and revise) rewrites what `check` finds false: a wrong number
becomes the signal's value, a wrong direction or comparison word the word of
the same form that matches the truth ("up from 26" -> "down from 26"); a claim
it cannot rewrite (unattributable, "doubled", a window the signals lack) loses
its clause. The stream serves the repaired text; the evaluation reports both.

The package, by module: `vocabulary` (every word and pattern: what the checker reads and
the phrase banks the grammar and the training targets write), `grammar` (the claim grammar,
the reasons: `reason_plan`, `top_driver`, `reason_of`), `parse`
(items, sentences and clauses of a text; `window_spans`), `checker` (`check`, `Claim`,
`FaithfulnessResult`) and `repairer` (`repair`, `Repair`). Import from the package.
"""

from __future__ import annotations

from stream.core.faithfulness.checker import Claim, FaithfulnessResult, check
from stream.core.faithfulness.parse import window_spans
from stream.core.faithfulness.repairer import Repair, repair

__all__ = ["Claim", "FaithfulnessResult", "Repair", "check", "repair", "window_spans"]
