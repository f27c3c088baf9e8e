"""Trend signals against a brute-force reference over random event streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.core.events import EventBatch
from stream.core.trends import HOUR_MS, TrendConfig, TrendTable
from stream.ingest.tracking import load_table, save_table
from stream.settings import SettingsError, load_settings

CFG = TrendConfig(bucket_ms=HOUR_MS, windows=(("2h", 2), ("5h", 5)), ema_halflife_buckets=3, decays=(("4h", 4), ("8h", 8)),
                  allowed_lateness_ms=2 * HOUR_MS)
T0 = 1_700_000_000_000 // HOUR_MS * HOUR_MS


def batch(items, users, ts, offsets=None) -> EventBatch:
    n = len(items)
    return EventBatch(
        item_id=np.array(items, object),
        user_id=np.array(users, object),
        ts_ms=np.array(ts, np.int64),
        event_type=np.array(["view"] * n, object),
        weight=np.ones(n),
        offset=np.array(offsets if offsets is not None else [-1] * n, np.int64),
    )


def reference(items, users, ts, as_of, cfg=CFG) -> dict[str, dict[str, float]]:
    """Signals straight from their definitions, one item at a time."""
    end = as_of // cfg.bucket_ms
    out = {}
    for item in sorted(set(items)):
        ev = [(t // cfg.bucket_ms, u, t) for i, u, t in zip(items, users, ts) if i == item and t < end * cfg.bucket_ms]

        def count(lo, hi):
            return sum(1 for b, _, _ in ev if end - hi <= b < end - lo)

        if count(0, cfg.longest) == 0:
            continue
        row = {}
        for name, w in cfg.windows:
            c0, c1, c2 = count(0, w), count(w, 2 * w), count(2 * w, 3 * w)
            row[f"count_{name}"] = c0
            row[f"prev_count_{name}"] = c1
            row[f"users_{name}"] = len({u for b, u, _ in ev if end - w <= b < end and u is not None})
            row[f"velocity_{name}"] = c0 - c1
            row[f"accel_{name}"] = (c0 - c1) - (c1 - c2)
        for name, halflife in [("ema", cfg.ema_halflife_buckets)] + [(f"ema_{n}", h) for n, h in cfg.decays]:
            row[name] = sum(2 ** (-(end - 1 - b) / halflife) for b, _, _ in ev if b >= end - cfg.longest)
        life = ev  # a silence of life_buckets starts a new life (arrival order)
        newest = None
        for k, (b, _, _) in enumerate(ev):
            if newest is not None and b - newest >= cfg.life_buckets:
                life = ev[k:]
            newest = b if newest is None else max(newest, b)
        row["total_count"] = len(life)
        row["age_h"] = end - min(t for _, _, t in life) // cfg.bucket_ms
        row["idle_h"] = end - 1 - max(b for b, _, _ in ev)
        out[item] = row
    return out


def as_dict(signals) -> dict[str, dict[str, float]]:
    return {item: signals.row(i) for i, item in enumerate(signals.item_ids)}


def assert_same(got, want):
    assert set(got) == set(want)
    for item in want:
        for name, value in want[item].items():
            assert got[item][name] == pytest.approx(value, abs=1e-9), (item, name)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.sampled_from(["u1", "u2", "u3", None]), st.integers(0, 20 * HOUR_MS)),
        min_size=1,
        max_size=80,
    ),
    st.integers(19, 27),  # the ring reaches back to as_of >= newest event - lateness
    st.integers(1, 7),
)
def test_signals_match_reference_in_time_order(events, as_of_h, chunks):
    events.sort(key=lambda e: e[2])
    items, users, offs = [e[0] for e in events], [e[1] for e in events], [e[2] for e in events]
    ts = [T0 + o for o in offs]
    as_of = T0 + as_of_h * HOUR_MS
    table = TrendTable(CFG, capacity=2)  # tiny capacity exercises growth
    cut = np.linspace(0, len(items), chunks + 1).astype(int)
    for a, b in zip(cut[:-1], cut[1:]):
        table.apply(batch(items[a:b], users[a:b], ts[a:b]))
    assert_same(as_dict(table.signals_at(as_of)), reference(items, users, ts, as_of))


def test_a_tick_lagging_the_newest_event_by_the_slack_is_still_exact():
    """A fast replay runs ahead of the tick timer: the ring keeps tick_slack_buckets more than the span."""
    lag = CFG.tick_slack_buckets + CFG.allowed_lateness_ms // HOUR_MS  # newest event this far past the tick
    offs = list(range(0, (CFG.span_buckets + lag + 4) * HOUR_MS, HOUR_MS // 2))
    items = [f"i{k % 3}" for k in range(len(offs))]
    users = [f"u{k % 5}" for k in range(len(offs))]
    ts = [T0 + o for o in offs]
    table = TrendTable(CFG)
    table.apply(batch(items, users, ts))
    as_of = T0 + (CFG.span_buckets + 4) * HOUR_MS
    assert_same(as_dict(table.signals_at(as_of)), reference(items, users, ts, as_of))
    with pytest.raises(ValueError, match="older than the table keeps"):
        table.signals_at(as_of - 2 * HOUR_MS)


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(30))), st.integers(0, 10**6))
def test_out_of_order_within_lateness_is_counted_in_its_bucket(order, seed):
    rng = np.random.default_rng(seed)
    ts = sorted((T0 + rng.integers(0, 12 * HOUR_MS, 30)).tolist())
    # shuffle inside a 1h band: always within the 2h lateness
    jitter = [t - int(rng.integers(0, HOUR_MS)) for t in ts]
    items = [str(rng.choice(list("xyz"))) for _ in ts]
    users = [f"u{rng.integers(0, 5)}" for _ in ts]
    table = TrendTable(CFG)
    result = table.apply(batch(items, users, jitter))
    assert result.applied == len(ts) and len(result.late) == 0
    as_of = T0 + 13 * HOUR_MS
    assert_same(as_dict(table.signals_at(as_of)), reference(items, users, jitter, as_of))


def test_late_events_are_rejected_and_not_counted():
    table = TrendTable(CFG)
    res = table.apply(batch(["a", "a", "a"], ["u", "u", "u"], [T0 + 10 * HOUR_MS, T0 + 9 * HOUR_MS, T0 + 7 * HOUR_MS]))
    assert res.applied == 2 and res.late.tolist() == [2]
    sig = as_dict(table.signals_at(T0 + 11 * HOUR_MS))
    assert sig["a"]["count_5h"] == 2


def test_replayed_offsets_are_not_counted_twice():
    table = TrendTable(CFG)
    ts = [T0 + i * 1000 for i in range(6)]
    table.apply(batch(list("aabbcc"), list("uvuvuv"), ts, offsets=range(6)))
    res = table.apply(batch(list("aabbcc"), list("uvuvuv"), ts, offsets=range(6)))
    assert res.applied == 0 and res.duplicates == 6
    res = table.apply(batch(list("bc"), list("ww"), [T0 + 7000, T0 + 8000], offsets=[5, 6]))
    assert res.applied == 1 and res.duplicates == 1
    sig = as_dict(table.signals_at(T0 + HOUR_MS))
    assert sig["a"]["count_2h"] == 2 and sig["c"]["count_2h"] == 3 and sig["c"]["users_2h"] == 3


def test_checkpoint_round_trip_preserves_signals(tmp_path):
    rng = np.random.default_rng(7)
    ts = np.sort(T0 + rng.integers(0, 30 * HOUR_MS, 500))
    items = [f"i{k}" for k in rng.integers(0, 40, 500)]
    users = [f"u{k}" for k in rng.integers(0, 60, 500)]
    table = TrendTable(CFG)
    table.apply(batch(items[:300], users[:300], ts[:300], offsets=range(300)))
    path = str(tmp_path / "state.npz")
    save_table(table, path)
    restored = load_table(path, CFG)
    for t in (table, restored):
        t.apply(batch(items, users, ts, offsets=range(500)))  # replay from the start: de-duplicated
    as_of = T0 + 31 * HOUR_MS
    assert_same(as_dict(restored.signals_at(as_of)), as_dict(table.signals_at(as_of)))
    assert_same(as_dict(table.signals_at(as_of)), reference(items, users, ts.tolist(), as_of))


def test_idle_items_expire_and_memory_stays_bounded():
    table = TrendTable(CFG, capacity=4)
    for hour in range(200):  # a fresh item every hour: only the ring's worth stay
        table.apply(batch([f"i{hour}"], ["u"], [T0 + hour * HOUR_MS]))
        table.expire()
    assert len(table) <= CFG.ring_buckets + 1
    assert table.capacity <= 64
    sig = table.signals_at(T0 + 200 * HOUR_MS)
    assert set(sig.item_ids) == {f"i{h}" for h in range(195, 200)}


def test_a_returning_item_starts_a_new_life():
    table = TrendTable(CFG)
    table.apply(batch(["a"], ["u"], [T0]))
    table.apply(batch(["a"], ["u"], [T0 + 100 * HOUR_MS]))
    row = as_dict(table.signals_at(T0 + 101 * HOUR_MS))["a"]
    assert row["total_count"] == 1 and row["age_h"] == 1


def test_cutoffs_never_see_the_future():
    rng = np.random.default_rng(3)
    ts = np.sort(T0 + rng.integers(0, 40 * HOUR_MS, 400))
    items = [f"i{k}" for k in rng.integers(0, 10, 400)]
    users = [f"u{k}" for k in rng.integers(0, 20, 400)]
    cutoffs = [T0 + h * HOUR_MS for h in (10, 20, 30)]
    full = list(TrendTable(CFG).signals_at_cutoffs(batch(items, users, ts), cutoffs))
    # replace everything after the first cut-off with other events: the first snapshot must not move
    keep = ts < cutoffs[0]
    alt_ts = np.concatenate([ts[keep], np.sort(cutoffs[0] + rng.integers(0, 5 * HOUR_MS, 100))])
    alt_items = [i for i, k in zip(items, keep) if k] + ["zz"] * 100
    alt_users = [u for u, k in zip(users, keep) if k] + ["v"] * 100
    alt = list(TrendTable(CFG).signals_at_cutoffs(batch(alt_items, alt_users, alt_ts), cutoffs))
    assert_same(as_dict(alt[0]), as_dict(full[0]))
    assert_same(as_dict(full[1]), reference(items, users, ts.tolist(), cutoffs[1]))


def test_config_from_settings_and_spec_round_trip():
    cfg = load_settings({"TRAIL_BUCKET_S": "60", "TRAIL_WINDOWS": "1h:3600,6h:21600",
                         "TRAIL_LATENESS_S": "120"}).worker.trend
    assert cfg.windows == (("1h", 60), ("6h", 360)) and cfg.allowed_lateness_ms == 120_000
    assert TrendConfig.from_spec(cfg.spec()).spec() == cfg.spec()
    assert load_settings({"TRAIL_BUCKET_S": "60"}).worker.trend.windows == (("1d", 1440), ("7d", 10080), ("28d", 40320))
    with pytest.raises(SettingsError, match="TRAIL_WINDOWS: window 1m .* not a whole number of TRAIL_BUCKET_S=3600"):
        load_settings({"TRAIL_BUCKET_S": "3600", "TRAIL_WINDOWS": "1m:60"})
