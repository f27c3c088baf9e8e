"""Delta-checkpoint tracking of a `TrendTable`, and its full snapshot on disk.

Pure module (numpy + stream.core.trends) apart from `save_table`, the atomic file write. The table
itself keeps only signal state: a `DeltaTracker` set as its observer records what changed since the
last checkpoint (`mark_checkpoint`), and `take_delta` turns that into one delta record's fields
(stream.ingest.deltas writes them; `TrendTable.apply_delta` replays them on load).

Untracked tables (the trainer's, the bench's) have no observer and keep nothing extra.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from stream.core.trends import PAIR_MIX, TrendConfig, TrendTable

MAX_TRACKED_ROWS = 4_000_000  # tracked cells + user rows between marks; beyond, the next checkpoint is full

# Epochs are unique across trackers, so a chain recorded for one tracker never matches another's.
_epochs = itertools.count(1)


class DeltaTracker:
    """The changes of one table since its last mark (a `TrendObserver`)."""

    def __init__(self, table: TrendTable) -> None:
        self.table = table
        self.epoch = 0
        self._dirty = np.zeros(0, bool)  # slots touched since the mark
        self._cells: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (flat cell, +count, bucket)
        self._users: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (pair hash, slot, bucket)
        self._removed: list[str] = []  # items expired since the mark
        self._rows = 0

    def mark(self) -> int:
        self.epoch = next(_epochs)
        self._dirty = np.zeros(self.table.capacity, bool)
        self._cells, self._users, self._removed = [], [], []
        self._rows = 0
        return self.epoch

    # ---- TrendObserver ------------------------------------------------------
    def grown(self, capacity: int) -> None:
        self._dirty = np.concatenate([self._dirty, np.zeros(capacity - len(self._dirty), bool)])

    def cells(self, slots: np.ndarray, flat: np.ndarray, counts: np.ndarray, buckets: np.ndarray) -> None:
        self._dirty[slots] = True
        self._log(self._cells, (flat, counts, buckets))

    def users(self, pair_hash: np.ndarray, slots: np.ndarray, buckets: np.ndarray) -> None:
        self._log(self._users, (pair_hash, slots, buckets))

    def removed(self, item: str) -> None:
        self._removed.append(item)

    def _log(self, log: list, part: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        if len(part[0]):
            log.append(part)
            self._rows += len(part[0])
        if self._rows > MAX_TRACKED_ROWS:  # e.g. a catch-up between two checkpoints: a full one is cheaper
            self.table.observer = None
            self._dirty = np.zeros(0, bool)
            self._cells, self._users, self._removed = [], [], []

    # ---- the delta ------------------------------------------------------------
    def delta(self) -> dict[str, object]:
        """The changes since the mark (the fields of one delta record).

        Cells and user observations of items expired since the mark (their slot may hold another
        item now) are all older than the ring and left out.
        """
        table = self.table
        ring = table.config.ring_buckets
        oldest = np.iinfo(np.int64).min if table.head_bucket is None else table.head_bucket - ring
        dirty = np.flatnonzero(self._dirty)
        slots = dirty[[item is not None for item in table.item_ids(dirty)]].astype(np.int64) if len(dirty) \
            else np.zeros(0, np.int64)
        live = np.zeros(table.capacity, bool)
        live[slots] = True
        cell_item = cell_col = np.zeros(0, np.int32)
        cell_count = np.zeros(0, np.int32)
        if self._cells:
            flat = np.concatenate([c[0] for c in self._cells])
            count = np.concatenate([c[1] for c in self._cells])
            bucket = np.concatenate([c[2] for c in self._cells])
            keep = (bucket > oldest) & live[flat // ring]
            flat, inverse = np.unique(flat[keep], return_inverse=True)
            cell_count = np.zeros(len(flat), np.int32)
            np.add.at(cell_count, inverse.reshape(-1), count[keep])
            cell_item = np.searchsorted(slots, flat // ring).astype(np.int32)
            cell_col = (flat % ring).astype(np.int32)
        u_hash, u_item, u_bucket = np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        if self._users:
            u_hash = np.concatenate([u[0] for u in self._users])
            u_slot = np.concatenate([u[1] for u in self._users])
            u_bucket = np.concatenate([u[2] for u in self._users])
            keep = (u_bucket > oldest) & live[u_slot]
            u_hash, u_slot, u_bucket = u_hash[keep], u_slot[keep], u_bucket[keep]
            _, first = np.unique(u_hash ^ (u_bucket.astype(np.uint64) * PAIR_MIX), return_index=True)
            first.sort()
            u_hash, u_slot, u_bucket = u_hash[first], u_slot[first], u_bucket[first]
            u_item = np.searchsorted(slots, u_slot).astype(np.int32)
        return {
            "scalars": table.scalars(),
            "item_ids": table.item_ids(slots),
            **table.item_rows(slots),
            "cell_item": cell_item,
            "cell_col": cell_col,
            "cell_count": cell_count,
            "u_hash": u_hash,
            "u_item": u_item,
            "u_bucket": u_bucket,
            "removed": list(dict.fromkeys(self._removed)),
        }


def tracker_of(table: TrendTable) -> DeltaTracker | None:
    observer = table.observer
    return observer if isinstance(observer, DeltaTracker) else None


def mark_checkpoint(table: TrendTable) -> int:
    """The table's current state is on disk: track its changes from here on. Returns the new epoch."""
    tracker = tracker_of(table)
    if tracker is None:
        tracker = DeltaTracker(table)
        table.observer = tracker
    return tracker.mark()


def checkpoint_epoch(table: TrendTable) -> int:
    """Changes when tracking restarts (or stops): a delta chain is valid for one epoch. 0: untracked."""
    tracker = tracker_of(table)
    return 0 if tracker is None else tracker.epoch


def take_delta(table: TrendTable) -> dict[str, object] | None:
    """The changes since the last mark, then a new mark; None when they were not tracked
    (never marked, or too many changes): write a full checkpoint instead."""
    tracker = tracker_of(table)
    if tracker is None:
        return None
    delta = tracker.delta()
    tracker.mark()
    return delta


def save_table(table: TrendTable, path: str | os.PathLike, **extra: np.ndarray) -> None:
    """Atomic snapshot (with `extra` arrays beside the state): a crash leaves either the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **table.state_dict(), **extra)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_table(path: str | os.PathLike, config: TrendConfig) -> TrendTable:
    with np.load(path, allow_pickle=True) as data:
        return TrendTable.from_state({k: data[k] for k in data.files}, config)
