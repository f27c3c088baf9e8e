"""The model inside the stream: per-tick scoring, one global ranking, predictions, explanations.

    TRAIL_MODEL_DIR=models/trail-smollm2 faust -A stream.app worker      # TRAIL_TICK_HOOKS defaults to these hooks

`stream.serving.service:on_tick` is resolved when the Faust service starts: the artefact is loaded
and checked then (feature spec, prompt version, ONNX files and their hashes, sessions
opened), so a wrong or corrupt model stops the worker at start with a clear message.

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

Environment (defaults in brackets), on top of stream.config's:
    TRAIL_MODEL_DIR        the exported artefact [models/trail-smollm2]
    TRAIL_SCORE_TOP_N      LLM candidates per tick, chosen by the numeric prior [100]
    TRAIL_PUBLISH_TOP      predictions per tick, 0 = every active item [0]
    TRAIL_SCORE_BATCH      prompts per ONNX run [32 on CPU, 512 on CUDA]
    TRAIL_PROVIDER         auto | cuda | cpu [auto]
    TRAIL_SCORE_VARIANT    auto | fp32 | int8 | fp16 [auto: int8 on CPU, fp16 on CUDA, if exported]
    TRAIL_HORIZON_DAYS     forecast horizon [the artefact's, when it has one]
    TRAIL_ORT_THREADS      onnxruntime intra-op threads for scoring [onnxruntime's default]
    TRAIL_EXPLAIN_TOP      movers explained per tick [3]
    TRAIL_EXPLAIN_BY       rise | rank_jump [rise]
    TRAIL_EXPLAIN_THREADS  onnxruntime threads of the generator [1]
    TRAIL_SCORES_TOPIC     the ranking topic (one partition) [trail.scores]
    TRAIL_RANKER_GROUP     consumer group of the ranker [trail-ranker]
    TRAIL_RANK_GRACE_S     wait for a tick's missing parts at most this long [10]
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson
import structlog

from stream.ingest.catalogue import ItemCatalogue
from stream.config import WorkerConfig
from stream.serving.explainer import ExplainRequest, Explainer, Mover, MoverPicker
from stream.serving.artefact import Artefact
from stream.serving.onnx_models import Generator, choose_providers
from stream.core.records import Explanation, Prediction
from stream.serving.scorer import ItemInfo, ScoredPart, TickScorer, rank_tick, season_of
from stream.topics import TopicSpec
from stream.core.trends import Signals

log = structlog.get_logger(__name__)

SCORES_RETENTION_MS = 3_600_000


@dataclass(frozen=True)
class ServingConfig:
    model_dir: Path = Path("models/trail-smollm2")
    top_n: int = 100
    publish_top: int = 0
    batch: int | None = None
    provider: str = "auto"
    variant: str = "auto"
    horizon_days: float | None = None
    threads: int | None = None
    explain_top: int = 3
    explain_by: str = "rise"
    explain_threads: int | None = 1
    scores_topic: str = "trail.scores"
    ranker_group: str = "trail-ranker"
    grace_s: float = 10.0
    catalogue_wait_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingConfig:
        env = os.environ if env is None else env
        names = {"model_dir": "TRAIL_MODEL_DIR", "top_n": "TRAIL_SCORE_TOP_N", "publish_top": "TRAIL_PUBLISH_TOP",
                 "batch": "TRAIL_SCORE_BATCH", "provider": "TRAIL_PROVIDER", "variant": "TRAIL_SCORE_VARIANT",
                 "horizon_days": "TRAIL_HORIZON_DAYS", "threads": "TRAIL_ORT_THREADS",
                 "explain_top": "TRAIL_EXPLAIN_TOP", "explain_by": "TRAIL_EXPLAIN_BY",
                 "explain_threads": "TRAIL_EXPLAIN_THREADS", "scores_topic": "TRAIL_SCORES_TOPIC",
                 "ranker_group": "TRAIL_RANKER_GROUP", "grace_s": "TRAIL_RANK_GRACE_S"}
        kinds = {"model_dir": Path, "top_n": int, "publish_top": int, "batch": int, "horizon_days": float,
                 "threads": int, "explain_top": int, "explain_threads": int, "grace_s": float}
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = names.get(f.name)
            raw = env.get(var, "").strip() if var else ""
            if not raw:
                continue
            kind = kinds.get(f.name, str)
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)


@dataclass
class _Tick:
    first_seen: float
    chunks: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    last_offset: int = -1

    def parts(self) -> list[ScoredPart]:
        return [ScoredPart.from_messages(list(c.values())) for c in self.chunks.values()
                if c and len(c) == next(iter(c.values()))["chunks"]]

    def complete(self) -> bool:
        parts = [next(iter(c.values())) for c in self.chunks.values()
                 if c and len(c) == next(iter(c.values()))["chunks"]]
        if not parts:
            return False
        if any(p["partitions"] is None for p in parts):
            return True
        covered = {q for p in parts for q in p["partitions"]}
        return covered >= set(range(int(parts[0]["total_partitions"])))


@dataclass
class ServingStats:
    ticks_scored: int = 0
    ticks_ranked: int = 0
    ticks_partial: int = 0  # ranked after grace_s without every partition
    ticks_dropped: int = 0  # superseded before they were complete, or arrived after a newer tick
    late_messages: int = 0
    predictions: int = 0
    explanations: int = 0
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
        self.artefact = Artefact.load(config.model_dir, worker_config.trend)
        self.scorer = TickScorer(self.artefact, top_n=config.top_n, publish_top=config.publish_top, batch=config.batch,
                                 provider=config.provider, variant=config.variant, horizon_days=config.horizon_days,
                                 threads=config.threads)
        gen = Generator(self.artefact.path("generator"), choose_providers(config.provider), self.scorer.tokenizer.end_id,
                        config.explain_threads)
        self.explainer = Explainer(gen.generate, self.scorer.tokenizer, self.artefact.model_version,
                                   self.artefact.max_explanation_tokens, self._publish_explanations)
        self.picker = MoverPicker(config.explain_top, config.explain_by, self.scorer.horizon_days)
        self.catalogue = ItemCatalogue(worker_config.bootstrap, self.topics.items)
        self.source = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stats = ServingStats()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trail-scorer")
        self._producer: Any = None
        self._ranker: Any = None
        self._tasks: list[asyncio.Task] = []
        self._commits: set[asyncio.Task] = set()
        self._ticks: dict[int, _Tick] = {}
        self._last_ranked: int | None = None
        self._start_lock: asyncio.Lock | None = None
        self.started = False

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
        await ensure_topics(self.worker_config.bootstrap, specs=specs)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.worker_config.bootstrap, acks="all", linger_ms=5,
                                          max_request_size=4 * 1024 * 1024)
        await self._producer.start()
        await self.catalogue.start()
        session_ms = int(self.worker_config.session_timeout_s * 1000)
        self._ranker = AIOKafkaConsumer(self.config.scores_topic, bootstrap_servers=self.worker_config.bootstrap,
                                        group_id=self.config.ranker_group, enable_auto_commit=False,
                                        auto_offset_reset="earliest", session_timeout_ms=session_ms,
                                        heartbeat_interval_ms=max(100, session_ms // 3),
                                        fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
        await self._ranker.start()
        self.explainer.start()
        self._tasks = [asyncio.create_task(self._rank_loop(), name="trail-ranker"),
                       asyncio.create_task(self._grace_loop(), name="trail-rank-grace")]
        await self.catalogue.wait_caught_up(self.config.catalogue_wait_s)
        self.started = True
        log.info("serving.started", model_version=self.artefact.model_version, provider=self.scorer.provider,
                 variant=self.scorer.variant, top_n=self.config.top_n, items_known=len(self.catalogue.items),
                 source=self.source)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._commits:  # offsets of ticks already published; a store that is down must not hold the stop
            await asyncio.wait(list(self._commits), timeout=10)
        self._tasks = []
        await self.explainer.stop()
        await self.catalogue.stop()
        if self._ranker is not None:
            await self._ranker.stop()
            self._ranker = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        self._executor.shutdown(wait=False)
        self.started = False

    # ---- the tick hook (every worker) ----------------------------------------------------------------
    def _ownership(self) -> tuple[list[int] | None, int]:
        w = self.worker
        if w is None or getattr(w, "consumer", None) is None:
            return None, 1
        total = len(w.consumer.partitions_for_topic(w.topic) or ()) or self.topics.partitions
        return sorted(w.parts), total

    async def on_tick(self, as_of_ms: int, signals: Signals) -> None:
        if not self.started:
            if self._start_lock is None:
                self._start_lock = asyncio.Lock()
            async with self._start_lock:
                await self.start()
        partitions, total = self._ownership()
        items: dict[str, ItemInfo] = self.catalogue.items
        part = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.scorer.score, as_of_ms, signals, items, partitions, total, self.source)
        key = str(as_of_ms).encode()
        futures = [await self._producer.send(self.config.scores_topic, value=m, key=key) for m in part.messages()]
        await asyncio.gather(*futures)
        self.stats.ticks_scored += 1
        log.info("scorer.tick", as_of_ms=as_of_ms, month=season_of(as_of_ms), **self.scorer.stats.last)

    # ---- the ranker (the process holding trail.scores) ------------------------------------------------
    async def _rank_loop(self) -> None:
        while True:
            batches = await self._ranker.getmany(timeout_ms=500, max_records=1000)
            for tp, msgs in batches.items():
                for m in msgs:
                    try:
                        msg = orjson.loads(m.value)
                        as_of = int(msg["as_of_ms"])
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        log.warning("ranker.bad_message", offset=m.offset)
                        continue
                    if self._last_ranked is not None and as_of <= self._last_ranked:
                        self.stats.late_messages += 1  # a part of a tick already ranked
                        continue
                    tick = self._ticks.setdefault(as_of, _Tick(time.monotonic()))
                    tick.chunks.setdefault(msg["source"], {})[int(msg["chunk"])] = msg
                    tick.last_offset = max(tick.last_offset, m.offset)
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
        predictions = rank_tick(tick.parts(), self.config.top_n, self.config.publish_top,
                                self.artefact.model_version)
        seq = await self._publish_predictions(predictions)
        self.stats.ticks_ranked += 1
        self.stats.last_published_at = time.time()
        if predictions:
            self.explainer.offer(self._request(as_of, predictions))
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
            prompt = self.scorer_prompt(p, info, month)
            movers.append(Mover(p, prompt, info.title))
        return ExplainRequest(as_of, movers)

    def scorer_prompt(self, p: Prediction, info: ItemInfo, month: str) -> str:
        from stream.core.prompts import render_prompt

        return render_prompt(info.title, info.category, p.signals, self.scorer.horizon_days, item_id=p.item_id,
                             month=month)

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


# ---- the hook as stream.app loads it: TRAIL_TICK_HOOKS=stream.serving.service:on_tick ----------------------------

_serving: Serving | None = None


def serving_from_env() -> Serving:
    """The process's Serving, built (and the artefact checked) on first use."""
    global _serving
    if _serving is None:
        from stream.store.hooks import shared_sink

        app = sys.modules.get("stream.app")  # the running Faust app, when there is one
        _serving = Serving(ServingConfig.from_env(), WorkerConfig.from_env(), sink=shared_sink(),
                           worker=getattr(app, "worker", None))
    return _serving


def __getattr__(name: str) -> Any:
    # `stream.serving.service:on_tick` is looked up when the service starts: the model is loaded then.
    if name == "on_tick":
        return serving_from_env().on_tick
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
