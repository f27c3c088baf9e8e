"""Batched, loss-free writes of TRAIL's output records to ClickHouse.

`ResultSink` takes typed records (`Prediction`, `Explanation`, `TrendSnapshot`) from the
event loop and writes them from its own thread (the clickhouse-connect client, embedded
chdb or HTTP, is synchronous), so no ClickHouse call ever runs on the asyncio loop.

    settings = load_settings()                               # stream.settings
    sink = ResultSink(settings.store, settings.sink); sink.start()
    seq = await sink.asubmit(predictions + explanations)     # never blocks unless full
    await sink.wait_durable(seq)                             # then commit the Kafka offsets
    sink.close()                                             # drains

Batching: rows are buffered per table and written as one columnar (Native) INSERT per
table when `batch_rows` rows are waiting or the oldest has waited `flush_interval_s`.

Durability contract: every `submit` returns a sequence number; a sequence number is
*durable* once every record submitted up to it is either in ClickHouse or in an fsynced
spill file under `spill_dir`. `on_durable(seq)`, `wait_durable(seq)` and `durable_seq`
report it. A caller that commits its Kafka offsets only after its records are durable
loses nothing: records not yet durable are re-read from Kafka after a crash, spill files
are replayed into ClickHouse when the sink starts again (and as soon as the store is back).

Outage policy (ClickHouse down or slow):
1. A failing batch is retried with exponential backoff (`retry_initial_s` doubling up to
   `retry_max_s`) for up to `spill_after_s` seconds after its first failed write (a backoff that
   would end later is cut at that deadline).
2. Then it is spilled to disk (JSON lines, written to a temporary name, fsynced, renamed)
   and counted durable; while the store stays down, later batches go straight to disk,
   and the sink probes the store by replaying the oldest spill file after each backoff.
3. Spill files are bounded by `max_spill_bytes`. Past that, batches stay in memory and are
   retried; memory is bounded by `max_buffer_rows`: `submit` raises `SinkFull` and
   `asubmit` waits (back-pressure on the stream) until the store takes rows again.

One sink per spill directory (an exclusive lock on `<spill_dir>/.lock`; a second one fails
with SpillDirInUse), so each worker process needs its own directory.

Replays are harmless: the tables are ReplacingMergeTree on (item_id, tick, model_version)
with the submit time `written_at` as version, so a record written twice (retry after a
lost response, spill replay, Kafka redelivery) counts once in FINAL queries.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from stream.core.records import Explanation, Prediction, RecordError, TrendSnapshot
from stream.store.batches import TABLE_ORDER, Batch, Buffer
from stream.store.clickhouse import StoreConfig, connect, ensure_schema, insert_records
from stream.store.spill import SpillDir, SpillDirInUse, read_spill

log = structlog.get_logger(__name__)

__all__ = ["ResultSink", "SinkClosed", "SinkConfig", "SinkFull", "SinkStats", "SpillDirInUse"]


class SinkFull(RuntimeError):
    """The in-memory buffer is at `max_buffer_rows`: await `asubmit` (or retry later)."""


class SinkClosed(RuntimeError):
    """The sink was closed (or never started) and takes no more records."""


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"SinkConfig.{name} must be > 0, got {value}")


@dataclass(frozen=True)
class SinkConfig:
    batch_rows: int = 5_000
    flush_interval_s: float = 1.0
    max_buffer_rows: int = 200_000
    spill_after_s: float = 10.0
    max_spill_bytes: int = 1 << 30
    retry_initial_s: float = 0.25
    retry_max_s: float = 30.0
    # None: <embedded data dir>/../spill for the embedded store, ./var/spill for a server.
    spill_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("batch_rows", "flush_interval_s", "max_buffer_rows", "spill_after_s",
                     "retry_initial_s", "retry_max_s"):
            _positive(name, getattr(self, name))
        if self.max_spill_bytes < 0:
            raise ValueError(f"SinkConfig.max_spill_bytes must be >= 0 (0 disables spilling), got {self.max_spill_bytes}")


@dataclass
class SinkStats:
    submitted_rows: int = 0
    written_rows: int = 0
    insert_batches: int = 0
    failed_attempts: int = 0
    spilled_rows: int = 0
    replayed_rows: int = 0
    spill_files: int = 0
    spill_bytes: int = 0
    buffered_rows: int = 0
    durable_seq: int = 0
    store_healthy: bool = True
    last_error: str | None = None


def _now_ms(clock: Callable[[], float]) -> datetime:
    ms = int(clock() * 1000)
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


class ResultSink:
    def __init__(
        self,
        store: StoreConfig,
        config: SinkConfig | None = None,
        *,
        on_durable: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config or SinkConfig()
        if self.config.spill_dir is not None:
            self.spill_dir = Path(self.config.spill_dir)
        elif store.embedded:
            self.spill_dir = Path(store.path).resolve().parent / "spill"
        else:
            self.spill_dir = Path("var/spill").resolve()
        self._on_durable = on_durable
        self._clock = clock
        self._cond = threading.Condition()
        self._buffer = Buffer()  # rows not yet taken by a write
        self._inflight_rows = 0
        self._seq = 0
        self._durable = 0
        self._flush_upto = 0
        self._stopping = False
        self._started = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._healthy = True
        self._backoff = self.config.retry_initial_s
        self._next_probe = 0.0
        self._spill = SpillDir(self.spill_dir)
        self._crashed: str | None = None
        self._stats = SinkStats()
        self._durable_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._capacity_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._idle = threading.Event()
        self._abandoned = False

    # ---- caller side (event loop or any thread) -------------------------------------------

    def start(self) -> ResultSink:
        """Start the writer thread; it first replays spill files left by an earlier run."""
        with self._cond:
            if self._closed:
                raise SinkClosed("this sink was closed; make a new one")
            if self._started:
                return self
            self._started = True
        try:
            self._spill.open()
        except SpillDirInUse:
            with self._cond:
                self._started = False
            raise
        self._stats.spill_files = len(self._spill.files)
        self._stats.spill_bytes = self._spill.bytes
        if self._spill.files:
            log.info("sink.spill_found", files=len(self._spill.files), bytes=self._stats.spill_bytes, dir=str(self.spill_dir))
        self._thread = threading.Thread(target=self._run, name="trail-sink", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> ResultSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, records: Iterable[Any]) -> int:
        """Buffer records without blocking; returns the sequence number that covers them.

        Raises SinkFull when the buffer is at max_buffer_rows (use `asubmit` to wait instead)."""
        batch = list(records)
        for r in batch:
            if not isinstance(r, (Prediction, Explanation, TrendSnapshot)):
                raise RecordError(f"the sink stores Prediction, Explanation and TrendSnapshot records, got {type(r).__name__}")
        stamp = _now_ms(self._clock)
        with self._cond:
            if self._crashed is not None:
                raise SinkClosed(f"the sink's writer thread died ({self._crashed}); see the log")
            if self._closed or not self._started:
                raise SinkClosed("submit() on a sink that is not running: call start() first" if not self._closed
                                 else "submit() after close()")
            if not batch:
                return self._seq
            held = self._buffer.rows + self._inflight_rows
            if held and held + len(batch) > self.config.max_buffer_rows:
                raise SinkFull(f"{held} rows buffered (max_buffer_rows={self.config.max_buffer_rows}); "
                               f"the store is not taking rows: {self._stats.last_error}")
            first = self._buffer.add(batch, stamp)
            self._stats.submitted_rows += len(batch)
            self._seq += 1
            self._idle.clear()
            if first or self._buffer.rows >= self.config.batch_rows:
                self._cond.notify_all()  # the writer sets its timer on the first row, writes on a full batch
            return self._seq

    async def asubmit(self, records: Iterable[Any]) -> int:
        """`submit`, but waits (without blocking the loop) while the buffer is full."""
        batch = list(records)
        while True:
            try:
                return self.submit(batch)
            except SinkFull:
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                with self._cond:
                    if self._buffer.rows + self._inflight_rows + len(batch) <= self.config.max_buffer_rows:
                        continue
                    self._capacity_waiters.append((loop, fut))
                await fut

    @property
    def durable_seq(self) -> int:
        return self._durable

    @property
    def last_seq(self) -> int:
        return self._seq

    async def wait_durable(self, seq: int, timeout: float | None = None) -> None:
        """Return once `seq` is durable (asyncio.TimeoutError after `timeout` seconds)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._durable >= seq:
                return
            if self._crashed is not None:
                raise SinkClosed(f"the sink's writer thread died: {self._crashed}")
            self._durable_waiters.append((seq, loop, fut))
            self._flush_upto = max(self._flush_upto, seq)
            self._cond.notify_all()
        await asyncio.wait_for(fut, timeout)

    def wait_durable_sync(self, seq: int, timeout: float | None = None) -> bool:
        """Block until `seq` is durable; False on timeout or when the writer thread died."""
        with self._cond:
            self._flush_upto = max(self._flush_upto, seq)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._durable >= seq or self._crashed is not None, timeout)
            return self._durable >= seq

    def flush(self, timeout: float | None = None) -> bool:
        """Write (or spill) everything submitted so far; True when it is all durable in time."""
        return self.wait_durable_sync(self._seq, timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Flush, then wait until no spill file is left, i.e. everything is in ClickHouse."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.flush(timeout):
            return False
        with self._cond:
            self._next_probe = 0.0
            self._cond.notify_all()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._idle.wait(remaining)

    def stats(self) -> SinkStats:
        with self._cond:
            s = SinkStats(**vars(self._stats))
            s.buffered_rows = self._buffer.rows + self._inflight_rows
            s.durable_seq = self._durable
            s.store_healthy = self._healthy
            return s

    def close(self, timeout: float | None = 60.0) -> bool:
        """Drain the buffer (to ClickHouse, or to spill files when it is down) and stop.

        Returns False when the writer did not finish within `timeout`; records not yet
        durable then were never reported durable, so their Kafka offsets are uncommitted."""
        with self._cond:
            if self._closed:
                return True
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Give up on what is still buffered: none of it was reported durable, so the
            # caller's source (Kafka) still has it. The writer stops after its current attempt.
            with self._cond:
                self._abandoned = True
                self._cond.notify_all()
            log.error("sink.close_timeout", abandoned_rows=self._buffer.rows + self._inflight_rows, timeout_s=timeout)
            self._thread.join(5.0)
            if not self._thread.is_alive():
                self._spill.close()
            return False
        self._spill.close()
        return True

    # ---- writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                action = self._next_action()
                if action is None:
                    break
                if isinstance(action, Batch):
                    self._deliver(action)
                else:
                    self._replay_one()
        except BaseException as ex:  # a bug here must not fail silently: nothing would be written
            with self._cond:
                self._crashed = f"{type(ex).__name__}: {ex}"
                waiters = [(loop, fut) for _, loop, fut in self._durable_waiters] + self._capacity_waiters
                self._durable_waiters, self._capacity_waiters = [], []
                self._cond.notify_all()
            for loop, fut in waiters:
                try:
                    loop.call_soon_threadsafe(_fail, fut, SinkClosed(f"the sink's writer thread died: {self._crashed}"))
                except RuntimeError:
                    pass
            log.exception("sink.writer_crashed")
            raise
        finally:
            self._drop_client()
            log.info("sink.stopped", **{k: v for k, v in vars(self.stats()).items() if k != "last_error"})

    def _next_action(self) -> Batch | str | None:
        cfg = self.config
        with self._cond:
            while True:
                if self._abandoned:
                    return None
                now = time.monotonic()
                if self._buffer.rows:
                    due = self._buffer.oldest + cfg.flush_interval_s
                    if (self._buffer.rows >= cfg.batch_rows or now >= due or self._stopping
                            or self._flush_upto > self._durable):
                        return self._take_batch()
                    wait = due - now
                else:
                    wait = None
                if self._stopping:
                    return None
                if self._spill.files:
                    if self._healthy or now >= self._next_probe:
                        return "replay"
                    probe_in = self._next_probe - now
                    wait = probe_in if wait is None else min(wait, probe_in)
                else:
                    self._idle.set()
                self._cond.wait(wait)

    def _take_batch(self) -> Batch:
        self._inflight_rows = self._buffer.rows
        return self._buffer.take(self._seq)

    def _client_ready(self) -> Any:
        if self._client is None:
            client = connect(self.store)
            try:
                ensure_schema(client, self.store)
            except Exception:
                client.close()
                raise
            self._client = client
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a client to a dead server may fail too; it is gone either way
                log.debug("sink.client_close_failed", exc_info=True)
            self._client = None

    def _insert(self, batch: Batch) -> None:
        client = self._client_ready()
        for table in TABLE_ORDER:
            if batch.rows.get(table):
                insert_records(client, table, batch.rows[table], batch.stamps[table])

    def _failed(self, ex: BaseException, **context: Any) -> None:
        self._drop_client()
        with self._cond:
            self._stats.failed_attempts += 1
            self._stats.last_error = f"{type(ex).__name__}: {ex}"[:500]
        log.warning("sink.store_error", error=self._stats.last_error, store=self.store.describe(), **context)

    def _spill_allowed(self) -> bool:
        return self._stats.spill_bytes < self.config.max_spill_bytes

    def _deliver(self, batch: Batch) -> None:
        cfg = self.config
        first_failure: float | None = None
        if not self._healthy and self._spill_allowed():
            self._spill_batch(batch)
            return
        while True:
            try:
                self._insert(batch)
            except Exception as ex:  # down, slow, or misconfigured: all retried, all logged
                now = time.monotonic()
                first_failure = first_failure or now
                self._failed(ex, rows=batch.size, backoff_s=self._backoff)
                with self._cond:
                    stopping = self._stopping
                    crowded = self._buffer.rows + batch.size >= cfg.max_buffer_rows
                deadline = first_failure + cfg.spill_after_s
                if self._spill_allowed() and (stopping or crowded or now >= deadline):
                    self._mark_unhealthy()
                    self._spill_batch(batch)
                    return
                if self._abandoned:
                    return
                # the backoff never runs past the spill deadline: spilling begins within spill_after_s of the
                # first failed write, not after the first retry whose backoff happens to end beyond it
                self._sleep(min(self._backoff, deadline - now) if self._spill_allowed() else self._backoff)
                self._backoff = min(self._backoff * 2, cfg.retry_max_s)
                if self._spill_allowed() and time.monotonic() >= deadline and not self._abandoned:
                    self._mark_unhealthy()
                    self._spill_batch(batch)
                    return
                continue
            self._mark_healthy()
            with self._cond:
                self._stats.written_rows += batch.size
                self._stats.insert_batches += 1
            self._made_durable(batch.seq)
            return

    def _sleep(self, seconds: float) -> None:
        # close() cuts the backoff short when the batch can go to disk instead
        with self._cond:
            self._cond.wait_for(lambda: self._abandoned or (self._stopping and self._spill_allowed()), seconds)

    def _mark_healthy(self) -> None:
        if not self._healthy:
            log.info("sink.store_back", store=self.store.describe(), spill_files=len(self._spill.files))
        self._healthy = True
        self._backoff = self.config.retry_initial_s

    def _mark_unhealthy(self) -> None:
        if self._healthy:
            log.warning("sink.store_down_spilling", store=self.store.describe(), spill_dir=str(self.spill_dir))
        self._healthy = False
        self._next_probe = time.monotonic() + self._backoff

    def _made_durable(self, seq: int) -> None:
        with self._cond:
            self._inflight_rows = 0
            self._durable = max(self._durable, seq)
            durable = self._durable
            ready = [(loop, fut) for s, loop, fut in self._durable_waiters if s <= durable]
            self._durable_waiters = [w for w in self._durable_waiters if w[0] > durable]
            capacity, self._capacity_waiters = self._capacity_waiters, []
            self._cond.notify_all()
        for loop, fut in ready + capacity:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # the waiting loop has been closed: nobody to tell
                pass
        if self._on_durable is not None:
            try:
                self._on_durable(durable)
            except Exception:
                log.exception("sink.on_durable_failed", seq=durable)

    # ---- spill files ----------------------------------------------------------------------

    def _spill_batch(self, batch: Batch) -> None:
        final, size = self._spill.write(batch)
        with self._cond:
            self._stats.spill_files = len(self._spill.files)
            self._stats.spill_bytes += size
            self._stats.spilled_rows += batch.size
        log.info("sink.spilled", rows=batch.size, file=final.name, spill_bytes=self._stats.spill_bytes)
        self._made_durable(batch.seq)

    def _replay_one(self) -> None:
        path = self._spill.oldest()
        try:
            batch = read_spill(path)
        except (OSError, ValueError) as ex:
            size = self._spill.files[path]
            bad = self._spill.quarantine(path)
            log.error("sink.spill_unreadable", file=str(path), moved_to=str(bad), error=str(ex))
            self._forget_spill(size)
            return
        try:
            self._insert(batch)
        except Exception as ex:
            self._failed(ex, replaying=path.name)
            self._mark_unhealthy()
            self._backoff = min(self._backoff * 2, self.config.retry_max_s)
            return
        self._mark_healthy()
        self._forget_spill(self._spill.remove(path))
        with self._cond:
            self._stats.replayed_rows += batch.size
            self._stats.written_rows += batch.size
            self._stats.insert_batches += 1
        log.info("sink.replayed", rows=batch.size, file=path.name, left=len(self._spill.files))

    def _forget_spill(self, size: int) -> None:
        with self._cond:
            self._stats.spill_bytes -= size
            self._stats.spill_files = len(self._spill.files)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future, ex: BaseException) -> None:
    if not fut.done():
        fut.set_exception(ex)
