"""Publish a historical event log to Kafka: items to `trail.items`, events to `trail.events`.

    python -m stream.tools.replay --dataset retail --bootstrap 127.0.0.1:9092
    python -m stream.tools.replay --events log.csv --items items.csv --bootstrap ... --speed 3600

Events go out in timestamp order, keyed by item_id (Kafka's default murmur2
partitioner, so any client agrees on an item's partition), as fast as possible or on
an accelerated clock (`--speed 3600`: one hour of history per second). Records are
built into per-partition batches directly (aiokafka `create_batch`/`send_batch`):
one `send()` per event costs ~12 µs of Python, a batch append a fraction of that.

Record timestamps are the publish time by default; the event time is in the value.
Kafka's time-based retention reads record timestamps, so stamping a 2010 log with
its event times (`--record-time event`) gets it deleted by a real broker.

The loaders (stream.core.datasets, pandas) are imported lazily by the CLI only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import structlog

from stream.topics import Topics, ensure_topics
from stream.kafka import KafkaSecurity

log = structlog.get_logger(__name__)

MAX_BATCH_BYTES = 512 * 1024
TICK_S = 0.01  # an accelerated replay sends what is due within the next tick in one go


@dataclass(frozen=True, slots=True)
class ReplayStats:
    events: int
    items: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else math.inf


def _partition_for(key: bytes, n: int) -> int:
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % n  # Kafka's DefaultPartitioner for keyed records


def _item_values(items: Any) -> list[tuple[bytes, bytes]]:
    out = []
    cols = [c for c in ("item_id", "title", "category", "price", "description") if c in items.columns]
    for row in items[cols].itertuples(index=False, name=None):
        rec = {}
        for c, v in zip(cols, row):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            rec[c] = v
        out.append((str(rec["item_id"]).encode(), orjson.dumps(rec)))
    return out


class _PartitionedSender:
    """Appends records to one open batch per partition and ships a batch when it is full."""

    def __init__(self, producer: Any, topic: str, n_partitions: int) -> None:
        self.producer = producer
        self.topic = topic
        self.n = n_partitions
        self.open: dict[int, Any] = {}
        self.futures: list[asyncio.Future[Any]] = []
        self._keys: dict[str, tuple[bytes, int]] = {}

    def key(self, item_id: str) -> tuple[bytes, int]:
        kp = self._keys.get(item_id)
        if kp is None:
            k = item_id.encode()
            kp = self._keys[item_id] = (k, _partition_for(k, self.n))
        return kp

    async def append(self, key: bytes, partition: int, value: bytes, timestamp_ms: int | None) -> None:
        batch = self.open.get(partition)
        if batch is None:
            batch = self.open[partition] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=timestamp_ms) is None:
            await self._ship(partition, batch)
            batch = self.open[partition] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=timestamp_ms) is None:
                raise ValueError(f"a record of {len(value)} bytes does not fit in an empty batch")

    async def _ship(self, partition: int, batch: Any) -> None:
        self.futures.append(await self.producer.send_batch(batch, self.topic, partition=partition))
        if len(self.futures) >= 256:  # surface delivery errors early and keep the list short
            done = [f for f in self.futures if f.done()]
            for f in done:
                f.result()
            self.futures = [f for f in self.futures if not f.done()]

    async def flush(self) -> None:
        for partition, batch in list(self.open.items()):
            if batch.record_count():
                await self._ship(partition, batch)
        self.open.clear()
        if self.futures:
            await asyncio.gather(*self.futures)
        self.futures = []


async def replay(
    events: Any,
    items: Any | None,
    bootstrap: str,
    *,
    topics: Topics | None = None,
    speed: float | None = None,
    limit: int | None = None,
    record_time: str = "now",
    create_topics: bool = True,
    progress: bool = True,
    kafka: KafkaSecurity | None = None,
) -> ReplayStats:
    """Publish `items` (item table) then `events` (event frame, sorted here by ts)."""
    from aiokafka import AIOKafkaProducer

    if record_time not in ("now", "event"):
        raise ValueError(f"record_time must be 'now' or 'event', not {record_time!r}")
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0 (or None for as fast as possible), not {speed}")
    topics = topics or Topics()
    if create_topics:
        await ensure_topics(bootstrap, topics, kafka=kafka)
    order = np.argsort(events["ts"].to_numpy(dtype=np.int64), kind="stable")
    if limit is not None:
        order = order[:limit]
    ev = events.iloc[order]
    item_ids = ev["item_id"].tolist()
    users = ev["user_id"].tolist() if "user_id" in ev else [None] * len(ev)
    ts = ev["ts"].to_numpy(dtype=np.int64)
    ts_list = ts.tolist()
    etypes = ev["event_type"].tolist() if "event_type" in ev else ["view"] * len(ev)
    weights = ev["weight"].to_numpy(dtype=np.float64).tolist() if "weight" in ev else [1.0] * len(ev)
    n = len(ev)

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_batch_size=MAX_BATCH_BYTES,
                                max_request_size=2 * MAX_BATCH_BYTES, enable_idempotence=False,
                                request_timeout_ms=30_000, **(kafka.client_kwargs() if kafka else {}))
    await producer.start()
    t0 = time.perf_counter()
    n_items = 0
    try:
        if items is not None and len(items):
            parts = await producer.partitions_for(topics.items)
            isend = _PartitionedSender(producer, topics.items, len(parts))
            for key, value in _item_values(items):
                await isend.append(key, _partition_for(key, len(parts)), value, None)
                n_items += 1
            await isend.flush()
        parts = await producer.partitions_for(topics.events)
        send = _PartitionedSender(producer, topics.events, len(parts))
        open_batches = send.open
        use_event_time = record_time == "event"
        dumps = orjson.dumps
        bar = _progress(n, progress)
        clock0 = time.monotonic()
        due = (ts - ts[0]) / (speed * 1000.0) if (speed and n) else None
        i = 0
        chunk = 5000
        while i < n:
            if due is None:
                j = min(n, i + chunk)
            else:
                now = time.monotonic() - clock0
                if due[i] > now:
                    await asyncio.sleep(due[i] - now)
                    now = time.monotonic() - clock0
                j = min(int(np.searchsorted(due, now + TICK_S, side="right")), i + chunk)
                j = max(j, i + 1)
            for k in range(i, j):
                item = item_ids[k]
                rec = {"item_id": item, "ts": ts_list[k], "event_type": etypes[k], "weight": weights[k]}
                user = users[k]
                if user is not None:
                    rec["user_id"] = user
                key, part = send.key(item)
                value = dumps(rec)
                stamp = ts_list[k] if use_event_time else None
                batch = open_batches.get(part)
                # the common case stays synchronous; a new or full batch takes the awaited path
                if batch is None or batch.append(key=key, value=value, timestamp=stamp) is None:
                    await send.append(key, part, value, stamp)
            bar.update(j - i)
            i = j
            if due is not None:  # on a clock, what is due goes out now rather than after linger
                await send.flush()
        await send.flush()
        bar.close()
    finally:
        await producer.stop()
    stats = ReplayStats(n, n_items, time.perf_counter() - t0)
    log.info("replay.done", events=stats.events, items=stats.items, seconds=round(stats.seconds, 3),
             events_per_s=round(stats.events_per_s), topic=topics.events)
    return stats


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, desc="replay", mininterval=0.5, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from stream.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(
        prog="python -m stream.tools.replay",
        description="Publish a historical event log to Kafka (items first, then events in timestamp order).")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["retail", "ml100k"], help="a built-in dataset")
    src.add_argument("--events", metavar="PATH", help="CSV/TSV/Parquet/JSONL event log (item_id, ts, ...)")
    ap.add_argument("--items", metavar="PATH", help="item table for --events (item_id, title, category, ...)")
    ap.add_argument("--bootstrap", default=settings.worker.bootstrap,
                    help="Kafka bootstrap HOST:PORT (default: $KAFKA_BOOTSTRAP, else %(default)s)")
    ap.add_argument("--speed", type=float, default=None,
                    help="history seconds per wall second (3600 = an hour per second); default: as fast as possible")
    ap.add_argument("--limit", type=int, default=None, help="publish only the first N events (in time order)")
    ap.add_argument("--topic", default=None, help="events topic (default: $TRAIL_EVENTS_TOPIC or trail.events)")
    ap.add_argument("--items-topic", default=None, help="items topic (default: $TRAIL_ITEMS_TOPIC or trail.items)")
    ap.add_argument("--no-items", action="store_true", help="do not publish the item table")
    ap.add_argument("--record-time", choices=["now", "event"], default="now",
                    help="Kafka record timestamp: publish time (default) or the event's own time")
    ap.add_argument("--no-create-topics", action="store_true", help="do not create missing topics first")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    # stdout carries the result (scripts read it); logs go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.items and not args.events:
        ap.error("--items goes with --events")
    if args.limit is not None and args.limit < 0:
        ap.error("--limit must be >= 0")
    if args.speed is not None and not args.speed > 0:
        ap.error("--speed must be > 0")

    from stream.core.datasets import DatasetError, load_dataset

    try:
        ds = load_dataset(args.dataset or args.events, args.items, cache_dir=settings.cache_dir)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configured = settings.worker.topics
    topics = dataclasses.replace(configured, events=args.topic or configured.events,
                                 items=args.items_topic or configured.items)
    stats = asyncio.run(replay(ds.events, None if args.no_items else ds.items, args.bootstrap, topics=topics,
                               speed=args.speed, limit=args.limit, record_time=args.record_time,
                               create_topics=not args.no_create_topics, progress=not args.quiet,
                               kafka=settings.worker.kafka))
    print(f"published {stats.items:,} items to {topics.items} and {stats.events:,} events to {topics.events} "
          f"in {stats.seconds:.2f} s ({stats.events_per_s:,.0f} events/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
