"""The trend worker: configuration, per-partition ingest and checkpoints (no broker), and the
dead-letter path and tick hooks against the real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from stream.settings import SettingsError, load_settings
from stream.core.events import REASON_LATE, ValidationConfig, encode_event, read_dlq_headers
from stream.ingest.partitions import CheckpointStore, PartitionState
from stream.core.snapshots import decode_snapshot, encode_snapshot, iso_ms
from stream.core.trends import HOUR_MS, TrendConfig, TrendTable
from stream.ingest.worker import TrendWorker, load_hook
from worker_helpers import as_dict, offline_signals, read_records, retail_slice, run_until_tick, worker_config

T0 = 1_262_304_000_000  # 2010-01-01
CFG = TrendConfig(windows=(("6h", 6), ("1d", 24)), ema_halflife_buckets=6)


# ---- configuration -------------------------------------------------------------------------

def test_config_defaults(tmp_path):
    c = load_settings({}, cwd=tmp_path).worker
    assert c.bootstrap == "127.0.0.1:9092"
    assert c.topics.events == "trail.events" and c.topics.dlq == "trail.events.dlq"
    assert c.snapshots_topic == "trail.snapshots"
    assert c.tick_s == 5.0 and c.checkpoint_s == 0 and c.state_dir == tmp_path / "var" / "state"
    assert c.group_id == "trail-trends"
    assert c.max_poll_records == 5000 and c.session_timeout_s == 10.0
    assert c.trend == TrendConfig() and c.publish_snapshots and c.web_port is None
    assert c.faust_broker == ["kafka://127.0.0.1:9092"]


def test_config_from_env():
    c = load_settings({
        "KAFKA_BOOTSTRAP": "k1:9092, k2:9093", "TRAIL_EVENTS_TOPIC": "ev", "TRAIL_SNAPSHOTS_TOPIC": "snap",
        "TRAIL_TICK_S": "0.5", "TRAIL_STATE_DIR": "/tmp/s", "TRAIL_GROUP_ID": "g", "TRAIL_BUCKET_S": "60",
        "TRAIL_WINDOWS": "1h:3600,6h:21600", "TRAIL_TICK_HOOKS": "a.b:c, d:e", "TRAIL_PUBLISH_SNAPSHOTS": "0",
        "TRAIL_PARTITIONS": "8", "TRAIL_MAX_POLL_RECORDS": "100", "TRAIL_CHECKPOINT_S": "30",
    }).worker
    assert c.bootstrap == "k1:9092,k2:9093" and c.faust_broker == ["kafka://k1:9092", "kafka://k2:9093"]
    assert (c.topics.events, c.snapshots_topic, c.tick_s, c.group_id) == ("ev", "snap", 0.5, "g")
    assert c.state_dir == Path("/tmp/s") and c.max_poll_records == 100 and c.checkpoint_s == 30
    assert c.trend.bucket_ms == 60_000 and c.trend.windows == (("1h", 60), ("6h", 360))
    assert c.tick_hooks == ("a.b:c", "d:e") and not c.publish_snapshots
    assert c.snapshot_spec().partitions == 8 and c.snapshot_spec().name == "snap"


@pytest.mark.parametrize("env, want", [
    ({"TRAIL_BROKER_URL": "kafka://h:1"}, "h:1"),
    ({"TRAIL_BROKER_URL": "kafka://h:1;kafka://g:2"}, "h:1,g:2"),
    ({"TRAIL_BROKER_URL": "kafka://h:1", "KAFKA_BOOTSTRAP": "k:3"}, "k:3"),
])
def test_bootstrap_from_env(env, want):
    assert load_settings(env).worker.bootstrap == want


@pytest.mark.parametrize("env, message", [
    ({"TRAIL_TICK_S": "soon"}, "TRAIL_TICK_S='soon': must be seconds >= 0.05"),
    ({"TRAIL_TICK_S": "0"}, "TRAIL_TICK_S='0'"),
    ({"KAFKA_BOOTSTRAP": "nohost"}, "KAFKA_BOOTSTRAP='nohost': broker address 'nohost' is not host:port"),
    ({"TRAIL_BROKER_URL": "redis://h:1"}, "TRAIL_BROKER_URL='redis://h:1': only kafka://"),
    ({"TRAIL_TICK_HOOKS": "nocolon"}, "TRAIL_TICK_HOOKS='nocolon': entry 'nocolon' is not module:function"),
    ({"TRAIL_PUBLISH_SNAPSHOTS": "maybe"}, "TRAIL_PUBLISH_SNAPSHOTS='maybe'"),
    ({"TRAIL_WEB_PORT": "http"}, "TRAIL_WEB_PORT='http': must be a port"),
])
def test_bad_config_is_a_clear_error(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_load_hook():
    assert load_hook("stream.core.snapshots:iso_ms") is iso_ms
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_hook("stream.core.snapshots:nope")
    with pytest.raises(ValueError, match="not callable"):
        load_hook("stream.core.trends:HOUR_MS")


# ---- per-partition ingest and checkpoints ---------------------------------------------------

def _records(events: list[tuple[str, str | None, int]]) -> tuple[list[bytes], list[bytes]]:
    values = [encode_event(item, ts, "purchase", user) for item, user, ts in events]
    return [item.encode() for item, _, _ in events], values


def test_ingest_rejects_duplicates_and_late():
    st = PartitionState(0, TrendTable(CFG), ValidationConfig())
    keys, values = _records([("A", "u1", T0), ("B", "u2", T0 + 60_000), ("A", "u2", T0 + 3 * HOUR_MS)])
    keys += [b"C", b"C", b"X"]
    values += [b"{broken", encode_event("C", T0 + 3 * HOUR_MS - 2 * HOUR_MS - 1, "view"), encode_event("Y", T0, "view")]
    dead = st.ingest(list(range(10, 16)), keys, values, now_ms=T0)
    assert sorted(dead) == [(3, "bad_json"), (4, REASON_LATE), (5, "key_mismatch")]
    c = st.counters
    assert (c.consumed, c.applied, c.rejected, c.late, c.duplicates) == (6, 3, 2, 1, 0)
    assert c.reasons == {"bad_json": 1, REASON_LATE: 1, "key_mismatch": 1}
    # the trailing rejects are handled too: a re-delivery does not send them to the DLQ again
    assert st.table.last_offset == 15 and st.dirty
    assert st.ingest(list(range(12, 16)), keys[2:], values[2:], now_ms=T0) == []
    assert (c.consumed, c.applied, c.duplicates) == (10, 3, 4)
    dead = st.ingest([16, 17], [b"D", b"D"], [encode_event("D", T0 + 3 * HOUR_MS, "view"), b"[1]"], now_ms=T0)
    assert dead == [(1, "not_object")] and c.applied == 4 and st.table.last_offset == 17


def test_checkpoint_resume_counts_each_event_once(tmp_path):
    """Checkpoint mid-stream, reload, then a re-delivery overlapping the checkpoint: equals one pass."""
    events = retail_slice(days=10)
    keys = [i.encode() for i in events["item_id"]]
    values = [encode_event(i, t, e, u, w) for i, u, t, e, w in
              events[["item_id", "user_id", "ts", "event_type", "weight"]].itertuples(index=False)]
    offsets = list(range(len(values)))
    cut, back = len(values) // 2, 1234
    store = CheckpointStore(tmp_path, "ev", CFG)
    store.prepare()
    st = PartitionState(0, TrendTable(CFG))
    assert st.ingest(offsets[:cut], keys[:cut], values[:cut]) == []
    store.save(0, st.table)
    resumed = PartitionState(0, store.load(0))
    assert resumed.next_offset == cut
    resumed.ingest(offsets[cut - back:], keys[cut - back:], values[cut - back:])  # re-read from before the checkpoint
    assert resumed.counters.duplicates == back and resumed.counters.applied == len(values) - cut
    as_of = (int(events["ts"].iloc[-1]) // HOUR_MS) * HOUR_MS
    want = offline_signals(events, CFG, as_of)
    assert len(want) > 500
    assert as_dict(resumed.table.signals_at(as_of)) == want


def test_checkpoint_store_config_change_and_unreadable_files(tmp_path):
    store = CheckpointStore(tmp_path, "ev", CFG)
    store.prepare()
    assert store.load(0) is None
    t = TrendTable(CFG)
    keys, values = _records([("A", "u1", T0)])
    st = PartitionState(0, t)
    st.ingest([0], keys, values, now_ms=T0)
    store.save(0, t)
    assert store.load(0).last_offset == 0
    # same config again: kept
    CheckpointStore(tmp_path, "ev", CFG).prepare()
    assert store.path(0).exists()
    # another config: the old files mean something else and are removed
    other = TrendConfig(windows=(("6h", 6), ("2d", 48)), ema_halflife_buckets=6)
    CheckpointStore(tmp_path, "ev", other).prepare()
    assert not store.path(0).exists()
    # a damaged file is rebuilt from the topic, not a crash
    store.path(1).write_bytes(b"not a checkpoint")
    assert store.load(1) is None


def test_snapshot_records_round_trip_exactly():
    t = TrendTable(CFG)
    keys, values = _records([("A", "u1", T0), ("A", "u2", T0 + HOUR_MS + 7), ("B", None, T0 + 5 * HOUR_MS)])
    PartitionState(3, t).ingest([0, 1, 2], keys, values, now_ms=T0)
    sig = t.signals_at(T0 + 6 * HOUR_MS)
    recs = encode_snapshot(sig, partition=3)
    assert [k for k, _ in recs] == [b"A", b"B"]
    for (key, value), item in zip(recs, sig.item_ids):
        rec = decode_snapshot(value)
        assert (rec.item_id, rec.partition, rec.items, rec.as_of_ms) == (item, 3, 2, T0 + 6 * HOUR_MS)
        assert rec.signals == sig.row(sig.item_ids.index(item))
        assert orjson.loads(value)["as_of"] == "2010-01-01T06:00:00.000Z"
    with pytest.raises(ValueError, match="not a trend snapshot"):
        decode_snapshot(b'{"item_id": "A"}')


# ---- against the broker -------------------------------------------------------------------------

async def _produce(bootstrap: str, topic: str, partition: int, records: list[tuple[bytes | None, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await p.start()
    try:
        for key, value in records:
            await p.send_and_wait(topic, value, key=key, partition=partition,
                                  headers=[("source", b"test")] if key == b"hdr" else None)
    finally:
        await p.stop()


@pytest.mark.broker
def test_bad_records_go_to_the_dlq_and_the_worker_goes_on(broker, topics, tmp_path):
    good = [("A", "u1", T0), ("B", "u2", T0 + 10 * 60_000), ("A", "u2", T0 + 3 * HOUR_MS)]
    bad = [  # (key, value, reason)
        (b"A", b"{not json", "bad_json"),
        (b"A", b"\xff\xfe{\"item_id\": \"A\"}", "bad_encoding"),
        (b"A", orjson.dumps({"ts": T0, "event_type": "view"}), "missing_field:item_id"),
        (b"A", orjson.dumps({"item_id": "A", "ts": T0, "event_type": "teleport"}), "unknown_event_type"),
        (b"B", encode_event("A", T0 + 3 * HOUR_MS, "view"), "key_mismatch"),
        (b"A", encode_event("A", 5, "view"), "absurd_ts"),
        (b"hdr", b"", "bad_json"),
        (b"A", encode_event("A", T0, "view"), REASON_LATE),  # 3 h behind the partition's newest event
    ]
    after = [("B", "u3", T0 + 4 * HOUR_MS)]
    close = [("Z", None, T0 + 7 * HOUR_MS)]  # closes the buckets before T0 + 6 h
    records = ([(k, v) for k, v in zip(*_records(good))] + [(k, v) for k, v, _ in bad]
               + [(k, v) for k, v in zip(*_records(after + close))])
    config = worker_config(broker, topics, tmp_path, trend=CFG)
    as_of = T0 + 6 * HOUR_MS
    seen: dict[int, dict] = {}

    async def scenario():
        await _produce(broker, topics.events, 0, records)
        worker = TrendWorker(config)

        @worker.add_tick_hook
        async def broken(as_of_ms, signals):
            raise RuntimeError("a failing hook must not stop the worker")

        @worker.add_tick_hook
        async def collect(as_of_ms, signals):
            seen[as_of_ms] = as_dict(signals)

        await run_until_tick(worker, as_of, seen)
        return worker.counters(), await read_records(broker, topics.dlq, len(bad))

    counters, dlq = asyncio.run(scenario())
    assert as_of in seen, "the worker did not publish the tick after the bad records"
    frame = pd.DataFrame([{"item_id": i, "user_id": u, "ts": t, "event_type": "purchase", "weight": 1.0}
                          for i, u, t in good + after + close])
    assert seen[as_of] == offline_signals(frame, CFG, as_of)
    assert (counters.applied, counters.rejected, counters.late) == (len(good + after + close), len(bad) - 1, 1)
    assert len(dlq) == len(bad)
    offset_of = {i: i + len(good) for i in range(len(bad))}
    for i, (rec, (key, value, reason)) in enumerate(zip(sorted(dlq, key=lambda r: r.offset), bad)):
        assert rec.key == key and rec.value == value  # the original bytes, unchanged
        ctx = read_dlq_headers(rec.headers)
        assert (ctx.reason, ctx.topic, ctx.partition, ctx.offset) == (reason, topics.events, 0, offset_of[i])
        if key == b"hdr":
            assert rec.headers[0] == ("source", b"test")  # the source's own headers come first
    assert np.all(np.diff([r.offset for r in sorted(dlq, key=lambda r: r.offset)]) == 1)


@pytest.mark.broker
def test_slow_hooks_get_the_newest_tick_and_never_hold_up_consumption(broker, topics, tmp_path):
    items = [f"i{k}" for k in range(50)]
    events = [(items[k % 50], f"u{k % 7}", T0 + k * 60_000) for k in range(3000)]  # 50 h of history
    config = worker_config(broker, topics, tmp_path, trend=CFG, tick_s=0.1)
    calls: list[int] = []

    async def scenario():
        worker = TrendWorker(config)

        @worker.add_tick_hook
        async def slow(as_of_ms, signals):
            calls.append(as_of_ms)
            await asyncio.sleep(0.6)

        await worker.start()
        run = asyncio.create_task(worker.run())
        try:
            keys, values = _records(events)
            for k in range(0, len(events), 300):  # ten slices, 0.2 s apart
                await _produce(broker, topics.events, 0, list(zip(keys[k:k + 300], values[k:k + 300])))
                await asyncio.sleep(0.2)
            closed = (events[-1][2] - CFG.allowed_lateness_ms) // HOUR_MS * HOUR_MS
            deadline = time.monotonic() + 20
            # the tick at `closed` can come before the last few events of its bucket are applied: wait for both
            while ((not calls or calls[-1] != closed) or worker.counters().applied < len(events)) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            applied_when_done = worker.counters().applied
        finally:
            await worker.stop()
            await run
        return worker, closed, applied_when_done

    worker, closed, applied = asyncio.run(scenario())
    assert applied == len(events)
    assert calls[-1] == closed and calls == sorted(calls)
    assert worker.ticks_skipped_by_hooks > 0  # ticks came faster than the hook: the older ones were dropped
    assert len(calls) < worker.ticks_published


def test_tick_hooks_setting_holds_only_the_extension_hooks():
    def hooks(env):
        return load_settings(env).worker.tick_hooks

    assert hooks({}) == () and hooks({"TRAIL_MODEL_DIR": "models/x"}) == ()  # the app wires serving itself
    assert hooks({"TRAIL_MODEL_DIR": "models/x", "TRAIL_TICK_HOOKS": ""}) == ()
    assert hooks({"TRAIL_MODEL_DIR": "m", "TRAIL_TICK_HOOKS": "a.b:c"}) == ("a.b:c",)
