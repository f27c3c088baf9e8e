"""End to end on the real broker: replay a slice of Online Retail II, the trend worker ticks, the
ONNX scorer ranks, the explainer explains; predictions and explanations arrive on their topics
(and in ClickHouse) with the contract fields.

Also measures freshness: for every replayed event, the time from its arrival on trail.events
(record timestamp) to the first published prediction whose tick includes it (tick > event ts).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace
from datetime import datetime

import numpy as np
import orjson
import pytest

from stream.settings import WorkerConfig
from stream.core.features import MAX_LOG_COUNT
from stream.core.records import Explanation, Prediction
from stream.tools.replay import replay
from stream.core.records import GENERATORS
from stream.serving.service import Serving, ServingConfig
from stream.store.sink import ResultSink, SinkConfig
from stream.store.clickhouse import StoreConfig, connect
from stream.ingest.worker import TrendWorker
from serving_artefact import exported_artefact

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PREDICTION_FIELDS = {"item_id", "tick", "score", "predicted_count", "predicted_low", "predicted_high", "rank", "signals",
                     "drivers", "model_version"}
EXPLANATION_FIELDS = {"item_id", "tick", "rank", "explanation", "raw_explanation", "repaired", "faithful",
                      "claims_checked", "forecast", "forecast_agrees", "reason", "reason_source", "driver", "decoding",
                      "generator", "model_version"}
SLICE_DAYS = 40
EVENTS_PER_S = 10_000
TICK_S = 1.0


def retail_slice():
    from shared_cache import CACHE_DIR
    from stream.core.datasets import load_dataset

    ds = load_dataset("retail", cache_dir=CACHE_DIR)
    ev = ds.events
    start = int(ev["ts"].iloc[0]) + 300 * 86_400_000  # mid-log: a season with history before it
    part = ev[(ev["ts"] >= start) & (ev["ts"] < start + SLICE_DAYS * 86_400_000)].reset_index(drop=True)
    items = ds.items[ds.items["item_id"].isin(set(part["item_id"]))].reset_index(drop=True)
    return part, items


async def read_topic(bootstrap: str, topic: str, quiet_s: float = 1.5) -> list:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        await c.topics()
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        out = []
        while True:
            got = await c.getmany(timeout_ms=int(quiet_s * 1000), max_records=50_000)
            for msgs in got.values():
                out += msgs
            if not got and all([await c.position(tp) >= end[tp] for tp in tps]):
                return out
    finally:
        await c.stop()


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def freshness(events: list, predictions: list) -> np.ndarray:
    """Seconds from each event's arrival to the first prediction of a tick that includes it."""
    first_pub: dict[int, int] = {}
    for m in predictions:
        tick = int(datetime.fromisoformat(orjson.loads(m.value)["tick"].replace("Z", "+00:00")).timestamp() * 1000)
        first_pub[tick] = min(first_pub.get(tick, m.timestamp), m.timestamp)
    ticks = np.array(sorted(first_pub), np.int64)
    pub = np.array([first_pub[t] for t in ticks], np.int64)
    ts = np.array([orjson.loads(m.value)["ts"] for m in events], np.int64)
    arrived = np.array([m.timestamp for m in events], np.int64)
    k = np.searchsorted(ticks, ts, side="right")  # first tick > ts
    seen = k < len(ticks)
    return (pub[k[seen]] - arrived[seen]) / 1000.0


def test_replayed_retail_is_scored_ranked_and_explained(broker, topics, tmp_path):
    model_dir = exported_artefact()
    events, items = retail_slice()
    span_ms = int(events["ts"].iloc[-1] - events["ts"].iloc[0])
    speed = span_ms / 1000 / (len(events) / EVENTS_PER_S)  # history seconds per wall second for 10k events/s
    store = StoreConfig(path=tmp_path / "clickhouse")
    sink = ResultSink(store, SinkConfig(flush_interval_s=0.2, spill_dir=tmp_path / "spill")).start()
    wcfg = replace(WorkerConfig(), bootstrap=broker, topics=topics, state_dir=tmp_path / "state",
                   group_id=f"{topics.events}-trends", tick_s=TICK_S, session_timeout_s=3.0, publish_snapshots=False)
    scfg = ServingConfig(model_dir=model_dir, explain_top=2, horizon_days=7,
                         scores_topic=f"{topics.events}.scores", ranker_group=f"{topics.events}-ranker",
                         catalogue_wait_s=20, threads=int(os.environ.get("TRAIL_TEST_ORT_THREADS", "2")))

    async def main() -> dict:
        worker = TrendWorker(wcfg)
        serving = Serving(scfg, wcfg, sink=sink, worker=worker)
        worker.add_tick_hook(serving.on_tick)
        await replay(events.iloc[:0], items, broker, topics=topics, create_topics=False, progress=False)
        await serving.start()
        await worker.start()
        run = asyncio.create_task(worker.run())
        try:
            stats = await replay(events, None, broker, topics=topics, speed=speed, create_topics=False,
                                 progress=False)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                if serving.stats.ticks_ranked >= 2 and serving.stats.explanations >= 2:
                    break
            await serving.explainer.wait_idle(120)
        finally:
            await worker.stop()
            await run
            await serving.stop()
        return {"replay_events_per_s": stats.events_per_s, "serving": serving.stats, "explainer": serving.explainer.stats,
                "scorer": serving.scorer.stats, "model_version": serving.artefact.model_version,
                "names": serving.scorer.features.signal_names}

    out = asyncio.run(main())
    assert sink.wait_durable_sync(sink.last_seq, timeout=60)
    sink.close()
    assert out["serving"].ticks_ranked >= 2, out
    assert out["explainer"].explained >= 1, out

    preds = asyncio.run(read_topic(broker, topics.predictions))
    expl = asyncio.run(read_topic(broker, topics.explanations))
    assert preds and expl

    by_tick: dict[str, dict[str, int]] = {}
    scores: dict[str, dict[int, float]] = {}
    for m in preds:
        d = orjson.loads(m.value)
        assert set(d) == PREDICTION_FIELDS
        assert m.key.decode() == d["item_id"]
        p = Prediction.from_dict(d)  # validates types: ISO tick, finite score, count >= 0, rank >= 1
        assert p.model_version == out["model_version"]
        assert set(out["names"]) <= set(p.signals)
        # the count head, not the ranking score: bounded by what log_count can give (stream.core.features)
        assert 0 <= p.predicted_count <= np.expm1(MAX_LOG_COUNT)
        # the committed model has a range head: the count is its median, inside its 80% range
        assert p.predicted_low is not None and p.predicted_low <= p.predicted_count <= p.predicted_high
        by_tick.setdefault(d["tick"], {})[p.item_id] = p.rank
        scores.setdefault(d["tick"], {})[p.rank] = p.score
    for tick, ranks in by_tick.items():
        assert sorted(ranks.values()) == list(range(1, len(ranks) + 1)), f"ranks of {tick} are not a permutation"
        ordered = [scores[tick][r] for r in sorted(scores[tick])]
        assert ordered == sorted(ordered, reverse=True), f"ranks of {tick} do not follow the score"

    for m in expl:
        d = orjson.loads(m.value)
        assert set(d) == EXPLANATION_FIELDS
        e = Explanation.from_dict(d)
        assert isinstance(d["faithful"], bool) and isinstance(d["claims_checked"], int)
        assert d["repaired"] == (d["explanation"] != d["raw_explanation"])  # the record says when it was rewritten
        assert d["forecast"] in ("rise", "steady", "fall", None) and (d["forecast_agrees"] is False or d["forecast"])
        assert d["generator"] in GENERATORS  # which export wrote the raw text, on every record
        assert d["tick"] in by_tick, "an explanation of a tick that was never predicted"
        tick_ranks = by_tick[d["tick"]]
        assert tick_ranks[e.item_id] == e.rank  # the rank the item had in that tick's predictions

    client = connect(store)
    stored = client.query("SELECT count() FROM trail_predictions FINAL").result_rows[0][0]
    stored_expl = client.query("SELECT count() FROM trail_explanations FINAL").result_rows[0][0]
    assert stored == len(preds)
    assert stored_expl == len(expl)

    ev_msgs = asyncio.run(read_topic(broker, topics.events))
    fresh = freshness(ev_msgs, preds)
    report = {"events": len(ev_msgs), "events_reflected": int(len(fresh)),
              "replay_events_per_s": round(out["replay_events_per_s"]),
              "freshness_p50_s": round(percentile(fresh, 50), 2), "freshness_p99_s": round(percentile(fresh, 99), 2),
              "tick_s": TICK_S, "ticks_ranked": out["serving"].ticks_ranked, "predictions": len(preds),
              "explanations": len(expl), "faithful": sum(orjson.loads(m.value)["faithful"] for m in expl),
              "items_encoded": out["scorer"].encoded,
              "item_encode_per_s": round(out["scorer"].encoded / max(out["scorer"].encode_seconds, 1e-9), 1)}
    print("serving e2e:", json.dumps(report))
    assert len(fresh) > 0.5 * len(ev_msgs)
    # the target (p99 <= tick + 2 s) is reported, not asserted: a shared 2-core CI box cannot promise it;
    # this bound catches a stalled scorer or ranker
    assert report["freshness_p99_s"] < 30
