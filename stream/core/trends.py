"""Sliding-window trend state per item, and the trend signals computed from it.

One definition serves both paths: the worker applies Kafka batches to a
`TrendTable` per partition and reads `signals_at(tick)`; the trainer applies a
historical log in time order and reads `signals_at(cutoff)`. Same class, same
numbers (tests/test_parity.py proves it).

State per item is a fixed ring of per-bucket event counts covering three
lengths of the longest window (current, previous and the one before, which
velocity and acceleration need) plus the allowed lateness, so memory per item
is bounded; items whose last event has left the ring are expired. Distinct
users are kept as de-duplicated (item, user, bucket) hashes for the same span.

Signals at `as_of` use only events with ts < as_of, bucket-aligned: as_of is
floored to a bucket boundary, so a snapshot published at a closed boundary
(`closed_until_ms`) never changes afterwards and equals the offline value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from itertools import repeat
from typing import Iterator, Protocol

import numpy as np
import pandas as pd

from stream.core.events import EventBatch

HOUR_MS = 3_600_000
SIGNALS_VERSION = 2  # bump when a signal's definition changes: artefacts record it (2: ema_<decay> signals)

PAIR_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier: spreads item hashes before xor with user hashes
_I64_MIN = int(np.iinfo(np.int64).min)
_I64_MAX = int(np.iinfo(np.int64).max)


@dataclass(frozen=True)
class TrendConfig:
    # Hour buckets suit retail and rating logs (events per item per hour are few);
    # use minute buckets (TRAIL_BUCKET_S=60) for clickstreams.
    bucket_ms: int = HOUR_MS
    # (name, length in buckets), shortest first. Day/week/4-week windows match the
    # weekly forecast horizon of the shipped model.
    windows: tuple[tuple[str, int], ...] = (("1d", 24), ("7d", 168), ("28d", 672))
    # Half-life of the decayed count: three days sits between the short and mid windows.
    ema_halflife_buckets: int = 72
    # More decayed counts, (name, half-life in buckets), over the longest window like `ema`:
    # signals ema_7d, ema_14d. Slower decays rank better on both public logs' validation
    # cut-offs than the 3-day one (docs/model.md), and the score head learns the mix.
    decays: tuple[tuple[str, int], ...] = (("7d", 168), ("14d", 336))
    # Events up to an hour behind the partition's newest event are still counted;
    # later ones go to the DLQ with reason "late".
    allowed_lateness_ms: int = HOUR_MS
    # Buckets the ring keeps beyond span + lateness: a tick's signals stay exact while the newest
    # event is up to this far past its boundary (a fast replay runs hours ahead between two ticks;
    # without it the demo withheld 1 tick in 8). A day of hour buckets: +1.2% memory per item.
    tick_slack_buckets: int = 24

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("at least one window is needed")
        lengths = [w for _, w in self.windows]
        if lengths != sorted(lengths) or min(lengths) < 1:
            raise ValueError(f"windows must be positive and sorted shortest first: {self.windows}")
        names = [n for n, _ in self.decays]
        if len(set(names)) != len(names) or any(h < 1 for _, h in self.decays):
            raise ValueError(f"decays must have distinct names and half-lives >= 1 bucket: {self.decays}")

    @property
    def longest(self) -> int:
        return self.windows[-1][1]

    @property
    def span_buckets(self) -> int:
        """Buckets of history a signal reads: three longest windows."""
        return 3 * self.longest

    @property
    def life_buckets(self) -> int:
        """An item silent this long starts a new life (total_count and age_h restart): the span plus the lateness."""
        lateness = -(-self.allowed_lateness_ms // self.bucket_ms)
        return self.span_buckets + lateness + 1

    @property
    def ring_buckets(self) -> int:
        """Buckets kept per item: a life, plus the slack a lagging tick reads."""
        return self.life_buckets + self.tick_slack_buckets

    @property
    def signal_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for w, _ in self.windows:
            names += [f"count_{w}", f"prev_count_{w}", f"users_{w}", f"velocity_{w}", f"accel_{w}"]
        return tuple(names + ["ema"] + [f"ema_{n}" for n, _ in self.decays] + ["total_count", "age_h", "idle_h"])

    def spec(self) -> dict:
        """The feature spec an artefact records; the stream refuses a model whose spec differs."""
        return {
            "signals_version": SIGNALS_VERSION,
            "bucket_ms": self.bucket_ms,
            "windows": [[n, w] for n, w in self.windows],
            "ema_halflife_buckets": self.ema_halflife_buckets,
            "decays": [[n, h] for n, h in self.decays],
            "signal_names": list(self.signal_names),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "TrendConfig":
        if spec.get("signals_version") != SIGNALS_VERSION:
            raise ValueError(
                f"feature spec has signals_version {spec.get('signals_version')}, this code computes {SIGNALS_VERSION}"
            )
        return cls(
            bucket_ms=int(spec["bucket_ms"]),
            windows=tuple((str(n), int(w)) for n, w in spec["windows"]),
            ema_halflife_buckets=int(spec["ema_halflife_buckets"]),
            decays=tuple((str(n), int(h)) for n, h in spec["decays"]),
        )


@dataclass
class Signals:
    """Trend signals of the active items at one instant."""

    as_of_ms: int
    item_ids: list[str]
    names: tuple[str, ...]
    values: np.ndarray  # (n_items, n_signals) float64

    def __len__(self) -> int:
        return len(self.item_ids)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]

    def row(self, i: int) -> dict[str, float]:
        return dict(zip(self.names, self.values[i].tolist()))

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.values, columns=list(self.names))
        df.insert(0, "item_id", self.item_ids)
        return df

    @staticmethod
    def concat(parts: list["Signals"], as_of_ms: int, names: tuple[str, ...]) -> "Signals":
        """Union of per-partition signals (items are disjoint across partitions)."""
        ids = [i for p in parts for i in p.item_ids]
        values = np.concatenate([p.values for p in parts]) if parts else np.zeros((0, len(names)))
        return Signals(as_of_ms, ids, names, values)


@dataclass
class ApplyResult:
    applied: int
    duplicates: int  # offsets at or below the last applied one: already counted
    late: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # batch indices, for the DLQ


def _hash_strings(values: np.ndarray) -> np.ndarray:
    """Stable 64-bit hashes (SipHash with pandas' fixed key), equal across processes."""
    return pd.util.hash_array(values.astype(object, copy=False), categorize=False)


def _present_hashes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`pd.notna(values)`, `_hash_strings` of those values), hashing each distinct string once (a poll
    names few users, many times). Strings only: factorize would merge 1, 1.0 and True, which
    `_hash_strings` tells apart, so other values take the direct way."""
    codes, uniques = pd.factorize(values, sort=False)
    uniques = np.asarray(uniques, object)
    if set(map(type, uniques.tolist())) <= {str}:
        present = codes >= 0
        return present, _hash_strings(uniques)[codes[present]] if len(uniques) else np.zeros(0, np.uint64)
    present = pd.notna(values)
    return present, _hash_strings(values[present])


def _rows(batch: EventBatch, rows: slice) -> EventBatch:
    arrays = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return replace(batch, **{k: v[rows] for k, v in arrays.items() if isinstance(v, np.ndarray)})


class TrendObserver(Protocol):
    """Told of each change a `TrendTable` makes (slots are the table's; see stream.ingest.tracking)."""

    def grown(self, capacity: int) -> None: ...

    def cells(self, slots: np.ndarray, flat: np.ndarray, counts: np.ndarray, buckets: np.ndarray) -> None:
        """`apply` touched the items in `slots`, adding `counts` to ring cells `flat` (slot * ring + column)
        for events of `buckets`."""

    def users(self, pair_hash: np.ndarray, slots: np.ndarray, buckets: np.ndarray) -> None:
        """`apply` observed these (item, user) pairs."""

    def removed(self, item: str) -> None:
        """`expire` freed this item."""


class TrendTable:
    """Per-partition trend state. Not thread-safe: one owner applies and reads."""

    def __init__(self, config: TrendConfig | None = None, capacity: int = 1024) -> None:
        self.config = config or TrendConfig()
        self._ring = self.config.ring_buckets
        self._slot: dict[str, int] = {}
        self._ids: list[str | None] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._counts = np.zeros((capacity, self._ring), np.int32)  # (items, ring buckets)
        self._first_ms = np.zeros(capacity, np.int64)
        self._last_bucket = np.zeros(capacity, np.int64)
        self._total = np.zeros(capacity, np.int64)
        # de-duplicated (item, user, bucket) observations for distinct-user counts
        self._u_hash = np.zeros(0, np.uint64)
        self._u_slot = np.zeros(0, np.int32)
        self._u_bucket = np.zeros(0, np.int64)
        self._u_pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._u_pending_rows = 0
        self.head_bucket: int | None = None  # newest bucket holding an event
        self.watermark_ms: int | None = None  # newest event time seen
        self.last_offset = -1  # newest source offset applied (de-duplication on replay)
        # Told of every change (stream.ingest.tracking records them for delta checkpoints); None: nobody is.
        self.observer: TrendObserver | None = None

    # ---- sizes -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot)

    @property
    def capacity(self) -> int:
        return len(self._ids)

    def _grow(self, need: int) -> None:
        old = self.capacity
        new = max(2 * old, old + need)
        self._counts = np.concatenate([self._counts, np.zeros((new - old, self._ring), np.int32)])
        self._first_ms = np.concatenate([self._first_ms, np.zeros(new - old, np.int64)])
        self._last_bucket = np.concatenate([self._last_bucket, np.zeros(new - old, np.int64)])
        self._total = np.concatenate([self._total, np.zeros(new - old, np.int64)])
        self._ids += [None] * (new - old)
        self._free = list(range(new - 1, old - 1, -1)) + self._free
        if self.observer is not None:
            self.observer.grown(new)

    # ---- writes ----------------------------------------------------------
    def _advance_head(self, bucket: int) -> None:
        if self.head_bucket is None:
            self.head_bucket = bucket
            return
        if bucket <= self.head_bucket:
            return
        steps = bucket - self.head_bucket
        if steps >= self._ring:
            self._counts[:] = 0
        else:  # columns head+1 .. bucket of the ring, as one or two slices (a fancy index is ~8x slower)
            first = (self.head_bucket + 1) % self._ring
            stop = first + steps
            self._counts[:, first : min(stop, self._ring)] = 0
            if stop > self._ring:
                self._counts[:, : stop - self._ring] = 0
        self.head_bucket = bucket

    def _slots_for(self, unique_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of the batch's items, allocating new ones. Returns (slots, is_new)."""
        slots = np.fromiter(map(self._slot.get, unique_ids.tolist(), repeat(-1)), np.int64, len(unique_ids))
        is_new = slots < 0
        if is_new.sum() > len(self._free):
            self._grow(int(is_new.sum()) - len(self._free))
        for i in np.flatnonzero(is_new).tolist():
            s = self._free.pop()
            self._slot[unique_ids[i]] = s
            self._ids[s] = unique_ids[i]
            self._first_ms[s] = _I64_MAX
            self._last_bucket[s] = _I64_MIN
            self._total[s] = 0
            slots[i] = s
        return slots, is_new

    def _update_lives(self, slots_u: np.ndarray, is_new: np.ndarray, codes: np.ndarray, buckets: np.ndarray, ts: np.ndarray) -> None:
        """total_count and first-seen time, per item life.

        An item silent for `life_buckets` (span + lateness) starts a new life (its
        counts in the span are all zero by then and it may have been expired): age and total restart at the
        event that ends the silence, in arrival order, whatever the batching.
        """
        n_u = len(slots_u)
        lo = np.full(n_u, _I64_MAX)
        hi = np.full(n_u, _I64_MIN)
        np.minimum.at(lo, codes, buckets)
        np.maximum.at(hi, codes, buckets)
        prior = self._last_bucket[slots_u]
        lo = np.where(is_new, lo, np.minimum(lo, prior))
        gap = self.config.life_buckets
        maybe = np.flatnonzero(hi - lo >= gap)  # rare: only these can start a new life
        reset = np.zeros(n_u, bool)
        for u in maybe.tolist():
            rows = np.flatnonzero(codes == u)
            newest = None if is_new[u] else int(prior[u])
            start = None
            for r in rows.tolist():
                if newest is not None and buckets[r] - newest >= gap:
                    start = r
                newest = int(buckets[r]) if newest is None else max(newest, int(buckets[r]))
            if start is not None:
                life = rows[rows >= start]
                s = slots_u[u]
                self._total[s] = len(life)
                self._first_ms[s] = ts[life].min()
                reset[u] = True
        keep = np.flatnonzero(~reset[codes])
        np.add.at(self._total, slots_u[codes[keep]], 1)
        np.minimum.at(self._first_ms, slots_u[codes[keep]], ts[keep])
        np.maximum.at(self._last_bucket, slots_u[codes], buckets)

    def apply(self, batch: EventBatch) -> ApplyResult:
        """Apply a batch in arrival order. Returns what was applied, skipped and late."""
        n = len(batch)
        if n == 0:
            return ApplyResult(0, 0)
        offsets = np.asarray(batch.offset, np.int64)
        fresh = (offsets < 0) | (offsets > self.last_offset)
        duplicates = int(n - fresh.sum())
        ts = np.asarray(batch.ts_ms, np.int64)
        # The watermark an event meets is the newest time before or at it in arrival order.
        prior = _I64_MIN if self.watermark_ms is None else self.watermark_ms
        seen_ts = np.where(fresh, ts, _I64_MIN)
        watermark = np.maximum(np.maximum.accumulate(seen_ts), prior)
        late_mask = fresh & (ts < watermark - self.config.allowed_lateness_ms)
        take = fresh & ~late_mask
        if fresh.any():
            self.last_offset = max(self.last_offset, int(offsets[fresh].max()))
            self.watermark_ms = int(watermark[-1])
        late = np.flatnonzero(late_mask)
        if not take.any():
            return ApplyResult(0, duplicates, late)

        idx = np.flatnonzero(take)
        ts = ts[idx]
        buckets = ts // self.config.bucket_ms
        self._advance_head(int(buckets.max()))
        codes, uniques = pd.factorize(np.asarray(batch.item_id, object)[idx], sort=False)
        slots_u, is_new = self._slots_for(np.asarray(uniques, object))
        slots = slots_u[codes]
        self._update_lives(slots_u, is_new, codes, buckets, ts)
        in_ring = buckets > self.head_bucket - self._ring  # a batch can span more than the ring
        cells = (slots * self._ring + buckets % self._ring)[in_ring]
        if self.observer is not None:
            flat, first, counts = np.unique(cells, return_index=True, return_counts=True)
            self.observer.cells(slots_u, flat, counts.astype(np.int32), buckets[in_ring][first])
        else:
            flat, counts = np.unique(cells, return_counts=True)
        self._counts.reshape(-1)[flat] += counts.astype(np.int32)

        users = np.asarray(batch.user_id, object)[idx]
        has_user, user_hash = _present_hashes(users)
        if has_user.any():
            item_hash = _hash_strings(np.asarray(uniques, object))[codes[has_user]]
            pair = item_hash * PAIR_MIX ^ user_hash
            self._u_pending.append((pair, slots[has_user].astype(np.int32), buckets[has_user]))
            self._u_pending_rows += len(pair)
            if self.observer is not None:
                self.observer.users(*self._u_pending[-1])
            if self._u_pending_rows > max(50_000, len(self._u_hash)):
                self._compact_users()
        return ApplyResult(len(idx), duplicates, late)

    def _compact_users(self) -> None:
        if self._u_pending:
            hashes = [self._u_hash] + [p[0] for p in self._u_pending]
            self._u_hash = np.concatenate(hashes)
            self._u_slot = np.concatenate([self._u_slot] + [p[1] for p in self._u_pending])
            self._u_bucket = np.concatenate([self._u_bucket] + [p[2] for p in self._u_pending])
            self._u_pending, self._u_pending_rows = [], 0
        if self.head_bucket is None or not len(self._u_hash):
            return
        keep = self._u_bucket > self.head_bucket - self._ring
        key = self._u_hash[keep] ^ (self._u_bucket[keep].astype(np.uint64) * PAIR_MIX)
        _, first = np.unique(key, return_index=True)
        sel = np.flatnonzero(keep)[first]
        self._u_hash, self._u_slot, self._u_bucket = self._u_hash[sel], self._u_slot[sel], self._u_bucket[sel]

    def expire(self) -> int:
        """Free the items whose last event has left the ring (all their counts are zero)."""
        if self.head_bucket is None:
            return 0
        in_use = np.array([s for s in self._slot.values()], np.int64)
        if not len(in_use):
            return 0
        gone = in_use[self._last_bucket[in_use] <= self.head_bucket - self._ring]
        for s in gone.tolist():
            del self._slot[self._ids[s]]
            if self.observer is not None:
                self.observer.removed(self._ids[s])
            self._ids[s] = None
            self._free.append(s)
        if len(gone):
            self._compact_users()
            alive = np.isin(self._u_slot, gone, invert=True)
            self._u_hash, self._u_slot, self._u_bucket = self._u_hash[alive], self._u_slot[alive], self._u_bucket[alive]
        return len(gone)

    # ---- reads -----------------------------------------------------------
    def closed_until_ms(self) -> int | None:
        """Latest bucket boundary that no event still accepted can fall before."""
        if self.watermark_ms is None:
            return None
        edge = self.watermark_ms - self.config.allowed_lateness_ms
        return (edge // self.config.bucket_ms) * self.config.bucket_ms

    def signals_at(self, as_of_ms: int) -> Signals:
        """Signals of items active in the longest window before `as_of_ms` (floored to a bucket)."""
        cfg = self.config
        names = cfg.signal_names
        end = as_of_ms // cfg.bucket_ms  # first bucket NOT read
        if self.head_bucket is None or not self._slot:
            return Signals(end * cfg.bucket_ms, [], names, np.zeros((0, len(names))))
        if end - cfg.span_buckets <= self.head_bucket - self._ring:
            raise ValueError(
                f"as_of {as_of_ms} is older than the table keeps (head bucket {self.head_bucket}, ring {self._ring})"
            )
        slots = np.array(sorted(self._slot.values()), np.int64)
        span = cfg.span_buckets
        hist = self._history(slots, end)  # (items, span) int32, oldest bucket first
        active = hist[:, -cfg.longest :].sum(axis=1, dtype=np.int64) > 0
        slots, hist = slots[active], hist[active]
        out = np.zeros((len(slots), len(names)))
        col = 0
        user_counts = self._distinct_users(slots, end)
        for name, w in cfg.windows:
            c0 = hist[:, span - w :].sum(axis=1, dtype=np.int64)
            c1 = hist[:, span - 2 * w : span - w].sum(axis=1, dtype=np.int64)
            c2 = hist[:, span - 3 * w : span - 2 * w].sum(axis=1, dtype=np.int64)
            out[:, col : col + 5] = np.stack(
                [c0, c1, user_counts[name], c0 - c1, (c0 - c1) - (c1 - c2)], axis=1
            )
            col += 5
        age_buckets = np.arange(cfg.longest - 1, -1, -1)  # newest bucket has age 0
        # elementwise then row sum, not a matmul: BLAS sums in an order that depends on the row count,
        # and a partition's table must give the same bits as the whole log's
        recent = hist[:, -cfg.longest :]
        for halflife in [cfg.ema_halflife_buckets] + [h for _, h in cfg.decays]:
            out[:, col] = (recent * np.exp2(-age_buckets / halflife)).sum(axis=1)
            col += 1
        if end <= self.head_bucket:  # events at or after as_of are already in the table
            later = np.arange(end, self.head_bucket + 1) % self._ring
            out[:, col] = self._total[slots] - self._counts[np.ix_(slots, later)].sum(axis=1)
        else:
            out[:, col] = self._total[slots]
        hours_per_bucket = cfg.bucket_ms / HOUR_MS
        first_bucket = self._first_ms[slots] // cfg.bucket_ms
        out[:, col + 1] = (end - first_bucket) * hours_per_bucket
        newest = span - 1 - np.argmax(hist[:, ::-1] > 0, axis=1)  # column of the newest active bucket
        out[:, col + 2] = (span - 1 - newest) * hours_per_bucket
        ids = [self._ids[s] for s in slots.tolist()]
        return Signals(end * cfg.bucket_ms, ids, names, out)

    def _history(self, slots: np.ndarray, end: int) -> np.ndarray:
        """Counts of buckets [end - span, end) for the given slots, oldest first."""
        span = self.config.span_buckets
        rows = self._counts[slots]  # a copy: zeroing below leaves the table alone
        first = (end - span) % self._ring
        if first + span <= self._ring:
            hist = rows[:, first : first + span]
        else:
            hist = np.concatenate([rows[:, first:], rows[:, : first + span - self._ring]], axis=1)
        future = end - 1 - self.head_bucket  # ring slots past the head still hold buckets of a lap ago
        if future > 0:
            hist[:, max(0, span - future) :] = 0
        return hist

    def _distinct_users(self, slots: np.ndarray, end: int) -> dict[str, np.ndarray]:
        self._compact_users()
        position = np.full(self.capacity, -1, np.int64)
        position[slots] = np.arange(len(slots))
        result = {}
        for name, w in self.config.windows:
            mask = (self._u_bucket >= end - w) & (self._u_bucket < end)
            _, first = np.unique(self._u_hash[mask], return_index=True)
            pos = position[self._u_slot[mask][first]]
            pos = pos[pos >= 0]
            result[name] = np.bincount(pos, minlength=len(slots))
        return result

    # ---- offline helper ----------------------------------------------------
    def signals_at_cutoffs(self, batch: EventBatch, cutoffs_ms: list[int]) -> Iterator[Signals]:
        """Apply a time-ordered log piece by piece and yield the signals at each cut-off.

        Only events with ts < cutoff are applied before that cut-off is read, so
        nothing from the future reaches a feature.
        """
        ts = np.asarray(batch.ts_ms, np.int64)
        if len(ts) > 1 and (np.diff(ts) < 0).any():
            raise ValueError("signals_at_cutoffs needs events sorted by ts")
        start = 0
        for cutoff in sorted(cutoffs_ms):
            stop = int(np.searchsorted(ts, cutoff, side="left"))
            if stop > start:
                self.apply(_rows(batch, slice(start, stop)))
                start = stop
            yield self.signals_at(cutoff)

    # ---- checkpoint ------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        self._compact_users()
        slots = np.array(sorted(self._slot.values()), np.int64)
        return {
            "item_ids": np.array([self._ids[s] for s in slots.tolist()], dtype=object),
            "counts": self._counts[slots],
            "first_ms": self._first_ms[slots],
            "last_bucket": self._last_bucket[slots],
            "total": self._total[slots],
            "u_hash": self._u_hash,
            "u_slot": np.searchsorted(slots, self._u_slot).astype(np.int32),
            "u_bucket": self._u_bucket,
            "scalars": np.array(
                [
                    -1 if self.head_bucket is None else self.head_bucket,
                    np.iinfo(np.int64).min if self.watermark_ms is None else self.watermark_ms,
                    self.last_offset,
                ],
                np.int64,
            ),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], config: TrendConfig) -> "TrendTable":
        ids = state["item_ids"].tolist()
        table = cls(config, capacity=max(1024, len(ids)))
        if state["counts"].shape[1:] != (table._ring,):
            raise ValueError("checkpoint was written with another trend config")
        n = len(ids)
        table._counts[:n] = state["counts"]
        table._first_ms[:n] = state["first_ms"]
        table._last_bucket[:n] = state["last_bucket"]
        table._total[:n] = state["total"]
        table._slot = {item: i for i, item in enumerate(ids)}
        table._ids[:n] = ids
        table._free = list(range(table.capacity - 1, n - 1, -1))
        table._u_hash, table._u_slot, table._u_bucket = state["u_hash"], state["u_slot"], state["u_bucket"]
        head, watermark, offset = state["scalars"].tolist()
        table.head_bucket = None if head == -1 else head
        table.watermark_ms = None if watermark == np.iinfo(np.int64).min else watermark
        table.last_offset = offset
        return table

    # ---- reads for incremental checkpoints (stream.ingest.tracking) ----------
    # Between two checkpoints a table changes in few places: the rows of the items it touched, the
    # user observations it added, the items it expired and its header (head, watermark, offset).
    # Advancing the head also zeroes buckets of every item; that is not recorded: `apply_delta`
    # advances the loaded table's head the same way, which zeroes the same buckets.
    def item_ids(self, slots: np.ndarray) -> list[str | None]:
        """The items in these slots (None: a free slot)."""
        return [self._ids[s] for s in slots.tolist()]

    def item_rows(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Per-item scalars of these slots: first_ms, last_bucket, total."""
        return {"first_ms": self._first_ms[slots], "last_bucket": self._last_bucket[slots], "total": self._total[slots]}

    def apply_delta(self, delta: dict[str, object]) -> None:
        """Replay one delta (stream.ingest.tracking.take_delta) on the state of its mark (loaded from the
        checkpoint before it)."""
        head, watermark, offset = (int(x) for x in np.asarray(delta["scalars"]).tolist())
        if head != -1:
            self._advance_head(head)  # zeroes the buckets the head passed, for every item, as the live table did
        gone = []
        for item in delta["removed"]:
            s = self._slot.pop(item, None)
            if s is not None:
                self._ids[s] = None
                self._free.append(s)
                gone.append(s)
        if gone:
            self._compact_users()
            alive = np.isin(self._u_slot, gone, invert=True)
            self._u_hash, self._u_slot, self._u_bucket = self._u_hash[alive], self._u_slot[alive], self._u_bucket[alive]
        ids = list(delta["item_ids"])
        slots = np.fromiter((self._slot.get(i, -1) for i in ids), np.int64, len(ids))
        new = np.flatnonzero(slots < 0)
        if len(new) > len(self._free):
            self._grow(len(new) - len(self._free))
        for i in new.tolist():
            s = self._free.pop()
            self._slot[ids[i]] = s
            self._ids[s] = ids[i]
            self._counts[s] = 0
            slots[i] = s
        self._first_ms[slots] = delta["first_ms"]
        self._last_bucket[slots] = delta["last_bucket"]
        self._total[slots] = delta["total"]
        cell_item = np.asarray(delta["cell_item"], np.int64)
        if len(cell_item):
            flat = slots[cell_item] * self._ring + np.asarray(delta["cell_col"], np.int64)
            self._counts.reshape(-1)[flat] += np.asarray(delta["cell_count"], np.int32)
        u_hash = np.asarray(delta["u_hash"], np.uint64)
        if len(u_hash):
            u_slot = slots[np.asarray(delta["u_item"], np.int64)].astype(np.int32)
            self._u_pending.append((u_hash, u_slot, np.asarray(delta["u_bucket"], np.int64)))
            self._u_pending_rows += len(u_hash)
            if self._u_pending_rows > max(50_000, len(self._u_hash)):
                self._compact_users()
        self.head_bucket = None if head == -1 else head
        self.watermark_ms = None if watermark == np.iinfo(np.int64).min else watermark
        self.last_offset = offset

    def scalars(self) -> np.ndarray:
        """(head bucket or -1, watermark or int64 min, last offset)."""
        return np.array(
            [
                -1 if self.head_bucket is None else self.head_bucket,
                np.iinfo(np.int64).min if self.watermark_ms is None else self.watermark_ms,
                self.last_offset,
            ],
            np.int64,
        )
