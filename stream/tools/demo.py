"""TRAIL end to end on one machine: `./trail demo` (= `python -m stream.tools.demo`).

    local broker (Tansu) ─► replay of a real log at an accelerated clock ─► trail.events
    faust -A stream.app worker (trend tables, scorer, explainer, ClickHouse sink)
    this process: a live table of the current top movers, read from
                  trail.predictions and trail.explanations
    the page:     the worker serves the movers, items and accuracy in the browser
                  (http://localhost:6066/, --web-port), with /metrics, /health, /ready

Start-up prints one line per stage (export on the first run, dataset, broker,
topics, warm-up replay, worker, first prediction, first explanation). The first run
exports the model to ONNX once per weights, into TRAIL_CACHE/exports/<model>-<hash>
(every later run and clone on the machine serves it from there); the export overlaps
the broker, the topics and the warm-up replay, and writes the score path first: the
worker starts on it and predicts while the export writes the generator (at a lower CPU
priority), and explains once it is recorded. For the public datasets whose item states
ship with the model (models/trail-smollm2/item_states/, export.item_states) the score
head alone comes first (export.onnx --head-first): the worker predicts from the shipped
states while the item encoder is exported, then checks a sample of them against it. Ctrl-C (or --duration)
stops the replay, then the worker (which stops in order: sink flushed, offsets
committed, state saved), then the broker; nothing is left running. The results
stay in the embedded ClickHouse store (`python -m stream.tools.report`). The worker
logs to var/worker.log (the previous run's: var/worker.prev.log); when it dies,
the demo stops with its last error lines and exit code 1.
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

from stream.tools.broker import LocalBroker
from stream.core.summary import reason_text, size_text
from stream.topics import Topics, ensure_topics
from stream.kafka import KafkaSecurity
from stream.model.artefact import TRAINED_FILES

log = structlog.get_logger(__name__)

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "trail-smollm2"
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
        lines.append(f"{'#':>3}  {'item':<34} {'score':>6} {'predicted':>13}  explanation")
        for rec in sorted(self.ranking.values(), key=lambda r: r["rank"])[:top]:
            item = rec["item_id"]
            name = (titles.get(item) or item)[:34]
            exp = self.explanations.get(item)
            text = "" if exp is None else _mark(exp) + " " + exp["explanation"]
            size = size_text(rec["predicted_count"], rec.get("predicted_low"), rec.get("predicted_high"))
            lines.append(f"{rec['rank']:>3}  {name:<34} {rec['score']:>6.2f} {size:>13}  {text[:110]}")
        latest = sorted(self.explanations.values(), key=lambda r: r["tick"], reverse=True)[:explained]
        if latest:
            lines += ["", "latest explanations of the top movers (✓ every claim checked true against the signals, "
                          "✎ rewritten by the stream's repair step, ✗ a claim is false; ! forecast disagrees with the score)"]
        for exp in latest:
            name = (titles.get(exp["item_id"]) or exp["item_id"])[:34]
            why = reason_text(exp.get("reason"), exp.get("reason_source"), exp.get("driver"))
            lines.append(f"  {exp['tick'][:13]}  rank {exp['rank']:>4}  {name:<34} {_mark(exp)} {exp['explanation']}"
                         + (f"  [{why}]" if why else ""))
        return "\n".join(lines)


def _mark(exp: dict) -> str:
    """✓ faithful as the model wrote it, ✎ faithful after the stream's repair, ✗ not faithful; ! the stated
    forecast is not the direction of the model's own prediction."""
    mark = "✗" if not exp["faithful"] else ("✎" if exp.get("repaired") else "✓")
    return mark + ("!" if exp.get("forecast") and not exp.get("forecast_agrees") else "")


def page_url(port: int) -> str:
    return f"http://localhost:{port}/"


def free_port(preferred: int) -> int:
    """`preferred` when nothing listens there, else a port the system picks (another demo may hold 6066)."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port for the page")


def worker_env(args: argparse.Namespace, bootstrap: str, var: Path, horizon_days: float) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "TRAIL_HORIZON_DAYS": env.get("TRAIL_HORIZON_DAYS") or f"{horizon_days:g}",
        "KAFKA_BOOTSTRAP": bootstrap,
        "TRAIL_STATE_DIR": str(var / "state"),
        "TRAIL_TICK_S": str(args.tick),
        "TRAIL_MODEL_DIR": str(args.model),  # the worker then scores, ranks, explains and stores (stream.app)
    })
    # The first tick encodes the items it scores (none with the item states shipped for the demo's data);
    # warming the whole catalogue up before it (the worker's default) encodes ~4,700 items where the first
    # tick of Online Retail II scores ~2,000-2,500: measured on a busy 2-core machine, first prediction at
    # 195 s instead of 408 s with a cold item cache. Later ticks encode the items that become active (cached
    # across runs in TRAIL_CACHE/item_states).
    env.setdefault("TRAIL_ITEM_WARM", "0")
    if getattr(args, "web_port", 0):  # the page, /metrics, /health, /ready on the worker's web server
        env["TRAIL_WEB_PORT"] = str(args.web_port)
    if not env.get("CLICKHOUSE_URL"):
        env.setdefault("TRAIL_CLICKHOUSE_PATH", str(var / "clickhouse"))
    return env


async def watch(bootstrap: str, topics: Topics, board: Board, stop: asyncio.Event, *,
                kafka: KafkaSecurity | None = None) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topics.predictions, topics.explanations, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
                                **(kafka.client_kwargs() if kafka else {}))
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


class Progress:
    """One line per start-up stage ("[  12.3s] broker: up at 127.0.0.1:9092"), kept for the summary."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self.marks: dict[str, float] = {}

    def __call__(self, stage: str, text: str) -> None:
        now = time.monotonic() - self.t0
        self.marks.setdefault(stage, now)
        line = f"[{now:6.1f}s] {stage}: {text}"
        self.lines.append(line)
        print(line, file=sys.stderr, flush=True)

    @property
    def latest(self) -> str:
        return self.lines[-1].split("] ", 1)[-1] if self.lines else "starting"


# ---- first-run ONNX export ---------------------------------------------------------------------------
# Parity prompts for the demo's export: the fewest export.onnx accepts (12 score prompts, 2 greedy
# explanations) instead of its defaults (24, 6); every file is still checked against PyTorch, on
# fewer samples. `python -m export.onnx --model DIR` re-runs the full check any time.
# The export writes the score path first (the worker starts on it) and the generator after it, 10 lower
# in CPU priority, so that the worker's first ticks get the cores first (export.onnx's --generator-nice).
DEMO_EXPORT_ARGS = ("--prompts", "12", "--explain", "2", "--generator-nice", "10")


def export_needed(model: Path, trend, pending_ok: bool = False, need_encoder: bool = True) -> bool:
    """The committed artefact carries the trained weights, not the ONNX files (1.3 GB): exported once.
    `pending_ok`: the score path is enough (the export may still be writing the generator); without
    `need_encoder`, the score head alone (a head-first export, the item states shipped)."""
    from stream.model.artefact import Artefact, ArtefactError

    try:
        art = Artefact.load(model, trend, verify=not pending_ok, pending_ok=pending_ok)
        return need_encoder and not art.has("item_encoder")
    except ArtefactError as e:
        if "export.onnx" not in str(e):
            raise
    return True


def weights_key(model: Path) -> str:
    """What an export depends on: the trained files (the manifest without an old "onnx" section) and
    export.onnx's EXPORT_VERSION (read from the source: importing it would import torch)."""
    import hashlib
    import json
    import re

    h = hashlib.sha256()
    for name in TRAINED_FILES:
        path = model / name
        for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            h.update(str(f.relative_to(model)).encode())
            if f.name == "manifest.json":
                m = json.loads(f.read_text())
                m.pop("onnx", None)
                h.update(json.dumps(m, sort_keys=True).encode())
            else:
                h.update(f.read_bytes())
    src = (Path(__file__).resolve().parents[2] / "export" / "onnx.py").read_text()
    m = re.search(r'^EXPORT_VERSION = "([^"]+)"', src, re.M)
    h.update((m.group(1) if m else "?").encode())
    return h.hexdigest()[:16]


def served_artefact(model: Path, trend, cache_dir: Path) -> Path:
    """The directory the worker serves: `model` itself when it is exported there, else its export in
    TRAIL_CACHE/exports/<hash of the trained files>, shared by every clone and run on the machine
    (a copy of the trained files, small; export.onnx writes the ONNX files beside them)."""
    if not export_needed(model, trend):
        return model
    home = cache_dir / "exports" / f"{model.name}-{weights_key(model)}"
    if not (home / "manifest.json").is_file():
        tmp = home.with_name(home.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in TRAINED_FILES:
            src = model / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.exists():
                shutil.copy2(src, tmp / name)
        try:
            tmp.rename(home)
        except OSError:  # another demo made it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    copy_shipped(model, home)
    return home


def copy_shipped(src: Path, home: Path) -> None:
    """The item states shipped with the committed model (stream.model.item_states) into its export's home,
    when they differ: they are not part of the weights' hash, their own key says what they were computed for."""
    from filecmp import cmp

    from stream.model.item_states import SHIPPED_DIR

    for f in sorted((src / SHIPPED_DIR).glob("*.npz")):
        dst = home / SHIPPED_DIR / f.name
        if not (dst.is_file() and cmp(f, dst, shallow=False)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{f.name}.tmp{os.getpid()}")
            shutil.copy2(f, tmp)
            tmp.replace(dst)


def shipped_for(model: Path, dataset: str | None) -> Path | None:
    """The shipped item states of `dataset` in `model`, when their key is the model's (else None)."""
    import json

    import numpy as np

    from stream.model.artefact import Artefact
    from stream.model.item_states import SHIPPED_DIR, shipped_key

    path = model / SHIPPED_DIR / f"{dataset}.npz"
    if not dataset or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            key = str(z["key"])
    except (OSError, ValueError, KeyError):
        return None
    return path if key == shipped_key(Artefact(model, json.loads((model / "manifest.json").read_text()))) else None


def shipped_coverage(path: Path, items) -> tuple[int, int]:
    """(items of the table whose shipped state was computed from the text the worker renders, items)."""
    import numpy as np

    from export.item_states import catalogue_texts
    from stream.model.item_states import ShippedStates

    ids, texts = catalogue_texts(items)
    with np.load(path, allow_pickle=False) as z:
        hidden = int(z["states"].shape[1])
    f = ShippedStates.read(path, None, hidden)
    shipped = dict(zip(f.ids, f.texts))
    return sum(shipped.get(i) == t for i, t in zip(ids, texts)), len(ids)


def start_export(model: Path, log_path: Path, head_first: bool = False) -> subprocess.Popen:
    out = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "export.onnx", "--model", str(model), *DEMO_EXPORT_ARGS,
                             *(["--head-first"] if head_first else [])],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def export_failed(exporter: subprocess.Popen, log_path: Path) -> None:
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    print("error: the ONNX export failed (exit code %d); its last lines:\n  %s\nfull log: %s"
          % (exporter.returncode, "\n  ".join(tail), log_path), file=sys.stderr)


# ---- the worker process ----------------------------------------------------------------------------------

def fresh_log(path: Path) -> Path:
    """A new log per run; the previous run's stays beside it (worker.log -> worker.prev.log)."""
    if path.exists():
        path.replace(path.with_name(f"{path.stem}.prev{path.suffix}"))
    return path


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    faust = shutil.which("faust", path=str(Path(sys.executable).parent)) or "faust"
    out = open(fresh_log(log_path), "wb")
    web = [] if env.get("TRAIL_WEB_PORT") else ["--without-web"]
    return subprocess.Popen([faust, "-A", "stream.app", "worker", *web, "-l", "warn"], env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the worker shuts down in order: sink flushed, offsets committed, state saved
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


stop_worker = stop_process


def _readable(line: str) -> str:
    """A JSON log line as `level event key=value ...`; other lines as they are."""
    if not line.startswith("{"):
        return line
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    rest = " ".join(f"{k}={v}" for k, v in rec.items() if k not in ("event", "level", "timestamp", "exception"))
    out = f"{rec.get('level', '?')} {rec.get('event', '')} {rest}".strip()
    return out + ("\n" + rec["exception"] if rec.get("exception") else "")


def last_errors(log_path: Path, n: int = 15) -> list[str]:
    """The worker's last error lines (errors, exceptions, tracebacks), else its last lines."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits: list[int] = []
    for i, line in enumerate(lines):
        low = line.lower()
        if ('"level": "error"' in low or '"level": "critical"' in low or "traceback" in low
                or low.startswith(("error", "critical")) or "crashed" in low):
            hits.append(i)
    if not hits:
        return [_readable(x) for x in lines[-n:]]
    # from the n-th last error line to the end: the errors and what followed them (a traceback)
    return [_readable(x) for x in lines[hits[max(0, len(hits) - n)]:]][-3 * n:]


class WorkerDied(RuntimeError):
    pass


async def run(args: argparse.Namespace) -> int:
    from stream.core.datasets import load_dataset
    from stream.settings import SettingsError, load_settings

    progress = Progress()
    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    topics = settings.worker.topics
    kafka = settings.worker.kafka
    var = Path(args.var).resolve()  # absolute once: nothing may depend on the cwd after start-up
    var.mkdir(parents=True, exist_ok=True)
    log_path = var / "worker.log"
    # The embedded broker starts empty, so checkpoints of an earlier run (offsets into a log that
    # no longer exists) must go; the store may stay: replayed rows de-duplicate there.
    for sub in ("state", "clickhouse") if args.fresh else ("state",) if not args.bootstrap else ():
        shutil.rmtree(var / sub, ignore_errors=True)

    model = served_artefact(Path(args.model).resolve(), settings.worker.trend, Path(settings.cache_dir).resolve())
    args.model = model  # what the worker serves (TRAIL_MODEL_DIR)
    exporter = None
    # the item states of the demo's data, shipped with the model: the worker need not wait for the item encoder
    shipped = None if args.events else shipped_for(model, args.dataset)
    if export_needed(model, settings.worker.trend):
        # the longest stage of a first run: everything up to the worker's start overlaps it, and the
        # worker starts once the score path is written (with shipped item states: the score head alone),
        # while the rest is exported
        shutil.rmtree(model / "onnx", ignore_errors=True)  # an interrupted export's files: the worker waits for new ones
        exporter = start_export(model, var / "export.log", head_first=shipped is not None)
        first = ("the score head first (the item states of the data ship with the model): the worker starts on it; "
                 "then the item encoder and the generator") if shipped else (
                 "item encoder and score head first: the worker starts on them; then the generator")
        progress("export", f"exporting {model.name} to ONNX once, into {model} ({first}), log {var / 'export.log'}")
    broker = None
    worker = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    board = Board()
    phase = {"text": "starting"}
    titles: dict[str, str] = {}
    tasks: list[asyncio.Task] = []
    died = False
    failed_export = False
    try:
        dataset = await asyncio.to_thread(load_dataset, args.events or args.dataset, args.items,
                                          cache_dir=settings.cache_dir)
        events = dataset.events
        if args.start:
            start_ms = int(time.mktime(time.strptime(args.start, "%Y-%m-%d")) * 1000)
            events = events[events["ts"] >= start_ms - args.warmup_days * DAY_MS]
        titles.update(zip(dataset.items["item_id"], dataset.items["title"].astype(str)))
        progress("dataset", f"{dataset.name}: {len(events):,} events, {len(dataset.items):,} items")
        if shipped is not None:
            covered, n_items = await asyncio.to_thread(shipped_coverage, shipped, dataset.items)
            progress("item states", f"{covered:,} of {n_items:,} items' states shipped with the model ({shipped.name}; "
                                    f"the worker checks a sample against the item encoder, the others are encoded)")
        bootstrap = args.bootstrap
        if not bootstrap:
            broker = LocalBroker()
            bootstrap = await asyncio.to_thread(broker.start)
            progress("broker", f"local broker up at {bootstrap}")
        await ensure_topics(bootstrap, topics, kafka=kafka)
        progress("topics", ", ".join(s.name for s in topics.specs()))
        from stream.tools.replay import replay

        warm = events[events["ts"] < events["ts"].iloc[0] + args.warmup_days * DAY_MS]
        rest = events.iloc[len(warm):]
        phase["text"] = f"warm-up: {len(warm):,} events ({args.warmup_days} days) as fast as possible"
        await replay(warm, dataset.items, bootstrap, topics=topics, progress=False, create_topics=False, kafka=kafka)
        progress("replay", f"warm-up published: {len(warm):,} events ({args.warmup_days} days of history)")
        if exporter is not None:
            phase["text"] = "waiting for the ONNX export of the score path"
            trend = settings.worker.trend
            while (exporter.poll() is None and not stop.is_set()
                   and await asyncio.to_thread(export_needed, model, trend, True, shipped is None)):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return 130
            if exporter.poll() not in (None, 0):
                export_failed(exporter, var / "export.log")
                return 1
            if exporter.poll() == 0:
                progress("export", "done")
                exporter = None
            elif shipped is not None:
                progress("export", "score head written and checked; the item encoder and the generator follow: "
                                   "predictions start now from the shipped item states, explanations once the "
                                   "generator is written")
            else:
                progress("export", "score path written and checked (item encoder, score head); the generator "
                                   "follows: predictions start now, explanations once it is written")
        if args.web_port:
            wanted, args.web_port = args.web_port, free_port(args.web_port)
            if args.web_port != wanted:
                progress("page", f"port {wanted} is in use; the page takes {args.web_port}")
        worker = start_worker(worker_env(args, bootstrap, var, dataset.horizon_days), log_path)
        progress("worker", f"started (pid {worker.pid}), log {log_path}")
        if args.web_port:
            progress("page", f"{page_url(args.web_port)}  (movers, items, accuracy; /api/*, /metrics, /health, /ready)")

        async def feed() -> None:
            phase["text"] = f"replaying {len(rest):,} events at {args.speed:g}x"
            progress("replay", f"replaying the remaining {len(rest):,} events at {args.speed:g}x")
            await replay(rest, None, bootstrap, topics=topics, speed=args.speed, progress=False, create_topics=False,
                         kafka=kafka)
            phase["text"] = "replay finished; waiting for the last ticks"
            progress("replay", "finished")

        def status() -> str:
            alive = "running" if worker.poll() is None else f"EXITED ({worker.returncode}): see {log_path}"
            exporting = " — explanations wait for the generator's export" if exporter is not None else ""
            return (f"TRAIL demo — {dataset.name} — {phase['text']}{exporting} — worker {alive} — "
                    f"{time.monotonic() - progress.t0:.0f}s (Ctrl-C to stop)")

        tasks = [asyncio.create_task(feed()), asyncio.create_task(watch(bootstrap, topics, board, stop, kafka=kafka)),
                 asyncio.create_task(show(board, titles, args.top, stop, status, args.refresh))]
        deadline = time.monotonic() + args.duration if args.duration else None  # of the live run
        while not stop.is_set():
            if worker.poll() is not None:
                died = True
                break
            if board.predictions_seen and "first prediction" not in progress.marks:
                progress("first prediction", f"tick {board.tick}, {len(board.ranking)} items ranked")
            if board.explanations_seen and "first explanation" not in progress.marks:
                progress("first explanation", f"tick {board.tick}")
            if exporter is not None and exporter.poll() is not None:
                if exporter.returncode != 0:
                    export_failed(exporter, var / "export.log")
                    failed_export = True
                    break
                progress("export", "generator written and checked: the worker's explainer starts")
                exporter = None
            if deadline and time.monotonic() >= deadline:
                break
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception():
                    raise t.exception()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if exporter is not None and exporter.poll() is None:
            os.killpg(exporter.pid, signal.SIGTERM)
            exporter.wait()
        stop_process(worker)
        if broker is not None:
            broker.stop()
    if failed_export:
        return 1
    if died:
        print(f"\nerror: the worker stopped unexpectedly (exit code {worker.returncode}); its last error lines:",
              file=sys.stderr)
        for line in last_errors(log_path):
            print("  " + line, file=sys.stderr)
        print(f"full log: {log_path}", file=sys.stderr)
        return 1
    print(board.render(args.top, titles, "final ranking"))
    print("\n" + "\n".join(progress.lines))
    if args.web_port:
        print(f"\nthe page was at {page_url(args.web_port)} while the worker ran")
    print(f"\nresults are in the store: ./trail py -m stream.tools.report   "
          f"(embedded data: {var / 'clickhouse'}; worker log: {log_path})")
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
    ap.add_argument("--duration", type=float, default=0,
                    help="stop this many seconds after the worker started (default: run to the end)")
    ap.add_argument("--tick", type=float, default=2.0, help="worker tick interval in seconds (2)")
    ap.add_argument("--top", type=int, default=10, help="rows in the live table (10)")
    ap.add_argument("--refresh", type=float, default=1.0, help="seconds between screen refreshes (1)")
    ap.add_argument("--bootstrap", help="HOST:PORT of an existing Kafka instead of the embedded broker")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="TRAIL artefact directory (the committed one)")
    ap.add_argument("--var", default="var", help="working directory: state, embedded ClickHouse (var/clickhouse, where stream.tools.report looks), logs")
    ap.add_argument("--web-port", type=int, default=6066,
                    help="port of the worker's page, JSON API, /metrics, /health and /ready (6066; 0: none)")
    ap.add_argument("--fresh", action="store_true", help="start from empty state and store")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.web_port <= 65535:
        print(f"error: --web-port must be 0 (no page) to 65535, got {args.web_port}", file=sys.stderr)
        return 2
    if args.items and not args.events:
        print("error: --items goes with --events", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
