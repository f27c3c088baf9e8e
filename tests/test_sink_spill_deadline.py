"""The sink's outage policy, timed: spilling begins within `spill_after_s` of the first failed write,
measured as the issue measured it, with the store's HTTP server (the real ClickHouse engine behind
ClickHouse's HTTP interface) killed. Before the fix the deadline was only checked after each retry's
back-off, so a back-off that ended past it (here 2 s, then 4 s) spilled at ~6 s instead of 3 s."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from structlog.testing import capture_logs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clickhouse_http import ClickHouseHTTPProcess  # noqa: E402

from stream.core.records import Prediction  # noqa: E402
from stream.store.clickhouse import StoreConfig  # noqa: E402
from stream.store.sink import ResultSink, SinkConfig  # noqa: E402

T0 = datetime(2011, 12, 9, tzinfo=timezone.utc)


def predictions(n: int, tick: datetime = T0) -> list[Prediction]:
    return [Prediction(f"item{i}", tick, 1.0 - i / n, float(n - i), i + 1, {"count_7d": float(n - i)}, "m1")
            for i in range(n)]


def test_spilling_begins_within_spill_after_s_of_the_first_failed_write(tmp_path):
    spill_after = 3.0
    cfg = SinkConfig(flush_interval_s=0.05, spill_after_s=spill_after, retry_initial_s=2.0, retry_max_s=30.0,
                     spill_dir=tmp_path / "spill")
    with ClickHouseHTTPProcess(tmp_path / "server") as srv:
        config = StoreConfig(url=srv.url, connect_timeout_s=2)
        with ResultSink(config, cfg) as sink:
            assert sink.wait_durable_sync(sink.submit(predictions(5)), timeout=30)  # healthy first
            srv.kill()  # the outage: every write from now on fails at once (connection refused)
            with capture_logs() as logs:
                t0 = time.monotonic()
                seq = sink.submit(predictions(50, T0.replace(hour=1)))
                assert sink.wait_durable_sync(seq, timeout=30)
                spilled_after = time.monotonic() - t0
            stats = sink.stats()
    events = [e["event"] for e in logs]
    assert stats.spilled_rows == 50 and stats.spill_files == 1, stats
    assert events.count("sink.store_error") >= 2  # it did retry before spilling
    assert "sink.store_down_spilling" in events and "sink.spilled" in events
    # the first failed write comes right after the flush interval; the spill at its deadline, not ~6 s
    assert spill_after - 0.2 <= spilled_after < spill_after + 1.0, spilled_after
