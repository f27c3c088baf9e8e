"""Against the real Kafka-protocol broker (Tansu): launcher, topics, produce/consume, DLQ, replay."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from stream.tools.broker import LocalBroker, probe_metadata
from stream.core.events import dlq_record, encode_event, parse_batch, read_dlq_headers
from stream.tools.replay import replay
from stream.settings import SettingsError, load_settings
from stream.topics import Topics, ensure_topics

pytestmark = pytest.mark.broker
REPO = Path(__file__).resolve().parents[1]
TS_2010 = 1_262_304_000_000


async def consume_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 20.0) -> list:
    """Every record of `topic` from the beginning, stopping once `expect` have arrived."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        parts = await asyncio.wait_for(_partitions(c, topic), 10)
        c.assign([TopicPartition(topic, p) for p in parts])
        out: list = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            got = await c.getmany(timeout_ms=200, max_records=10_000)
            for records in got.values():
                out.extend(records)
        # nothing beyond what was expected
        got = await c.getmany(timeout_ms=300)
        out.extend(r for rs in got.values() for r in rs)
        return out
    finally:
        await c.stop()


async def _partitions(c, topic: str) -> list[int]:
    while not (parts := c.partitions_for_topic(topic)):
        await c._client.force_metadata_update()
        await asyncio.sleep(0.05)
    return sorted(parts)


def test_broker_answers_kafka_metadata(broker):
    host, port = broker.rsplit(":", 1)
    assert (host, int(port)) in [(h, p) for _, h, p in probe_metadata(host, int(port))]


def test_local_broker_lifecycle_and_free_ports():
    a, b = LocalBroker(), LocalBroker()
    with a as ba, b as bb:
        assert ba != bb and a.is_running() and b.is_running()
        pid = a.pid
    assert not a.is_running() and not b.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    host, port = ba.rsplit(":", 1)
    with pytest.raises(OSError):
        probe_metadata(host, int(port), timeout=0.5)


def test_ensure_topics_is_idempotent_and_reports_partition_mismatch(broker):
    t = Topics(events="ens.events", items="ens.items", dlq="ens.dlq", predictions="ens.pred",
               explanations="ens.expl", partitions=3)
    first = asyncio.run(ensure_topics(broker, t))
    assert sorted(first.created) == sorted(s.name for s in t.specs()) and first.partition_mismatch == {}
    again = asyncio.run(ensure_topics(broker, t))
    assert again.created == [] and sorted(again.existing) == sorted(first.created)
    other = asyncio.run(ensure_topics(broker, Topics(events="ens.events", items="ens.items", dlq="ens.dlq",
                                                     predictions="ens.pred", explanations="ens.expl",
                                                     partitions=5)))
    assert other.created == [] and other.partition_mismatch["ens.events"] == (3, 5)


def test_topics_from_settings():
    t = load_settings({"TRAIL_EVENTS_TOPIC": "x.events", "TRAIL_PARTITIONS": "8"}).worker.topics
    assert t.events == "x.events" and t.items == "trail.items" and t.partitions == 8
    specs = {s.name: s for s in t.specs()}
    assert specs["x.events"].partitions == 8 and specs["trail.items"].config["cleanup.policy"] == "compact"
    assert int(specs["x.events"].config["retention.ms"]) > 28 * 86_400_000
    with pytest.raises(SettingsError, match="TRAIL_PARTITIONS='0'"):
        load_settings({"TRAIL_PARTITIONS": "0"})


def test_produce_consume_and_dlq_round_trip(broker, topics):
    """Good and bad events through the broker; the bad ones go to the DLQ and come back byte-exact."""
    from aiokafka import AIOKafkaProducer

    good = [encode_event(f"i{k}", TS_2010 + k, "view", "u") for k in range(50)]
    bad = [b"\xff\xfe not utf-8 \x80", b'{"item_id": "i1"}', b"[1,2]"]

    async def run():
        p = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
        await p.start()
        try:
            for k, v in enumerate(good):
                await p.send(topics.events, v, key=f"i{k}".encode())
            for v in bad:
                await p.send(topics.events, v, key=b"\x00\xff", headers=[("src", b"\x80")])
            await p.flush()
            records = await consume_all(broker, topics.events, len(good) + len(bad))
            by_part = defaultdict(list)
            for r in records:
                by_part[r.partition].append(r)
            dlq_sent = []
            accepted = []
            for part, rs in by_part.items():
                res = parse_batch([r.value for r in rs], keys=[r.key for r in rs],
                                  offsets=[r.offset for r in rs], partition=part)
                accepted.extend(res.batch.item_id.tolist())
                assert res.batch.offset.tolist() == [rs[i].offset for i in res.batch.index]
                for rej in res.rejects:
                    src = rs[rej.index]
                    d = dlq_record(src.key, src.value, rej.reason, topic=src.topic, partition=src.partition,
                                   offset=src.offset, timestamp_ms=src.timestamp, source_headers=src.headers)
                    await p.send(topics.dlq, d.value, key=d.key, headers=d.headers, timestamp_ms=d.timestamp_ms)
                    dlq_sent.append((src, rej.reason))
            await p.flush()
            dlq = await consume_all(broker, topics.dlq, len(dlq_sent))
            return accepted, dlq_sent, dlq
        finally:
            await p.stop()

    accepted, dlq_sent, dlq = asyncio.run(run())
    assert sorted(accepted) == sorted(f"i{k}" for k in range(50))
    assert len(dlq) == len(bad) == len(dlq_sent)
    src_by_value = {src.value: (src, reason) for src, reason in dlq_sent}
    for r in dlq:
        src, reason = src_by_value[r.value]
        assert r.value == src.value and r.key == src.key == b"\x00\xff"  # byte-exact
        assert list(r.headers)[0] == ("src", b"\x80")
        ctx = read_dlq_headers(r.headers)
        assert (ctx.topic, ctx.partition, ctx.offset, ctx.reason) == (src.topic, src.partition, src.offset, reason)
        assert ctx.timestamp_ms == src.timestamp == r.timestamp
    assert {reason for _, reason in dlq_sent} == {"bad_encoding", "missing_field:ts", "not_object"}


@pytest.fixture(scope="module")
def retail_slice():
    from stream.core import datasets as D

    raw = pd.read_csv(D._wheel_path(*D.RETAIL_FILE), nrows=8_000,
                      dtype={"Invoice": str, "StockCode": str, "Description": str, "InvoiceDate": str,
                             "Customer ID": str})
    return D.parse_online_retail(raw)


def test_replay_retail_slice_and_read_it_back(broker, topics, retail_slice):
    events, items = retail_slice
    limit = 5_000
    stats = asyncio.run(replay(events, items, broker, topics=topics, limit=limit, progress=False))
    assert stats.events == limit and stats.items == len(items)

    records = asyncio.run(consume_all(broker, topics.events, limit))
    assert len(records) == limit
    by_part = defaultdict(list)
    for r in records:
        by_part[r.partition].append(r)
    assert len(by_part) == topics.partitions  # keyed by item: spread over every partition
    got = []
    for part, rs in by_part.items():
        res = parse_batch([r.value for r in rs], keys=[r.key for r in rs], offsets=[r.offset for r in rs],
                          partition=part)
        assert res.rejects == []
        assert (np.diff(res.batch.ts_ms) >= 0).all()  # timestamp order within each partition
        got.append(res.batch.to_frame())
    back = pd.concat(got).sort_values(["ts", "item_id", "user_id", "weight"], na_position="first")
    want = events.iloc[:limit].sort_values(["ts", "item_id", "user_id", "weight"], na_position="first")
    pd.testing.assert_frame_equal(back.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
    # each item always lands on the same partition
    part_of = defaultdict(set)
    for r in records:
        part_of[r.key].add(r.partition)
    assert all(len(p) == 1 for p in part_of.values())

    item_recs = asyncio.run(consume_all(broker, topics.items, len(items)))
    assert len(item_recs) == len(items)
    sent = items.set_index("item_id")
    for r in item_recs:
        v = orjson.loads(r.value)
        assert r.key.decode() == v["item_id"] and v["title"] == sent.loc[v["item_id"], "title"]
        assert v["price"] == sent.loc[v["item_id"], "price"] and "category" not in v  # None is left out


def test_replay_on_an_accelerated_clock(broker, topics):
    ev = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "user_id": [None] * 4,
                       "ts": [TS_2010, TS_2010 + 1_800_000, TS_2010 + 3_600_000, TS_2010 + 3_600_000],
                       "event_type": ["view"] * 4, "weight": [1.0] * 4})
    t = time.perf_counter()
    stats = asyncio.run(replay(ev, None, broker, topics=topics, speed=3600 * 2, progress=False))
    elapsed = time.perf_counter() - t
    assert stats.events == 4
    assert 0.45 <= stats.seconds and elapsed < 5  # one hour of history at 7200x: 0.5 s
    records = asyncio.run(consume_all(broker, topics.events, 4))
    stamps = sorted((r.timestamp, orjson.loads(r.value)["ts"]) for r in records)
    # record timestamps are publish times: the 30-minute gap took ~0.25 s of wall time
    assert 0.2 <= (stamps[1][0] - stamps[0][0]) / 1000 <= 1.0


def test_replay_cli_with_generic_event_log(broker, topics, tmp_path):
    ev = tmp_path / "log.csv"
    ev.write_text("item_id,user_id,ts,event_type\nx,u1,2011-01-01T00:00:00Z,click\ny,,2011-01-01T00:00:01Z,view\n")
    out = subprocess.run([sys.executable, "-m", "stream.tools.replay", "--events", str(ev), "--bootstrap", broker,
                          "--topic", topics.events, "--items-topic", topics.items, "--quiet"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "2 events" in out.stdout
    records = asyncio.run(consume_all(broker, topics.events, 2))
    assert sorted(orjson.loads(r.value)["item_id"] for r in records) == ["x", "y"]
    bad = subprocess.run([sys.executable, "-m", "stream.tools.replay", "--events", str(tmp_path / "nope.csv"),
                          "--bootstrap", broker], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_broker_cli_prints_bootstrap_and_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "stream.tools.broker"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline().strip()
        host, port = line.rsplit(":", 1)
        assert host == "127.0.0.1" and probe_metadata(host, int(port))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        with pytest.raises(OSError):
            probe_metadata(host, int(port), timeout=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
