"""The sink's spilling piece: batches the store cannot take, as fsynced JSON-lines files in one directory
that one sink owns (an exclusive lock on `<dir>/.lock`), oldest first, read back for replay.

A file is written under a temporary name, fsynced, renamed and its directory fsynced: once `write`
returns, the batch survives a crash (the sink then reports it durable). A temporary file left by a
crash was never reported durable (its records are still in Kafka) and is deleted when the directory
is opened again. A file that cannot be read back is moved to `bad/` (logged), never retried forever."""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import structlog

from stream.core.records import RECORD_TYPES, RecordError
from stream.store.batches import TABLE_ORDER, Batch

log = structlog.get_logger(__name__)

SPILL_SUFFIX = ".jsonl"


class SpillDirInUse(RuntimeError):
    """Another process holds the spill directory: give each worker its own TRAIL_SINK_SPILL_DIR."""


class SpillDir:
    """The spill files of one directory: `files` maps each to its size, oldest first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[Path, int] = {}
        self._lock_file: Any = None

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    def open(self) -> None:
        """Lock the directory (SpillDirInUse when another sink holds it), drop unfinished files, list the rest."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        for tmp in self.path.glob(f"*{SPILL_SUFFIX}.tmp"):
            tmp.unlink()  # never renamed, so never reported durable: its records are still in Kafka
        self.files = {p: p.stat().st_size for p in sorted(self.path.glob(f"*{SPILL_SUFFIX}"))}

    def _lock(self) -> None:
        # Spill files belong to one writer: a second process replaying or cleaning the same
        # directory would race this one. The lock dies with the process, so a crash frees it.
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise SpillDirInUse(f"spill directory {self.path} is used by another running sink; give each "
                                "worker its own (TRAIL_SINK_SPILL_DIR, or a separate volume)") from None
        self._lock_file = f

    def close(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def write(self, batch: Batch) -> tuple[Path, int]:
        """Write `batch` durably as a new file; (its path, its size)."""
        name = f"{time.time_ns():020d}-{batch.seq}-{uuid.uuid4().hex[:8]}{SPILL_SUFFIX}"
        final = self.path / name
        tmp = final.with_name(name + ".tmp")
        with open(tmp, "wb") as f:
            for table in TABLE_ORDER:
                for record, stamp in zip(batch.rows.get(table, ()), batch.stamps.get(table, ())):
                    f.write(orjson.dumps({"table": table, "written_at_ms": int(stamp.timestamp() * 1000),
                                          "record": record.to_dict()}))
                    f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.path)
        size = final.stat().st_size
        self.files[final] = size
        return final, size

    def oldest(self) -> Path:
        return next(iter(self.files))

    def quarantine(self, path: Path) -> Path:
        """Move an unreadable file out of the way (to `bad/`); where it went."""
        bad = self.path / "bad"
        bad.mkdir(exist_ok=True)
        os.replace(path, bad / path.name)
        self.files.pop(path)
        return bad

    def remove(self, path: Path) -> int:
        """Delete a file whose batch is in the store; its size."""
        path.unlink()
        _fsync_dir(self.path)
        return self.files.pop(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_spill(path: Path) -> Batch:
    """A spill file back as a batch (seq 0); ValueError naming the line when one is not a record."""
    batch = Batch(seq=0)
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
                cls = RECORD_TYPES[item["table"]]
                record = cls.from_dict(item["record"])
                stamp = datetime.fromtimestamp(int(item["written_at_ms"]) / 1000, tz=timezone.utc)
            except (orjson.JSONDecodeError, KeyError, TypeError, RecordError) as ex:
                raise ValueError(f"{path.name} line {n}: {ex}") from None
            batch.rows.setdefault(cls.table, []).append(record)
            batch.stamps.setdefault(cls.table, []).append(stamp)
    return batch
