"""The stream process's shared ResultSink, and a tick hook that stores trend snapshots.

One sink per process (it owns a spill directory and, embedded, the chdb data directory):
the scorer, the explainer and the hook below all submit through `shared_sink()`, which is
configured from the environment (StoreConfig.from_env, SinkConfig.from_env) on first use
and drained at interpreter exit (or by `close_shared_sink()` from a shutdown handler).

    TRAIL_TICK_HOOKS=stream.store.hooks:store_snapshots faust -A stream.app worker

stores every active item's signals at each tick in trail_trend_snapshots, which the
accuracy dashboard reads realised counts from.
"""

from __future__ import annotations

import asyncio
import atexit
import threading

from stream.core.records import TrendSnapshot, to_tick
from stream.store.sink import ResultSink, SinkConfig
from stream.store.clickhouse import StoreConfig
from stream.core.trends import SIGNALS_VERSION, Signals

FEATURE_VERSION = f"signals-v{SIGNALS_VERSION}"

_lock = threading.Lock()
_sink: ResultSink | None = None


def shared_sink() -> ResultSink:
    global _sink
    with _lock:
        if _sink is None:
            _sink = ResultSink(StoreConfig.from_env(), SinkConfig.from_env()).start()
            atexit.register(close_shared_sink)
        return _sink


def close_shared_sink(timeout: float | None = 60.0) -> bool:
    """Drain and stop the shared sink (True when everything was written or spilled)."""
    global _sink
    with _lock:
        sink, _sink = _sink, None
    return True if sink is None else sink.close(timeout)


def snapshot_records(signals: Signals, feature_version: str = FEATURE_VERSION) -> list[TrendSnapshot]:
    tick = to_tick(signals.as_of_ms)
    names = signals.names
    return [TrendSnapshot(item, tick, dict(zip(names, row)), feature_version)
            for item, row in zip(signals.item_ids, signals.values.tolist())]


async def store_snapshots(as_of_ms: int, signals: Signals) -> None:
    """Tick hook: queue this tick's signals for trail_trend_snapshots (waits only when the sink is full)."""
    records = await asyncio.to_thread(snapshot_records, signals)  # thousands of records: off the loop
    await shared_sink().asubmit(records)
