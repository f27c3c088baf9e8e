"""Incremental checkpoints: snapshot + delta log reloads to the very table that was saved."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.core.events import EventBatch
from stream.core.trends import HOUR_MS, TrendConfig, TrendTable
from stream.ingest.deltas import decode_delta, encode_delta
from stream.ingest.partitions import CheckpointStore
from stream.ingest.tracking import load_table, mark_checkpoint, save_table, take_delta

CFG = TrendConfig(bucket_ms=HOUR_MS, windows=(("2h", 2), ("5h", 5)), ema_halflife_buckets=3,
                  allowed_lateness_ms=2 * HOUR_MS, tick_slack_buckets=0)  # ring of 18 buckets: a few hours wrap it
T0 = 1_700_000_000_000 // HOUR_MS * HOUR_MS


def batch(items, users, ts, offsets) -> EventBatch:
    n = len(items)
    return EventBatch(item_id=np.array(items, object), user_id=np.array(users, object),
                      ts_ms=np.array(ts, np.int64), event_type=np.array(["view"] * n, object),
                      weight=np.ones(n), offset=np.array(offsets, np.int64))


def canonical(t: TrendTable) -> dict:
    """Everything a table holds, by item id (slot numbers are an implementation detail)."""
    t._compact_users()
    items = {t._ids[s]: (t._counts[s].tobytes(), int(t._first_ms[s]), int(t._last_bucket[s]), int(t._total[s]))
             for s in t._slot.values()}
    users = [(int(h), t._ids[int(s)], int(b)) for h, s, b in zip(t._u_hash, t._u_slot, t._u_bucket)]
    return {"header": (t.head_bucket, t.watermark_ms, t.last_offset), "items": items, "users": users,
            "signals": signals(t)}


def signals(t: TrendTable) -> dict:
    if t.head_bucket is None:
        return {}
    out = {}
    for end in (t.head_bucket, t.head_bucket + 1, t.head_bucket + 4):
        s = t.signals_at(end * HOUR_MS)
        out[end] = {item: s.values[i].tobytes() for i, item in enumerate(s.item_ids)}  # bit for bit
    return out


def reload(state_dir: str) -> TrendTable | None:
    return CheckpointStore(state_dir, "ev", CFG).load(0)  # another store: the writer's chain is left alone


step = st.one_of(
    st.tuples(st.just("batch"),
              st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from(["u1", "u2", "u3", "u4", None]),
                                 st.integers(-3 * HOUR_MS, HOUR_MS)), min_size=1, max_size=12),
              st.sampled_from([0, 0, 0, HOUR_MS // 2, HOUR_MS, 3 * HOUR_MS, 11 * HOUR_MS, 40 * HOUR_MS])),
    st.tuples(st.just("replay"), st.integers(1, 8), st.just(0)),  # re-delivery of applied offsets
    st.tuples(st.just("expire"), st.just(None), st.just(0)),
    st.tuples(st.just("checkpoint"), st.just(None), st.just(0)),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=40), st.integers(2, 6), st.integers(1, 10_000))
def test_snapshot_plus_deltas_reload_bit_identical(steps, compact_every, cut_seed):
    state_dir = tempfile.mkdtemp()
    try:
        store = CheckpointStore(state_dir, "ev", CFG, compact_fraction=10.0, compact_every=compact_every)
        store.prepare()
        table = TrendTable(CFG, capacity=2)  # small: slots are reused and the table grows
        clock, offset, applied = T0, 0, []
        saved, kinds = [], []  # canonical state at every save, and its kind
        last_info, ops, since_save = None, [], []  # since_save: the ops between the last two saves
        for kind, arg, advance in steps + [("checkpoint", None, 0)]:
            if kind == "batch":
                clock += advance
                rows = [(i, u, clock + d) for i, u, d in arg]
                b = batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                          range(offset, offset + len(rows)))
                offset += len(rows)
                applied.append(b)
                ops.append(b)
                table.apply(b)
            elif kind == "replay" and applied:
                ops.append(applied[-min(arg, len(applied))])
                table.apply(ops[-1])
            elif kind == "expire":
                ops.append(None)
                table.expire()
            elif kind == "checkpoint":
                since_save, ops = ops, []
                last_info = store.save(0, table)
                kinds.append(last_info.kind)
                saved.append(canonical(table))
                assert canonical(reload(state_dir)) == saved[-1]
        assert kinds[0] == "full"

        # A crash tore the last delta record: the state of the save before it loads.
        log_path = store.log_path(0)
        if last_info.kind == "delta" and len(saved) >= 2:
            size = os.path.getsize(log_path)
            cut = size - 1 - cut_seed % last_info.bytes  # somewhere inside the last record
            with open(log_path, "r+b") as f:
                f.truncate(cut)
            resumed = reload(state_dir)
            assert canonical(resumed) == saved[-2]
            # the restarted worker re-reads what the torn record held and appends after cutting the tail
            writer = CheckpointStore(state_dir, "ev", CFG, compact_fraction=10.0, compact_every=10**6)
            resumed = writer.load(0)
            for b in since_save:
                resumed.expire() if b is None else resumed.apply(b)
            assert writer.save(0, resumed).kind == "delta"
            assert canonical(resumed) == saved[-1] == canonical(reload(state_dir))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _events(rng, n, start, spread_h=30):
    ts = np.sort(start + rng.integers(0, spread_h * HOUR_MS, n))
    return [f"i{k}" for k in rng.integers(0, 40, n)], [f"u{k}" for k in rng.integers(0, 60, n)], ts


def test_a_delta_costs_what_changed(tmp_path):
    rng = np.random.default_rng(3)
    items, users, ts = _events(rng, 2000, T0)
    table = TrendTable(TrendConfig())  # the default ring: 2042 hourly buckets per item
    table.apply(batch(items, users, ts, range(2000)))
    store = CheckpointStore(tmp_path, "ev", TrendConfig())
    store.prepare()
    full = store.save(0, table)
    assert full.kind == "full" and full.bytes > 40 * TrendConfig().ring_buckets * 4
    table.apply(batch(["i1", "i2", "new"], ["u1", None, "u9"], [int(ts[-1])] * 3, [2000, 2001, 2002]))
    delta = store.save(0, table)
    assert delta.kind == "delta" and delta.bytes < 400
    assert store.save(0, table).bytes < 200  # nothing changed: the header and empty fields only
    assert canonical(CheckpointStore(tmp_path, "ev", TrendConfig()).load(0)) == canonical(table)


def test_untouched_items_zeroed_by_the_head_are_zeroed_on_load(tmp_path):
    store = CheckpointStore(tmp_path, "ev", CFG)
    store.prepare()
    table = TrendTable(CFG)
    table.apply(batch(["a", "a", "b"], ["u1", "u2", "u1"], [T0, T0 + HOUR_MS, T0 + 2 * HOUR_MS], [0, 1, 2]))
    store.save(0, table)
    table.apply(batch(["b"], ["u3"], [T0 + 18 * HOUR_MS], [3]))  # a's first bucket leaves the ring, a untouched
    assert table._counts[table._slot["a"]].sum() == 1
    assert store.save(0, table).kind == "delta"
    loaded = CheckpointStore(tmp_path, "ev", CFG).load(0)
    assert canonical(loaded) == canonical(table)
    table.apply(batch(["c"], [None], [T0 + 60 * HOUR_MS], [4]))
    table.expire()  # a and b expire, c is new
    assert store.save(0, table).kind == "delta"
    loaded = CheckpointStore(tmp_path, "ev", CFG).load(0)
    assert set(loaded._slot) == {"c"} and canonical(loaded) == canonical(table)


def test_another_table_or_writer_gets_a_full_snapshot(tmp_path):
    rng = np.random.default_rng(5)
    items, users, ts = _events(rng, 300, T0)
    store = CheckpointStore(tmp_path, "ev", CFG)
    store.prepare()
    a = TrendTable(CFG)
    a.apply(batch(items[:200], users[:200], ts[:200], range(200)))
    assert store.save(0, a).kind == "full"
    a.apply(batch(items[200:], users[200:], ts[200:], range(200, 300)))
    assert store.save(0, a).kind == "delta"
    # a rebuild (a fresh table for the same partition) must not append to a's chain
    b = TrendTable(CFG)
    b.apply(batch(items[:50], users[:50], ts[:50], range(50)))
    assert store.save(0, b).kind == "full"
    assert not store.log_path(0).exists()
    assert canonical(CheckpointStore(tmp_path, "ev", CFG).load(0)) == canonical(b)
    # another store replaced the snapshot under this one: its next save is a full one again
    other = CheckpointStore(tmp_path, "ev", CFG)
    c = other.load(0)
    c.apply(batch(items[50:60], users[50:60], ts[50:60], range(50, 60)))
    assert other.save(0, c).kind == "delta"
    b.apply(batch(items[50:70], users[50:70], ts[50:70], range(50, 70)))
    assert store.save(0, b).kind == "full"
    assert canonical(CheckpointStore(tmp_path, "ev", CFG).load(0)) == canonical(b)


def test_compaction_and_a_crash_before_the_old_log_is_removed(tmp_path):
    rng = np.random.default_rng(11)
    items, users, ts = _events(rng, 400, T0)
    store = CheckpointStore(tmp_path, "ev", CFG, compact_fraction=100.0, compact_every=3)
    store.prepare()
    table = TrendTable(CFG)
    kinds = []
    old_log = None
    for k in range(8):
        table.apply(batch(items[k * 50:(k + 1) * 50], users[k * 50:(k + 1) * 50], ts[k * 50:(k + 1) * 50],
                          range(k * 50, (k + 1) * 50)))
        if k == 3:
            old_log = store.log_path(0).read_bytes()  # 3 deltas of the first snapshot's chain
        kinds.append(store.save(0, table).kind)
    assert kinds == ["full", "delta", "delta", "delta", "full", "delta", "delta", "delta"]
    want = canonical(table)
    # the crash came right after the new snapshot's rename: the previous chain's log is still there
    store.log_path(0).write_bytes(old_log)
    assert canonical(CheckpointStore(tmp_path, "ev", CFG).load(0)) == canonical(_only_snapshot(tmp_path))
    # and a log with the right records followed by garbage loads the records
    table2 = TrendTable(CFG)
    store2 = CheckpointStore(tmp_path / "b", "ev", CFG)
    store2.prepare()
    for k in range(8):
        table2.apply(batch(items[k * 50:(k + 1) * 50], users[k * 50:(k + 1) * 50], ts[k * 50:(k + 1) * 50],
                           range(k * 50, (k + 1) * 50)))
        store2.save(0, table2)
    with open(store2.log_path(0), "ab") as f:
        f.write(os.urandom(100))
    assert canonical(CheckpointStore(tmp_path / "b", "ev", CFG).load(0)) == want


def _only_snapshot(state_dir) -> TrendTable:
    return load_table(CheckpointStore(state_dir, "ev", CFG).path(0), CFG)


def test_old_format_snapshot_loads_and_the_next_save_is_full(tmp_path):
    store = CheckpointStore(tmp_path, "ev", CFG)
    store.prepare()
    t = TrendTable(CFG)
    t.apply(batch(["a"], ["u"], [T0], [0]))
    save_table(t, store.path(0))  # save_table: a snapshot without a chain id
    loaded = store.load(0)
    assert canonical(loaded) == canonical(t)
    loaded.apply(batch(["b"], ["u"], [T0 + 1], [1]))
    assert store.save(0, loaded).kind == "full"
    assert store.save(0, loaded).kind == "delta"


def test_config_change_removes_the_logs_too(tmp_path):
    store = CheckpointStore(tmp_path, "ev", CFG)
    store.prepare()
    t = TrendTable(CFG)
    t.apply(batch(["a"], ["u"], [T0], [0]))
    store.save(0, t)
    t.apply(batch(["a"], ["v"], [T0 + 5], [1]))
    store.save(0, t)
    assert store.log_path(0).exists()
    CheckpointStore(tmp_path, "ev", TrendConfig(windows=(("6h", 6),), ema_halflife_buckets=6)).prepare()
    assert not store.path(0).exists() and not store.log_path(0).exists()


def test_delta_encoding_round_trip_and_non_str_ids():
    t = TrendTable(CFG)
    mark_checkpoint(t)
    t.apply(batch(["é", "日本"], ["u", None], [T0, T0 + 1], [0, 1]))
    d = take_delta(t)
    back = decode_delta(encode_delta(d))
    assert back["item_ids"] == d["item_ids"] and back["removed"] == []
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(back[k], v) and back[k].dtype == v.dtype, k
    try:
        encode_delta({**d, "item_ids": [1]})
    except TypeError:
        pass
    else:
        raise AssertionError("non-str ids must not be written as deltas")


def test_untracked_tables_keep_nothing_extra():
    t = TrendTable(CFG)
    t.apply(batch(["a"] * 3, ["u"] * 3, [T0] * 3, [0, 1, 2]))
    assert take_delta(t) is None and t.observer is None


def test_resume_from_deltas_counts_each_retail_event_once(tmp_path):
    """The worker's path on real events: PartitionState ingests in ticks, the store writes deltas;
    killed while writing one, the restart resumes after the last complete record and, with the
    records re-delivered from before it, ends equal to one offline pass."""
    from stream.core.events import encode_event
    from stream.ingest.partitions import PartitionState
    from worker_helpers import as_dict, offline_signals, retail_slice

    cfg = TrendConfig()
    events = retail_slice(days=10)
    keys = [i.encode() for i in events["item_id"]]
    values = [encode_event(i, t, e, u, w) for i, u, t, e, w in
              events[["item_id", "user_id", "ts", "event_type", "weight"]].itertuples(index=False)]
    n = len(values)
    cuts = np.linspace(0, n, 21).astype(int).tolist()
    store = CheckpointStore(tmp_path, "ev", cfg)
    store.prepare()
    st = PartitionState(0, TrendTable(cfg))
    kinds = []
    for a, b in zip(cuts[:14], cuts[1:15]):
        st.ingest(list(range(a, b)), keys[a:b], values[a:b])
        st.table.expire()
        kinds.append(store.save(0, st.table).kind)
    assert kinds == ["full"] + ["delta"] * 13
    committed = st.next_offset
    a, b = cuts[14], cuts[15]
    st.ingest(list(range(a, b)), keys[a:b], values[a:b])
    record = store.save(0, st.table).bytes
    with open(store.log_path(0), "r+b") as f:  # kill -9 in the middle of that append
        f.truncate(f.seek(0, 2) - record // 2)
    store2 = CheckpointStore(tmp_path, "ev", cfg)
    resumed = PartitionState(0, store2.load(0))
    assert resumed.next_offset == committed
    back = 1000
    resumed.ingest(list(range(committed - back, n)), keys[committed - back:], values[committed - back:])
    assert resumed.counters.duplicates == back and resumed.counters.applied == n - committed
    assert store2.save(0, resumed.table).kind == "delta"  # after cutting the torn tail
    as_of = (int(events["ts"].iloc[-1]) // HOUR_MS) * HOUR_MS
    want = offline_signals(events, cfg, as_of)
    assert len(want) > 500
    assert as_dict(resumed.table.signals_at(as_of)) == want
    final = CheckpointStore(tmp_path, "ev", cfg).load(0)
    assert canonical(final) == canonical(resumed.table)
    assert as_dict(final.signals_at(as_of)) == want


def test_the_trend_table_is_pure_tracking_and_files_live_in_ingest():
    import stream.core.trends as trends

    assert "os" not in vars(trends) and not hasattr(TrendTable, "save") and not hasattr(TrendTable, "take_delta")
    t = TrendTable(CFG)
    mark_checkpoint(t)
    assert t.observer is not None  # the tracker hangs on the table only once a store marks it
