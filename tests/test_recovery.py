"""State that survives: `faust -A stream.app worker` processes killed, restarted and joined by a
second worker, on the real broker, with three weeks of Online Retail II; the final snapshot
must equal the offline computation (every event counted exactly once)."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

from stream.ingest.partitions import CheckpointStore
from stream.tools.replay import replay
from stream.core.trends import TrendConfig
from worker_helpers import (FaustWorker, fences, offline_signals, partition_of, read_records, read_snapshot,
                            retail_slice, worker_config, worker_env)

pytestmark = pytest.mark.broker
TREND = TrendConfig()


def _log_with_fences(partitions: int) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    events = retail_slice(days=21)
    fence, as_of = fences(int(events["ts"].iloc[-1]), partitions, TREND)
    return events, fence, as_of


def _publish(broker, topics, frame: pd.DataFrame) -> None:
    asyncio.run(replay(frame, None, broker, topics=topics, create_topics=False, progress=False))


async def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return {p: await c.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await c.stop()


async def _markers(bootstrap: str, topic: str, partitions: int) -> None:
    """One undecodable record at the end of every partition: its DLQ copy shows the partition was read."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await p.start()
    try:
        for part in range(partitions):
            await p.send_and_wait(topic, b"{marker", key=None, partition=part)
    finally:
        await p.stop()


def test_kill9_and_restart_count_every_event_once(broker, topics, tmp_path):
    events, fence, as_of = _log_with_fences(topics.partitions)
    half = len(events) // 2
    first, second = events.iloc[:half], events.iloc[half:]
    want = offline_signals(pd.concat([events, fence], ignore_index=True), TREND, as_of)
    config = worker_config(broker, topics, tmp_path / "state", tick_s=4.0)
    env = worker_env(config, app_id=f"{topics.events}.app")

    _publish(broker, topics, first)
    w1 = FaustWorker(env, tmp_path / "w1.log").start()
    try:
        w1.wait_for("partitions.assigned", lambda e: len(e["partitions"]) == topics.partitions, 60)
        w1.wait_for("tick", lambda e: e["consumed"] == half, 30)  # logged after checkpoint + commit
        committed = asyncio.run(_committed(broker, config.group_id, topics.events, topics.partitions))
        store = CheckpointStore(config.state_dir, topics.events, TREND)
        checkpointed = {p: store.load(p).last_offset + 1 for p in range(topics.partitions)}
        assert committed == checkpointed and sum(checkpointed.values()) == half

        # Mid-stream: the second half is read (the markers reach the DLQ) but not yet checkpointed
        # (the next tick is seconds away) when the worker is killed.
        _publish(broker, topics, second)
        asyncio.run(_markers(broker, topics.events, topics.partitions))
        assert len(asyncio.run(read_records(broker, topics.dlq, topics.partitions, 20))) == topics.partitions
    finally:
        w1.kill9()
    assert {p: store.load(p).last_offset + 1 for p in range(topics.partitions)} == checkpointed

    w2 = FaustWorker(env, tmp_path / "w2.log").start()
    try:
        assigned = w2.wait_for("partitions.assigned", lambda e: len(e["partitions"]) == topics.partitions, 60)
        assert set(assigned["source"].values()) == {"checkpoint"}
        assert {int(p): o for p, o in assigned["offsets"].items()} == checkpointed
        _publish(broker, topics, fence)
        snapshot = asyncio.run(read_snapshot(broker, config.snapshots_topic, as_of, len(want), 60))
        assert {item: rec.signals for item, rec in snapshot.items()} == want
        last = w2.wait_for("tick", lambda e: e["consumed"] >= len(second) + 2 * topics.partitions, 20)
        # the restarted worker applied the unsaved second half (and the fences) once, nothing of the first
        assert last["applied"] == len(second) + len(fence) and last["duplicates"] == 0
        assert last["rejected"] == topics.partitions  # the markers, re-read after the crash: at-least-once DLQ
    finally:
        assert w2.stop() == 0, w2.tail()
    assert w2.events("worker.stopped")


def test_two_workers_split_the_partitions_and_match_one(broker, topics, tmp_path):
    events, fence, as_of = _log_with_fences(topics.partitions)
    half = len(events) // 2
    want = offline_signals(pd.concat([events, fence], ignore_index=True), TREND, as_of)
    app_id = f"{topics.events}.app"
    c1 = worker_config(broker, topics, tmp_path / "state1", tick_s=0.5)
    c2 = worker_config(broker, topics, tmp_path / "state2", tick_s=0.5)

    _publish(broker, topics, events.iloc[:half])
    w1 = FaustWorker(worker_env(c1, app_id), tmp_path / "w1.log").start()
    w2 = FaustWorker(worker_env(c2, app_id), tmp_path / "w2.log")
    try:
        w1.wait_for("tick", lambda e: e["consumed"] == half, 60)
        w2.start()
        # the group rebalances: each worker gets half of the partitions
        a1 = w1.wait_for("partitions.assigned", lambda e: len(e["partitions"]) == topics.partitions // 2, 60)
        a2 = w2.wait_for("partitions.assigned", lambda e: len(e["partitions"]) == topics.partitions // 2, 60)
        assert sorted(a1["partitions"] + a2["partitions"]) == list(range(topics.partitions))
        assert set(a1["source"].values()) == {"memory"}  # kept across the rebalance
        assert set(a2["source"].values()) == {"rebuild"}  # no state here: rebuilt from the topic

        _publish(broker, topics, pd.concat([events.iloc[half:], fence], ignore_index=True))
        snapshot = asyncio.run(read_snapshot(broker, c1.snapshots_topic, as_of, len(want), 60))
        assert {item: rec.signals for item, rec in snapshot.items()} == want
        owner = {p: 1 for p in a1["partitions"]} | {p: 2 for p in a2["partitions"]}
        assert {owner[rec.partition] for rec in snapshot.values()} == {1, 2}
        assert all(rec.partition == partition_of(item, topics.partitions) for item, rec in snapshot.items())
    finally:
        rc1, rc2 = w1.stop(), w2.stop()
    assert (rc1, rc2) == (0, 0), (w1.tail(), w2.tail())


def test_state_ahead_of_a_recreated_topic_is_rebuilt_not_trusted(broker, topics, tmp_path):
    """A state dir left over from an earlier incarnation of the topic (offsets beyond the log's end)
    must not make the worker skip the new log's events as already counted."""
    from stream.core.events import EventBatch
    from stream.core.trends import TrendTable
    from stream.ingest.worker import TrendWorker
    from worker_helpers import as_dict, run_until_tick

    events = retail_slice(days=3)
    fence, as_of = fences(int(events["ts"].iloc[-1]), topics.partitions, TREND)
    log = pd.concat([events, fence], ignore_index=True)
    config = worker_config(broker, topics, tmp_path / "state")
    store = CheckpointStore(config.state_dir, topics.events, TREND)
    store.prepare()
    for p in range(topics.partitions):  # a ghost item at offsets far beyond anything in the new topic
        stale = TrendTable(TREND)
        stale.apply(EventBatch.from_frame(pd.DataFrame({
            "item_id": ["ghost"], "user_id": ["u"], "ts": [int(events["ts"].iloc[-1])], "event_type": ["view"],
            "weight": [1.0], "offset": [1_000_000 + p]})))
        store.save(p, stale)
    _publish(broker, topics, log)
    seen = {}

    async def scenario():
        worker = TrendWorker(config)

        @worker.add_tick_hook
        async def collect(as_of_ms, signals):
            seen[as_of_ms] = as_dict(signals)

        await run_until_tick(worker, as_of, seen)
        return worker.counters()

    counters = asyncio.run(scenario())
    assert as_of in seen
    assert seen[as_of] == offline_signals(log, TREND, as_of) and "ghost" not in seen[as_of]
    assert counters.applied == len(log)
    assert {p: store.load(p).last_offset for p in range(topics.partitions)} != {
        p: 1_000_000 + p for p in range(topics.partitions)}
