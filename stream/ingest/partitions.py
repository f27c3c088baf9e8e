"""Per-partition trend state of the worker, and its checkpoints on disk.

Pure module (numpy + stream.core.events/trends): the Kafka side lives in stream.ingest.worker.

A partition's state is one `TrendTable` whose `last_offset` is the newest source
offset *handled* (applied, rejected or late). Its checkpoint file holds the table
and that offset together, so a restart resumes at `last_offset + 1` with every
event counted exactly once: anything re-read is skipped by offset.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from stream.core.events import REASON_LATE, ValidationConfig, parse_batch
from stream.core.trends import TrendConfig, TrendTable

log = structlog.get_logger(__name__)


@dataclass
class Counters:
    consumed: int = 0  # records read from Kafka, duplicates included
    applied: int = 0  # events counted in the trend table
    rejected: int = 0  # failed parsing/validation (to the DLQ)
    late: int = 0  # beyond the allowed lateness (to the DLQ)
    duplicates: int = 0  # offsets already handled (re-delivery after a restart or rebalance)
    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, other: Counters) -> None:
        self.consumed += other.consumed
        self.applied += other.applied
        self.rejected += other.rejected
        self.late += other.late
        self.duplicates += other.duplicates
        self.reasons.update(other.reasons)

    def as_dict(self) -> dict[str, object]:
        return {"consumed": self.consumed, "applied": self.applied, "rejected": self.rejected,
                "late": self.late, "duplicates": self.duplicates, "reasons": dict(self.reasons)}


class PartitionState:
    """The trend table of one source partition plus what the worker counts about it."""

    def __init__(self, partition: int, table: TrendTable, validation: ValidationConfig = ValidationConfig()) -> None:
        self.partition = partition
        self.table = table
        self.validation = validation
        self.counters = Counters()
        self.dirty = False  # handled records since the last checkpoint

    @property
    def next_offset(self) -> int:
        return self.table.last_offset + 1

    def ingest(self, offsets: Sequence[int], keys: Sequence[bytes | None], values: Sequence[bytes | None],
               now_ms: int | None = None) -> list[tuple[int, str]]:
        """Handle one fetched run of records (ascending offsets). Returns (index, reason) for the DLQ."""
        n = len(offsets)
        if not n:
            return []
        c = self.counters
        c.consumed += n
        start = bisect_right(offsets, self.table.last_offset)  # offsets are ascending within a partition
        c.duplicates += start
        if start == n:
            return []
        if start:
            offsets, keys, values = offsets[start:], keys[start:], values[start:]
        parsed = parse_batch(values, offsets=offsets, partition=self.partition, keys=keys,
                             config=self.validation, now_ms=now_ms)
        result = self.table.apply(parsed.batch)
        c.duplicates += result.duplicates
        c.applied += result.applied
        dead = [(start + r.index, r.reason) for r in parsed.rejects]
        if parsed.rejects:
            c.rejected += len(parsed.rejects)
            c.reasons.update(r.reason for r in parsed.rejects)
        if len(result.late):
            c.late += len(result.late)
            c.reasons[REASON_LATE] += len(result.late)
            dead += [(start + int(i), REASON_LATE) for i in parsed.batch.index[result.late].tolist()]
        # Rejected records are handled too: a restart must not send them to the DLQ again.
        self.table.last_offset = max(self.table.last_offset, int(offsets[-1]))
        self.dirty = True
        return dead


class CheckpointStore:
    """`<state_dir>/<topic>-<partition>.npz` per partition, written atomically by TrendTable.save.

    `<topic>.spec.json` records the trend config the files were written with; on a
    different config the old files are removed (their buckets would mean something
    else) and the tables are rebuilt from the topic.
    """

    def __init__(self, state_dir: str | Path, topic: str, config: TrendConfig) -> None:
        self.dir = Path(state_dir)
        self.topic = topic
        self.config = config
        self._spec = {**config.spec(), "allowed_lateness_ms": config.allowed_lateness_ms}

    def path(self, partition: int) -> Path:
        return self.dir / f"{self.topic}-{partition}.npz"

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.dir / f"{self.topic}.spec.json"
        if spec_path.exists():
            try:
                old = json.loads(spec_path.read_text())
            except (OSError, ValueError):
                old = None
            if old == self._spec:
                return
            stale = sorted(self.dir.glob(f"{self.topic}-*.npz"))
            log.warning("checkpoint.config_changed", dir=str(self.dir), removed=len(stale), old=old, new=self._spec)
            for p in stale:
                p.unlink(missing_ok=True)
        tmp = spec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._spec, sort_keys=True))
        os.replace(tmp, spec_path)

    def load(self, partition: int) -> TrendTable | None:
        path = self.path(partition)
        if not path.exists():
            return None
        try:
            return TrendTable.load(str(path), self.config)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: rebuild from the topic
            log.warning("checkpoint.unreadable", path=str(path), error=repr(e))
            return None

    def save(self, partition: int, table: TrendTable) -> None:
        table.save(str(self.path(partition)))
