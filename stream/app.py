"""The TRAIL stream service as a Faust app: it builds every part, starts them in order and stops
them in the reverse order.

    faust -A stream.app worker --without-web        # configuration: stream.settings (environment), read once

Faust hosts the process (start-up, signals, graceful shutdown, the optional web server); the
work is done by the parts that `build` makes and connects when the module is imported (`trail`:
the trend worker, the sink, serving, the tick hooks, the web pages). Each is started and stopped
by a mode `Service`, children of one `TrailService` that mode starts in this order and stops in
the reverse one:

  1. SinkPart      the process's ResultSink (ClickHouse, embedded or a server)   [with a model]
  2. TrendPart     stream.ingest.worker.TrendWorker: its own aiokafka consumer (group
                   $TRAIL_GROUP_ID), per-partition trend tables, a tick every $TRAIL_TICK_S
                   seconds (snapshot to $TRAIL_SNAPSHOTS_TOPIC, checkpoint, commit)
  3. ServingPart   stream.serving.service.Serving: scorer, ranker, explainer, catalogue,
                   producer                                                    [with a model]
  4. TicksPart     wires the tick hooks (the scorer, the snapshot store, the extension
                   hooks), then lets the trend worker consume and tick

With a model ($TRAIL_MODEL_DIR) the artefact is loaded and checked by `build`, so a wrong model
stops the worker before it starts, with a clear message. Without one, the worker keeps
trend tables and publishes snapshots only (no sink, no ClickHouse).

Shutdown (SIGTERM, SIGINT), in this order:
  1. no more ticks for the hooks (the running one finishes, a pending one is dropped);
  2. ranking and explaining stop; the sink is flushed and the ranked ticks' offsets committed;
  3. the ranker leaves its consumer group (its partition moves at once);
  4. the explainer's and the scorer's threads are joined;
  5. the item catalogue and the serving producer are closed;
  6. the trend worker stops consuming, checkpoints its tables, commits and closes its clients;
  7. the sink drains what is left (to ClickHouse, or to its spill directory) and closes.

Extension point - code that runs every tick:

    from stream.app import on_tick
    from stream.core.trends import Signals

    @on_tick
    async def score(as_of_ms: int, signals: Signals) -> None: ...

or without touching this module, `TRAIL_TICK_HOOKS=package.module:function` (comma-separated;
resolved when the app starts; they run after the built-in hooks). The contract is in
stream.ingest.worker's module doc.

Two or more workers share the partitions (same $TRAIL_GROUP_ID, one state dir and one sink
spill directory each); run each `--without-web` or with its own `--web-port`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from typing import Any

import faust
import structlog
from mode import Service

from stream.ingest.worker import TickHook, TrendWorker, load_hook
from stream.model.artefact import ArtefactError
from stream.serving.service import Serving
from stream.settings import Settings, SettingsError, load_settings
from stream.store.hooks import SnapshotStore
from stream.store.sink import ResultSink
from stream.web.routes import TrailPages, install

log = structlog.get_logger(__name__)

def configure_logging(level: int = logging.INFO) -> None:
    """structlog -> one JSON object per line on stderr."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def stdlib_json_logging() -> dict:
    """dictConfig for Faust's `logging_config`: Faust's, mode's and aiokafka's stdlib log
    records as the same JSON lines as ours (merged into Faust's config, so `-l` still sets the level)."""
    return {
        "version": 1,
        "merge": True,
        "formatters": {"json": {
            "()": structlog.stdlib.ProcessorFormatter,
            "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                           structlog.processors.JSONRenderer()],
            "foreign_pre_chain": [structlog.stdlib.add_logger_name, structlog.processors.add_log_level,
                                  structlog.processors.TimeStamper(fmt="iso", utc=True),
                                  structlog.processors.format_exc_info],
        }},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json",
                                 "stream": "ext://sys.stderr"}},
        # group membership (joins, assignments, "LeaveGroup request succeeded" at shutdown) at any -l
        "loggers": {"aiokafka.consumer.group_coordinator": {"level": "INFO"}},
    }


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Worker(faust.Worker):
    """Faust's worker without its terminal spinner when the output is not a terminal: the
    spinner writes cursor control codes (ESC[?25l ... ESC[?25h) and ` OK ^` into log files.
    Its "ready" message is then a log line ("Ready") like every other."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not (_isatty(self.stdout) and _isatty(self.stderr)):
            self.spinner = None


# ---- configuration, read once ---------------------------------------------------------------------

try:
    settings = load_settings()
except SettingsError as e:  # the variable, the value and what it must be; no traceback
    raise SystemExit(f"trail: bad configuration: {e}") from None
config = settings.worker
configure_logging()
# Faust wants its data dir's parent to exist; it keeps nothing we rely on there.
config.state_dir.mkdir(parents=True, exist_ok=True)

app = faust.App(
    config.app_id,
    broker=config.faust_broker,
    # Faust's own consumer group has nothing to consume; a short session keeps its
    # rebalances (when workers come and go) as quick as ours.
    broker_session_timeout=config.session_timeout_s,
    broker_heartbeat_interval=max(0.1, config.session_timeout_s / 3),
    topic_partitions=config.topics.partitions,
    datadir=str(config.state_dir / "faust"),
    web_enabled=config.web_port is not None,
    web_port=config.web_port or 6066,
    broker_credentials=config.kafka.faust_credentials(),
    logging_config=stdlib_json_logging(),
    Worker=Worker,
)


# ---- the parts, built and connected in one place ---------------------------------------------------------

@dataclass(frozen=True)
class Trail:
    """Every part of this process, built and connected by `build` before the worker starts."""

    worker: TrendWorker
    sink: ResultSink | None  # with a model
    serving: Serving | None  # with a model: scorer, ranker, explainer, catalogue, producer
    hooks: tuple[TickHook, ...]  # the built-in tick hooks, run before the @on_tick ones
    hook_specs: tuple[str, ...]  # $TRAIL_TICK_HOOKS, resolved when the app starts (after the built-in hooks)


def build(app: faust.App, settings: Settings) -> tuple[Trail, TrailPages | None]:
    """The parts and their connections, and the web pages over them (with a web port). The artefact is loaded
    and checked here, so a wrong or corrupt model stops the worker before it starts, with a clear message.
    Nothing starts here: the services below start the parts, in order."""
    worker = TrendWorker(settings.worker)
    sink = serving = None
    hooks: tuple[TickHook, ...] = ()
    if settings.serving is not None:
        sink = ResultSink(settings.store, settings.sink)
        serving = Serving(settings.serving, settings.worker, sink=sink, worker=worker)
        hooks = (serving.on_tick, SnapshotStore(sink).on_tick)
    trail = Trail(worker, sink, serving, hooks, tuple(settings.worker.tick_hooks))
    # the page, its JSON API, /metrics, /health and /ready on the worker's web server (stream.web)
    pages = install(app, trail, settings) if settings.worker.web_port is not None else None
    return trail, pages


try:
    trail, pages = build(app, settings)
except ArtefactError as e:
    raise SystemExit(f"trail: {e}") from None
on_tick = trail.worker.add_tick_hook


class SinkPart(Service):
    """The process's one ResultSink: opened first, closed last (everything that submits has stopped)."""

    def __init__(self, sink: ResultSink, **kwargs: Any) -> None:
        self.sink = sink
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await asyncio.to_thread(self.sink.start)  # replays spill files, opens the store

    async def on_stop(self) -> None:
        done = await asyncio.to_thread(self.sink.close, 60.0)
        log.info("sink.closed", drained=done, **{k: v for k, v in vars(self.sink.stats()).items()
                                                  if k in ("written_rows", "spilled_rows", "buffered_rows")})


class TrendPart(Service):
    """The trend worker: clients and state at start; consumption once the hooks are wired;
    checkpoint, commit and close at stop.

    Its start (topics, clients, joining its group: seconds) overlaps the serving part's (topics, ranker
    group, catalogue, warm-up); the tick part waits for both."""

    def __init__(self, worker: TrendWorker, **kwargs: Any) -> None:
        self.worker = worker
        self.starting: asyncio.Future | None = None  # the trend worker's start, under way
        self.ticking = asyncio.Event()  # set once every hook is wired: the trend worker may consume
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        self.starting = asyncio.ensure_future(self.worker.start())

    @Service.task
    async def _consume(self) -> None:
        await self.ticking.wait()
        await self.worker.run()

    async def on_stop(self) -> None:
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()
            await asyncio.gather(self.starting, return_exceptions=True)
        await self.worker.stop()  # stops run(), final checkpoint and commit, closes the clients


class ServingPart(Service):
    """Scorer, ranker, explainer: topics, producer, catalogue, ranker group and the item states' warm-up."""

    def __init__(self, serving: Serving, **kwargs: Any) -> None:
        self.serving = serving
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.serving.start()

    async def on_stop(self) -> None:
        await self.serving.stop()


class TicksPart(Service):
    """The tick hooks, wired last and unwired first: built-in ones, then $TRAIL_TICK_HOOKS."""

    def __init__(self, trail: Trail, pages: TrailPages | None, trend: TrendPart, **kwargs: Any) -> None:
        self.trail = trail
        self.pages = pages
        self.trend = trend
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        w = self.trail.worker
        if self.trend.starting is not None:
            await self.trend.starting  # raises what the trend worker's start raised
        w.tick_hooks[:0] = self.trail.hooks  # before the hooks registered with @on_tick at import
        for spec in self.trail.hook_specs:
            w.add_tick_hook(load_hook(spec))
        if self.pages is not None:
            self.pages.wire_ticks(w)  # the tick timer's hooks around all the others
        self.trend.ticking.set()
        log.info("app.started", serving=self.trail.serving is not None, sink=self.trail.sink is not None,
                 hooks=[getattr(h, "__qualname__", repr(h)) for h in w.tick_hooks])

    async def on_stop(self) -> None:
        await self.trail.worker.stop_ticks()


@app.service
class TrailService(Service):
    """The parts, started in the order listed and stopped in the reverse order (mode's children)."""

    def on_init_dependencies(self) -> list[Service]:
        trend = TrendPart(trail.worker, loop=self.loop)
        order: list[Service] = []
        if trail.sink is not None:
            order.append(SinkPart(trail.sink, loop=self.loop))
        order.append(trend)
        if trail.serving is not None:
            order.append(ServingPart(trail.serving, loop=self.loop))
        order.append(TicksPart(trail, pages, trend, loop=self.loop))
        return order

    async def on_stop(self) -> None:
        log.info("app.stopping")
