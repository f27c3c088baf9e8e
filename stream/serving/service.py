"""The model inside the stream: per-tick scoring, one global ranking, predictions, explanations.

    TRAIL_MODEL_DIR=models/trail-smollm2 faust -A stream.app worker

`Serving` wires four parts with one job each (stream.serving.parts: the tick scorer, the ranker,
the explainer service, the publisher). `stream.app` builds one `Serving` when a model directory is
configured, hands it the process's trend worker and result sink, starts it before the first tick
and stops it on shutdown (`Serving.stop` has the order). The artefact is loaded and checked when
`Serving` is built (feature spec, prompt version, ONNX files and their hashes, sessions opened), so
a wrong or corrupt model stops the worker before it starts, with a clear message. `Serving.start` then waits for the item
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
import os
import socket
import uuid

import structlog

from stream.core.trends import Signals
from stream.ingest.catalogue import ItemCatalogue
from stream.ingest.config import WorkerConfig
from stream.model.artefact import Artefact
from stream.model.item_states import ItemStateStore
from stream.serving.config import ServingConfig
from stream.serving.explainer import Explainer
from stream.serving.parts import (DurableSink, ExplainerService, PartitionOwner, Publisher, Ranker, ScorerService,
                                  ServingStats)
from stream.serving.scorer import TickScorer
from stream.topics import TopicSpec

log = structlog.get_logger(__name__)

SCORES_RETENTION_MS = 3_600_000


class Serving:
    """The serving parts of one process (stream.serving.parts), built from the artefact and wired here:
    the tick scorer (`scoring`), the ranker, the explainer service (`explaining`) and the publisher."""

    def __init__(self, config: ServingConfig, worker_config: WorkerConfig, *, sink: DurableSink | None = None,
                 worker: PartitionOwner | None = None) -> None:
        self.config = config
        self.worker_config = worker_config
        self.topics = worker_config.topics
        self.sink = sink
        # an export still writing its generator serves predictions now and explanations once it is there
        artefact = Artefact.load(config.model_dir, worker_config.trend, pending_ok=True)
        store = None if config.item_store_dir is None else ItemStateStore.for_artefact(artefact, config.item_store_dir)
        self.scorer = TickScorer(artefact, publish_top=config.publish_top, batch=config.batch,
                                 provider=config.provider, horizon_days=config.horizon_days, threads=config.threads,
                                 cache_items=config.cache_items, store=store)
        self.catalogue = ItemCatalogue(worker_config.bootstrap, self.topics.items, kafka=worker_config.kafka)
        self.source = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stats = ServingStats()
        self.publisher = Publisher(self.topics.predictions, self.topics.explanations, sink, self.stats)
        self.explaining = ExplainerService(config, worker_config.trend, artefact, self.scorer, self.catalogue,
                                           self.publisher.publish_explanations, self.stats)
        self.scoring = ScorerService(self.scorer, config, self.catalogue, self.publisher, worker,
                                     self.topics.partitions, self.source, self.stats)
        self.ranker = Ranker(config, artefact.model_version, self.publisher, self.explaining.offer, sink, self.stats)
        self.started = False

    @property
    def artefact(self) -> Artefact:
        """The export record as last read (the explainer service re-reads it while the generator is pending)."""
        return self.explaining.artefact

    @property
    def explainer(self) -> Explainer | None:
        """None while the export is still writing the generator."""
        return self.explaining.explainer

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
        await self.publisher.start(AIOKafkaProducer(bootstrap_servers=self.worker_config.bootstrap, acks="all",
                                                    linger_ms=5, max_request_size=4 * 1024 * 1024,
                                                    **kafka.client_kwargs()))
        await self.catalogue.start()
        session_ms = int(self.worker_config.session_timeout_s * 1000)
        await self.ranker.start(AIOKafkaConsumer(self.config.scores_topic, bootstrap_servers=self.worker_config.bootstrap,
                                                 group_id=self.config.ranker_group, enable_auto_commit=False,
                                                 auto_offset_reset="earliest", session_timeout_ms=session_ms,
                                                 heartbeat_interval_ms=max(100, session_ms // 3),
                                                 fetch_max_bytes=64 * 1024 * 1024,
                                                 max_partition_fetch_bytes=16 * 1024 * 1024, **kafka.client_kwargs()))
        self.explaining.start()
        await self.catalogue.wait_caught_up(self.config.catalogue_wait_s)
        await self.scoring.warm_up()
        self.started = True
        log.info("serving.started", model_version=self.artefact.model_version, provider=self.scorer.provider,
                 cache_items=self.config.cache_items, items_known=len(self.catalogue.items),
                 source=self.source)

    async def stop(self, flush_timeout_s: float = 30.0) -> None:
        """Stop in the order that loses nothing already published and leaves nothing open:
        no more ranking or explaining; the sink flushed and the ranked ticks' offsets committed;
        the ranker out of its group (its partition moves at once, not after the session timeout);
        the explainer's and scorer's threads joined (the item states written to their store in between);
        the catalogue and the producer closed.
        Call it after the tick hooks have stopped (stream.app does)."""
        self.scoring.close()
        await self.ranker.cancel()
        await self.explaining.stop()  # no new explanation starts; a running generate() finishes below
        if self.sink is not None:
            # what was ranked becomes durable, so that its offsets can be committed
            if not await asyncio.to_thread(self.sink.flush, flush_timeout_s):
                log.warning("serving.sink_not_flushed", timeout_s=flush_timeout_s)
        await self.ranker.finish_commits()
        await self.ranker.leave()
        await self.explaining.join()
        await self.scoring.join()
        await self.catalogue.stop()
        await self.publisher.stop()
        self.started = False
        log.info("serving.stopped", ticks_scored=self.stats.ticks_scored, ticks_ranked=self.stats.ticks_ranked,
                 predictions=self.stats.predictions, explanations=self.stats.explanations)

    # ---- the tick hook (every worker) ----------------------------------------------------------------
    async def on_tick(self, as_of_ms: int, signals: Signals) -> None:
        if self.scoring.closing:
            return
        if not self.started:  # nothing starts itself: stream.app starts serving before it wires the tick hooks
            raise RuntimeError("Serving.on_tick before Serving.start(): start it first (stream.app does)")
        await self.scoring.on_tick(as_of_ms, signals)
