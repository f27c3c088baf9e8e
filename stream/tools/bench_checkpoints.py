"""Bytes a checkpoint writes per tick: the old full snapshot against snapshot + deltas.

    python -m stream.tools.bench_checkpoints --events 300000 --ticks 1000 --partitions 4 --json

Replays the first N Online Retail II events (time order) into one `TrendTable` per partition
(items partitioned as Kafka's default partitioner does for keyed records: murmur2 of the
item id) in `--ticks` equal steps, as the worker does between two ticks: apply, `expire()`,
then checkpoint every partition that received events. Each checkpoint is written twice:

- before: `save_table` (stream.ingest.tracking: the full snapshot every tick, as the store wrote it until now), to
  `--old-dir` (default /dev/shm when there is one: only its size counts, its fsync is no disk's);
- after: `CheckpointStore.save` (a delta record, or a full snapshot when compaction is due),
  to `--state-dir` (default: a temporary directory).

Reports bytes per tick (sum over the partitions saved in that tick): mean, p95, max, for
before, after (all ticks, compactions included), the delta-only ticks, and the compactions
themselves; then reloads every partition from the store and checks it against the live table
bit for bit (signals and arrays). Prints one JSON object (`--json`) or a short summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import structlog

from stream.core.events import EventBatch
from stream.core.trends import TrendConfig, TrendTable
from stream.ingest.partitions import COMPACT_EVERY, COMPACT_FRACTION, CheckpointStore
from stream.ingest.tracking import save_table


def _partition_of(items: pd.Series, partitions: int) -> np.ndarray:
    from aiokafka.partitioner import murmur2

    codes, uniques = pd.factorize(items, sort=False)
    per_item = np.array([(murmur2(str(u).encode()) & 0x7FFFFFFF) % partitions for u in uniques], np.int64)
    return per_item[codes]


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, np.float64)
    return {"n": len(a), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max()), "total": float(a.sum())}


def _canonical(t: TrendTable) -> tuple:
    t._compact_users()
    items = sorted((t._ids[s], t._counts[s].tobytes(), int(t._first_ms[s]), int(t._last_bucket[s]), int(t._total[s]))
                   for s in t._slot.values())
    users = [(int(h), t._ids[int(s)], int(b)) for h, s, b in zip(t._u_hash, t._u_slot, t._u_bucket)]
    return (t.head_bucket, t.watermark_ms, t.last_offset), items, users


def _signals(t: TrendTable, as_of_ms: int) -> dict[str, bytes]:
    s = t.signals_at(as_of_ms)
    return {item: s.values[i].tobytes() for i, item in enumerate(s.item_ids)}


def run(events: int, ticks: int, partitions: int, state_dir: Path, old_dir: Path,
        compact_fraction: float, compact_every: int, cache_dir: Path) -> dict:
    from stream.core.datasets import load_dataset

    config = TrendConfig()
    frame = load_dataset("retail", cache_dir=cache_dir).events.iloc[:events].reset_index(drop=True)
    part = _partition_of(frame["item_id"], partitions)
    frame["offset"] = frame.groupby(part).cumcount().to_numpy(np.int64)  # each partition's own offsets
    store = CheckpointStore(state_dir, "bench", config, compact_fraction=compact_fraction,
                            compact_every=compact_every)
    store.prepare()
    old_dir.mkdir(parents=True, exist_ok=True)
    tables = [TrendTable(config) for _ in range(partitions)]
    bounds = np.linspace(0, len(frame), ticks + 1).astype(np.int64)
    before, after, deltas, fulls = [], [], [], []
    before_s, after_s = [], []
    full_ticks = []
    for k in range(ticks):
        chunk = frame.iloc[bounds[k] : bounds[k + 1]]
        chunk_part = part[bounds[k] : bounds[k + 1]]
        touched = []
        for p in range(partitions):
            rows = chunk[chunk_part == p]
            if len(rows):
                tables[p].apply(EventBatch.from_frame(rows, partition=p))
                touched.append(p)
        for t in tables:
            t.expire()
        old_bytes = new_bytes = 0
        old_t = new_t = 0.0
        kinds = []
        for p in touched:
            path = old_dir / f"bench-{p}.npz"
            t0 = time.perf_counter()
            save_table(tables[p], path)
            old_t += time.perf_counter() - t0
            old_bytes += path.stat().st_size
            t0 = time.perf_counter()
            info = store.save(p, tables[p])
            new_t += time.perf_counter() - t0
            new_bytes += info.bytes
            kinds.append(info.kind)
            if info.kind == "full" and k > 0:
                fulls.append(info.bytes)
        before.append(old_bytes)
        after.append(new_bytes)
        before_s.append(old_t)
        after_s.append(new_t)
        if "full" in kinds:
            if k > 0:  # tick 0: the initial snapshot, reported on its own
                full_ticks.append(k)
        else:
            deltas.append(new_bytes)

    # Reload every partition from disk (snapshot + deltas) and compare with the live table.
    t0 = time.perf_counter()
    loaded = [CheckpointStore(state_dir, "bench", config).load(p) for p in range(partitions)]
    load_s = time.perf_counter() - t0
    as_of = int(min(t.closed_until_ms() for t in tables))
    identical = all(
        l is not None and _canonical(l) == _canonical(t) and _signals(l, as_of) == _signals(t, as_of)
        for l, t in zip(loaded, tables)
    )
    b, a = _stats(before), _stats(after)
    return {
        "command": "python -m stream.tools.bench_checkpoints " + " ".join(sys.argv[1:]),
        "dataset": "retail",
        "events": int(len(frame)),
        "ticks": ticks,
        "events_per_tick": float(len(frame) / ticks),
        "partitions": partitions,
        "trend": {"bucket_ms": config.bucket_ms, "windows": [list(w) for w in config.windows],
                  "ring_buckets": config.ring_buckets},
        "compaction": {"fraction_of_snapshot": compact_fraction, "every_n_deltas": compact_every,
                       "count": len(fulls), "ticks": full_ticks, "bytes": _stats(fulls)},
        "items": [len(t) for t in tables],
        "before_bytes_per_tick": b,
        "after_bytes_per_tick": a,
        "after_delta_only_bytes_per_tick": _stats(deltas),
        "after_initial_snapshot_bytes": int(after[0]) if after else 0,  # tick 0: the first checkpoint is full
        "reduction_mean_x": b["mean"] / a["mean"] if a.get("mean") else None,
        "before_save_s_per_tick": _stats(before_s),
        "after_save_s_per_tick": _stats(after_s),
        "final_checkpoint_bytes_on_disk": int(sum(f.stat().st_size for f in state_dir.glob("bench-*"))),
        "load_s": load_s,
        "reload_identical": bool(identical),
        "old_dir": str(old_dir),
        "state_dir": str(state_dir),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--ticks", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--state-dir", type=Path, default=None, help="where the store writes (default: a temp dir)")
    ap.add_argument("--old-dir", type=Path, default=None, help="where the full snapshots go (default /dev/shm)")
    ap.add_argument("--compact-fraction", type=float, default=COMPACT_FRACTION)
    ap.add_argument("--compact-every", type=int, default=COMPACT_EVERY)
    ap.add_argument("--json", action="store_true", help="print only the JSON object on stdout (logs on stderr)")
    args = ap.parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: the JSON only
    from stream.settings import load_settings

    cache_dir = load_settings().cache_dir  # TRAIL_CACHE: the parsed Online Retail II
    made = []
    state_dir = args.state_dir
    if state_dir is None:
        state_dir = Path(tempfile.mkdtemp(prefix="trail-ckpt-bench-"))
        made.append(state_dir)
    old_dir = args.old_dir
    if old_dir is None:
        shm = Path("/dev/shm")
        in_memory = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        old_dir = Path(tempfile.mkdtemp(prefix="trail-ckpt-old-", dir=in_memory))
        made.append(old_dir)
    try:
        result = run(args.events, args.ticks, args.partitions, state_dir.absolute(), old_dir.absolute(),
                     args.compact_fraction, args.compact_every, cache_dir)
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        b, a = result["before_bytes_per_tick"], result["after_bytes_per_tick"]
        d = result["after_delta_only_bytes_per_tick"]
        print(f"{result['events']} events, {result['ticks']} ticks, {result['partitions']} partitions")
        print(f"before: mean {b['mean'] / 1e6:.2f} MB/tick, p95 {b['p95'] / 1e6:.2f} MB")
        print(f"after:  mean {a['mean'] / 1e3:.1f} kB/tick, p95 {a['p95'] / 1e3:.1f} kB (deltas only: mean "
              f"{d['mean'] / 1e3:.1f} kB, p95 {d['p95'] / 1e3:.1f} kB)")
        print(f"compactions: {result['compaction']['count']}, reload identical: {result['reload_identical']}")
    return 0 if result["reload_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
