"""The page, its JSON API and the operator endpoints (stream.web) on a real embedded store.

The store holds MovieLens-100K as test_store_dashboards loads it (daily trend snapshots, RecentPop
predictions of the top 50, explanations of the top 10), written through the real sink; some ticks'
predictions carry a forecast range and drivers, the others none. The routes run on a real aiohttp
server in this process, as the worker serves them; answers are checked against the data.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
import types
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from stream.core.records import Prediction, tick_iso
from stream.store.clickhouse import StoreConfig
from stream.store.sink import ResultSink, SinkConfig
from stream.web.reader import AsyncReader, PageConfig, StoreReader, StoreUnavailable
from stream.web.routes import build
from test_store_dashboards import MODEL, build_store_data, realised_lookup

CONFIG = PageConfig(count_signal="count_7d", horizon_hours=168, spark_signal="count_1d", spark_ticks=10,
                    window_ticks=5, timeout_s=30.0)


def with_range(p: Prediction, k: int) -> Prediction:
    """Every other tick's predictions with a range and drivers (as a model with quantile heads writes them),
    the others without (build_store_data's own ranges are replaced either way)."""
    if k % 2:
        return replace(p, predicted_low=None, predicted_high=None, drivers=None)
    return replace(p, predicted_low=0.6 * p.predicted_count, predicted_high=1.5 * p.predicted_count + 1,
                   drivers={"trend": round(0.1 * p.rank, 3), "level": -0.25})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    data = build_store_data(n_ticks=16)
    index = {t: k for k, t in enumerate(data.ticks)}
    data.predictions = [with_range(p, index[p.tick]) for p in data.predictions]
    config = StoreConfig(path=tmp_path_factory.mktemp("web") / "clickhouse")
    sink = ResultSink(config, SinkConfig(batch_rows=20_000, spill_dir=config.path.parent / "spill")).start()
    for tick in data.ticks:
        sink.submit([s for s in data.snapshots if s.tick == tick])
        sink.submit([p for p in data.predictions if p.tick == tick])
        sink.submit([e for e in data.explanations if e.tick == tick])
    assert sink.flush(timeout=60)
    yield data, config, sink
    sink.close(30)


class serve:
    """The routes of `parts` over `store_config`; each `get` serves them on a fresh loop, as a worker would."""

    def __init__(self, parts, store_config, config=CONFIG):
        self.parts, self.store_config, self.config = parts, store_config, config

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_routes(build(self.parts, self.store_config, self.config).routes())
        return app


def run(coro):
    return asyncio.run(coro)


async def _get(app, *paths):
    async with TestClient(TestServer(app)) as client:
        out = []
        for path in paths:
            r = await client.get(path)
            body = await r.text()
            out.append((r.status, r.headers.get("Content-Type", ""), body))
        return out


def get(server, *paths):
    return run(_get(server.app(), *paths))


def parts_with(sink=None, worker=None, serving=None):
    return types.SimpleNamespace(sink=sink, worker=worker, serving=serving)


def test_movers_page_and_api_show_the_latest_ranking(store):
    data, config, sink = store
    app = serve(parts_with(sink), config)
    last = data.ticks[-1]
    want = sorted((p for p in data.predictions if p.tick == last), key=lambda p: p.rank)
    texts = {e.item_id: e.explanation for e in data.explanations if e.tick == last}
    (s1, ct1, html), (s2, ct2, body) = get(app, "/", "/api/movers?top=12")
    assert (s1, s2) == (200, 200) and ct1.startswith("text/html") and ct2.startswith("application/json")
    table = re.search(r'<table id="movers">.*?</table>', html, re.S).group(0)
    rows = re.findall(r'<tr class="mover">(.*?)</tr>', table, re.S)
    assert len(rows) == CONFIG.top_n
    assert f'href="/items/{want[0].item_id}"' in rows[0] and "<polyline" in rows[0] and "✓" in rows[0]
    assert "model recentpop-ml100k" in html and last.strftime("%Y-%m-%d %H:%M UTC") in html
    import orjson

    api = orjson.loads(body)
    assert api["status"]["model_version"] == MODEL and api["status"]["items"] == len(want)
    assert [(m["rank"], m["item_id"]) for m in api["movers"]] == [(p.rank, p.item_id) for p in want[:12]]
    assert [m["explanation"] for m in api["movers"]] == [texts.get(p.item_id) for p in want[:12]]
    # the movers the explainer explained (here the top 10 of every tick), with their texts and marks
    assert [(m["rank"], m["explanation"]) for m in api["explained"]] == \
        [(p.rank, texts[p.item_id]) for p in want if p.item_id in texts]
    assert api["explained_tick"] == api["status"]["tick"] and api["explained"][0]["faithful"] is True
    explained = re.search(r'<table id="explained">.*?</table>', html, re.S).group(0)
    assert explained.count('<tr class="mover">') == len(texts) and explained.count("✓") == len(texts)
    m0 = api["movers"][0]
    assert m0["predicted_count"] == pytest.approx(want[0].predicted_count)
    # the last tick (index 15) has no range: shown as none, not as zeros
    assert m0["predicted_low"] is None and m0["predicted_high"] is None and not m0["drivers"]
    assert "10–90" not in html
    # the sparkline: count_1d of the item at the last spark_ticks snapshot ticks, oldest first
    recent = {(s.tick, s.signals["count_1d"]) for s in data.snapshots
              if s.item_id == want[0].item_id and s.tick in data.ticks[-CONFIG.spark_ticks:]}
    assert [tuple(x) for x in m0["recent"]] == [(tick_iso(t), v) for t, v in sorted(recent)]
    assert len(m0["recent"]) == CONFIG.spark_ticks


def test_the_range_and_drivers_show_when_the_tick_has_them(store):
    data, config, sink = store
    app = serve(parts_with(sink), config)
    tick = data.ticks[-2]  # index 14 of 16: with a range
    assert data.ticks.index(tick) % 2 == 0
    item = next(p for p in data.predictions if p.tick == tick and p.rank == 1)
    (status, _, html), (_, _, body) = get(app, f"/items/{item.item_id}", f"/api/items/{item.item_id}")
    assert status == 200
    import orjson

    page = orjson.loads(body)
    point = next(p for p in page["predictions"] if p["tick"].startswith(tick.strftime("%Y-%m-%dT%H:%M")))
    assert point["predicted_low"] == pytest.approx(item.predicted_low)
    assert point["predicted_high"] == pytest.approx(item.predicted_high)
    assert point["drivers"] == item.drivers
    assert sum(1 for p in page["predictions"] if p["predicted_low"] is not None) >= 2
    assert '<polygon class="band"' in html and "10–90 %" in html


def test_item_page_charts_predicted_against_realised(store):
    data, config, sink = store
    app = serve(parts_with(sink), config)
    realised = realised_lookup(data)
    item = next(p.item_id for p in data.predictions if p.tick == data.ticks[-1] and p.rank == 1)
    (status, _, html), (_, _, body) = get(app, f"/items/{item}", f"/api/items/{item}")
    assert status == 200
    svg = re.search(r'<svg id="item-chart".*?</svg>', html, re.S).group(0)
    assert re.search(r'<path class="pred" d="M[\d.]+,[\d.]+ L', svg)
    assert re.search(r'<path class="real" d="M[\d.]+,[\d.]+ L', svg)
    import orjson

    page = orjson.loads(body)
    mine = sorted((p for p in data.predictions if p.item_id == item), key=lambda p: p.tick)
    assert [p["rank"] for p in page["predictions"]] == [p.rank for p in mine]
    assert [p["realised_count"] for p in page["predictions"]] == [realised(p.item_id, p.tick) for p in mine]
    assert [e["explanation"] for e in page["explanations"]] == \
        [e.explanation for e in sorted((e for e in data.explanations if e.item_id == item), key=lambda e: e.tick,
                                       reverse=True)]
    assert len(page["counts"]) == sum(1 for s in data.snapshots if s.item_id == item)
    assert "<h3>Explanations</h3>" in html and "✓" in html


def test_unknown_items_are_404_and_bad_parameters_400(store):
    data, config, sink = store
    app = serve(parts_with(sink), config)
    injection = "1' OR '1'='1"
    answers = get(app, "/items/no-such-item", "/api/items/no-such-item", f"/items/{injection}",
                  "/?top=abc", "/?top=0", "/api/movers?top=100000", "/api/movers?limit=3", "/accuracy?window=-1",
                  "/items/" + "x" * 300)
    codes = [a[0] for a in answers]
    assert codes == [404, 404, 404, 400, 400, 400, 400, 400, 400], answers
    assert "no item &#x27;no-such-item&#x27;" in answers[0][2] and answers[0][1].startswith("text/html")
    assert answers[1][2].startswith('{"error":') and "never scored" in answers[1][2]
    assert "top must be a whole number" in answers[3][2]
    assert "top must be from 1 to 500, got 100000" in answers[5][2] and answers[5][1].startswith("application/json")
    assert "unknown query parameter 'limit'" in answers[6][2]
    # the quote reached the store as a value: the table is intact
    (s, _, body), = get(app, "/api/status")
    assert s == 200 and '"items":' in body


def test_accuracy_page_gives_mae_and_ndcg_per_passed_tick(store):
    data, config, sink = store
    app = serve(parts_with(sink), config)
    (status, _, html), (_, _, body) = get(app, "/accuracy", "/api/accuracy?window=3")
    assert status == 200 and '<svg id="accuracy-chart"' in html
    import orjson

    acc = orjson.loads(body)
    realised = realised_lookup(data)
    passed = [t for t in data.ticks if t + timedelta(hours=168) <= data.ticks[-1]]
    assert [r["tick"][:16] for r in acc["rows"]] == [t.strftime("%Y-%m-%dT%H:%M") for t in passed]
    for row, tick in zip(acc["rows"], passed):
        preds = [p for p in data.predictions if p.tick == tick]
        actual = np.array([realised(p.item_id, p.tick) for p in preds])
        predicted = np.array([p.predicted_count for p in preds])
        assert row["mae_log1p"] == pytest.approx(np.mean(np.abs(np.log1p(predicted) - np.log1p(actual))))
        ranked = [realised(p.item_id, p.tick) for p in sorted(preds, key=lambda p: p.rank)][:10]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(ranked))
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(actual, reverse=True)[:10]))
        assert row["ndcg"] == pytest.approx(dcg / idcg)
        assert 0 < row["ndcg"] <= 1


def test_waiting_state_before_the_first_tick(store):
    # chdb serves one data directory per process: the same one, a database the sink has not created yet
    config = replace(store[1], database="not_created_yet")
    app = serve(parts_with(), config)
    (s1, _, html), (s2, _, body), (s3, _, acc), (s4, _, ready) = get(app, "/", "/api/status", "/accuracy", "/ready")
    assert s1 == 200 and 'id="waiting"' in html, html and "Waiting for the first tick" in html
    assert s2 == 200 and '"waiting":true' in body
    assert s3 == 200 and "Waiting for the first tick" in acc
    assert s4 == 503 and '"first_tick":false' in ready


def test_operator_endpoints(store):
    data, config, sink = store
    worker = types.SimpleNamespace(ticks_published=0)
    serving = types.SimpleNamespace(stats=types.SimpleNamespace(ticks_ranked=0, ticks_dropped=0, predictions=5,
                                                                explanations=2), catalogue=None)
    parts = parts_with(sink, serving=serving)
    app = serve(parts, config)
    (h, _, health), (r1, _, ready), (m, ctype, metrics) = get(app, "/health", "/ready", "/metrics")
    assert (h, r1) == (200, 503) and '"status":"ok"' in health and '"store":true' in ready
    assert m == 200 and ctype.startswith("text/plain")
    written = float(re.search(r"^trail_sink_rows_written_total (\S+)$", metrics, re.M).group(1))
    assert written == len(data.snapshots) + len(data.predictions) + len(data.explanations)
    assert re.search(r"^trail_predictions_published_total 5\.0$", metrics, re.M)
    assert re.search(r"^trail_sink_backlog_rows 0\.0$", metrics, re.M)
    serving.stats.ticks_ranked = 1
    (r2, _, ready), = get(app, "/ready")
    assert r2 == 200 and '"ready":true' in ready
    del worker


def test_store_reads_are_bounded_and_time_out(tmp_path):
    async def scenario():
        reader = AsyncReader(StoreReader(StoreConfig(path=tmp_path / "ch"), replace(CONFIG, threads=1, timeout_s=0.3)))
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="did not answer within 0.3 s"):
            await reader.call(time.sleep, 1.0)
        assert time.monotonic() - t0 < 0.9  # the loop was not blocked by the sleeping read
        # the one slot is still held by the sleeping read: the next read waits for it, within its own timeout
        with pytest.raises(StoreUnavailable):
            await reader.call(lambda: 1)
        await asyncio.sleep(1.0)
        assert await reader.call(lambda: 2) == 2
        reader.close()

    run(scenario())


def test_the_demo_takes_another_port_when_its_page_port_is_in_use():
    import socket

    from stream.tools.demo import build_parser, free_port, page_url, worker_env

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        taken = held.getsockname()[1]
        other = free_port(taken)
        assert other != taken and other > 0
    args = build_parser().parse_args(["--web-port", str(other)])
    env = worker_env(args, "127.0.0.1:9092", Path("/tmp/var"), 7.0)
    assert env["TRAIL_WEB_PORT"] == str(other) and page_url(other) == f"http://localhost:{other}/"
    assert build_parser().parse_args([]).web_port == 6066  # the page is on by default
    off = worker_env(build_parser().parse_args(["--web-port", "0"]), "x:1", Path("/tmp"), 7.0)
    assert off.get("TRAIL_WEB_PORT") == os.environ.get("TRAIL_WEB_PORT")  # --web-port 0 adds none


def test_the_page_reads_a_clickhouse_server_over_http(tmp_path):
    """CLICKHOUSE_URL deployments: the same routes on ClickHouse's HTTP interface (a real engine in a child)."""
    from datetime import datetime, timezone

    import orjson
    from clickhouse_http import ClickHouseHTTPProcess

    from stream.core.records import Explanation, TrendSnapshot

    ticks = [datetime(2011, 12, d, tzinfo=timezone.utc) for d in (7, 8, 9)]
    snaps = [TrendSnapshot(f"sku{i}", t, {"count_1d": float(i + k), "count_7d": 9.0 - i}, "signals-v1")
             for k, t in enumerate(ticks) for i in range(5)]
    preds = [Prediction(f"sku{i}", ticks[-1], 1 - i / 10, 10.0 - i, i + 1, {"count_7d": 9.0 - i}, "m-http",
                        predicted_low=8.0 - i, predicted_high=12.0 - i, drivers={"trend": 0.5, "level": -0.1})
             for i in range(5)]
    expl = Explanation("sku1", ticks[-1], 2, "sku1 had 8 sales this week.", True, 1, "m-http", reason="trend")
    with ClickHouseHTTPProcess(tmp_path / "server") as srv:
        config = StoreConfig(url=srv.url)
        with ResultSink(config, SinkConfig(spill_dir=tmp_path / "spill")) as sink:
            assert sink.wait_durable_sync(sink.submit(snaps + preds + [expl]), timeout=30)
        (s1, _, body), (s2, _, html), (s3, _, missing) = get(serve(parts_with(), config), "/api/movers?top=3",
                                                              "/items/sku1", "/api/items/nope")
    assert (s1, s2, s3) == (200, 200, 404)
    data = orjson.loads(body)
    assert data["status"]["tick"] == "2011-12-09T00:00:00.000Z" and data["status"]["model_version"] == "m-http"
    assert [(m["item_id"], m["predicted_low"], m["predicted_high"]) for m in data["movers"]] == \
        [("sku0", 8.0, 12.0), ("sku1", 7.0, 11.0), ("sku2", 6.0, 10.0)]
    assert data["movers"][1]["drivers"] == {"trend": 0.5, "level": -0.1}
    assert [v for _, v in data["movers"][1]["recent"]] == [1.0, 2.0, 3.0]
    assert [(m["item_id"], m["explanation"], m["reason"]) for m in data["explained"]] == \
        [("sku1", "sku1 had 8 sales this week.", "trend")]
    assert "sku1 had 8 sales this week." in html and "7–11" in html and "drivers: trend +0.50" in html
