"""Online/offline parity: what the worker publishes from Kafka equals TrendTable over the same log.

Three weeks of real Online Retail II events stream through the broker (replayed on an
accelerated clock) into the worker (per partition, in poll-sized batches); every tick it
publishes, mid-stream or at the end, must equal the offline
computation (one table over the whole log) at the same as_of, exactly, both through
the tick hook and on the snapshot topic.
"""

from __future__ import annotations

import asyncio
import time

import pandas as pd
import pytest

from stream.tools.replay import replay
from stream.core.trends import TrendConfig
from stream.ingest.worker import TrendWorker
from worker_helpers import as_dict, fences, offline_signals, partition_of, read_snapshot, retail_slice, worker_config

pytestmark = pytest.mark.broker

CONFIGS = {
    "default": TrendConfig(),
    # 10-minute buckets and short windows: items go silent for a whole ring, expire and come
    # back (a new life) many times in three weeks, across poll boundaries.
    "short": TrendConfig(bucket_ms=600_000, windows=(("1h", 6), ("6h", 36)), ema_halflife_buckets=12,
                         allowed_lateness_ms=1_800_000),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_published_signals_equal_offline(broker, topics, tmp_path, name):
    trend = CONFIGS[name]
    events = retail_slice(days=21)
    fence, as_of = fences(int(events["ts"].iloc[-1]), topics.partitions, trend)
    log = pd.concat([events, fence], ignore_index=True)
    want = offline_signals(log, trend, as_of)
    assert len(want) > 300
    config = worker_config(broker, topics, tmp_path, trend=trend, max_poll_records=3000)
    seen: dict[int, object] = {}

    async def scenario():
        worker = TrendWorker(config)

        @worker.add_tick_hook
        async def collect(as_of_ms, signals):
            seen[as_of_ms] = signals

        await worker.start()
        run = asyncio.create_task(worker.run())
        # three weeks of history in ~2.5 s, so the worker ticks mid-stream
        speed = (int(log["ts"].iloc[-1]) - int(log["ts"].iloc[0])) / 1000 / 2.5
        await replay(log, None, broker, topics=topics, speed=speed, create_topics=False, progress=False)
        try:
            deadline = time.monotonic() + 60
            while as_of not in seen and time.monotonic() < deadline and not run.done():
                await asyncio.sleep(0.05)
        finally:
            await worker.stop()
            await run
        snapshot = await read_snapshot(broker, config.snapshots_topic, as_of, len(want))
        return worker.counters(), snapshot

    counters, snapshot = asyncio.run(scenario())
    assert as_of in seen, f"no tick at the fence's as_of; ticks: {sorted(seen)}"
    assert (counters.applied, counters.rejected, counters.late, counters.duplicates) == (len(log), 0, 0, 0)
    assert as_dict(seen[as_of]) == want
    assert {item: rec.signals for item, rec in snapshot.items()} == want
    per_partition = pd.Series([partition_of(i, topics.partitions) for i in want]).value_counts().to_dict()
    for item, rec in snapshot.items():
        assert rec.partition == partition_of(item, topics.partitions)
        assert rec.items == per_partition[rec.partition]
    # The ticks published mid-stream never change afterwards: each equals the offline value at its as_of.
    assert len(seen) >= 3 and list(seen) == sorted(seen)
    for t, signals in seen.items():
        assert t % trend.bucket_ms == 0 and t <= as_of
        assert as_dict(signals) == offline_signals(log[log["ts"] < t], trend, t), f"tick at {t} differs"
