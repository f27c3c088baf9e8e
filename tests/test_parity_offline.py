"""Offline side of online/offline parity: the examples' features equal what per-partition workers compute.

The log is turned into `trail.events` records (JSON values, item_id keys), spread over
partitions with Kafka's default partitioner, delivered in a slightly shuffled arrival
order (within the allowed lateness), in polls of random size, with one poll delivered
twice (at-least-once). Each partition parses its polls with `stream.core.events.parse_batch`
and keeps its own `TrendTable`; a partition reads a cut-off once its closed boundary
has passed it. The union of the partitions' snapshots must equal the examples frame's
signal columns exactly, cut-off by cut-off.
"""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
from aiokafka.partitioner import murmur2

from stream.core.events import parse_batch
from stream.core.trends import Signals, TrendConfig, TrendTable
from trainer.examples import build_examples

PARTITIONS = 3
NOW_MS = pd.Timestamp("2030-01-01", tz="UTC").value // 10**6



def worker_apply(table: TrendTable, batch, pending: list[int], snaps: dict[int, Signals]) -> None:
    """Apply one poll as a worker does: a tick is read just before the event that closes it is applied.

    The table keeps only the lateness behind its head, so a tick must be read before
    the watermark moves further past it (after a quiet night the next event can be
    a day later); events applied so far with ts >= the tick do not touch its signals.
    """
    lateness = table.config.allowed_lateness_ms
    prior = table.watermark_ms if table.watermark_ms is not None else np.iinfo(np.int64).min
    fresh = batch.offset > table.last_offset
    watermark = np.maximum(np.maximum.accumulate(np.where(fresh, batch.ts_ms, np.iinfo(np.int64).min)), prior)
    start = 0
    while pending:
        closing = np.flatnonzero(watermark - lateness >= pending[0])
        if not len(closing):
            break
        stop = int(closing[0])
        if stop > start:
            result = table.apply(batch.take(np.arange(start, stop)))
            assert len(result.late) == 0
            start = stop
        t = pending.pop(0)
        snaps[t] = table.signals_at(t)
    if start < len(batch):
        result = table.apply(batch.take(np.arange(start, len(batch))))
        assert len(result.late) == 0


def stream_snapshots(events: pd.DataFrame, cutoffs: list[int], config: TrendConfig, seed: int = 0,
                     ) -> dict[int, Signals]:
    rng = np.random.default_rng(seed)
    jitter = rng.integers(0, config.allowed_lateness_ms // 2, len(events))
    arrival = np.argsort(events["ts"].to_numpy() + jitter, kind="stable")
    ev = events.iloc[arrival].reset_index(drop=True)
    keys = [i.encode() for i in ev["item_id"]]
    values = [orjson.dumps({"item_id": i, "user_id": u, "ts": int(t), "event_type": e, "weight": w})
              for i, u, t, e, w in zip(ev["item_id"], ev["user_id"], ev["ts"], ev["event_type"], ev["weight"])]
    part = np.array([(murmur2(k) & 0x7FFFFFFF) % PARTITIONS for k in keys])
    offsets = np.zeros(len(ev), np.int64)
    for p in range(PARTITIONS):
        offsets[part == p] = np.arange((part == p).sum())

    tables = [TrendTable(config) for _ in range(PARTITIONS)]
    pending = [list(cutoffs) for _ in range(PARTITIONS)]
    snaps: list[dict[int, Signals]] = [{} for _ in range(PARTITIONS)]
    bounds = np.unique(np.r_[0, np.sort(rng.integers(1, len(ev), len(ev) // 700)), len(ev)])
    polls = list(zip(bounds[:-1], bounds[1:]))
    polls.insert(len(polls) // 2, polls[len(polls) // 2 - 1])  # a redelivered poll
    for a, b in polls:
        for p in range(PARTITIONS):
            rows = np.flatnonzero(part[a:b] == p) + a
            if not len(rows):
                continue
            parsed = parse_batch([values[r] for r in rows], offsets=offsets[rows], partition=p,
                                 keys=[keys[r] for r in rows], now_ms=NOW_MS)
            assert not parsed.rejects
            worker_apply(tables[p], parsed.batch, pending[p], snaps[p])
            tables[p].expire()
    assert not any(pending), "every cut-off's horizon lies in the log, so every partition closes it"
    return {t: Signals.concat([s[t] for s in snaps], t, config.signal_names) for t in cutoffs}


def test_examples_equal_partitioned_stream_snapshots(retail_slice):
    config = TrendConfig()
    examples = build_examples(retail_slice, config)
    cutoffs = examples.cutoffs.tolist()
    assert len(cutoffs) >= 3
    online = stream_snapshots(retail_slice.events, cutoffs, config)
    for t in cutoffs:
        offline = examples.frame[examples.frame["cutoff_ms"] == t]
        snap = online[t].frame().sort_values("item_id", kind="stable")
        assert snap["item_id"].tolist() == offline["item_id"].tolist(), t
        names = list(config.signal_names)
        np.testing.assert_array_equal(snap[names].to_numpy(), offline[names].to_numpy(), err_msg=str(t))
