"""The TRAIL stream service as a Faust app.

    faust -A stream.app worker --without-web        # configuration: stream.config (env)

Faust hosts the process (start-up, signals, graceful shutdown, the optional web
server); the work is done by one Faust service that runs `stream.ingest.worker.TrendWorker`:
its own aiokafka consumer (group `$TRAIL_GROUP_ID`) feeding per-partition trend
tables, a tick every `$TRAIL_TICK_S` seconds that publishes a trend snapshot to
`$TRAIL_SNAPSHOTS_TOPIC`, checkpoints the tables and commits. Why no Faust agents
or tables: see stream.ingest.worker.

Extension point - code that runs every tick (the scorer):

    from stream.app import on_tick
    from stream.core.trends import Signals

    @on_tick
    async def score(as_of_ms: int, signals: Signals) -> None: ...

or without touching this module, `TRAIL_TICK_HOOKS=package.module:function`
(comma-separated; resolved when the service starts). The contract is in
stream.ingest.worker's module doc.

Two or more workers share the partitions (same $TRAIL_GROUP_ID, one state dir
each); run each `--without-web` or with its own `--web-port`.
"""

from __future__ import annotations

import logging
import sys

import faust
import structlog
from mode import Service

from stream.config import WorkerConfig
from stream.ingest.worker import TrendWorker, load_hook


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
    }


config = WorkerConfig.from_env()
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
    logging_config=stdlib_json_logging(),
)

worker = TrendWorker(config)
on_tick = worker.add_tick_hook


@app.service
class TrendService(Service):
    """Runs the trend worker for as long as the Faust worker runs."""

    async def on_start(self) -> None:
        for spec in config.tick_hooks:
            worker.add_tick_hook(load_hook(spec))
        await worker.start()

    @Service.task
    async def _consume(self) -> None:
        await worker.run()

    async def on_stop(self) -> None:
        await worker.stop()

