"""ResultSink on the embedded engine: batching, durability reporting, spill and replay, back-pressure."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from stream.core.records import Explanation, Prediction, RecordError, TrendSnapshot
from stream.store.sink import ResultSink, SinkClosed, SinkConfig, SinkFull, SpillDirInUse
from stream.settings import SettingsError, load_settings
from stream.store.clickhouse import StoreConfig, connect

T0 = datetime(2011, 12, 1, tzinfo=timezone.utc)


def predictions(n: int, tick: datetime = T0, offset: int = 0) -> list[Prediction]:
    return [Prediction(f"item{i + offset}", tick, 1.0 / (i + 1), float(n - i), i + 1,
                       {"count_7d": float(n - i), "users_7d": 1.0}, "m1") for i in range(n)]


def explanations(n: int, tick: datetime = T0) -> list[Explanation]:
    return [Explanation(f"item{i}", tick, i + 1, f"item{i} sold {n - i} units in 7 days.", True, 1, "m1")
            for i in range(n)]


def dead_url() -> str:
    """An http URL on which nothing listens: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def count_final(config: StoreConfig, table: str) -> int:
    client = connect(config)
    try:
        return client.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0]
    finally:
        client.close()


@pytest.fixture
def embedded(tmp_path) -> StoreConfig:
    return StoreConfig(path=tmp_path / "clickhouse")


def test_flushes_by_size_and_by_time(embedded, tmp_path):
    cfg = SinkConfig(batch_rows=100, flush_interval_s=0.6, spill_dir=tmp_path / "spill")
    with ResultSink(embedded, cfg) as sink:
        start = time.monotonic()
        seq = sink.submit(predictions(150))  # over batch_rows: written without waiting for the timer
        assert sink.wait_durable_sync(seq, timeout=20)
        assert sink.stats().insert_batches == 1

        seq = sink.submit(predictions(3, tick=T0 + timedelta(hours=1)))
        submitted = time.monotonic()
        while sink.durable_seq < seq:  # no flush(): only the timer may write these
            assert time.monotonic() - submitted < 20, "time-based flush never happened"
            time.sleep(0.02)
        assert time.monotonic() - submitted >= 0.5
        assert sink.stats().insert_batches == 2
        assert time.monotonic() - start < 30
    stats = sink.stats()
    assert (stats.submitted_rows, stats.written_rows, stats.spilled_rows, stats.buffered_rows) == (153, 153, 0, 0)
    assert count_final(embedded, "trail_predictions") == 153


def test_async_api_reports_durability_in_order(embedded, tmp_path):
    seen: list[int] = []
    cfg = SinkConfig(batch_rows=10_000, flush_interval_s=0.2, spill_dir=tmp_path / "spill")

    async def main() -> tuple[int, int]:
        sink = ResultSink(embedded, cfg, on_durable=seen.append).start()
        try:
            s1 = await sink.asubmit(predictions(40))
            s2 = await sink.asubmit(explanations(10))
            s3 = await sink.asubmit([TrendSnapshot(f"item{i}", T0, {"count_7d": float(i)}) for i in range(40)])
            assert (s1, s2, s3) == (1, 2, 3)
            await sink.wait_durable(s3, timeout=20)
            assert sink.durable_seq >= s3
            await sink.wait_durable(s1, timeout=1)  # already durable: returns at once
            return s3, sink.stats().written_rows
        finally:
            sink.close()

    last, written = asyncio.run(main())
    assert written == 90
    assert seen and seen == sorted(seen) and seen[-1] == last
    assert [count_final(embedded, t) for t in ("trail_predictions", "trail_explanations", "trail_trend_snapshots")] \
        == [40, 10, 40]


def test_store_down_spills_to_disk_and_a_restart_replays_exactly_once(embedded, tmp_path):
    spill = tmp_path / "spill"
    down = StoreConfig(url=dead_url())
    cfg = SinkConfig(flush_interval_s=0.05, spill_after_s=0.3, retry_initial_s=0.05, retry_max_s=0.2, spill_dir=spill)
    with ResultSink(down, cfg) as sink:
        s1 = sink.submit(predictions(500))
        assert sink.wait_durable_sync(s1, timeout=20), "spilled records must count as durable"
        s2 = sink.submit(explanations(20))  # the store is known down: straight to disk
        assert sink.wait_durable_sync(s2, timeout=20)
        stats = sink.stats()
        assert stats.spilled_rows == 520 and stats.written_rows == 0 and not stats.store_healthy
        assert stats.failed_attempts >= 1 and "refused" in (stats.last_error or "").lower()
    assert len(list(spill.glob("*.jsonl"))) == 2

    # a new process (here: a new sink) on the same spill directory writes them into the store
    with ResultSink(embedded, SinkConfig(spill_dir=spill)) as sink:
        assert sink.stats().spill_files == 2
        assert sink.wait_idle(timeout=30)
        stats = sink.stats()
        assert stats.replayed_rows == 520 and stats.spill_files == 0 and stats.spill_bytes == 0
    assert list(spill.glob("*.jsonl")) == []
    assert count_final(embedded, "trail_predictions") == 500
    assert count_final(embedded, "trail_explanations") == 20


def test_back_pressure_when_the_store_is_down_and_spilling_is_off(tmp_path):
    cfg = SinkConfig(flush_interval_s=0.05, max_buffer_rows=100, max_spill_bytes=0, retry_initial_s=0.05,
                     retry_max_s=0.1, spill_dir=tmp_path / "spill")
    sink = ResultSink(StoreConfig(url=dead_url()), cfg).start()
    try:
        seq = sink.submit(predictions(60))
        with pytest.raises(SinkFull, match="max_buffer_rows=100"):
            sink.submit(predictions(60, offset=60))
        sink.submit(predictions(40, offset=60))  # fits exactly

        async def blocked() -> None:
            await asyncio.wait_for(sink.asubmit(predictions(5, offset=100)), timeout=0.5)

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(blocked())
        assert not sink.wait_durable_sync(seq, timeout=0.3)
        assert sink.durable_seq == 0 and sink.stats().buffered_rows == 100
    finally:
        # nothing can be written or spilled: close gives up, nothing was reported durable
        assert sink.close(timeout=0.5) is False
    assert list((tmp_path / "spill").glob("*.jsonl")) == []


def test_one_sink_per_spill_directory(embedded, tmp_path):
    cfg = SinkConfig(spill_dir=tmp_path / "spill")
    first = ResultSink(embedded, cfg).start()
    try:
        with pytest.raises(SpillDirInUse, match="TRAIL_SINK_SPILL_DIR"):
            ResultSink(embedded, cfg).start()
    finally:
        first.close()
    ResultSink(embedded, cfg).start().close()  # free again once the first one has stopped


def test_unreadable_and_unfinished_spill_files(embedded, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "00000000000000000001-1-deadbeef.jsonl").write_bytes(b'{"table": "trail_predictions", "rec')
    (spill / "00000000000000000002-1-cafe.jsonl.tmp").write_bytes(b"half written, never acknowledged")
    with ResultSink(embedded, SinkConfig(spill_dir=spill)) as sink:
        assert sink.wait_idle(timeout=30)
        assert sink.flush(timeout=5)
    assert not list(spill.glob("*.tmp"))
    assert [p.name for p in (spill / "bad").iterdir()] == ["00000000000000000001-1-deadbeef.jsonl"]


def test_misuse_is_reported(embedded, tmp_path):
    sink = ResultSink(embedded, SinkConfig(spill_dir=tmp_path / "spill"))
    with pytest.raises(SinkClosed, match="call start"):
        sink.submit(predictions(1))
    sink.start()
    with pytest.raises(RecordError, match="got dict"):
        sink.submit([{"item_id": "a"}])
    assert sink.submit([]) == 0
    sink.close()
    with pytest.raises(SinkClosed, match="after close"):
        sink.submit(predictions(1))
    with pytest.raises(ValueError, match="batch_rows must be > 0"):
        SinkConfig(batch_rows=0)
    config = load_settings({"TRAIL_SINK_BATCH_ROWS": "7", "TRAIL_SINK_SPILL_DIR": "/x"}).sink
    assert config.batch_rows == 7 and config.spill_dir == Path("/x")
    with pytest.raises(SettingsError, match="TRAIL_SINK_FLUSH_INTERVAL_S='soon': must be seconds > 0"):
        load_settings({"TRAIL_SINK_FLUSH_INTERVAL_S": "soon"})
    with pytest.raises(SettingsError, match="TRAIL_SINK_BATCH_ROWS='0'"):
        load_settings({"TRAIL_SINK_BATCH_ROWS": "0"})


def test_tick_hook_stores_trend_snapshots_through_the_sink(tmp_path):
    import numpy as np

    from stream.store import hooks as sink_hooks
    from stream.core.trends import Signals

    names = ("count_7d", "users_7d")
    as_of = 1_322_697_600_000  # 2011-12-01T00:00Z
    signals = Signals(as_of, ["a", "b", "c"], names, np.array([[3.0, 2.0], [1.0, 1.0], [0.0, 0.0]]))
    sink = ResultSink(StoreConfig(path=tmp_path / "clickhouse"),
                      SinkConfig(flush_interval_s=0.05, spill_dir=tmp_path / "spill")).start()
    try:
        asyncio.run(sink_hooks.SnapshotStore(sink).on_tick(as_of, signals))
    finally:
        assert sink.close(timeout=30)
    config = StoreConfig(path=tmp_path / "clickhouse")
    client = connect(config)
    try:
        rows = client.query("SELECT item_id, tick, model_version, signals FROM trail_trend_snapshots FINAL "
                            "ORDER BY item_id").result_rows
    finally:
        client.close()
    assert rows == [(i, datetime(2011, 12, 1), sink_hooks.FEATURE_VERSION, dict(zip(names, v)))
                    for i, v in zip("abc", signals.values.tolist())]
