"""Rolling-origin validation folds over the training span: where every model choice is made.

One validation period holds one season (retail's: May–Jul 2011, while its test period holds the
Christmas ramp), so choices made on it need not carry to test. `make_folds` lays `n_folds`
validation blocks, each as long as the split's validation part, evenly from `min_train_frac` of the
pre-test cut-offs to the split's own validation block (the last fold). Each fold trains on the
cut-offs whose label window ends by its first validation cut-off (rolling origin, purged of
overlapping horizons). On retail (weekly, 81 pre-test cut-offs) the four blocks start in Aug 2010,
Nov 2010, Feb 2011 and May 2011: one of them covers November–December. Test cut-offs are never in a fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trainer.examples import Split

N_FOLDS = 4
MIN_TRAIN_FRAC = 0.4  # of the pre-test cut-offs, before the first fold's validation block


@dataclass(frozen=True)
class Fold:
    train: np.ndarray  # cut-offs (epoch ms) a model of this fold is fitted on
    valid: np.ndarray  # cut-offs it is scored on

    def describe(self) -> dict:
        day = lambda ms: pd.Timestamp(int(ms), unit="ms", tz="UTC").date().isoformat()  # noqa: E731
        return {"train_cutoffs": int(len(self.train)), "train_first": day(self.train[0]),
                "train_last": day(self.train[-1]), "valid_cutoffs": int(len(self.valid)),
                "valid_first": day(self.valid[0]), "valid_last": day(self.valid[-1])}


def make_folds(split: Split, horizon_ms: int, n_folds: int = N_FOLDS,
               min_train_frac: float = MIN_TRAIN_FRAC) -> list[Fold]:
    """Up to `n_folds` rolling-origin folds over train + validation; the last is the split's validation."""
    pre = np.sort(np.concatenate([split.train, split.valid]).astype(np.int64))
    size = len(split.valid)
    last = int(np.searchsorted(pre, split.valid[0]))
    first = min(last, max(1, math.ceil(min_train_frac * len(pre))))
    starts = sorted({int(round(s)) for s in np.linspace(first, last, n_folds)}) if n_folds > 1 else [last]
    folds = []
    for s in starts:
        valid = pre[s: s + size] if s != last else np.asarray(split.valid, np.int64)
        train = pre[pre + horizon_ms <= valid[0]]
        if len(train) and len(valid):
            folds.append(Fold(train, valid))
    return folds
