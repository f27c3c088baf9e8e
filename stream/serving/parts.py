"""The four parts `Serving` (stream.serving.service) is made of, each with one job and typed dependencies.

- `Publisher`: the producer; sends scored parts, predictions and explanations to Kafka and the
  records to the result sink.
- `ScorerService`: the tick hook of every worker: scores its partitions' tick in the scorer's thread
  and publishes the parts to trail.scores; warms the item states up and writes them to their store.
- `ExplainerService`: builds the `Explainer` (the generator, quantised on CPU when exported:
  `generator_role`), picks a ranked tick's movers, builds their prompts from the catalogue and hands them
  to it (its own task and thread).
  While the export is still writing the generator (the artefact's "pending") it counts the ranked ticks
  unexplained and re-reads the export record until the generator is there (`await_generator`).
- `Ranker`: the consumer of trail.scores (one process: its single partition's holder): merges a tick's
  parts, ranks it, publishes the predictions, offers the movers to the explainer and commits once the
  predictions are durable; a grace timer ranks a tick with what arrived after `grace_s`.

They share one `ServingStats` (the web page and the metrics read it as `serving.stats`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from stream.core.features import season_of
from stream.core.forecast import PredictedCount
from stream.core.records import GENERATOR_OF_ROLE, Explanation, ItemInfo, Prediction
from stream.core.trends import Signals, TrendConfig
from stream.model.artefact import Artefact, ArtefactError
from stream.model.constraint import ClaimConstraint
from stream.model.onnx_models import Generator, ShardedGenerator, choose_providers, explain_generator
from stream.model.teacher_forced import generator_role
from stream.serving.config import ServingConfig, explain_threads
from stream.serving.explainer import ExplainRequest, Explainer, Mover, MoverPicker
from stream.serving.scorer import ScoredChunk, ScoredChunkError, ScoredPart, TickScorer, WarmUp, prompt_for, rank_tick

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

log = structlog.get_logger(__name__)


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


class DurableSink(Protocol):
    """What serving needs of the result sink (stream.store.sink.ResultSink)."""

    async def asubmit(self, records: Iterable[Prediction | Explanation]) -> int: ...

    async def wait_durable(self, seq: int, timeout: float | None = None) -> None: ...

    def flush(self, timeout: float | None = None) -> bool: ...


class PartitionOwner(Protocol):
    """What the tick hook needs of the trend worker (stream.ingest.worker.TrendWorker)."""

    topic: str
    consumer: AIOKafkaConsumer | None

    @property
    def parts(self) -> dict[int, object]: ...


class ItemSource(Protocol):
    """The item catalogue (stream.ingest.catalogue.ItemCatalogue): item id -> title and category."""

    items: dict[str, ItemInfo]


# ---- the publisher ---------------------------------------------------------------------------------------
class Publisher:
    def __init__(self, predictions_topic: str, explanations_topic: str, sink: DurableSink | None,
                 stats: ServingStats) -> None:
        self.predictions_topic = predictions_topic
        self.explanations_topic = explanations_topic
        self.sink = sink
        self.stats = stats
        self.producer: AIOKafkaProducer | None = None

    async def start(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        await producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def send_all(self, topic: str, values: list[bytes], key: bytes) -> None:
        futures = [await self.producer.send(topic, value=v, key=key) for v in values]
        await asyncio.gather(*futures)

    async def _send(self, topic: str, records: list[Prediction] | list[Explanation]) -> None:
        futures = [await self.producer.send(topic, value=r.to_json(), key=r.item_id.encode()) for r in records]
        await asyncio.gather(*futures)

    async def publish_predictions(self, predictions: list[Prediction]) -> int | None:
        """Returns the sink's sequence number of the batch (None: nothing submitted)."""
        await self._send(self.predictions_topic, predictions)
        self.stats.predictions += len(predictions)
        return await self.sink.asubmit(predictions) if self.sink is not None and predictions else None

    async def publish_explanations(self, records: list[Explanation]) -> None:
        await self._send(self.explanations_topic, records)
        self.stats.explanations += len(records)
        if self.sink is not None:
            await self.sink.asubmit(records)


# ---- the tick scorer (every worker) ------------------------------------------------------------------------
class ScorerService:
    def __init__(self, scorer: TickScorer, config: ServingConfig, catalogue: ItemSource, publisher: Publisher,
                 worker: PartitionOwner | None, partitions: int, source: str, stats: ServingStats) -> None:
        self.scorer = scorer
        self.config = config
        self.catalogue = catalogue
        self.publisher = publisher
        self.worker = worker
        self.partitions = partitions  # of the event topic, when the worker cannot say
        self.source = source
        self.stats = stats
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trail-scorer")
        self._closing = False

    async def warm_up(self) -> WarmUp:
        """The item states of the catalogue, in the scorer's thread (see stream.serving.service)."""
        items = dict(self.catalogue.items)  # a copy: the catalogue goes on consuming on the loop meanwhile
        warm = await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(self.scorer.warm, items, self.config.warm_items,
                                              lambda: self._closing))
        log.info("serving.warmed", items=warm.items, encoded=warm.encoded, seconds=warm.seconds,
                 from_disk=warm.from_disk, cached_items=len(self.scorer.cache))
        return warm

    def _ownership(self) -> tuple[list[int] | None, int]:
        w = self.worker
        if w is None or w.consumer is None:
            return None, 1
        total = len(w.consumer.partitions_for_topic(w.topic) or ()) or self.partitions
        return sorted(w.parts), total

    async def on_tick(self, as_of_ms: int, signals: Signals) -> None:
        if self._closing:
            return
        partitions, total = self._ownership()
        items: dict[str, ItemInfo] = self.catalogue.items
        part = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.scorer.score, as_of_ms, signals, items, partitions, total, self.source)
        await self.publisher.send_all(self.config.scores_topic, part.messages(), str(as_of_ms).encode())
        self.stats.ticks_scored += 1
        log.info("scorer.tick", as_of_ms=as_of_ms, month=season_of(as_of_ms), **self.scorer.stats.last)
        if self.scorer.save_due():  # new item states, and the last write is SAVE_EVERY_S old: after publishing
            await asyncio.get_running_loop().run_in_executor(self._executor, self.scorer.save_states)

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """No more ticks (a tick or warm-up running in the scorer's thread finishes)."""
        self._closing = True

    async def join(self) -> None:
        """The item states written to their store, then the scorer's thread joined."""
        try:  # after a tick or warm-up still running there: the item states they encoded are kept
            await asyncio.get_running_loop().run_in_executor(self._executor, self.scorer.save_states, True)
        except RuntimeError:  # the executor is shut down already: a second stop()
            pass
        await asyncio.to_thread(self._executor.shutdown, True)


# ---- the explainer service ----------------------------------------------------------------------------------
class ExplainerService:
    def __init__(self, config: ServingConfig, trend: TrendConfig, artefact: Artefact, scorer: TickScorer,
                 catalogue: ItemSource, publish: Callable[[list[Explanation]], Awaitable[None]],
                 stats: ServingStats) -> None:
        self.config = config
        self.trend = trend  # to re-read the export record while the generator is pending
        self.artefact = artefact  # the export record as last read: it loses its "pending" once the generator is there
        self.scorer = scorer
        self.catalogue = catalogue
        self.publish = publish
        self.stats = stats
        self.picker = MoverPicker(config.explain_top, config.explain_by, scorer.horizon_days)
        # None while the export writes the generator (the artefact's "pending"): ticks are ranked and published
        # unexplained meanwhile (counted in stats.ticks_unexplained), `await_generator` builds it when it is there
        self.generator: Generator | ShardedGenerator | None = None  # what `_build` opened, closed at `join`
        self.explainer: Explainer | None = None if artefact.pending else self._build(artefact)
        self._waiting: asyncio.Task | None = None
        self._closing = False

    def _build(self, artefact: Artefact) -> Explainer:
        config = self.config
        providers = choose_providers(config.provider)
        role = generator_role(artefact, providers)
        threads = explain_threads(config.explain_threads)
        gen = self.generator = explain_generator(artefact.path(role), providers, self.scorer.tokenizer.end_id, threads,
                                                 config.explain_nice)
        log.info("serving.explainer_threads", threads=threads, sharded=isinstance(gen, ShardedGenerator),
                 nice=config.explain_nice)
        # one batch per tick's movers, each row held to its claim grammar (stream.model.constraint)
        return Explainer(gen.generate, self.scorer.tokenizer, artefact.model_version,
                         artefact.max_explanation_tokens, self.publish,
                         horizon_days=self.scorer.horizon_days, generate_batch=gen.generate_batch,
                         constraint=ClaimConstraint(artefact.path("tokenizer"), self.scorer.tokenizer.end_id),
                         batch_size=max(1, config.explain_top), temperature=config.explain_temperature,
                         top_p=config.explain_top_p, generator=GENERATOR_OF_ROLE[role], nice=config.explain_nice)

    async def await_generator(self, every_s: float = 2.0) -> None:
        """Until the export records its generator: re-read the artefact, then build and start the explainer."""
        t0 = time.monotonic()
        log.warning("serving.explainer_pending", pending=self.artefact.pending, model_version=self.artefact.model_version,
                    note="predictions are published unexplained until the export has written the generator")
        while True:
            await asyncio.sleep(every_s)
            try:
                art = await asyncio.to_thread(Artefact.load, self.config.model_dir, self.trend)
            except ArtefactError:
                continue  # still under way (a failed export is the exporter's to report)
            if art.model_version != self.artefact.model_version or art.onnx.get("source") != self.artefact.onnx.get("source"):
                log.error("serving.explainer_mismatch", model_version=art.model_version,
                          note="the export finished for other weights than this worker scores with; not explaining")
                return
            explainer = await asyncio.to_thread(self._build, art)
            if self._closing:
                return
            self.artefact, self.explainer = art, explainer
            explainer.start()
            log.info("serving.explainer_ready", waited_s=round(time.monotonic() - t0, 1),
                     ticks_unexplained=self.stats.ticks_unexplained)
            return

    def start(self) -> None:
        """The explainer's task, or, while the generator is pending, the task that waits for it."""
        if self.explainer is not None:
            self.explainer.start()
        else:
            self._waiting = asyncio.create_task(self.await_generator(), name="trail-await-generator")

    async def stop(self) -> None:
        """No new explanation starts; a running generate() finishes (see `join`)."""
        self._closing = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        if self.explainer is not None:
            await self.explainer.stop()

    async def join(self) -> None:
        if self.explainer is not None:
            await asyncio.to_thread(self.explainer.executor.shutdown, True)
        if self.generator is not None:
            await asyncio.to_thread(self.generator.close)

    def offer(self, as_of: int, predictions: list[Prediction]) -> None:
        if self.explainer is None:
            self.stats.ticks_unexplained += 1  # the generator is still being exported
            return
        self.explainer.offer(self.request(as_of, predictions))

    def request(self, as_of: int, predictions: list[Prediction]) -> ExplainRequest:
        movers = []
        month = season_of(as_of)
        for p in self.picker(predictions):
            info = self.catalogue.items.get(p.item_id) or ItemInfo()
            prompt = prompt_for(p.item_id, info, p.signals, self.scorer.horizon_days, month,
                                PredictedCount.of(p, self.scorer.horizon_days))
            movers.append(Mover(p, prompt, info.title))
        return ExplainRequest(as_of, movers)


# ---- the ranker (the process holding trail.scores) ------------------------------------------------------------
@dataclass
class PendingTick:
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


class Ranker:
    def __init__(self, config: ServingConfig, model_version: str, publisher: Publisher,
                 on_ranked: Callable[[int, list[Prediction]], None], sink: DurableSink | None,
                 stats: ServingStats) -> None:
        self.config = config
        self.model_version = model_version
        self.publisher = publisher
        self.on_ranked = on_ranked  # the explainer service's offer
        self.sink = sink
        self.stats = stats
        self._ranker: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task] = []
        self._commits: set[asyncio.Task] = set()
        self._ticks: dict[int, PendingTick] = {}
        self._last_ranked: int | None = None

    async def start(self, consumer: AIOKafkaConsumer) -> None:
        self._ranker = consumer
        await consumer.start()
        self._tasks = [asyncio.create_task(self._rank_loop(), name="trail-ranker"),
                       asyncio.create_task(self._grace_loop(), name="trail-rank-grace")]

    async def cancel(self) -> None:
        """No more ranking."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def finish_commits(self) -> None:
        if self._commits:  # a store that is down must not hold the stop: those ticks are ranked again
            _, pending = await asyncio.wait(list(self._commits), timeout=10)
            for task in pending:
                task.cancel()

    async def leave(self) -> None:
        if self._ranker is not None:
            coordinator = getattr(self._ranker, "_coordinator", None)
            member, generation = getattr(coordinator, "member_id", None), getattr(coordinator, "generation", None)
            await self._ranker.stop()  # sends LeaveGroup (aiokafka: for generations > 0)
            self._ranker = None
            log.info("ranker.stopped", group=self.config.ranker_group, member_id=member, generation=generation)

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
                    tick = self._ticks.setdefault(as_of, PendingTick(time.monotonic()))
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

    async def _rank(self, as_of: int, tp: TopicPartition | None) -> None:
        tick = self._ticks.pop(as_of)
        for older in [a for a in self._ticks if a < as_of]:
            del self._ticks[older]
            self.stats.ticks_dropped += 1
        self._last_ranked = as_of
        predictions = rank_tick(tick.parts(), self.config.publish_top, self.model_version)
        seq = await self.publisher.publish_predictions(predictions)
        self.stats.ticks_ranked += 1
        self.stats.last_published_at = time.time()
        if predictions:
            self.on_ranked(as_of, predictions)
        if tp is not None and tick.last_offset >= 0:
            task = asyncio.create_task(self._commit_when_durable(tp, tick.last_offset + 1, seq))
            self._commits.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._commits.discard)
        log.info("ranker.tick", as_of_ms=as_of, predictions=len(predictions),
                 top=[p.item_id for p in predictions[:3]])

    async def _commit_when_durable(self, tp: TopicPartition, offset: int, seq: int | None) -> None:
        try:
            if self.sink is not None and seq is not None:
                await self.sink.wait_durable(seq)
            if self._ranker is not None:
                await self._ranker.commit({tp: offset})
        except Exception as e:  # noqa: BLE001 - a failed commit only means the tick may be ranked again
            log.warning("ranker.commit_failed", offset=offset, error=str(e))
