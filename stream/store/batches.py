"""The sink's batching piece: records waiting for their INSERT, per table in submit order, and the batch
a write takes from them. Not thread-safe on its own: `ResultSink` holds its lock around every call."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stream.core.records import Explanation, Prediction, TrendSnapshot

TABLE_ORDER = (Prediction.table, Explanation.table, TrendSnapshot.table)


@dataclass
class Batch:
    seq: int  # the highest sequence number it contains
    rows: dict[str, list[Any]] = field(default_factory=dict)
    stamps: dict[str, list[datetime]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.rows.values())


class Buffer:
    """Rows not yet taken by a write: `rows` of them, the oldest waiting since `oldest` (time.monotonic)."""

    def __init__(self) -> None:
        self._rows: dict[str, list[Any]] = {t: [] for t in TABLE_ORDER}
        self._stamps: dict[str, list[datetime]] = {t: [] for t in TABLE_ORDER}
        self.rows = 0
        self.oldest: float | None = None

    def add(self, records: list[Any], stamp: datetime) -> bool:
        """Buffer `records` (each with its table), all stamped `stamp`; True when they are the first waiting."""
        for r in records:
            self._rows[r.table].append(r)
            self._stamps[r.table].append(stamp)
        self.rows += len(records)
        first = self.oldest is None
        if first:
            self.oldest = time.monotonic()
        return first

    def take(self, seq: int) -> Batch:
        """Everything buffered, as one batch covering sequence numbers up to `seq`; the buffer is empty after."""
        batch = Batch(seq=seq)
        for table in TABLE_ORDER:
            if self._rows[table]:
                batch.rows[table], self._rows[table] = self._rows[table], []
                batch.stamps[table], self._stamps[table] = self._stamps[table], []
        self.rows = 0
        self.oldest = None
        return batch
