"""The worker's Prometheus series (`/metrics`), in a registry of its own per app.

Most series are read at scrape time from the counters the parts already keep (the trend worker's
`Counters`, the serving and explainer stats, the sink's `SinkStats`), so the stream's code paths
carry no metrics calls; the tick's duration and size come from two tick hooks wrapped around the
others (`TickTimer`). A per-app `CollectorRegistry`, never prometheus-client's global one, so that
several apps in one process (tests) do not collide.

Rates ("per second") are also exported as gauges over the last minute of scrapes, for a reader
without PromQL; with Prometheus use `rate(trail_events_consumed_total[1m])`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RATE_WINDOW_S = 60.0


class _Rate:
    """Per-second rate of a monotonically growing total over the last `window_s` of samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def __call__(self, total: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        t0, v0 = self._samples[0]
        return (total - v0) / (now - t0) if now > t0 and total >= v0 else 0.0


class TickTimer:
    """Two tick hooks: `start` runs before every other hook of a tick, `finish` after the last; the
    time between them is the tick's duration (scoring, ranking hand-off, snapshot storing)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram("trail_tick_duration_seconds", "Time the tick hooks took per tick",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=registry)
        self.items_last_tick = 0
        self.last_tick_ms: int | None = None
        self._t0: float | None = None

    async def start(self, as_of_ms: int, signals: Any) -> None:
        self._t0 = time.perf_counter()
        self.items_last_tick = len(signals.item_ids)
        self.last_tick_ms = as_of_ms

    async def finish(self, as_of_ms: int, signals: Any) -> None:
        if self._t0 is not None:
            self.duration.observe(time.perf_counter() - self._t0)
            self._t0 = None


class TrailCollector(Collector):
    """Reads `parts` (stream.app.Trail: .worker, .serving, .sink) at every scrape."""

    def __init__(self, parts: Any, timer: TickTimer | None = None) -> None:
        self.parts = parts
        self.timer = timer
        self._events_rate = _Rate()
        self._explained_rate = _Rate()

    def collect(self) -> Iterator[Any]:
        yield from self._worker()
        yield from self._serving()
        yield from self._sink()

    def _worker(self) -> Iterator[Any]:
        w = getattr(self.parts, "worker", None)
        if w is None:
            return
        c = w.counters()
        consumed = CounterMetricFamily("trail_events_consumed", "Event records read from Kafka (duplicates included)")
        consumed.add_metric([], c.consumed)
        yield consumed
        rate = GaugeMetricFamily("trail_events_consumed_per_second", "Events consumed per second, last minute")
        rate.add_metric([], self._events_rate(c.consumed))
        yield rate
        applied = CounterMetricFamily("trail_events_applied", "Events counted in the trend tables")
        applied.add_metric([], c.applied)
        yield applied
        dlq = CounterMetricFamily("trail_dlq_records", "Records sent to the dead-letter topic", labels=["reason"])
        for reason, n in sorted(c.reasons.items()):
            dlq.add_metric([str(reason)], n)
        yield dlq
        dlq_failed = CounterMetricFamily("trail_dlq_send_failures", "Dead-letter sends that failed")
        dlq_failed.add_metric([], w.dlq_failed)
        yield dlq_failed
        lag = GaugeMetricFamily("trail_consumer_lag", "Records of the events topic not read yet", labels=["partition"])
        consumer = getattr(w, "consumer", None)
        if consumer is not None:
            from aiokafka import TopicPartition

            for p, st in sorted(list(w.parts.items())):
                hw = consumer.highwater(TopicPartition(w.topic, p))
                if hw is not None:
                    lag.add_metric([str(p)], max(0, hw - st.next_offset))
        yield lag
        ticks = CounterMetricFamily("trail_ticks", "Ticks published to the hooks")
        ticks.add_metric([], w.ticks_published)
        yield ticks
        skipped = CounterMetricFamily("trail_ticks_skipped", "Ticks skipped because a stage was still busy",
                                      labels=["stage"])
        skipped.add_metric(["hooks"], w.ticks_skipped_by_hooks)
        serving = getattr(self.parts, "serving", None)
        if serving is not None:
            skipped.add_metric(["ranker"], serving.stats.ticks_dropped)
        yield skipped
        if w.last_as_of_ms is not None:
            last = GaugeMetricFamily("trail_last_tick_timestamp_seconds", "The latest tick (event time), epoch s")
            last.add_metric([], w.last_as_of_ms / 1000)
            yield last
        if self.timer is not None:
            items = GaugeMetricFamily("trail_tick_items", "Items in the latest tick (scored when a model is served)")
            items.add_metric([], self.timer.items_last_tick)
            yield items

    def _serving(self) -> Iterator[Any]:
        s = getattr(self.parts, "serving", None)
        if s is None:
            return
        st = s.stats
        for name, value, doc in (("trail_ticks_ranked", st.ticks_ranked, "Ticks ranked and published"),
                                 ("trail_predictions_published", st.predictions, "Prediction records published"),
                                 ("trail_explanations_published", st.explanations, "Explanation records published"),
                                 ("trail_ticks_unexplained", getattr(st, "ticks_unexplained", 0),
                                  "Ticks ranked before the export had written the generator (no explainer yet)")):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], value)
            yield m
        explainer = getattr(s, "explainer", None)
        if explainer is None:
            return
        e = explainer.stats
        rate = GaugeMetricFamily("trail_explanations_per_second", "Explanations written per second, last minute")
        rate.add_metric([], self._explained_rate(e.explained))
        yield rate
        for name, value, doc in (("trail_explainer_explained", e.explained, "Movers explained"),
                                 ("trail_explainer_faithful", e.faithful, "Explanations whose every claim checked true"),
                                 ("trail_explainer_repaired", e.repaired, "Explanations the checker repaired"),
                                 ("trail_explainer_failed", e.failed, "Explanations that failed"),
                                 ("trail_explainer_dropped_items", e.dropped_items,
                                  "Movers not explained: their tick was superseded")):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], value)
            yield m
        waiting = getattr(getattr(explainer, "_mailbox", None), "waiting", None)
        queue = GaugeMetricFamily("trail_explainer_queue", "Movers waiting for the explainer")
        queue.add_metric([], len(waiting.movers) if waiting is not None else 0)
        yield queue

    def _sink(self) -> Iterator[Any]:
        sink = getattr(self.parts, "sink", None)
        if sink is None:
            return
        st = sink.stats()
        for name, value, doc in (("trail_sink_rows_written", st.written_rows, "Rows inserted into ClickHouse"),
                                 ("trail_sink_insert_failures", st.failed_attempts, "Failed insert attempts"),
                                 ("trail_sink_rows_spilled", st.spilled_rows, "Rows written to spill files"),
                                 ("trail_sink_rows_replayed", st.replayed_rows, "Rows replayed from spill files")):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], value)
            yield m
        for name, value, doc in (("trail_sink_backlog_rows", st.buffered_rows, "Rows waiting in memory"),
                                 ("trail_sink_spill_files", st.spill_files, "Spill files not replayed yet"),
                                 ("trail_sink_spill_bytes", st.spill_bytes, "Bytes in spill files"),
                                 ("trail_sink_store_healthy", int(st.store_healthy),
                                  "1 while the last insert succeeded")):
            m = GaugeMetricFamily(name, doc)
            m.add_metric([], value)
            yield m


class Metrics:
    """One app's registry: the collector over its parts and the tick timer."""

    def __init__(self, parts: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.timer = TickTimer(self.registry)
        self.registry.register(TrailCollector(parts, self.timer))

    def render(self) -> bytes:
        return generate_latest(self.registry)
