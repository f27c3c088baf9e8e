"""The TRAIL stream service as a Faust app: it builds every part, starts them in order and stops
them in the reverse order.

    faust -A stream.app worker --without-web        # configuration: stream.settings (environment), read once

Faust hosts the process (start-up, signals, graceful shutdown, the optional web server); the
work is done by the parts below, each a mode `Service`, children of one `TrailService` that
mode starts in this order and stops in the reverse one:

  1. SinkPart      the process's ResultSink (ClickHouse, embedded or a server)   [with a model]
  2. TrendPart     stream.ingest.worker.TrendWorker: its own aiokafka consumer (group
                   $TRAIL_GROUP_ID), per-partition trend tables, a tick every $TRAIL_TICK_S
                   seconds (snapshot to $TRAIL_SNAPSHOTS_TOPIC, checkpoint, commit)
  3. ServingPart   stream.serving.service.Serving: scorer, ranker, explainer, catalogue,
                   producer                                                    [with a model]
  4. TicksPart     wires the tick hooks (the scorer, the snapshot store, the extension
                   hooks), then lets the trend worker consume and tick

With a model ($TRAIL_MODEL_DIR) the artefact is loaded and checked when the app starts, so a
wrong model stops the worker at start with a clear message. Without one, the worker keeps
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
from typing import Any

import faust
import structlog
from mode import Service

from stream.ingest.worker import TickHook, TrendWorker, load_hook
from stream.settings import SettingsError, load_settings

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

worker = TrendWorker(config)
on_tick = worker.add_tick_hook


class Parts:
    """What the app is made of; the services below fill it in as they start."""

    def __init__(self, worker: TrendWorker) -> None:
        self.worker = worker
        self.sink: Any = None  # stream.store.sink.ResultSink, with a model
        self.serving: Any = None  # stream.serving.service.Serving, with a model
        self.trend_started: asyncio.Future | None = None  # the trend worker's start, under way
        self.ticking = asyncio.Event()  # set once every hook is wired: the trend worker may consume


parts = Parts(worker)

# The page, its JSON API, /metrics, /health and /ready on the worker's web server (stream.web).
pages = None
if config.web_port is not None:
    from stream.web.routes import install

    pages = install(app, parts, settings)


class _Part(Service):
    def __init__(self, parts: Parts, **kwargs: Any) -> None:
        self.parts = parts
        super().__init__(**kwargs)


class SinkPart(_Part):
    """The process's one ResultSink: opened first, closed last (everything that submits has stopped)."""

    async def on_start(self) -> None:
        from stream.store.sink import ResultSink

        sink = ResultSink(settings.store, settings.sink)
        self.parts.sink = await asyncio.to_thread(sink.start)  # replays spill files, opens the store

    async def on_stop(self) -> None:
        sink, self.parts.sink = self.parts.sink, None
        if sink is not None:
            done = await asyncio.to_thread(sink.close, 60.0)
            log.info("sink.closed", drained=done, **{k: v for k, v in vars(sink.stats()).items()
                                                      if k in ("written_rows", "spilled_rows", "buffered_rows")})


class TrendPart(_Part):
    """The trend worker: clients and state at start; consumption once the hooks are wired;
    checkpoint, commit and close at stop.

    Its start (topics, clients, joining its group: seconds) overlaps the serving part's (artefact,
    ranker group); the tick part waits for both."""

    async def on_start(self) -> None:
        self.parts.trend_started = asyncio.ensure_future(self.parts.worker.start())

    @Service.task
    async def _consume(self) -> None:
        await self.parts.ticking.wait()
        await self.parts.worker.run()

    async def on_stop(self) -> None:
        started = self.parts.trend_started
        if started is not None and not started.done():
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
        await self.parts.worker.stop()  # stops run(), final checkpoint and commit, closes the clients


class ServingPart(_Part):
    """Scorer, ranker, explainer: the artefact is loaded (off the loop) and checked at start."""

    async def on_start(self) -> None:
        from stream.serving.service import Serving

        self.parts.serving = await asyncio.to_thread(Serving, settings.serving, config,
                                                     sink=self.parts.sink, worker=self.parts.worker)
        await self.parts.serving.start()

    async def on_stop(self) -> None:
        if self.parts.serving is not None:
            await self.parts.serving.stop()


class TicksPart(_Part):
    """The tick hooks, wired last and unwired first: built-in ones, then $TRAIL_TICK_HOOKS."""

    async def on_start(self) -> None:
        from stream.store.hooks import SnapshotStore

        w = self.parts.worker
        if self.parts.trend_started is not None:
            await self.parts.trend_started  # raises what the trend worker's start raised
        built_in: list[TickHook] = []
        if self.parts.serving is not None:
            built_in.append(self.parts.serving.on_tick)
        if self.parts.sink is not None:
            built_in.append(SnapshotStore(self.parts.sink).on_tick)
        w.tick_hooks[:0] = built_in  # before the hooks registered with @on_tick at import
        for spec in config.tick_hooks:
            w.add_tick_hook(load_hook(spec))
        if pages is not None:
            pages.wire_ticks(w)  # the tick timer's hooks around all the others
        self.parts.ticking.set()
        log.info("app.started", serving=self.parts.serving is not None, sink=self.parts.sink is not None,
                 hooks=[getattr(h, "__qualname__", repr(h)) for h in w.tick_hooks])

    async def on_stop(self) -> None:
        await self.parts.worker.stop_ticks()


@app.service
class TrailService(Service):
    """The parts, started in the order listed and stopped in the reverse order (mode's children)."""

    def on_init_dependencies(self) -> list[Service]:
        order: list[type[_Part]] = ([SinkPart, TrendPart, ServingPart, TicksPart] if settings.serving
                                    else [TrendPart, TicksPart])
        return [cls(parts, loop=self.loop) for cls in order]

    async def on_stop(self) -> None:
        log.info("app.stopping")
