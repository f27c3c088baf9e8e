"""The model inside the stream: per-tick scoring, one global ranking, predictions, explanations.

    TRAIL_MODEL_DIR=models/trail-smollm2 faust -A stream.app worker

`stream.app` builds one `Serving` when a model directory is configured, hands it the process's
trend worker and result sink, starts it before the first tick and stops it on shutdown
(`Serving.stop` has the order). The artefact is loaded and checked when the app starts (feature
spec, prompt version, ONNX files and their hashes, sessions opened), so a wrong or corrupt
model stops the worker at start with a clear message. `Serving.start` then waits for the item
catalogue and warms the scorer's item states up (from disk, then the catalogue's items the cache
lacks, at most TRAIL_ITEM_WARM: stream.serving.scorer), in the scorer's thread, before the first
tick: the app wires the tick hooks only after it, so a cold start delays the first tick instead
of making the hooks skip ticks.

Data flow (docs/serving.md has the picture and the reasons):

  tick hook (every worker, its partitions)        ranker (one process: the group member that
    TickScorer.score in an executor thread   -->    holds the single partition of trail.scores)
    ScoredPart messages -> trail.scores              parts of a tick merged -> rank_tick
                                                     -> trail.predictions + ClickHouse sink
                                                     -> top movers -> Explainer (own task)
                                                        -> trail.explanations + sink

A tick is ranked when the parts received cover every partition of the event topic, or,
after `grace_s`, with what arrived (logged). Ticks older than the last one ranked are
dropped (counted), so predictions move forward only. The ranker commits its offsets on
trail.scores once a tick's predictions are acknowledged by Kafka and durable in the sink.

Configuration: TRAIL_MODEL_DIR, TRAIL_SCORE_*, TRAIL_EXPLAIN_*, TRAIL_RANK* and the rest of
`ServingConfig` come from the environment through `stream.settings`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog

from stream.ingest.catalogue import ItemCatalogue
from stream.ingest.config import WorkerConfig
from stream.serving.config import ServingConfig
from stream.serving.explainer import ExplainRequest, Explainer, Mover, MoverPicker
from stream.model.artefact import Artefact, ArtefactError
from stream.model.onnx_models import CPU, Generator, choose_providers
from stream.model.constraint import ClaimConstraint
from stream.core.features import season_of
from stream.core.records import Explanation, ItemInfo, Prediction
from stream.model.item_states import ItemStateStore
from stream.serving.scorer import (ScoredChunk, ScoredChunkError, ScoredPart, TickScorer, WarmUp,
                                   prompt_for, rank_tick)
from stream.topics import TopicSpec
from stream.core.trends import Signals

log = structlog.get_logger(__name__)

SCORES_RETENTION_MS = 3_600_000


@dataclass
class _Tick:
    first_seen: float
    chunks: dict[str, dict[int, ScoredChunk]] = field(default_factory=dict)  # source -> chunk index -> chunk
    last_offset: int = -1

    def add(self, chunk: ScoredChunk, offset: int) -> None:
        self.chunks.setdefault(chunk.source, {})[chunk.chunk] = chunk
        self.last_offset = max(self.last_offset, offset)

    def _whole(self) -> list[list[ScoredChunk]]:
        """The chunks of every source whose part has arrived whole."""
        return [list(c.values()) for c in self.chunks.values() if c and len(c) == next(iter(c.values())).chunks]

    def parts(self) -> list[ScoredPart]:
        return [ScoredPart.from_chunks(c) for c in self._whole()]

    def complete(self) -> bool:
        firsts = [c[0] for c in self._whole()]
        if not firsts:
            return False
        if any(c.partitions is None for c in firsts):
            return True
        covered = {q for c in firsts for q in c.partitions}
        return covered >= set(range(firsts[0].total_partitions))


@dataclass
class ServingStats:
    ticks_scored: int = 0
    ticks_ranked: int = 0
    ticks_partial: int = 0  # ranked after grace_s without every partition
    ticks_dropped: int = 0  # superseded before they were complete, or arrived after a newer tick
    late_messages: int = 0
    predictions: int = 0
    explanations: int = 0
    ticks_unexplained: int = 0  # ranked while the export was still writing the generator: no explainer yet
    last_published_at: float | None = None


class Serving:
    """Scorer hook + ranker + explainer of one process; see the module doc."""

    def __init__(self, config: ServingConfig, worker_config: WorkerConfig, *, sink: Any = None,
                 worker: Any = None) -> None:
        self.config = config
        self.worker_config = worker_config
        self.topics = worker_config.topics
        self.worker = worker
        self.sink = sink
        # an export still writing its generator serves predictions now and explanations once it is there
        self.artefact = Artefact.load(config.model_dir, worker_config.trend, pending_ok=True)
        store = (None if config.item_store_dir is None
                 else ItemStateStore.for_artefact(self.artefact, config.item_store_dir))
        self.scorer = TickScorer(self.artefact, publish_top=config.publish_top, batch=config.batch,
                                 provider=config.provider, horizon_days=config.horizon_days, threads=config.threads,
                                 cache_items=config.cache_items, store=store)
        # None while the export writes the generator (the artefact's "pending"): ticks are ranked and published
        # unexplained meanwhile (counted in stats.ticks_unexplained), `_await_generator` builds it when it is there
        self.explainer: Explainer | None = None
        if not self.artefact.pending:
            self.explainer = self._build_explainer(self.artefact)
        self.picker = MoverPicker(config.explain_top, config.explain_by, self.scorer.horizon_days)
        self.catalogue = ItemCatalogue(worker_config.bootstrap, self.topics.items, kafka=worker_config.kafka)
        self.source = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stats = ServingStats()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trail-scorer")
        self._producer: Any = None
        self._ranker: Any = None
        self._tasks: list[asyncio.Task] = []
        self._commits: set[asyncio.Task] = set()
        self._ticks: dict[int, _Tick] = {}
        self._last_ranked: int | None = None
        self.started = False
        self._closing = False

    def _build_explainer(self, artefact: Artefact) -> Explainer:
        config = self.config
        providers = choose_providers(config.provider)
        # on CPU, the int8 generator when exported (export.onnx --generator-int8): ~1.8x the explanations/s
        role = "generator.int8" if providers[0] == CPU and artefact.has("generator.int8") else "generator"
        gen = Generator(artefact.path(role), providers, self.scorer.tokenizer.end_id, config.explain_threads)
        # one batch per tick's movers, each row held to its claim grammar (stream.model.constraint)
        return Explainer(gen.generate, self.scorer.tokenizer, artefact.model_version,
                         artefact.max_explanation_tokens, self._publish_explanations,
                         horizon_days=self.scorer.horizon_days, generate_batch=gen.generate_batch,
                         constraint=ClaimConstraint(artefact.path("tokenizer"), self.scorer.tokenizer.end_id),
                         batch_size=max(1, config.explain_top), temperature=config.explain_temperature,
                         top_p=config.explain_top_p)

    async def _await_generator(self, every_s: float = 2.0) -> None:
        """Until the export records its generator: re-read the artefact, then build and start the explainer."""
        t0 = time.monotonic()
        log.warning("serving.explainer_pending", pending=self.artefact.pending, model_version=self.artefact.model_version,
                    note="predictions are published unexplained until the export has written the generator")
        while True:
            await asyncio.sleep(every_s)
            try:
                art = await asyncio.to_thread(Artefact.load, self.config.model_dir, self.worker_config.trend)
            except ArtefactError:
                continue  # still under way (a failed export is the exporter's to report)
            if art.model_version != self.artefact.model_version or art.onnx.get("source") != self.artefact.onnx.get("source"):
                log.error("serving.explainer_mismatch", model_version=art.model_version,
                          note="the export finished for other weights than this worker scores with; not explaining")
                return
            explainer = await asyncio.to_thread(self._build_explainer, art)
            if self._closing:
                return
            self.artefact, self.explainer = art, explainer
            explainer.start()
            log.info("serving.explainer_ready", waited_s=round(time.monotonic() - t0, 1),
                     ticks_unexplained=self.stats.ticks_unexplained)
            return

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from stream.topics import ensure_topics

        if self.started:
            return
        t = self.topics
        specs = [s for s in t.specs() if s.name in (t.items, t.predictions, t.explanations)]
        specs.append(TopicSpec(self.config.scores_topic, 1, t.replication,
                               {"cleanup.policy": "delete", "retention.ms": str(SCORES_RETENTION_MS)}))
        kafka = self.worker_config.kafka
        await ensure_topics(self.worker_config.bootstrap, specs=specs, kafka=kafka)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.worker_config.bootstrap, acks="all", linger_ms=5,
                                          max_request_size=4 * 1024 * 1024, **kafka.client_kwargs())
        await self._producer.start()
        await self.catalogue.start()
        session_ms = int(self.worker_config.session_timeout_s * 1000)
        self._ranker = AIOKafkaConsumer(self.config.scores_topic, bootstrap_servers=self.worker_config.bootstrap,
                                        group_id=self.config.ranker_group, enable_auto_commit=False,
                                        auto_offset_reset="earliest", session_timeout_ms=session_ms,
                                        heartbeat_interval_ms=max(100, session_ms // 3),
                                        fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024,
                                        **kafka.client_kwargs())
        await self._ranker.start()
        self._tasks = [asyncio.create_task(self._rank_loop(), name="trail-ranker"),
                       asyncio.create_task(self._grace_loop(), name="trail-rank-grace")]
        if self.explainer is not None:
            self.explainer.start()
        else:
            self._tasks.append(asyncio.create_task(self._await_generator(), name="trail-await-generator"))
        await self.catalogue.wait_caught_up(self.config.catalogue_wait_s)
        await self._warm_up()
        self.started = True
        log.info("serving.started", model_version=self.artefact.model_version, provider=self.scorer.provider,
                 cache_items=self.config.cache_items, items_known=len(self.catalogue.items),
                 source=self.source)

    async def _warm_up(self) -> WarmUp:
        """The item states of the catalogue, in the scorer's thread (see the module doc)."""
        items = dict(self.catalogue.items)  # a copy: the catalogue goes on consuming on the loop meanwhile
        warm = await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(self.scorer.warm, items, self.config.warm_items,
                                              lambda: self._closing))
        log.info("serving.warmed", items=warm.items, encoded=warm.encoded, seconds=warm.seconds,
                 from_disk=warm.from_disk, cached_items=len(self.scorer.cache))
        return warm

    async def stop(self, flush_timeout_s: float = 30.0) -> None:
        """Stop in the order that loses nothing already published and leaves nothing open:
        no more ranking or explaining; the sink flushed and the ranked ticks' offsets committed;
        the ranker out of its group (its partition moves at once, not after the session timeout);
        the explainer's and scorer's threads joined (the item states written to their store in between);
        the catalogue and the producer closed.
        Call it after the tick hooks have stopped (stream.app does)."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.explainer is not None:
            await self.explainer.stop()  # its task: no new explanation starts; a running generate() finishes below
        if self.sink is not None:
            # what was ranked becomes durable, so that its offsets can be committed
            if not await asyncio.to_thread(self.sink.flush, flush_timeout_s):
                log.warning("serving.sink_not_flushed", timeout_s=flush_timeout_s)
        if self._commits:  # a store that is down must not hold the stop: those ticks are ranked again
            _, pending = await asyncio.wait(list(self._commits), timeout=10)
            for task in pending:
                task.cancel()
        if self._ranker is not None:
            coordinator = getattr(self._ranker, "_coordinator", None)
            member, generation = getattr(coordinator, "member_id", None), getattr(coordinator, "generation", None)
            await self._ranker.stop()  # sends LeaveGroup (aiokafka: for generations > 0)
            self._ranker = None
            log.info("ranker.stopped", group=self.config.ranker_group, member_id=member, generation=generation)
        if self.explainer is not None:
            await asyncio.to_thread(self.explainer.executor.shutdown, True)
        try:  # after a tick or warm-up still running there: the item states they encoded are kept
            await asyncio.get_running_loop().run_in_executor(self._executor, self.scorer.save_states, True)
        except RuntimeError:  # the executor is shut down already: a second stop()
            pass
        await asyncio.to_thread(self._executor.shutdown, True)
        await self.catalogue.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        self.started = False
        log.info("serving.stopped", ticks_scored=self.stats.ticks_scored, ticks_ranked=self.stats.ticks_ranked,
                 predictions=self.stats.predictions, explanations=self.stats.explanations)

    # ---- the tick hook (every worker) ----------------------------------------------------------------
    def _ownership(self) -> tuple[list[int] | None, int]:
        w = self.worker
        if w is None or getattr(w, "consumer", None) is None:
            return None, 1
        total = len(w.consumer.partitions_for_topic(w.topic) or ()) or self.topics.partitions
        return sorted(w.parts), total

    async def on_tick(self, as_of_ms: int, signals: Signals) -> None:
        if self._closing:
            return
        if not self.started:  # nothing starts itself: stream.app starts serving before it wires the tick hooks
            raise RuntimeError("Serving.on_tick before Serving.start(): start it first (stream.app does)")
        partitions, total = self._ownership()
        items: dict[str, ItemInfo] = self.catalogue.items
        part = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.scorer.score, as_of_ms, signals, items, partitions, total, self.source)
        key = str(as_of_ms).encode()
        futures = [await self._producer.send(self.config.scores_topic, value=m, key=key) for m in part.messages()]
        await asyncio.gather(*futures)
        self.stats.ticks_scored += 1
        log.info("scorer.tick", as_of_ms=as_of_ms, month=season_of(as_of_ms), **self.scorer.stats.last)
        if self.scorer.save_due():  # new item states, and the last write is SAVE_EVERY_S old: after publishing
            await asyncio.get_running_loop().run_in_executor(self._executor, self.scorer.save_states)

    # ---- the ranker (the process holding trail.scores) ------------------------------------------------
    async def _rank_loop(self) -> None:
        while True:
            batches = await self._ranker.getmany(timeout_ms=500, max_records=1000)
            for tp, msgs in batches.items():
                for m in msgs:
                    try:
                        chunk = ScoredChunk.from_json(m.value)
                    except ScoredChunkError as e:
                        log.warning("ranker.bad_message", offset=m.offset, error=str(e))
                        continue
                    as_of = chunk.as_of_ms
                    if self._last_ranked is not None and as_of <= self._last_ranked:
                        self.stats.late_messages += 1  # a part of a tick already ranked
                        continue
                    tick = self._ticks.setdefault(as_of, _Tick(time.monotonic()))
                    tick.add(chunk, m.offset)
                    if tick.complete():
                        await self._rank(as_of, tp)

    async def _grace_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.grace_s))
            now = time.monotonic()
            overdue = [a for a, t in self._ticks.items() if now - t.first_seen > self.config.grace_s and t.parts()]
            if overdue:
                as_of = max(overdue)
                self.stats.ticks_partial += 1
                log.warning("ranker.partial_tick", as_of_ms=as_of, waited_s=self.config.grace_s)
                await self._rank(as_of, None)

    async def _rank(self, as_of: int, tp: Any) -> None:
        tick = self._ticks.pop(as_of)
        for older in [a for a in self._ticks if a < as_of]:
            del self._ticks[older]
            self.stats.ticks_dropped += 1
        self._last_ranked = as_of
        predictions = rank_tick(tick.parts(), self.config.publish_top, self.artefact.model_version)
        seq = await self._publish_predictions(predictions)
        self.stats.ticks_ranked += 1
        self.stats.last_published_at = time.time()
        if predictions and self.explainer is not None:
            self.explainer.offer(self._request(as_of, predictions))
        elif predictions:
            self.stats.ticks_unexplained += 1  # the generator is still being exported
        if tp is not None and tick.last_offset >= 0:
            task = asyncio.create_task(self._commit_when_durable(tp, tick.last_offset + 1, seq))
            self._commits.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._commits.discard)
        log.info("ranker.tick", as_of_ms=as_of, predictions=len(predictions),
                 top=[p.item_id for p in predictions[:3]])

    def _request(self, as_of: int, predictions: list[Prediction]) -> ExplainRequest:
        movers = []
        month = season_of(as_of)
        for p in self.picker(predictions):
            info = self.catalogue.items.get(p.item_id) or ItemInfo()
            prompt = prompt_for(p.item_id, info, p.signals, self.scorer.horizon_days, month)
            movers.append(Mover(p, prompt, info.title))
        return ExplainRequest(as_of, movers)

    async def _commit_when_durable(self, tp: Any, offset: int, seq: int | None) -> None:
        try:
            if self.sink is not None and seq is not None:
                await self.sink.wait_durable(seq)
            if self._ranker is not None:
                await self._ranker.commit({tp: offset})
        except Exception as e:  # noqa: BLE001 - a failed commit only means the tick may be ranked again
            log.warning("ranker.commit_failed", offset=offset, error=str(e))

    # ---- publishing --------------------------------------------------------------------------------------
    async def _send(self, topic: str, records: list[Prediction] | list[Explanation]) -> None:
        futures = [await self._producer.send(topic, value=r.to_json(), key=r.item_id.encode()) for r in records]
        await asyncio.gather(*futures)

    async def _publish_predictions(self, predictions: list[Prediction]) -> int | None:
        await self._send(self.topics.predictions, predictions)
        self.stats.predictions += len(predictions)
        return await self.sink.asubmit(predictions) if self.sink is not None and predictions else None

    async def _publish_explanations(self, records: list[Explanation]) -> None:
        await self._send(self.topics.explanations, records)
        self.stats.explanations += len(records)
        if self.sink is not None:
            await self.sink.asubmit(records)
