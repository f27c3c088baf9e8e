"""The trend worker: trail.events -> per-partition TrendTables -> snapshots + tick hooks.

`stream.app` runs it inside `faust worker`; tests and the benchmark run it in-process.

Why not Faust agents and tables: an agent costs ~100 µs of Faust/asyncio machinery
per event and a Table `+= 1` with its changelog ~300 µs (issue #2 has the numbers,
`python -m stream.tools.bench` measures them again), and Faust's windowed tables lose
windows on rebalance. This worker owns one aiokafka consumer (its own group,
auto-commit off) and handles each poll as numpy batches.

Exactly-once state over at-least-once delivery:
- each partition's TrendTable skips offsets it has already handled;
- every tick (at most every `checkpoint_s`) the DLQ sends are awaited, then the
  changed tables are checkpointed (per partition a delta record appended to its
  log, or now and then a new snapshot; atomic either way, `last_offset` inside),
  then `last_offset + 1` is committed - commit only after the state is safe; the
  same happens for the partitions being revoked before a rebalance and on shutdown;
- on assignment a partition resumes from its checkpoint (seek to last_offset + 1)
  or, without one (another worker had it, or the disk was lost), is rebuilt from
  the beginning of the partition. A rebuild is exact only while the topic's
  retention covers the trend span (3 x the longest window + lateness: 84 days
  for the default 28-day window).
The committed offsets are for lag monitoring; positions come from the state itself.

Ticks: every `tick_s` wall seconds the worker computes `as_of`, the minimum over
its partitions of `TrendTable.closed_until_ms()` (an event-time bucket boundary no
accepted event can still change), and, when it advanced, the signals of every
owned partition at `as_of`. These equal the offline computation over the same
events. Ticks are withheld while an owned partition has not reported where its
log ends, or lags so far that another table no longer holds the window before
its `as_of` (a rebuild after a rebalance).

Extension point for the scorer: `TrendWorker.add_tick_hook(fn)` with
`async def fn(as_of_ms: int, signals: Signals) -> None`. Hooks run in order, in
their own task (never on the consume path), after the snapshot of that tick was
published; `signals` holds every active item of this worker's partitions (read-only:
the same arrays were just encoded into the snapshot). When the
hooks are slower than the ticks, only the newest pending tick is delivered (the
skipped ones are counted and logged). A hook that raises is logged and the next
one still runs. CPU-heavy hooks should use `asyncio.to_thread` / an executor:
the event loop is shared with the consumer. `worker.producer` (aiokafka) is there
for hooks that publish.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable, Iterable
from operator import attrgetter
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (CommitFailedError, IllegalStateError, KafkaError, NoOffsetForPartitionError,
                             OffsetOutOfRangeError)

from stream.ingest.config import WorkerConfig
from stream.core.events import DlqRecord, dlq_record, read_dlq_headers
from stream.core.mailbox import Mailbox
from stream.ingest.partitions import CheckpointStore, Counters, PartitionState
from stream.core.snapshots import encode_snapshot, iso_ms
from stream.topics import ensure_topics
from stream.core.trends import Signals, TrendTable

log = structlog.get_logger(__name__)

TickHook = Callable[[int, Signals], Awaitable[None]]

_offset, _key, _value = attrgetter("offset"), attrgetter("key"), attrgetter("value")

MAX_BATCH_BYTES = 512 * 1024
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a consumed record of any size can be forwarded to the DLQ


def consumer_settings(config: WorkerConfig) -> dict[str, Any]:
    """aiokafka consumer settings shared by the worker and the benchmark's raw-consume baseline.

    Fetch sizes stay at aiokafka's defaults: 4 or 16 MiB per partition and 20k records
    per poll measured no faster here (stream.tools.bench, 300k events, 4 partitions).
    """
    session_ms = int(config.session_timeout_s * 1000)
    return {
        "bootstrap_servers": config.bootstrap,
        "enable_auto_commit": False,
        "auto_offset_reset": "none",  # every position comes from the state (TrendWorker._position_lost)
        "session_timeout_ms": session_ms,
        "heartbeat_interval_ms": max(100, session_ms // 3),
        "max_poll_records": config.max_poll_records,
        **config.kafka.client_kwargs(),
    }


def load_hook(spec: str) -> TickHook:
    """`package.module:attribute` (e.g. from $TRAIL_TICK_HOOKS) -> the callable it names."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"tick hook {spec!r} cannot be loaded: {e}") from e
    if not callable(obj):
        raise ValueError(f"tick hook {spec!r} is not callable")
    return obj


class TrendWorker:
    """Consumes `config.topics.events` into per-partition trend tables; see the module doc."""

    def __init__(self, config: WorkerConfig, hooks: Iterable[TickHook] = ()) -> None:
        self.config = config
        self.topic = config.topics.events
        self.store = CheckpointStore(config.state_dir, self.topic, config.trend)
        self.parts: dict[int, PartitionState] = {}
        self._parked: dict[int, PartitionState] = {}  # revoked, kept until the assignment that follows
        self.retired = Counters()  # counters of partitions this worker no longer owns
        self.tick_hooks: list[TickHook] = list(hooks)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None  # also for hooks that publish
        self.last_as_of_ms: int | None = None
        self.ticks = 0
        self.ticks_published = 0
        self.ticks_skipped_by_hooks = 0
        self._lock = asyncio.Lock()
        self._stopping = False
        self._epoch = 0  # bumped by every assignment, see _on_assigned
        self.first_poll_at: float | None = None  # perf_counter of the first / latest handled poll
        self.last_poll_at: float | None = None
        self._run_done: asyncio.Event | None = None
        self._inflight: list[tuple[DlqRecord, asyncio.Future[Any]]] = []  # DLQ sends not yet acknowledged
        self.dlq_failed = 0
        self._checkpointed_at = -float("inf")
        self._ticks: Mailbox[tuple[int, dict[int, Signals]]] = Mailbox()  # latest tick for the hooks
        self._hook_task: asyncio.Task[None] | None = None
        self._dlq_partitions = 0
        self._ahead: dict[int, int] = {}  # partition -> ticks its state has been beyond the log's end

    def add_tick_hook(self, fn: TickHook) -> TickHook:
        """Register `async fn(as_of_ms, signals)` to run every published tick (usable as a decorator)."""
        if not callable(fn):
            raise TypeError(f"tick hook {fn!r} is not callable")
        self.tick_hooks.append(fn)
        return fn

    # ---- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        await asyncio.to_thread(self.store.prepare)
        specs = [s for s in cfg.topics.specs() if s.name in (cfg.topics.events, cfg.topics.dlq)]
        if cfg.publish_snapshots:
            specs.append(cfg.snapshot_spec())
        await ensure_topics(cfg.bootstrap, specs=specs, kafka=cfg.kafka)
        self.producer = AIOKafkaProducer(bootstrap_servers=cfg.bootstrap, acks="all", linger_ms=5,
                                         enable_idempotence=False, max_batch_size=MAX_BATCH_BYTES,
                                         max_request_size=MAX_REQUEST_BYTES, **cfg.kafka.client_kwargs())
        await self.producer.start()
        self._dlq_partitions = len(await self.producer.partitions_for(cfg.topics.dlq))
        self.consumer = AIOKafkaConsumer(group_id=cfg.group_id, **consumer_settings(cfg))
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        await self.consumer.start()
        self._ticks = Mailbox()  # of this event loop
        self._hook_task = asyncio.create_task(self._run_hooks(), name="trail-tick-hooks")
        log.info("worker.started", topic=self.topic, group=cfg.group_id, bootstrap=cfg.bootstrap,
                 state_dir=str(cfg.state_dir), tick_s=cfg.tick_s, hooks=len(self.tick_hooks))

    async def run(self) -> None:
        """Consume and tick until `stop()`."""
        self._run_done = asyncio.Event()
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.config.tick_s
        try:
            while not self._stopping:
                wait = min(0.5, max(0.0, next_tick - loop.time()))
                epoch = self._epoch
                try:
                    records = await self.consumer.getmany(timeout_ms=int(wait * 1000),
                                                          max_records=self.config.max_poll_records)
                except (OffsetOutOfRangeError, NoOffsetForPartitionError) as e:
                    async with self._lock:
                        await self._position_lost(e)
                    continue
                if records:
                    async with self._lock:
                        if epoch == self._epoch:
                            await self._handle(records)
                        else:  # polled across an assignment: may predate its seeks
                            await self._reseek(records)
                if loop.time() >= next_tick and not self._stopping:
                    await self.tick()
                    next_tick = loop.time() + self.config.tick_s
        finally:
            self._run_done.set()

    async def stop(self) -> None:
        """Checkpoint and commit everything, deliver the pending tick, close the clients."""
        self._stopping = True
        if self._run_done is not None:
            await self._run_done.wait()
        if self.consumer is not None:
            async with self._lock:
                await self._checkpoint(list(self.parts.values()))
        await self.stop_ticks(deliver_pending=True)
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None
        log.info("worker.stopped", **self.counters().as_dict())

    async def stop_ticks(self, deliver_pending: bool = False) -> None:
        """Run no more tick hooks: the tick being handled finishes, a pending one is delivered first
        (`deliver_pending`) or dropped. Consumption, checkpoints and commits go on until `stop()`.
        The app calls this first on shutdown, so that nothing it stops next gets another tick."""
        if self._hook_task is None:
            return
        if not deliver_pending and self._ticks.waiting is not None:
            log.info("tick.dropped_at_stop", as_of=iso_ms(self._ticks.discard()[0]))
        while not self._ticks.idle and not self._hook_task.done():
            await asyncio.sleep(0.01)
        self._hook_task.cancel()
        await asyncio.gather(self._hook_task, return_exceptions=True)
        self._hook_task = None

    # ---- consume path --------------------------------------------------------------
    async def _handle(self, records: dict[Any, list[Any]]) -> None:
        dead: list[tuple[int, Any]] = []
        now_ms = time.time_ns() // 1_000_000
        if self.first_poll_at is None:
            self.first_poll_at = time.perf_counter()
        for tp, msgs in records.items():
            st = self.parts.get(tp.partition)
            if st is None or tp.topic != self.topic:  # revoked while this poll was in hand
                continue
            for i, reason in st.ingest(list(map(_offset, msgs)), list(map(_key, msgs)), list(map(_value, msgs)),
                                       now_ms):
                m = msgs[i]
                dead.append((tp.partition, dlq_record(m.key, m.value, reason, topic=tp.topic, partition=tp.partition,
                                                      offset=m.offset, timestamp_ms=m.timestamp,
                                                      source_headers=list(m.headers or ()))))
        self.last_poll_at = time.perf_counter()
        for partition, rec in dead:
            # Stamped with the send time so that retention keeps it; the source time is in a header.
            try:
                fut = await self.producer.send(self.config.topics.dlq, value=rec.value, key=rec.key,
                                               partition=partition if partition < self._dlq_partitions else None,
                                               headers=rec.headers)
            except KafkaError as e:  # e.g. too large for the DLQ topic: a poison record must not stop us
                self._dlq_failed(rec, e)
                continue
            self._inflight.append((rec, fut))

    def _dlq_failed(self, rec: DlqRecord, error: BaseException) -> None:
        self.dlq_failed += 1
        ctx = read_dlq_headers(rec.headers)
        log.error("dlq.send_failed", reason=ctx.reason, partition=ctx.partition, offset=ctx.offset,
                  value_bytes=len(rec.value or b""), error=repr(error), total=self.dlq_failed)

    async def _seek_to_state(self, tp: TopicPartition, st: PartitionState) -> None:
        if st.table.last_offset >= 0:
            self.consumer.seek(tp, st.next_offset)
        else:
            await self.consumer.seek_to_beginning(tp)

    async def _reseek(self, records: dict[Any, list[Any]]) -> None:
        """Drop a poll and put its partitions back where their tables stand."""
        for tp in records:
            st = self.parts.get(tp.partition)
            if st is not None and tp.topic == self.topic:
                await self._seek_to_state(tp, st)

    async def _position_lost(self, error: OffsetOutOfRangeError | NoOffsetForPartitionError) -> None:
        """A table's next offset is not in the log (auto_offset_reset is off so that we decide)."""
        if isinstance(error, NoOffsetForPartitionError):  # polled before our seek: seek now
            tp = error.args[0]
            if tp.partition in self.parts and tp.topic == self.topic:
                await self._seek_to_state(tp, self.parts[tp.partition])
            return
        for tp in error.args[0]:
            st = self.parts.get(tp.partition)
            if st is None or tp.topic != self.topic:
                continue
            start = (await self.consumer.beginning_offsets([tp]))[tp]
            if st.next_offset < start:
                # Retention deleted records this table never read: they are gone for every reader.
                log.warning("partition.gap", partition=tp.partition, next_offset=st.next_offset, log_start=start)
                self.consumer.seek(tp, start)
            else:
                await self._rebuild(tp, st, reason="offset_out_of_range")

    async def _rebuild(self, tp: TopicPartition, st: PartitionState, reason: str) -> None:
        """The table's offsets are beyond the log (the topic was recreated or truncated under this
        state dir): they mean nothing here any more. Start the partition over from the log."""
        log.warning("partition.state_ahead_of_log", partition=tp.partition, next_offset=st.next_offset,
                    reason=reason)
        self.retired.add(st.counters)
        self._ahead.pop(tp.partition, None)
        fresh = self.parts[tp.partition] = PartitionState(tp.partition, TrendTable(self.config.trend),
                                                          self.config.validation)
        fresh.dirty = True  # replace the stale checkpoint at the next checkpoint
        await self.consumer.seek_to_beginning(tp)

    # ---- ticks -----------------------------------------------------------------------
    async def _as_of(self) -> int | None:
        """min closed_until over the owned partitions with data; None while a partition has not
        shown where its log ends (no fetch answered yet, events not read yet, state ahead of the log)."""
        closed = []
        ready = True
        for p, st in list(self.parts.items()):
            tp = TopicPartition(self.topic, p)
            hw = self.consumer.highwater(tp)
            if hw is None:
                ready = False
                continue
            if st.next_offset > hw:
                # State beyond the log's end: the topic was recreated under this state dir (Kafka
                # answers OffsetOutOfRange, see _position_lost; not every broker does). Twice in a
                # row, so that a new leader's briefly lagging high-water mark is no reason.
                self._ahead[p] = self._ahead.get(p, 0) + 1
                if self._ahead[p] >= 2:
                    await self._rebuild(tp, st, reason="high_water_below_state")
                ready = False
                continue
            self._ahead.pop(p, None)
            c = st.table.closed_until_ms()
            if c is not None:
                closed.append(c)
            elif await self.consumer.position(tp) < hw:
                ready = False  # holds events not read yet
        return min(closed) if ready and closed else None

    async def tick(self) -> int | None:
        """One tick: signals at the new as_of (if it advanced), expiry, checkpoint, commit. Returns as_of."""
        published = None
        async with self._lock:
            self.ticks += 1
            as_of = await self._as_of()
            if as_of is not None and (self.last_as_of_ms is None or as_of > self.last_as_of_ms):
                try:
                    parts = {p: st.table.signals_at(as_of) for p, st in sorted(self.parts.items())
                             if st.table.head_bucket is not None}
                except ValueError as e:  # a lagging partition's as_of is older than another table keeps
                    log.info("tick.withheld", as_of=iso_ms(as_of), reason=str(e))
                else:
                    self.last_as_of_ms = published = as_of
                    self.ticks_published += 1
                    self._offer(as_of, parts)
            expired = sum(st.table.expire() for st in self.parts.values())
            now = time.monotonic()
            if now - self._checkpointed_at >= self.config.checkpoint_s:
                await self._checkpoint(list(self.parts.values()))
                self._checkpointed_at = now
        c = self.counters()
        log.info("tick", as_of=None if published is None else iso_ms(published),
                 last_as_of=None if self.last_as_of_ms is None else iso_ms(self.last_as_of_ms),
                 partitions=sorted(self.parts),
                 expired=expired, items=sum(len(st.table) for st in self.parts.values()),
                 dlq_failed=self.dlq_failed, **c.as_dict())
        return published

    def _offer(self, as_of: int, parts: dict[int, Signals]) -> None:
        if self._hook_task is None:  # stop_ticks() was called: no hook runs any more
            return
        skipped = self._ticks.put((as_of, parts))
        if skipped is not None:
            self.ticks_skipped_by_hooks += 1
            log.warning("tick.hooks_behind", skipped_as_of=iso_ms(skipped[0]),
                        skipped_total=self.ticks_skipped_by_hooks)

    async def _run_hooks(self) -> None:
        names = self.config.trend.signal_names
        while True:
            as_of, parts = await self._ticks.get()
            try:
                if self.config.publish_snapshots:
                    await self._publish_snapshot(parts)
                signals = Signals.concat(list(parts.values()), as_of, names)
                for hook in list(self.tick_hooks):
                    try:
                        await hook(as_of, signals)
                    except Exception:  # noqa: BLE001 - one failing hook must not stop the others or the worker
                        log.exception("tick.hook_failed", hook=getattr(hook, "__qualname__", repr(hook)),
                                      as_of=iso_ms(as_of))
            except Exception:  # noqa: BLE001 - e.g. the snapshot topic is unreachable; the next tick retries
                log.exception("tick.publish_failed", as_of=iso_ms(as_of))
            finally:
                self._ticks.task_done()

    async def _publish_snapshot(self, parts: dict[int, Signals]) -> None:
        topic = self.config.snapshots_topic
        futures = []
        for partition, signals in parts.items():
            batch = self.producer.create_batch()
            for key, value in encode_snapshot(signals, partition):
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await self.producer.send_batch(batch, topic, partition=partition))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            if batch.record_count():
                futures.append(await self.producer.send_batch(batch, topic, partition=partition))
            await asyncio.sleep(0)  # let the consumer run between partitions
        await asyncio.gather(*futures)

    # ---- state -----------------------------------------------------------------------
    async def _checkpoint(self, states: list[PartitionState]) -> None:
        """DLQ sends acknowledged -> changed tables on disk -> offsets committed. Caller holds the lock."""
        if self._inflight:
            inflight, self._inflight = self._inflight, []
            results = await asyncio.gather(*(fut for _, fut in inflight), return_exceptions=True)
            for (rec, _), result in zip(inflight, results):
                if isinstance(result, BaseException):
                    self._dlq_failed(rec, result)
        dirty = [st for st in states if st.dirty]
        if not dirty:
            return
        await asyncio.to_thread(self._save, dirty)
        for st in dirty:
            st.dirty = False
        await self._commit({st.partition: st.next_offset for st in dirty})

    def _save(self, states: list[PartitionState]) -> None:
        for st in states:
            self.store.save(st.partition, st.table)

    async def _commit(self, offsets: dict[int, int]) -> None:
        try:
            await self.consumer.commit({TopicPartition(self.topic, p): o for p, o in offsets.items()})
        except (CommitFailedError, IllegalStateError) as e:
            # The state is on disk already; the commit only serves lag monitoring.
            log.warning("commit.failed", offsets=offsets, error=str(e))

    async def _on_revoked(self, revoked: set[Any]) -> None:
        async with self._lock:
            states = [self.parts.pop(tp.partition) for tp in revoked
                      if tp.topic == self.topic and tp.partition in self.parts]
            await self._checkpoint(states)
            for st in states:
                self._parked[st.partition] = st
        log.info("partitions.revoked", partitions=sorted(st.partition for st in states))

    async def _on_assigned(self, assigned: set[Any]) -> None:
        async with self._lock:
            source = {}
            for tp in sorted(assigned):
                if tp.topic != self.topic:
                    continue
                p = tp.partition
                st = self._parked.pop(p, None)
                if st is not None:
                    source[p] = "memory"
                else:
                    table = await asyncio.to_thread(self.store.load, p)
                    source[p] = "checkpoint" if table is not None else "rebuild"
                    st = PartitionState(p, table or TrendTable(self.config.trend), self.config.validation)
                self.parts[p] = st
                await self._seek_to_state(tp, st)
            for st in self._parked.values():
                self.retired.add(st.counters)
            self._parked.clear()
            # A poll begun before this point may hold records fetched from the group's
            # committed offsets (not where our tables stand): the main loop drops it.
            self._epoch += 1
        log.info("partitions.assigned", partitions=sorted(self.parts), source=source,
                 offsets={p: st.next_offset for p, st in sorted(self.parts.items())})

    # ---- introspection --------------------------------------------------------------
    def counters(self) -> Counters:
        total = Counters()
        total.add(self.retired)
        for st in list(self.parts.values()) + list(self._parked.values()):
            total.add(st.counters)
        return total


class _Listener(ConsumerRebalanceListener):
    def __init__(self, worker: TrendWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        await self.worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        await self.worker._on_assigned(assigned)
