"""Training and evaluation rows: the stream's own trend signals at a series of cut-offs, plus labels.

For each cut-off t (bucket-aligned, UTC midnight plus whole periods):

- candidates: the items `TrendTable.signals_at(t)` returns, i.e. those with at least
  one event in the longest window before t; their feature columns are exactly those
  signals, computed by `stream.core.trends` from events with ts < t only;
- label_count: the item's number of events with t <= ts < t + h (the horizon).
  Signals read ts < t, labels ts >= t: every event belongs to exactly one side of
  the cut-off. (The issue writes the horizon as (t, t+h]; with millisecond
  timestamps the half-open [t, t+h) is the same idea without double-counting an
  event at exactly t+h in the next cut-off's label.)
- label_log = log1p(label_count); label_rank = 1 + the number of candidates with a
  strictly larger label_count at the same cut-off (ties share the best rank);
- label_users: the item's number of distinct users with an event in [t, t+h), i.e. the
  number of truth pairs (below) of the item: what the global-ranking metrics reward
  (an item in the shared list is a hit for each of them), so the score head's
  listwise loss uses it as the gain;
- label_gain: the item's exact weight in the global NDCG@10 of trainer.metrics: the sum,
  over the users who interact with it in [t, t+h), of 1 / that user's ideal DCG@10
  (a user with many truth items spreads the same total over them). NDCG@10 at the
  cut-off is sum_i label_gain_i * discount(position_i) / (scored users), so a listwise
  loss with these gains optimises the metric itself;
- truth: the (user, item) pairs with an event in [t, t+h), de-duplicated, over ALL
  items (not only candidates: an item no method could rank still counts as a miss)
  and only events with a user (guest purchases have none).

Cut-offs start at the first UTC midnight with at least `min_history_days` of log
before it and end with the last one whose horizon fits in the log (t + h <= the
last event's ts). `split_cutoffs` cuts them in time order into train / validation /
test, leaving out the cut-offs whose label window would reach into the next part
(only when the period is shorter than the horizon).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import structlog
from tqdm import tqdm

from stream.core.events import EventBatch
from stream.core.trends import TrendConfig, TrendTable
from stream.core.datasets import Dataset

log = structlog.get_logger(__name__)

DAY_MS = 86_400_000
LABEL_COLUMNS = ("label_count", "label_log", "label_rank", "label_users", "label_gain")
GAIN_K = 10  # label_gain is the item's weight in NDCG@GAIN_K


class ExamplesError(ValueError):
    """The log is too short (or the settings too large) to build cut-offs."""


@dataclass
class Truth:
    """Per cut-off, the de-duplicated (user, item) pairs of the horizon, as integer codes.

    Items are coded by position in `items` (all item ids of the log, sorted), users
    by first appearance in the log; codes are only compared within one cut-off.
    """

    items: np.ndarray  # object, sorted unique item ids
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # cutoff -> (user, item)

    def item_codes(self, item_ids: np.ndarray) -> np.ndarray:
        """Codes of item ids (-1 for ids not in the log)."""
        ids = np.asarray(item_ids, dtype=object)
        pos = np.searchsorted(self.items, ids)
        pos = np.minimum(pos, len(self.items) - 1)
        found = self.items[pos] == ids if len(self.items) else np.zeros(len(ids), bool)
        return np.where(found, pos, -1).astype(np.int64)

    def at(self, cutoff_ms: int) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros(0, np.int64)
        return self.pairs.get(int(cutoff_ms), (empty, empty))


@dataclass
class Examples:
    dataset: str
    frame: pd.DataFrame  # cutoff_ms, item_id, <signals>, label_count, label_log, label_rank, label_users, title, category
    truth: Truth
    cutoffs: np.ndarray  # int64 epoch ms, ascending
    horizon_ms: int
    period_ms: int
    config: TrendConfig

    @property
    def feature_names(self) -> list[str]:
        return list(self.config.signal_names)

    def rows(self, cutoffs: np.ndarray) -> pd.DataFrame:
        """The rows of the given cut-offs (in frame order)."""
        return self.frame[self.frame["cutoff_ms"].isin(np.asarray(cutoffs, np.int64))].reset_index(drop=True)


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def describe(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def make_cutoffs(ts_min: int, ts_max: int, horizon_ms: int, period_ms: int, min_history_ms: int,
                 bucket_ms: int) -> np.ndarray:
    """UTC-midnight-anchored cut-offs every period whose horizon lies inside [ts_min, ts_max]."""
    if period_ms <= 0 or horizon_ms <= 0:
        raise ExamplesError("horizon and period must be positive")
    if period_ms % bucket_ms:
        raise ExamplesError(f"period ({period_ms} ms) must be a whole number of trend buckets ({bucket_ms} ms)")
    first = -(-(ts_min + min_history_ms) // DAY_MS) * DAY_MS  # ceil to a UTC midnight
    if first % bucket_ms:
        raise ExamplesError(f"trend bucket ({bucket_ms} ms) does not divide a day; cut-offs would not align")
    last = ts_max - horizon_ms
    if last < first:
        span_days = (ts_max - ts_min) / DAY_MS
        raise ExamplesError(f"the log spans {span_days:.1f} days: too short for {min_history_ms / DAY_MS:g} days of "
                            f"history plus a {horizon_ms / DAY_MS:g}-day horizon")
    return np.arange(first, last + 1, period_ms, dtype=np.int64)


def build_examples(dataset: Dataset, config: TrendConfig | None = None, horizon_days: float | None = None,
                   period_days: float | None = None, min_history_days: float = 28.0,
                   progress: bool = False) -> Examples:
    """Signals of the candidates at every cut-off, with labels and per-cut-off truth."""
    config = config or TrendConfig()
    events = dataset.events
    if len(events) == 0:
        raise ExamplesError(f"dataset {dataset.name!r} has no events")
    horizon_days = dataset.horizon_days if horizon_days is None else horizon_days
    period_days = horizon_days if period_days is None else period_days
    horizon_ms, period_ms = round(horizon_days * DAY_MS), round(period_days * DAY_MS)
    ts = events["ts"].to_numpy(np.int64)
    if len(ts) > 1 and (np.diff(ts) < 0).any():
        raise ExamplesError("events must be sorted by ts (the event frame contract)")
    cutoffs = make_cutoffs(int(ts[0]), int(ts[-1]), horizon_ms, period_ms, round(min_history_days * DAY_MS),
                           config.bucket_ms)

    item_codes, vocab = pd.factorize(events["item_id"], sort=True)
    vocab = np.asarray(vocab, dtype=object)
    users = events["user_id"]
    user_codes, _ = pd.factorize(users, use_na_sentinel=True)  # -1 for events without a user
    n_items = len(vocab)

    table = TrendTable(config, capacity=max(1024, n_items))
    batch = EventBatch.from_frame(events)
    names = list(config.signal_names)
    parts: list[tuple] = []  # (cutoff, codes, values, counts, users, gains)
    ideal = np.cumsum(1.0 / np.log2(np.arange(GAIN_K) + 2.0))  # ideal DCG@K of n truth items, n = 1..K
    truth = Truth(vocab)
    snapshots = table.signals_at_cutoffs(batch, cutoffs.tolist())
    for cutoff, signals in tqdm(zip(cutoffs.tolist(), snapshots), total=len(cutoffs), disable=not progress,
                                desc=f"examples {dataset.name}", unit="cut-off"):
        lo, hi = np.searchsorted(ts, [cutoff, cutoff + horizon_ms], side="left")
        counts = np.bincount(item_codes[lo:hi], minlength=n_items)
        codes = truth.item_codes(np.asarray(signals.item_ids, dtype=object))
        order = np.argsort(codes, kind="stable")  # rows by item id within a cut-off
        codes = codes[order]
        u, it = user_codes[lo:hi], item_codes[lo:hi]
        has_user = u >= 0
        pair = np.unique(u[has_user].astype(np.int64) * n_items + it[has_user])
        truth.pairs[cutoff] = (pair // n_items, pair % n_items)
        pu, pi = pair // n_items, pair % n_items
        n_users = np.bincount(pi, minlength=n_items)  # distinct users per item: the truth pairs
        _, uidx, n_truth = np.unique(pu, return_inverse=True, return_counts=True)
        weight = 1.0 / ideal[np.minimum(n_truth, GAIN_K) - 1][uidx] if len(pu) else np.zeros(0)
        gains = np.bincount(pi, weights=weight, minlength=n_items)
        parts.append((cutoff, codes, signals.values[order], counts[codes], n_users[codes], gains[codes]))

    frame = _assemble(parts, names, vocab, dataset.items)
    log.info("examples.built", dataset=dataset.name, cutoffs=len(cutoffs), rows=len(frame),
             horizon_days=horizon_days, period_days=period_days)
    return Examples(dataset.name, frame, truth, cutoffs, horizon_ms, period_ms, config)


def _assemble(parts: list[tuple], names: list[str], vocab: np.ndarray,
              items: pd.DataFrame) -> pd.DataFrame:
    sizes = [len(p[1]) for p in parts]
    cutoff_col = np.repeat(np.array([p[0] for p in parts], np.int64), sizes)
    codes = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    values = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, len(names)))
    labels = np.concatenate([p[3] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    users = np.concatenate([p[4] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    gains = np.concatenate([p[5] for p in parts]).astype(np.float64) if parts else np.zeros(0)
    frame = pd.DataFrame(values, columns=names)
    frame.insert(0, "cutoff_ms", cutoff_col)
    frame.insert(1, "item_id", pd.Series(vocab[codes], dtype=object))
    frame["label_count"] = labels
    frame["label_log"] = np.log1p(labels.astype(np.float64))
    frame["label_rank"] = (frame.groupby("cutoff_ms", sort=False)["label_count"]
                           .rank(method="min", ascending=False).astype(np.int64))
    frame["label_users"] = users
    frame["label_gain"] = gains
    meta = items.set_index("item_id")
    frame["title"] = frame["item_id"].map(meta["title"]).astype(object)
    frame["title"] = frame["title"].where(frame["title"].notna(), frame["item_id"])
    frame["category"] = frame["item_id"].map(meta["category"]).astype(object)
    frame["category"] = frame["category"].where(frame["category"].notna(), None)
    return frame


def split_cutoffs(cutoffs: np.ndarray, horizon_ms: int, test_frac: float = 0.2, valid_frac: float = 0.1) -> Split:
    """Time-ordered split: the last `test_frac` of cut-offs test, `valid_frac` before them validation.

    Validation takes the last cut-offs whose label window [t, t+h) ends by the first
    test cut-off, train those whose window ends by the first validation cut-off; the
    ones in between (only when the period is shorter than the horizon) are dropped,
    so no label window overlaps a later part.
    """
    cutoffs = np.sort(np.asarray(cutoffs, np.int64))
    if not (0 < test_frac < 1 and 0 < valid_frac < 1 and test_frac + valid_frac < 1):
        raise ExamplesError(f"need 0 < test_frac, valid_frac and their sum < 1; got {test_frac}, {valid_frac}")
    n = len(cutoffs)
    if n < 3:
        raise ExamplesError(f"{n} cut-off(s) are too few for a train/validation/test split; use a longer log "
                            "or a shorter period")
    n_test = max(1, round(n * test_frac))
    n_valid = max(1, round(n * valid_frac))
    test = cutoffs[n - n_test:]
    valid = cutoffs[cutoffs + horizon_ms <= test[0]][-n_valid:]
    train = cutoffs[cutoffs + horizon_ms <= valid[0]] if len(valid) else valid
    if len(train) == 0 or len(valid) == 0:
        raise ExamplesError(f"{n} cut-offs are too few for a train/validation/test split "
                            f"(after purging overlapping horizons: train {len(train)}, valid {len(valid)}, "
                            f"test {len(test)}); use a longer log or a shorter period")
    return Split(train, valid, test)


@dataclass(frozen=True)
class RowLimits:
    """A fit on a slice of the data (`trainer.fit --max-train-cutoffs / --max-valid-cutoffs / --max-items`: tests, a
    quick look): the last N training and validation cut-offs, the N busiest items of the kept training rows.
    Every phase of the fit reads the same slice (the score head's and the range head's, trainer.quantiles). 0 or
    None: no limit."""

    train_cutoffs: int | None = None
    valid_cutoffs: int | None = None
    items: int | None = None

    def apply(self, train: pd.DataFrame, valid: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        def last(frame: pd.DataFrame, n: int | None) -> pd.DataFrame:
            if not n:
                return frame
            keep = np.sort(frame["cutoff_ms"].unique())[-n:]
            return frame[frame["cutoff_ms"].isin(keep)].reset_index(drop=True)

        train, valid = last(train, self.train_cutoffs), last(valid, self.valid_cutoffs)
        if self.items:
            busiest = train.groupby("item_id")["count_7d"].sum().nlargest(self.items).index
            train = train[train["item_id"].isin(busiest)].reset_index(drop=True)
            valid = valid[valid["item_id"].isin(busiest)].reset_index(drop=True)
        return train, valid
