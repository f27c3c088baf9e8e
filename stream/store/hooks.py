"""Trend snapshots into ClickHouse: a tick hook the app wires when it runs a sink.

`stream.app` builds one ResultSink per process (it owns a spill directory and, embedded,
the chdb data directory) and hands it to everything that stores results: the ranker, the
explainer and `SnapshotStore` below, whose `on_tick` method it adds to the trend worker's
tick hooks. The app drains and closes the sink last, after everything that submits to it
has stopped (stream.app's module doc has the shutdown order).

    SnapshotStore(sink).on_tick      # async (as_of_ms, signals): every active item's signals

stores every active item's signals at each tick in trail_trend_snapshots, which the
accuracy dashboard reads realised counts from.
"""

from __future__ import annotations

import asyncio

from stream.core.records import TrendSnapshot, to_tick
from stream.store.sink import ResultSink
from stream.core.trends import SIGNALS_VERSION, Signals

FEATURE_VERSION = f"signals-v{SIGNALS_VERSION}"


def snapshot_records(signals: Signals, feature_version: str = FEATURE_VERSION) -> list[TrendSnapshot]:
    tick = to_tick(signals.as_of_ms)
    names = signals.names
    return [TrendSnapshot(item, tick, dict(zip(names, row)), feature_version)
            for item, row in zip(signals.item_ids, signals.values.tolist())]


class SnapshotStore:
    """The tick hook that queues each tick's signals for trail_trend_snapshots through `sink`."""

    def __init__(self, sink: ResultSink, feature_version: str = FEATURE_VERSION) -> None:
        self.sink = sink
        self.feature_version = feature_version

    async def on_tick(self, as_of_ms: int, signals: Signals) -> None:
        """Waits only when the sink is full (back-pressure on the tick hooks, never on consumption)."""
        records = await asyncio.to_thread(snapshot_records, signals, self.feature_version)  # thousands: off the loop
        await self.sink.asubmit(records)
