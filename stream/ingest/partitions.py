"""Per-partition trend state of the worker, and its checkpoints on disk.

Pure module (numpy + stream.core.events/trends, stream.ingest.deltas/tracking): the Kafka side lives in
stream.ingest.worker.

A partition's state is one `TrendTable` whose `last_offset` is the newest source
offset *handled* (applied, rejected or late). Its checkpoint holds the table
and that offset together, so a restart resumes at `last_offset + 1` with every
event counted exactly once: anything re-read is skipped by offset.

A checkpoint costs what changed: a full snapshot now and then, and in between
one small delta record per save (the touched items' rows, new user observations,
expired items, the header) appended to a log; see `CheckpointStore`.
"""

from __future__ import annotations

import json
import os
import weakref
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from stream.core.events import REASON_LATE, ValidationConfig, parse_batch
from stream.core.trends import TrendConfig, TrendTable
from stream.ingest.deltas import decode_delta, encode_delta, frame, read_records
from stream.ingest.tracking import checkpoint_epoch, mark_checkpoint, save_table, take_delta

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


CHAIN_KEY = "checkpoint_chain"  # in a full snapshot: the id its delta records carry
# A new snapshot once the log holds half a snapshot's bytes (a partition of 800 retail items with
# the default windows: ~6.5 MB snapshot, ~1.7 kB per delta) or 2000 records (bounds the load time).
COMPACT_FRACTION = 0.5
COMPACT_EVERY = 2000


@dataclass
class SaveInfo:
    kind: str  # "full" (snapshot, the log restarts) or "delta" (one record appended)
    bytes: int  # written to disk


@dataclass
class _Chain:
    """What this store last wrote or loaded for a partition; deltas may follow while it holds."""

    table: weakref.ref  # the table it describes (a rebuilt table is another object: full snapshot)
    epoch: int  # the table's checkpoint_epoch (stream.ingest.tracking) after that write (another writer re-marking it: full)
    chain: int
    seq: int  # number of the last delta record (0: none since the snapshot)
    log_len: int  # bytes of the complete records
    log_size: int  # the log's size on disk as last seen (above log_len after a torn write)
    base_stat: tuple[int, int, int]  # (inode, size, mtime_ns) of the snapshot: replaced by someone else -> full


def _stat(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointStore:
    """Per partition: `<state_dir>/<topic>-<partition>.npz`, a full snapshot of the table, and
    `<topic>-<partition>.npz.deltas`, the changes since it (stream.ingest.deltas).

    `save` appends one delta record (fsynced; a torn record is ignored on load and cut off
    before the next append) while the table is the one this store last saved or loaded for
    that partition, and otherwise, or when the log has grown past `compact_fraction` of the
    snapshot or to `compact_every` records, writes a new snapshot (temp file + fsync + rename;
    its new chain id retires the old log's records even if the crash comes before the log is
    removed). `load` = snapshot + the log's complete records in order: the same state as the
    table at its last save (tests/test_checkpoints.py).

    `<topic>.spec.json` records the trend config the files were written with; on a
    different config the old files are removed (their buckets would mean something
    else) and the tables are rebuilt from the topic.
    """

    def __init__(self, state_dir: str | Path, topic: str, config: TrendConfig,
                 compact_fraction: float = COMPACT_FRACTION, compact_every: int = COMPACT_EVERY) -> None:
        self.dir = Path(state_dir)
        self.topic = topic
        self.config = config
        self.compact_fraction = compact_fraction
        self.compact_every = compact_every
        self._spec = {**config.spec(), "allowed_lateness_ms": config.allowed_lateness_ms,
                      "ring_buckets": config.ring_buckets}
        self._chains: dict[int, _Chain] = {}

    def path(self, partition: int) -> Path:
        return self.dir / f"{self.topic}-{partition}.npz"

    def log_path(self, partition: int) -> Path:
        return self.dir / f"{self.topic}-{partition}.npz.deltas"

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
            stale = sorted(self.dir.glob(f"{self.topic}-*.npz")) + sorted(self.dir.glob(f"{self.topic}-*.npz.deltas"))
            log.warning("checkpoint.config_changed", dir=str(self.dir), removed=len(stale), old=old, new=self._spec)
            for p in stale:
                p.unlink(missing_ok=True)
        tmp = spec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._spec, sort_keys=True))
        os.replace(tmp, spec_path)

    def load(self, partition: int) -> TrendTable | None:
        """Snapshot + complete delta records, or None (no checkpoint, or unreadable: rebuild from the topic)."""
        self._chains.pop(partition, None)
        path = self.path(partition)
        if not path.exists():
            return None
        try:
            base_stat = _stat(path)
            with np.load(path, allow_pickle=True) as data:
                state = {k: data[k] for k in data.files}
            chain = state.pop(CHAIN_KEY, None)
            table = TrendTable.from_state(state, self.config)
            seq = log_len = log_size = 0
            if chain is not None:
                chain = int(chain)
                try:
                    data = self.log_path(partition).read_bytes()
                except FileNotFoundError:
                    data = b""
                log_size = len(data)
                for seq, payload, log_len in read_records(data, chain):
                    table.apply_delta(decode_delta(payload))
                if log_len < log_size:
                    log.warning("checkpoint.torn_tail", path=str(self.log_path(partition)), records=seq,
                                ignored_bytes=log_size - log_len)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: rebuild from the topic
            log.warning("checkpoint.unreadable", path=str(path), error=repr(e))
            return None
        epoch = mark_checkpoint(table)
        if chain is not None:  # a snapshot of the old format (no chain) gets a full one at the next save
            self._chains[partition] = _Chain(weakref.ref(table), epoch, chain, seq, log_len, log_size, base_stat)
        return table

    def save(self, partition: int, table: TrendTable) -> SaveInfo:
        ch = self._chains.get(partition)
        if ch is not None and ch.table() is table and ch.epoch == checkpoint_epoch(table) \
                and not self._compaction_due(ch) and self._unchanged_on_disk(partition, ch):
            delta = take_delta(table)
            payload = None
            if delta is not None:
                try:
                    payload = encode_delta(delta)
                except TypeError:  # item ids that are not str: only a snapshot can hold them
                    payload = None
            if payload is not None:
                try:
                    written = self._append(partition, ch, payload)
                except BaseException:
                    self._chains.pop(partition, None)  # the log's end is unknown: the next save is a snapshot
                    raise
                ch.epoch = checkpoint_epoch(table)
                return SaveInfo("delta", written)
        return self._save_full(partition, table)

    def _compaction_due(self, ch: _Chain) -> bool:
        return ch.seq >= self.compact_every or ch.log_len > self.compact_fraction * ch.base_stat[1]

    def _unchanged_on_disk(self, partition: int, ch: _Chain) -> bool:
        """Nobody else has replaced the snapshot or appended to the log since this store did."""
        try:
            if _stat(self.path(partition)) != ch.base_stat:
                return False
        except FileNotFoundError:
            return False
        try:
            size = os.stat(self.log_path(partition)).st_size
        except FileNotFoundError:
            size = 0
        return size == ch.log_size

    def _append(self, partition: int, ch: _Chain, payload: bytes) -> int:
        record = frame(ch.chain, ch.seq + 1, payload)
        path = self.log_path(partition)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if ch.log_size != ch.log_len:  # a torn record from a crash: cut it off, it was never applied
                os.ftruncate(fd, ch.log_len)
            view = memoryview(record)
            pos = 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos:], ch.log_len + pos)
            os.fsync(fd)
        finally:
            os.close(fd)
        if ch.log_len == 0:
            _fsync_dir(self.dir)  # a new file: make its directory entry durable too
        ch.seq += 1
        ch.log_len += len(record)
        ch.log_size = ch.log_len
        return len(record)

    def _save_full(self, partition: int, table: TrendTable) -> SaveInfo:
        self._chains.pop(partition, None)
        chain = int.from_bytes(os.urandom(8), "little") or 1
        path = self.path(partition)
        save_table(table, path, **{CHAIN_KEY: np.array(chain, np.uint64)})
        _fsync_dir(self.dir)
        epoch = mark_checkpoint(table)
        # Its records belong to the chain just replaced (ignored on load should this unlink not happen).
        self.log_path(partition).unlink(missing_ok=True)
        base_stat = _stat(path)
        self._chains[partition] = _Chain(weakref.ref(table), epoch, chain, 0, 0, 0, base_stat)
        return SaveInfo("full", base_stat[1])
