"""The seasonal slice of the evaluation: items whose title names Christmas, at the test cut-offs of
September to November (the ramp before the season), against the other items of the same cut-offs.

Per method: `mae_log` and `bias_log`, the mean of log1p(actual) minus log1p(predicted count)
(positive = under-predicted)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

CHRISTMAS = re.compile(r"\b(?:christmas|xmas|x-mas|advent|santa|reindeer|snowflakes?|snowman|snowmen|sleigh|baubles?|"
                       r"nativity|mistletoe|noel|festive|jingle)\b", re.IGNORECASE)
SEASON_MONTHS = (9, 10, 11)


def christmas_title(titles: pd.Series) -> np.ndarray:
    return titles.astype(str).str.contains(CHRISTMAS).to_numpy(bool)


def seasonal_slice(frame: pd.DataFrame, counts: dict[str, np.ndarray]) -> dict | None:
    """`slices.seasonal` over the rows of `frame` (test rows) given each method's predicted counts;
    None when no test cut-off in September–November has an item titled with a Christmas word."""
    month = pd.to_datetime(frame["cutoff_ms"].to_numpy(np.int64), unit="ms", utc=True).month
    in_season = np.isin(month, SEASON_MONTHS)
    xmas = christmas_title(frame["title"]) & in_season
    other = ~christmas_title(frame["title"]) & in_season
    if not xmas.any():
        return None
    actual = frame["label_log"].to_numpy(np.float64)

    def stats(mask: np.ndarray, count: np.ndarray) -> dict[str, float]:
        err = actual[mask] - np.log1p(np.maximum(count[mask], 0.0))
        return {"mae_log": float(np.abs(err).mean()), "bias_log": float(err.mean())}

    return {"months": list(SEASON_MONTHS), "words": CHRISTMAS.pattern,
            "cutoffs": int(len(np.unique(frame["cutoff_ms"].to_numpy()[in_season]))),
            "rows": int(xmas.sum()), "items": int(frame.loc[xmas, "item_id"].nunique()),
            "other_rows": int(other.sum()),
            "methods": {name: stats(xmas, c) for name, c in counts.items()},
            "other_items": {name: stats(other, c) for name, c in counts.items()} if other.any() else {}}
