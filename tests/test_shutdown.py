"""A serving worker (`faust -A stream.app worker` with a model) stops cleanly on SIGTERM: exit code 0,
its parts stopped in order, no unclosed Kafka client, no traceback, no terminal control codes in
its log, and its ranker out of the ranker group."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving_artefact import exported_artefact
from stream.tools.replay import replay
from worker_helpers import FaustWorker, retail_slice, worker_config, worker_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# the shutdown as stream.app builds it, by the log line each step ends with
SHUTDOWN_ORDER = ["app.stopping", "ranker.stopped", "serving.stopped", "worker.stopped", "sink.closed"]


async def _members(bootstrap: str, group: str) -> list:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
        (described,) = response.groups
        return list(described[5])  # (error_code, group, state, protocol_type, protocol, members)
    finally:
        await admin.close()


async def _broker_forgets_members_that_leave(bootstrap: str, topic: str, group: str) -> bool:
    """Does this broker drop a member when it sends LeaveGroup? Tansu 0.6 acknowledges the request
    but keeps the member until its session times out; Kafka drops it at once."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, session_timeout_ms=30_000)
    await c.start()
    try:
        deadline = time.monotonic() + 30
        while not c.assignment() and time.monotonic() < deadline:
            await c.getmany(timeout_ms=200)
    finally:
        await c.stop()  # leaves the group
    return not await _members(bootstrap, group)


def test_sigterm_stops_a_serving_worker_in_order_and_cleanly(broker, topics, tmp_path):
    model = exported_artefact()
    config = worker_config(broker, topics, tmp_path / "state", session_timeout_s=30.0, tick_s=0.5)
    scores, ranker_group = f"{topics.events}.scores", f"{topics.events}.ranker"
    env = worker_env(config, app_id=f"{topics.events}.app")
    env.update({"TRAIL_MODEL_DIR": str(model), "TRAIL_CLICKHOUSE_PATH": str(tmp_path / "clickhouse"),
                "TRAIL_SCORES_TOPIC": scores, "TRAIL_RANKER_GROUP": ranker_group,
                "TRAIL_EXPLAIN_TOP": "2", "TRAIL_ORT_THREADS": "1", "TRAIL_HORIZON_DAYS": "7"})
    env.pop("CLICKHOUSE_URL", None)

    events = retail_slice(days=40, start_day=300)
    from stream.core.datasets import load_dataset

    from shared_cache import CACHE_DIR

    items = load_dataset("retail", cache_dir=CACHE_DIR).items
    items = items[items["item_id"].isin(set(events["item_id"]))].reset_index(drop=True)
    asyncio.run(replay(events, items, broker, topics=topics, create_topics=False, progress=False))

    worker = FaustWorker(env, tmp_path / "worker.log").start()
    try:
        worker.wait_for("ranker.tick", lambda e: e.get("predictions", 0) > 0, timeout_s=240)
        worker.wait_for("scorer.tick", timeout_s=60)  # ticks go on while it runs; the explainer is busy
    except BaseException:
        worker.stop()
        raise
    assert worker.proc is not None
    started = time.monotonic()
    rc = worker.stop(timeout_s=90)
    took = time.monotonic() - started
    log = worker.log_path.read_bytes()
    text = log.decode(errors="replace")
    assert rc == 0, f"exit code {rc} after {took:.1f}s; log tail:\n{worker.tail()}"
    assert took < 60, f"the stop took {took:.1f}s"
    assert "Unclosed" not in text, worker.tail()
    assert "Traceback" not in text and '"level": "error"' not in text, worker.tail()
    assert b"\x1b" not in log, "terminal control codes in a log file"

    seen = {name: i for i, e in enumerate(_lines(worker)) if (name := e.get("event")) in SHUTDOWN_ORDER}
    assert sorted(seen, key=seen.get) == SHUTDOWN_ORDER, seen
    ranker = worker.events("ranker.stopped")[-1]
    if ranker["generation"]:  # aiokafka sends LeaveGroup only then (Tansu's groups stay at generation 0)
        assert worker.events("LeaveGroup request succeeded"), "the ranker did not leave its group"
    assert worker.events("sink.closed")[-1]["drained"] is True

    members = asyncio.run(_members(broker, ranker_group))
    if members:  # only a broker that keeps members that left (or were never told to) may still list it
        assert not asyncio.run(_broker_forgets_members_that_leave(broker, scores, f"{ranker_group}.probe")), (
            f"the ranker is still a member of {ranker_group}: {members}")


def _lines(worker: FaustWorker) -> list[dict]:
    import orjson

    out = []
    for line in worker.log_path.read_bytes().splitlines():
        if line.startswith(b"{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass
    return out
