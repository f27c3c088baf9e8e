"""The idiomatic Faust way of counting events, for `python -m stream.tools.bench` to compare against.

    faust -A stream.tools.bench_faust worker --without-web      # started by stream.tools.bench, configured by env

One agent over the events topic doing, per event, `counts[item] += 1` on a Table
and `hopping[item] += 1` on a hopping windowed Table (1 h windows every 10 min,
by record time), both with their changelogs, as the Faust docs teach. After
$TRAIL_BENCH_EVENTS events it writes {"events", "seconds", "first_event_at"} to
$TRAIL_BENCH_RESULT (seconds from the first event to the last) and keeps idling
until the bench stops it.

Environment: the broker and its security from stream.settings (KAFKA_*); TRAIL_BENCH_TOPIC,
TRAIL_BENCH_EVENTS, TRAIL_BENCH_RESULT, TRAIL_BENCH_APP_ID, TRAIL_BENCH_PARTITIONS and
TRAIL_BENCH_DATADIR are set by stream.tools.bench for this process only (not settings).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import faust
import orjson

from stream.settings import load_settings

_env = os.environ
_worker = load_settings().worker
TARGET = int(_env.get("TRAIL_BENCH_EVENTS", "10000"))
RESULT = Path(_env.get("TRAIL_BENCH_RESULT", "faust-bench.json"))
PARTITIONS = int(_env.get("TRAIL_BENCH_PARTITIONS", "4"))

app = faust.App(
    _env.get("TRAIL_BENCH_APP_ID", "trail-bench-faust"),
    broker=_worker.faust_broker,
    broker_credentials=_worker.kafka.faust_credentials(),
    store="memory://",
    topic_partitions=PARTITIONS,
    broker_session_timeout=3.0,
    broker_heartbeat_interval=1.0,
    consumer_auto_offset_reset="earliest",
    datadir=_env.get("TRAIL_BENCH_DATADIR", "/tmp/trail-bench-faust"),
    web_enabled=False,
)
events = app.topic(_env.get("TRAIL_BENCH_TOPIC", "trail.events"), key_type=bytes, value_type=bytes,
                   key_serializer="raw", value_serializer="raw", partitions=PARTITIONS)
counts = app.Table("item_counts", default=int, partitions=PARTITIONS)
hopping = app.Table("item_counts_hopping", default=int, partitions=PARTITIONS).hopping(
    size=timedelta(hours=1), step=timedelta(minutes=10), expires=timedelta(hours=2)).relative_to_stream()

_seen = 0
_first: float | None = None


@app.agent(events)
async def count(stream: faust.StreamT) -> None:
    global _seen, _first
    async for value in stream:
        if _first is None:
            _first = time.perf_counter()
        item = orjson.loads(value)["item_id"]
        counts[item] += 1
        hopping[item] += 1
        _seen += 1
        if _seen == TARGET:
            tmp = RESULT.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps({"events": _seen, "seconds": time.perf_counter() - _first}))
            tmp.replace(RESULT)
