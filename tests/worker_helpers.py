"""Helpers for the trend-worker tests (test_app, test_parity, test_recovery): real data slices,
fence events, offline reference signals, reading snapshots, and `faust worker` subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from stream.settings import WorkerConfig
from stream.core.events import EventBatch
from stream.core.snapshots import SnapshotRecord, decode_snapshot
from stream.topics import Topics
from stream.core.trends import Signals, TrendConfig, TrendTable

REPO = Path(__file__).resolve().parents[1]
FAUST = Path(sys.executable).with_name("faust")


def retail_slice(days: int, start_day: int = 0) -> pd.DataFrame:
    """`days` days of Online Retail II events (the event frame), from `start_day` days after its start."""
    from shared_cache import CACHE_DIR
    from stream.core.datasets import load_dataset

    ev = load_dataset("retail", cache_dir=CACHE_DIR).events
    t0 = int(ev["ts"].iloc[0]) + start_day * 86_400_000
    sl = ev[(ev["ts"] >= t0) & (ev["ts"] < t0 + days * 86_400_000)]
    return sl.reset_index(drop=True)


def partition_of(item: str, partitions: int) -> int:
    from aiokafka.partitioner import murmur2

    return (murmur2(item.encode()) & 0x7FFFFFFF) % partitions


def fences(last_ts: int, partitions: int, config: TrendConfig) -> tuple[pd.DataFrame, int]:
    """One event per partition, late enough that every partition closes the same bucket T
    after all the real events; returns (events, T). Fence items have no event before T,
    so they are in no snapshot at T."""
    b = config.bucket_ms
    as_of = (last_ts // b + 1) * b
    fence_ts = as_of + config.allowed_lateness_ms  # closed_until_ms() = floor(fence_ts - lateness) = as_of
    ids: dict[int, str] = {}
    k = 0
    while len(ids) < partitions:
        item = f"fence-{k}"
        ids.setdefault(partition_of(item, partitions), item)
        k += 1
    df = pd.DataFrame({"item_id": pd.Series([ids[p] for p in range(partitions)], dtype=object),
                       "user_id": pd.Series([None] * partitions, dtype=object),
                       "ts": np.full(partitions, fence_ts, np.int64),
                       "event_type": pd.Series(["view"] * partitions, dtype=object),
                       "weight": np.ones(partitions)})
    return df, as_of


def offline_signals(events: pd.DataFrame, config: TrendConfig, as_of_ms: int) -> dict[str, dict[str, float]]:
    """The offline path: one TrendTable over the whole (time-ordered) log."""
    table = TrendTable(config)
    table.apply(EventBatch.from_frame(events))
    return as_dict(table.signals_at(as_of_ms))


def as_dict(signals: Signals) -> dict[str, dict[str, float]]:
    return {item: signals.row(i) for i, item in enumerate(signals.item_ids)}


def worker_config(bootstrap: str, topics: Topics, state_dir: Path, **kw) -> WorkerConfig:
    settings = {"snapshots_topic": f"{topics.events}.snapshots", "group_id": f"{topics.events}.trends",
                "session_timeout_s": 3.0, "tick_s": 0.3, **kw}
    return replace(WorkerConfig(), bootstrap=bootstrap, topics=topics, state_dir=state_dir, **settings)


def worker_env(config: WorkerConfig, app_id: str) -> dict[str, str]:
    """The environment that makes `faust -A stream.app worker` run with `config`."""
    t = config.topics
    tc = config.trend
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAIL_", "KAFKA_"))}
    env.update({
        "KAFKA_BOOTSTRAP": config.bootstrap, "TRAIL_EVENTS_TOPIC": t.events, "TRAIL_DLQ_TOPIC": t.dlq,
        "TRAIL_ITEMS_TOPIC": t.items, "TRAIL_PREDICTIONS_TOPIC": t.predictions,
        "TRAIL_EXPLANATIONS_TOPIC": t.explanations, "TRAIL_PARTITIONS": str(t.partitions),
        "TRAIL_SNAPSHOTS_TOPIC": config.snapshots_topic, "TRAIL_STATE_DIR": str(config.state_dir),
        "TRAIL_GROUP_ID": config.group_id, "TRAIL_APP_ID": app_id, "TRAIL_TICK_S": str(config.tick_s),
        "TRAIL_SESSION_TIMEOUT_S": str(config.session_timeout_s),
        "TRAIL_BUCKET_S": str(tc.bucket_ms // 1000),
        "TRAIL_WINDOWS": ",".join(f"{n}:{w * tc.bucket_ms // 1000}" for n, w in tc.windows),
        "TRAIL_EMA_HALFLIFE_S": str(tc.ema_halflife_buckets * tc.bucket_ms // 1000),
        "TRAIL_DECAYS": ",".join(f"{n}:{h * tc.bucket_ms // 1000}" for n, h in tc.decays) or "none",
        "TRAIL_LATENESS_S": str(tc.allowed_lateness_ms // 1000),
    })
    return env


async def read_snapshot(bootstrap: str, topic: str, as_of_ms: int, n_items: int,
                        timeout_s: float = 60.0) -> dict[str, SnapshotRecord]:
    """The records of `topic` at `as_of_ms`, once `n_items` distinct items have arrived (or the timeout)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not (parts := c.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} never appeared")
            await c._client.force_metadata_update()
            await asyncio.sleep(0.1)
        c.assign([TopicPartition(topic, p) for p in sorted(parts)])
        out: dict[str, SnapshotRecord] = {}
        while len(out) < n_items and time.monotonic() < deadline:
            for records in (await c.getmany(timeout_ms=200, max_records=10_000)).values():
                for r in records:
                    rec = decode_snapshot(r.value)
                    if rec.as_of_ms == as_of_ms:
                        assert r.key == rec.item_id.encode()
                        out[rec.item_id] = rec
        return out
    finally:
        await c.stop()


@dataclass
class FaustWorker:
    """`faust -A stream.app worker --without-web` in a subprocess; its JSON log lines in `log_path`."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    cwd: Path = REPO

    def start(self) -> FaustWorker:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(FAUST), "-A", "stream.app", "worker", "--without-web", "-l", "warn"],
                                     cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if obj.get("event") == name:
                    out.append(obj)
        return out

    def wait_for(self, name: str, pred=lambda e: True, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hits = [e for e in self.events(name) if pred(e)]
            if hits:
                return hits[-1]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}); log tail:\n{self.tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"no {name!r} log event within {timeout_s} s; log tail:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (graceful: final checkpoint and commit); returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return -1 if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


async def run_until_tick(worker, as_of_ms: int, seen: dict, timeout_s: float = 30.0) -> None:
    """Start `worker`, run it until a tick hook has filled seen[as_of_ms] (or the timeout), stop it."""
    import asyncio
    import time

    await worker.start()
    run = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + timeout_s
        while as_of_ms not in seen and time.monotonic() < deadline and not run.done():
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
        await run


async def read_records(bootstrap: str, topic: str, expect: int, timeout_s: float = 20.0) -> list:
    """Every record of `topic` from the start: at least `expect` (or until the timeout), then whatever else comes."""
    import asyncio
    import time

    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        while not (parts := c.partitions_for_topic(topic)):
            await c._client.force_metadata_update()
            await asyncio.sleep(0.05)
        c.assign([TopicPartition(topic, p) for p in parts])
        out: list = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            for rs in (await c.getmany(timeout_ms=200)).values():
                out.extend(rs)
        for rs in (await c.getmany(timeout_ms=300)).values():  # and nothing more
            out.extend(rs)
        return out
    finally:
        await c.stop()
