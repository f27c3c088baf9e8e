"""The store over real HTTP: clickhouse-connect's HTTP client against ClickHouse's HTTP interface
answered by the real engine (tests/clickhouse_http.py runs chdb in a child process).

Same sink code as the embedded path, with lz4 compression on and off, authentication, and an
outage: the server is killed mid-run and started again, and every record lands exactly once.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clickhouse_http import ClickHouseHTTPProcess  # noqa: E402

from stream.core.records import Explanation, Prediction  # noqa: E402
from stream.store.sink import ResultSink, SinkConfig  # noqa: E402
from stream.store.clickhouse import StoreConfig, connect  # noqa: E402

USER, PASSWORD = "trail", "s3cret"
T0 = datetime(2011, 11, 1, tzinfo=timezone.utc)


@pytest.fixture
def server(tmp_path):
    srv = ClickHouseHTTPProcess(tmp_path / "server-data", user=USER, password=PASSWORD).start()
    yield srv
    srv.stop()


def http_config(srv: ClickHouseHTTPProcess, compress: bool | str = True) -> StoreConfig:
    return StoreConfig(url=srv.url, user=USER, password=PASSWORD, compress=compress, connect_timeout_s=2,
                       send_receive_timeout_s=10)


def tick_predictions(tick_no: int, n: int) -> list[Prediction]:
    tick = T0 + timedelta(hours=tick_no)
    return [Prediction(f"sku-{i:05d}", tick, 1.0 / (i + 1 + tick_no), float(n - i), i + 1,
                       {"count_7d": float(n - i), "velocity_7d": float(tick_no % 5 - 2)}, "trail-v1")
            for i in range(n)]


@pytest.mark.parametrize("compress", [True, False], ids=["lz4", "uncompressed"])
def test_sink_writes_over_http(server, tmp_path, compress):
    config = http_config(server, compress)
    long_text = ("Café crème ↑: {n} orders in the last 7 days, up from {p} the week before; "
                 "the fastest riser in its category. ") * 3
    preds = tick_predictions(0, 20_000)
    expls = [Explanation(p.item_id, p.tick, p.rank, long_text.format(n=i, p=i // 2), i % 7 != 0, 3, p.model_version)
             for i, p in enumerate(preds)]
    with ResultSink(config, SinkConfig(batch_rows=50_000, spill_dir=tmp_path / "spill")) as sink:
        seq = sink.submit(preds + expls)
        assert sink.wait_durable_sync(seq, timeout=60)
        assert sink.stats().spilled_rows == 0

    client = connect(config)
    try:
        got = client.query("SELECT count(), sum(rank), sum(signals['count_7d']) FROM trail_predictions FINAL").result_rows
        assert got == [(20_000, sum(range(1, 20_001)), float(sum(range(1, 20_001))))]
        row = client.query("SELECT explanation, faithful, claims_checked FROM trail_explanations FINAL "
                           "WHERE item_id = {i:String}", parameters={"i": "sku-00014"}).result_rows
        assert row == [(long_text.format(n=14, p=7), False, 3)]
        # a large result, so that the response itself is compressed when asked for
        big = client.query("SELECT item_id, explanation FROM trail_explanations FINAL ORDER BY item_id")
        assert len(big.result_rows) == 20_000 and big.result_rows[-1][0] == "sku-19999"
    finally:
        client.close()

    traffic = server.traffic()
    assert traffic.get("chunked_requests", 0) >= 1, traffic  # inserts stream their blocks
    if compress:
        # one lz4 frame per insert block: the 20k explanations span several blocks of one request
        assert traffic.get("request_encoding_lz4", 0) >= 2, traffic
        assert traffic["lz4_frames"] > traffic["request_encoding_lz4"], traffic
        assert traffic.get("response_encoding_lz4", 0) >= 1, traffic
    else:
        assert not any(k.startswith(("request_encoding", "response_encoding", "lz4")) for k in traffic), traffic


def test_wrong_password_is_refused(server):
    from clickhouse_connect.driver.exceptions import DatabaseError

    bad = StoreConfig(url=server.url, user=USER, password="wrong")
    with pytest.raises(DatabaseError, match="516|Authentication failed"):
        connect(bad)


def test_outage_mid_run_every_record_lands_exactly_once(server, tmp_path):
    config = http_config(server)
    cfg = SinkConfig(batch_rows=500, flush_interval_s=0.05, spill_after_s=0.4, retry_initial_s=0.05,
                     retry_max_s=0.3, spill_dir=tmp_path / "spill")
    ticks, per_tick = 36, 120
    durable_seen: list[int] = []
    with ResultSink(config, cfg, on_durable=durable_seen.append) as sink:
        last = 0
        for t in range(ticks):
            if t == 10:
                server.kill()  # abrupt: in-flight inserts die with it
            if t == 24:
                server.start()  # same port, same data directory
            last = sink.submit(tick_predictions(t, per_tick))
            time.sleep(0.1 if 10 <= t < 24 else 0.02)
        assert sink.wait_durable_sync(last, timeout=60)
        assert sink.wait_idle(timeout=60), sink.stats()
        stats = sink.stats()
    assert stats.failed_attempts >= 1 and stats.spilled_rows > 0, stats
    assert stats.replayed_rows == stats.spilled_rows and stats.spill_files == 0, stats
    assert durable_seen == sorted(durable_seen) and durable_seen[-1] == last

    client = connect(config)
    try:
        total, keys = client.query("SELECT count(), uniqExact(item_id, tick, model_version) "
                                   "FROM trail_predictions FINAL").result_rows[0]
        assert (total, keys) == (ticks * per_tick, ticks * per_tick)
        per = client.query("SELECT count() FROM trail_predictions FINAL GROUP BY tick").result_rows
        assert sorted(c for (c,) in per) == [per_tick] * ticks
        raw = client.query("SELECT count() FROM trail_predictions").result_rows[0][0]
        assert raw >= total  # retried inserts may have landed twice; FINAL counts them once
    finally:
        client.close()


def test_back_pressure_holds_the_producer_until_the_store_is_back(server, tmp_path):
    config = http_config(server)
    cfg = SinkConfig(flush_interval_s=0.05, max_buffer_rows=300, max_spill_bytes=0, retry_initial_s=0.05,
                     retry_max_s=0.2, spill_dir=tmp_path / "spill")
    server.kill()
    restarter = threading.Timer(1.0, server.start)

    async def produce(sink: ResultSink) -> tuple[int, float]:
        started = time.monotonic()
        seq = 0
        for t in range(6):  # 600 rows through a 300-row buffer: must wait for the store
            seq = await sink.asubmit(tick_predictions(t, 100))
        await sink.wait_durable(seq, timeout=60)
        return seq, time.monotonic() - started

    with ResultSink(config, cfg) as sink:
        restarter.start()
        try:
            seq, waited = asyncio.run(produce(sink))
        finally:
            restarter.join()
        assert waited >= 0.9 and sink.durable_seq == seq
        assert sink.stats().spilled_rows == 0
    client = connect(config)
    try:
        assert client.query("SELECT count() FROM trail_predictions FINAL").result_rows == [(600,)]
    finally:
        client.close()
