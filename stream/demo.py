"""TRAIL end to end on one machine: `./trail demo` (= `python -m stream.demo`).

    local broker (Tansu) ─► replay of a real log at an accelerated clock ─► trail.events
    faust -A stream.app worker (trend tables, scorer, explainer, ClickHouse sink)
    this process: a live table of the current top movers, read from
                  trail.predictions and trail.explanations

Ctrl-C (or --duration) stops the replay, then the worker (which flushes its
sink), then the broker; nothing is left running. The results stay in the
embedded ClickHouse store (`python -m stream.report`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import structlog

from stream.broker import LocalBroker
from stream.topics import Topics, ensure_topics

log = structlog.get_logger(__name__)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "trail-smollm2"
DAY_MS = 86_400_000


@dataclass
class Board:
    """What the live table shows: the latest tick's ranking and the explanations of its items."""

    tick: str = ""
    ranking: dict[str, dict] = field(default_factory=dict)  # item_id -> prediction record
    explanations: dict[str, dict] = field(default_factory=dict)  # item_id -> latest explanation record
    predictions_seen: int = 0
    explanations_seen: int = 0

    def add_prediction(self, rec: dict) -> None:
        if rec["tick"] > self.tick:
            self.tick, self.ranking = rec["tick"], {}
        if rec["tick"] == self.tick:
            self.ranking[rec["item_id"]] = rec
        self.predictions_seen += 1

    def add_explanation(self, rec: dict) -> None:
        self.explanations[rec["item_id"]] = rec
        self.explanations_seen += 1

    def render(self, top: int, titles: dict[str, str], status: str, explained: int = 5) -> str:
        lines = [status, f"tick {self.tick or '-'}   predictions {self.predictions_seen:,}   "
                         f"explanations {self.explanations_seen:,}", ""]
        lines.append(f"{'#':>3}  {'item':<34} {'score':>6} {'pred.':>6}  explanation")
        for rec in sorted(self.ranking.values(), key=lambda r: r["rank"])[:top]:
            item = rec["item_id"]
            name = (titles.get(item) or item)[:34]
            exp = self.explanations.get(item)
            text = "" if exp is None else ("✓ " if exp["faithful"] else "✗ ") + exp["explanation"]
            lines.append(f"{rec['rank']:>3}  {name:<34} {rec['score']:>6.2f} {rec['predicted_count']:>6.0f}  {text[:110]}")
        latest = sorted(self.explanations.values(), key=lambda r: r["tick"], reverse=True)[:explained]
        if latest:
            lines += ["", "latest explanations of the top movers (✓ every claim checked true against the signals)"]
        for exp in latest:
            name = (titles.get(exp["item_id"]) or exp["item_id"])[:34]
            mark = "✓" if exp["faithful"] else "✗"
            lines.append(f"  {exp['tick'][:13]}  rank {exp['rank']:>4}  {name:<34} {mark} {exp['explanation']}")
        return "\n".join(lines)


def worker_env(args: argparse.Namespace, bootstrap: str, var: Path, horizon_days: float) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "TRAIL_HORIZON_DAYS": env.get("TRAIL_HORIZON_DAYS") or f"{horizon_days:g}",
        "KAFKA_BOOTSTRAP": bootstrap,
        "TRAIL_STATE_DIR": str(var / "state"),
        "TRAIL_TICK_S": str(args.tick),
        "TRAIL_MODEL_DIR": str(args.model),  # the worker then runs the serving hooks (stream.config)
        "TRAIL_LOG_LEVEL": env.get("TRAIL_LOG_LEVEL", "warning"),
    })
    if not env.get("CLICKHOUSE_URL"):
        env.setdefault("TRAIL_CLICKHOUSE_PATH", str(var / "clickhouse"))
    return env


async def watch(bootstrap: str, topics: Topics, board: Board, stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topics.predictions, topics.explanations, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, records in batches.items():
                for r in records:
                    rec = orjson.loads(r.value)
                    if tp.topic == topics.predictions:
                        board.add_prediction(rec)
                    else:
                        board.add_explanation(rec)
    finally:
        await consumer.stop()


async def show(board: Board, titles: dict[str, str], top: int, stop: asyncio.Event, status, every: float) -> None:
    tty = sys.stdout.isatty()
    last = None
    while not stop.is_set():
        text = board.render(top, titles, status())
        if tty:
            sys.stdout.write("\x1b[2J\x1b[H" + text + "\n")
            sys.stdout.flush()
        elif board.tick != last:  # piped: one table per tick
            print(text + "\n", flush=True)
            last = board.tick
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def ensure_export(model: Path) -> None:
    """The committed artefact carries the trained weights, not the ONNX files (1.3 GB): export them once."""
    from stream.serving.artefact import Artefact, ArtefactError
    from stream.core.trends import TrendConfig

    try:
        Artefact.load(model, TrendConfig.from_env())
        return
    except ArtefactError as e:
        if "export.onnx" not in str(e):
            raise
    print(f"exporting {model} to ONNX once (score path, int8 variant, generator; a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "export.onnx", "--model", str(model)], check=True)


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    faust = shutil.which("faust", path=str(Path(sys.executable).parent)) or "faust"
    out = open(log_path, "ab")
    return subprocess.Popen([faust, "-A", "stream.app", "worker", "--without-web", "-l", "warn"], env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # Faust shuts down gracefully: the sink flushes, state is checkpointed
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def run(args: argparse.Namespace) -> int:
    from stream.core.datasets import load_dataset

    var = Path(args.var)
    var.mkdir(parents=True, exist_ok=True)
    # The embedded broker starts empty, so checkpoints of an earlier run (offsets into a log that
    # no longer exists) must go; the store may stay: replayed rows de-duplicate there.
    for sub in ("state", "clickhouse") if args.fresh else ("state",) if not args.bootstrap else ():
        shutil.rmtree(var / sub, ignore_errors=True)
    dataset = load_dataset(args.events or args.dataset, args.items)
    events = dataset.events
    if args.start:
        start_ms = int(time.mktime(time.strptime(args.start, "%Y-%m-%d")) * 1000)
        events = events[events["ts"] >= start_ms - args.warmup_days * DAY_MS]
    titles = dict(zip(dataset.items["item_id"], dataset.items["title"].astype(str)))
    ensure_export(Path(args.model))
    topics = Topics.from_env()

    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = LocalBroker()
        bootstrap = broker.start()
    worker = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    board = Board()
    started = time.monotonic()
    progress = {"phase": "starting"}
    try:
        await ensure_topics(bootstrap, topics)
        worker = start_worker(worker_env(args, bootstrap, var, dataset.horizon_days), var / "worker.log")
        from stream.replay import replay

        warm = events[events["ts"] < events["ts"].iloc[0] + args.warmup_days * DAY_MS]
        rest = events.iloc[len(warm):]

        async def feed() -> None:
            progress["phase"] = f"warm-up: {len(warm):,} events ({args.warmup_days} days) as fast as possible"
            await replay(warm, dataset.items, bootstrap, topics=topics, progress=False, create_topics=False)
            progress["phase"] = f"replaying {len(rest):,} events at {args.speed:g}x"
            await replay(rest, None, bootstrap, topics=topics, speed=args.speed, progress=False, create_topics=False)
            progress["phase"] = "replay finished; waiting for the last ticks"

        def status() -> str:
            alive = "running" if worker.poll() is None else f"EXITED ({worker.returncode}): see {var / 'worker.log'}"
            return (f"TRAIL demo — {dataset.name} — {progress['phase']} — worker {alive} — "
                    f"{time.monotonic() - started:.0f}s (Ctrl-C to stop)")

        tasks = [asyncio.create_task(feed()), asyncio.create_task(watch(bootstrap, topics, board, stop)),
                 asyncio.create_task(show(board, titles, args.top, stop, status, args.refresh))]
        deadline = started + args.duration if args.duration else None
        while not stop.is_set():
            if worker.poll() is not None:
                log.error("demo.worker_exited", code=worker.returncode, log=str(var / "worker.log"))
                stop.set()
                break
            if deadline and time.monotonic() >= deadline:
                stop.set()
                break
            for t in tasks:
                if t.done() and t.exception():
                    raise t.exception()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if worker is not None:
            stop_worker(worker)
        if broker is not None:
            broker.stop()
    print(board.render(args.top, titles, "final ranking"))
    print(f"\nresults are in the store: ./trail py -m stream.report   "
          f"(embedded data: {var / 'clickhouse'}; worker log: {var / 'worker.log'})")
    return 0 if worker is None or worker.returncode in (0, -signal.SIGTERM, None) else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="./trail demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--dataset", default="retail", help="retail (Online Retail II, default) or ml100k")
    src.add_argument("--events", help="your own event log (CSV/Parquet/JSONL: item_id, user_id, ts)")
    ap.add_argument("--items", help="item table for --events (item_id, title, category)")
    ap.add_argument("--speed", type=float, default=43_200.0,
                    help="history seconds per wall second after the warm-up (default 43200: half a day a second)")
    ap.add_argument("--warmup-days", type=int, default=35,
                    help="days of history replayed as fast as possible first, so the 28-day windows fill (35)")
    ap.add_argument("--start", help="YYYY-MM-DD: start the replay here (minus the warm-up) instead of the log's start")
    ap.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: run to the end)")
    ap.add_argument("--tick", type=float, default=2.0, help="worker tick interval in seconds (2)")
    ap.add_argument("--top", type=int, default=10, help="rows in the live table (10)")
    ap.add_argument("--refresh", type=float, default=1.0, help="seconds between screen refreshes (1)")
    ap.add_argument("--bootstrap", help="HOST:PORT of an existing Kafka instead of the embedded broker")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="TRAIL artefact directory (the committed one)")
    ap.add_argument("--var", default="var", help="working directory: state, embedded ClickHouse (var/clickhouse, where stream.report looks), logs")
    ap.add_argument("--fresh", action="store_true", help="start from empty state and store")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.items and not args.events:
        print("error: --items goes with --events", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
