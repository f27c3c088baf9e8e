"""Parsing and validation of trail.events records, and dead-letter records."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.settings import SettingsError, load_settings
from stream.core.events import (
    DAY_MS,
    EVENT_TYPES,
    H_EXC_MESSAGE,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_STAGE,
    H_TOPIC,
    EventBatch,
    ValidationConfig,
    dlq_record,
    encode_event,
    parse_batch,
    read_dlq_headers,
)

NOW = 1_700_000_000_000  # 2023-11-14T22:13:20Z
TS_2010 = 1_262_304_000_000  # 2010-01-01T00:00:00Z


def one(raw: bytes | None, **kw):
    r = parse_batch([raw], now_ms=NOW, **kw)
    assert len(r.batch) + len(r.rejects) == 1
    return r


GOOD = [
    # (value, item_id, user_id, ts_ms, event_type, weight)
    (b'{"item_id":"a","user_id":"u1","ts":1262304000000,"event_type":"view","weight":2.5}',
     "a", "u1", TS_2010, "view", 2.5),
    (b'{"item_id":"a","ts":1262304000000,"event_type":"click"}', "a", None, TS_2010, "click", 1.0),
    (b'{"item_id":"a","user_id":null,"ts":1262304000000,"event_type":"cart","weight":null}',
     "a", None, TS_2010, "cart", 1.0),
    (b'{"item_id":"a","ts":"2010-01-01T00:00:00Z","event_type":"purchase","weight":3}',
     "a", None, TS_2010, "purchase", 3.0),
    (b'{"item_id":"a","ts":"2010-01-01T01:30:00+01:30","event_type":"rating","weight":4}',
     "a", None, TS_2010, "rating", 4.0),
    (b'{"item_id":"a","ts":"2010-01-01T00:00:00.123","event_type":"view"}', "a", None, TS_2010 + 123, "view", 1.0),
    (b'{"item_id":"a","ts":"2010-01-01","event_type":"view"}', "a", None, TS_2010, "view", 1.0),
    ('{"item_id":"caf\u00e9 \u2615","ts":1262304000000,"event_type":"view","extra":{"x":[1]}}'.encode(),
     "caf\u00e9 \u2615", None, TS_2010, "view", 1.0),
    (b' {"event_type":"view", "ts":1262304000000, "item_id":"b"} ', "b", None, TS_2010, "view", 1.0),
]


@pytest.mark.parametrize("value,item,user,ts,etype,weight", GOOD)
def test_good_records(value, item, user, ts, etype, weight):
    r = one(value)
    assert r.rejects == []
    b = r.batch
    assert (b.item_id[0], b.user_id[0], int(b.ts_ms[0]), b.event_type[0], float(b.weight[0])) == (
        item, user, ts, etype, weight)
    assert b.ts_ms.dtype == np.int64 and b.weight.dtype == np.float64
    assert b.item_id.dtype == object and b.user_id.dtype == object


BAD = [
    (b"\xff\xfe{\"item_id\":1}", "bad_encoding"),
    ('{"item_id":"a","ts":1262304000000,"event_type":"view"}'.encode("utf-16"), "bad_encoding"),
    (b'{"item_id":"\xe9","ts":1262304000000,"event_type":"view"}', "bad_encoding"),
    (b'{"item_id":"a",', "bad_json"),
    (b"", "bad_json"),
    (None, "bad_json"),
    (b"NaN", "bad_json"),
    (b'["item_id","a"]', "not_object"),
    (b'"a string"', "not_object"),
    (b"42", "not_object"),
    (b"null", "not_object"),
    (b'{"ts":1262304000000,"event_type":"view"}', "missing_field:item_id"),
    (b'{"item_id":null,"ts":1262304000000,"event_type":"view"}', "missing_field:item_id"),
    (b'{"item_id":"a","event_type":"view"}', "missing_field:ts"),
    (b'{"item_id":"a","ts":1262304000000}', "missing_field:event_type"),
    (b'{"item_id":7,"ts":1262304000000,"event_type":"view"}', "bad_type:item_id"),
    (b'{"item_id":"","ts":1262304000000,"event_type":"view"}', "bad_value:item_id"),
    (b'{"item_id":["a"],"ts":1262304000000,"event_type":"view"}', "bad_type:item_id"),
    (b'{"item_id":"a","user_id":5,"ts":1262304000000,"event_type":"view"}', "bad_type:user_id"),
    (b'{"item_id":"a","ts":1262304000000.5,"event_type":"view"}', "bad_type:ts"),
    (b'{"item_id":"a","ts":true,"event_type":"view"}', "bad_type:ts"),
    (b'{"item_id":"a","ts":"yesterday","event_type":"view"}', "bad_type:ts"),
    (b'{"item_id":"a","ts":"1262304000000","event_type":"view"}', "bad_type:ts"),
    (b'{"item_id":"a","ts":1262304000000,"event_type":["view"]}', "bad_type:event_type"),
    (b'{"item_id":"a","ts":1262304000000,"event_type":1}', "bad_type:event_type"),
    (b'{"item_id":"a","ts":1262304000000,"event_type":"view","weight":"2"}', "bad_type:weight"),
    (b'{"item_id":"a","ts":1262304000000,"event_type":"view","weight":true}', "bad_type:weight"),
    (b'{"item_id":"a","ts":1262304000000,"event_type":"like"}', "unknown_event_type"),
    (b'{"item_id":"a","ts":1262304000000,"event_type":"VIEW"}', "unknown_event_type"),
    (b'{"item_id":"a","ts":5,"event_type":"view"}', "absurd_ts"),
    (b'{"item_id":"a","ts":1262304000,"event_type":"view"}', "absurd_ts"),  # seconds, not ms
    (b'{"item_id":"a","ts":"1989-12-31T23:59:59Z","event_type":"view"}', "absurd_ts"),
    (orjson.dumps({"item_id": "a", "ts": NOW + DAY_MS + 1, "event_type": "view"}), "absurd_ts"),
    (b'{"item_id":"a","ts":-1,"event_type":"view"}', "absurd_ts"),
    (b'{"item_id":"a","ts":99999999999999999999999,"event_type":"view"}', "bad_type:ts"),  # a float to orjson
    (b'{"item_id":"a","ts":18446744073709551615,"event_type":"view"}', "absurd_ts"),  # u64, not int64
]


@pytest.mark.parametrize("value,reason", BAD)
def test_bad_records(value, reason):
    r = one(value)
    assert len(r.batch) == 0
    assert [(x.index, x.reason) for x in r.rejects] == [(0, reason)]


def _rec(**fields) -> bytes:
    obj = {"item_id": "a", "user_id": "u", "ts": TS_2010, "event_type": "view"}
    obj.update(fields)
    return orjson.dumps(obj)


_WEIGHT_TAIL = b'{"item_id":"a","ts":1262304000000,"event_type":"view","weight":'
VALUE_LIMITS = [
    # (id, value, reason): right JSON type, value outside the limits (issue 10 item 5)
    ("weight -1e308", _rec(weight=-1e308), "bad_value:weight"),
    ("weight 1e308", _rec(weight=1e308), "bad_value:weight"),
    ("weight above max", _rec(weight=1_000_001), "bad_value:weight"),
    ("weight below min", _rec(weight=-1e6 - 0.5), "bad_value:weight"),
    ("weight u64 int", _WEIGHT_TAIL + b"18446744073709551615}", "bad_value:weight"),
    # orjson refuses numbers that overflow a double and NaN/Infinity (not JSON): they never reach a weight
    ("weight 1e400", _WEIGHT_TAIL + b"1e400}", "bad_json"),
    ("weight -1e400", _WEIGHT_TAIL + b"-1e400}", "bad_json"),
    ("weight NaN", _WEIGHT_TAIL + b"NaN}", "bad_json"),
    ("weight Infinity", _WEIGHT_TAIL + b"Infinity}", "bad_json"),
    ("weight true", _rec(weight=True), "bad_type:weight"),
    ("weight false", _rec(weight=False), "bad_type:weight"),
    ("weight string", _rec(weight="2"), "bad_type:weight"),
    ("weight list", _rec(weight=[2]), "bad_type:weight"),
    ("item_id NUL", _rec(item_id="a\x00b"), "bad_value:item_id"),
    ("item_id newline", _rec(item_id="a\nb"), "bad_value:item_id"),
    ("item_id tab", _rec(item_id="\ta"), "bad_value:item_id"),
    ("item_id DEL", _rec(item_id="a\x7f"), "bad_value:item_id"),
    ("item_id C1 NEL", _rec(item_id="a\x85b"), "bad_value:item_id"),
    ("item_id C1 U+009F", _rec(item_id="\x9f"), "bad_value:item_id"),
    ("item_id raw DEL byte", b'{"item_id":"a\x7f","ts":1262304000000,"event_type":"view"}', "bad_value:item_id"),
    ("item_id empty", _rec(item_id=""), "bad_value:item_id"),
    ("item_id spaces", _rec(item_id="   "), "bad_value:item_id"),
    ("item_id unicode spaces", _rec(item_id=" \u3000\u2003"), "bad_value:item_id"),
    ("item_id 257 chars", _rec(item_id="x" * 257), "bad_value:item_id"),
    ("item_id 257 non-ASCII chars", _rec(item_id="\u00e9" * 257), "bad_value:item_id"),
    ("user_id NUL", _rec(user_id="u\x00"), "bad_value:user_id"),
    ("user_id newline", _rec(user_id="u\n"), "bad_value:user_id"),
    ("user_id C1", _rec(user_id="\x85"), "bad_value:user_id"),
    ("user_id 257 chars", _rec(user_id="u" * 257), "bad_value:user_id"),
]


@pytest.mark.parametrize("value,reason", [(v, r) for _, v, r in VALUE_LIMITS], ids=[n for n, _, _ in VALUE_LIMITS])
def test_value_limits_reject_with_reason_and_lose_nothing_around(value, reason):
    good = [encode_event(f"g{k}", TS_2010 + k, "purchase", f"u{k}", float(k - 2)) for k in range(4)]
    values = [good[0], good[1], value, good[2], good[3]]
    r = parse_batch(values, offsets=[10, 11, 12, 13, 14], now_ms=NOW)
    assert [(x.index, x.reason) for x in r.rejects] == [(2, reason)]
    b = r.batch
    assert b.index.tolist() == [0, 1, 3, 4] and b.offset.tolist() == [10, 11, 13, 14]
    assert b.item_id.tolist() == ["g0", "g1", "g2", "g3"]
    assert b.weight.tolist() == [-2.0, -1.0, 0.0, 1.0]  # negative weight (a return) is fine
    assert one(value).rejects[0].reason == reason  # alone, the same reason


@pytest.mark.parametrize("fields", [
    {"item_id": "x" * 256},
    {"user_id": "u" * 256},
    {"item_id": "\u65e5" * 256},  # the limit counts characters, not bytes
    {"item_id": "caf\u00e9-\u00fc-\u65e5\u672c"},
    {"item_id": "Toy Story (1995)", "user_id": "caf\u00e9 \u2615"},
    {"item_id": " a "},  # surrounding spaces are kept as they are
    {"item_id": "a\u00a0b\u200dc"},  # not printable but not Cc (no-break space, zero-width joiner)
    {"user_id": ""},  # only item_id must be non-blank
    {"weight": 1e6}, {"weight": -1e6}, {"weight": -3}, {"weight": 0}, {"weight": 4.5}, {"weight": None},
])
def test_value_limits_accept(fields):
    r = one(_rec(**fields))
    assert r.rejects == []
    b = r.batch
    assert b.item_id[0] == fields.get("item_id", "a") and b.user_id[0] == fields.get("user_id", "u")
    w = fields.get("weight")
    assert float(b.weight[0]) == (1.0 if w is None else float(w))


def test_value_limits_are_configurable():
    cfg = ValidationConfig(min_weight=0.5, max_weight=5.0, max_id_chars=4)
    assert one(_rec(weight=5.0), config=cfg).rejects == []
    assert one(_rec(weight=5.5), config=cfg).rejects[0].reason == "bad_value:weight"
    assert one(_rec(weight=0), config=cfg).rejects[0].reason == "bad_value:weight"
    assert one(_rec(), config=cfg).rejects == []  # no weight: 1.0, not range-checked
    assert one(_rec(item_id="abcd", user_id="wxyz"), config=cfg).rejects == []
    assert one(_rec(item_id="abcde"), config=cfg).rejects[0].reason == "bad_value:item_id"
    assert one(_rec(user_id="vwxyz"), config=cfg).rejects[0].reason == "bad_value:user_id"
    # infinite bounds still reject nothing finite and admit no inf/NaN (JSON has none; orjson refuses 1e400)
    inf = ValidationConfig(min_weight=float("-inf"), max_weight=float("inf"))
    assert one(_rec(weight=-1e308), config=inf).rejects == []


def test_oversized_is_checked_before_decoding():
    big = orjson.dumps({"item_id": "a", "ts": TS_2010, "event_type": "view", "pad": "x" * 70_000})
    assert one(big).rejects[0].reason == "oversized"
    cfg = ValidationConfig(max_bytes=32)
    small = encode_event("a", TS_2010, "view")
    assert len(small) > 32
    assert one(small, config=cfg).rejects[0].reason == "oversized"
    assert one(small, config=ValidationConfig(max_bytes=len(small))).rejects == []


def test_timestamp_bounds_are_configurable_and_now_is_injectable():
    rec = encode_event("a", NOW + 2 * DAY_MS, "view")
    assert one(rec).rejects[0].reason == "absurd_ts"
    assert parse_batch([rec], now_ms=NOW + DAY_MS).rejects == []
    assert one(rec, config=ValidationConfig(max_future_ms=3 * DAY_MS)).rejects == []
    # a historical replay from 2010 passes the default bounds...
    assert one(encode_event("a", TS_2010, "view")).rejects == []
    # ...and a stricter lower bound rejects it
    strict = ValidationConfig(min_ts_ms=TS_2010 + 1)
    assert one(encode_event("a", TS_2010, "view"), config=strict).rejects[0].reason == "absurd_ts"
    # the default "now" is the wall clock: an event from a minute ago passes, one from next year does not
    import time

    wall = time.time_ns() // 1_000_000
    r = parse_batch([encode_event("a", wall - 60_000, "view"), encode_event("a", wall + 365 * DAY_MS, "view")])
    assert len(r.batch) == 1 and r.rejects[0].reason == "absurd_ts"


def test_config_from_settings():
    def validation(env):
        return load_settings(env).worker.validation

    cfg = validation({"TRAIL_MAX_EVENT_BYTES": "1000", "TRAIL_MIN_EVENT_TS": "2000-01-01T00:00:00Z",
                      "TRAIL_MAX_FUTURE_MS": "5", "TRAIL_MIN_WEIGHT": "0", "TRAIL_MAX_WEIGHT": "5",
                      "TRAIL_MAX_ID_CHARS": "64"})
    assert cfg == ValidationConfig(max_bytes=1000, min_ts_ms=946_684_800_000, max_future_ms=5, min_weight=0,
                                   max_weight=5, max_id_chars=64)
    assert validation({"TRAIL_MIN_EVENT_TS": "946684800000"}).min_ts_ms == 946_684_800_000
    assert validation({}) == ValidationConfig()
    with pytest.raises(SettingsError, match="TRAIL_MAX_EVENT_BYTES='lots'"):
        validation({"TRAIL_MAX_EVENT_BYTES": "lots"})
    with pytest.raises(SettingsError, match="TRAIL_MIN_EVENT_TS='last tuesday'"):
        validation({"TRAIL_MIN_EVENT_TS": "last tuesday"})
    with pytest.raises(SettingsError, match="TRAIL_MIN_WEIGHT=5, TRAIL_MAX_WEIGHT=1"):
        validation({"TRAIL_MIN_WEIGHT": "5", "TRAIL_MAX_WEIGHT": "1"})


def test_mixed_batch_keeps_order_offsets_and_indices():
    values = [encode_event(f"i{k}", TS_2010 + k, EVENT_TYPES[k % 5], f"u{k}" if k % 2 else None, float(k))
              for k in range(10)]
    values[3] = b"{oops"
    values[7] = encode_event("i7", 5, "view")
    offsets = list(range(100, 110))
    r = parse_batch(values, offsets=offsets, partition=2, now_ms=NOW)
    good = [k for k in range(10) if k not in (3, 7)]
    b = r.batch
    assert len(b) == 8 and b.partition == 2
    assert b.index.tolist() == good
    assert b.offset.tolist() == [100 + k for k in good]
    assert b.item_id.tolist() == [f"i{k}" for k in good]
    assert b.user_id.tolist() == [f"u{k}" if k % 2 else None for k in good]
    assert b.ts_ms.tolist() == [TS_2010 + k for k in good]
    assert b.event_type.tolist() == [EVENT_TYPES[k % 5] for k in good]
    assert b.weight.tolist() == [float(k) for k in good]
    assert [(x.index, x.reason) for x in r.rejects] == [(3, "bad_json"), (7, "absurd_ts")]


def test_without_offsets_offsets_are_minus_one_and_empty_batch():
    r = parse_batch([encode_event("a", TS_2010, "view")], now_ms=NOW)
    assert r.batch.offset.tolist() == [-1] and r.batch.partition == -1
    e = parse_batch([], now_ms=NOW, offsets=[])
    assert len(e.batch) == 0 and e.rejects == [] and e.batch.ts_ms.dtype == np.int64


def test_key_must_match_item_id_when_present():
    values = [encode_event("a", TS_2010, "view")] * 3
    r = parse_batch(values, keys=[b"a", None, b"b"], now_ms=NOW)
    assert r.batch.index.tolist() == [0, 1]
    assert [(x.index, x.reason) for x in r.rejects] == [(2, "key_mismatch")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
field_values = st.one_of(json_values, st.sampled_from(EVENT_TYPES), st.integers(0, 2 * NOW),
                         st.sampled_from(["2010-01-01T00:00:00Z", "2010-13-01", ""]))
records = st.dictionaries(st.sampled_from(["item_id", "user_id", "ts", "event_type", "weight", "x"]),
                          field_values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), records.map(orjson.dumps), json_values.map(orjson.dumps)),
                max_size=20))
def test_never_raises_and_accounts_for_every_record(values):
    r = parse_batch(values, now_ms=NOW)
    seen = sorted(r.batch.index.tolist() + [x.index for x in r.rejects])
    assert seen == list(range(len(values)))
    for x in r.rejects:
        assert x.reason in {"bad_encoding", "bad_json", "not_object", "unknown_event_type", "absurd_ts",
                            "oversized"} or x.reason.split(":")[0] in {"missing_field", "bad_type", "bad_value"}
    # every accepted record re-encodes to one that parses to the same event
    b = r.batch
    again = parse_batch([encode_event(b.item_id[k], int(b.ts_ms[k]), b.event_type[k], b.user_id[k],
                                      float(b.weight[k])) for k in range(len(b))], now_ms=NOW)
    assert again.rejects == [] and again.batch.ts_ms.tolist() == b.ts_ms.tolist()


def test_event_batch_from_frame_and_back():
    df = pd.DataFrame({"item_id": ["a", "b"], "user_id": ["u", None], "ts": [TS_2010, TS_2010 + 1],
                       "event_type": ["view", "purchase"], "weight": [1.0, 3.0]})
    b = EventBatch.from_frame(df)
    assert len(b) == 2 and b.partition == -1
    assert b.user_id.tolist() == ["u", None] and b.offset.tolist() == [-1, -1] and b.index.tolist() == [0, 1]
    assert b.ts_ms.dtype == np.int64
    back = b.to_frame()
    assert back.to_dict("list") == {"item_id": ["a", "b"], "user_id": ["u", None], "ts": [TS_2010, TS_2010 + 1],
                                    "event_type": ["view", "purchase"], "weight": [1.0, 3.0]}
    assert back["user_id"].dtype == object and back["ts"].dtype == np.int64
    sub = b.take(np.array([1]))
    assert sub.item_id.tolist() == ["b"] and sub.index.tolist() == [1]
    with pytest.raises(ValueError, match="lacks column"):
        EventBatch.from_frame(df.drop(columns="ts"))
    with pytest.raises(ValueError, match="rows"):
        EventBatch(b.item_id, b.user_id[:1], b.ts_ms, b.event_type, b.weight, b.offset)


def test_event_batch_from_frame_with_nan_users_and_offsets():
    df = pd.DataFrame({"item_id": ["a", "b"], "user_id": [np.nan, "u"], "ts": [1, 2], "offset": [7, 8]})
    b = EventBatch.from_frame(df, partition=3)
    assert b.user_id.tolist() == [None, "u"] and b.offset.tolist() == [7, 8] and b.partition == 3
    assert b.event_type.tolist() == ["view", "view"] and b.weight.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("key,value", [
    (b"item-1", b'{"item_id": "item-1", "ts": "garbage"}'),
    (None, b"\xff\xfe\x00\x80 not utf-8 \xc3\x28"),
    (b"\x00\xffkey", None),
    (b"", b""),
])
def test_dlq_record_round_trips_original_bytes(key, value):
    src_headers = [("trace", b"\x01\x02"), ("__connect.errors.topic", b"upstream")]
    rec = dlq_record(key, value, "bad_json", topic="trail.events", partition=3, offset=12345,
                     timestamp_ms=TS_2010, source_headers=src_headers)
    assert rec.key is key and rec.value is value
    assert rec.timestamp_ms == TS_2010
    assert rec.headers[:2] == src_headers  # the source record's headers come first, unchanged
    h = dict(rec.headers[2:])
    assert h[H_TOPIC] == b"trail.events" and h[H_PARTITION] == b"3" and h[H_OFFSET] == b"12345"
    assert h[H_EXC_MESSAGE] == b"bad_json" and h[H_REASON] == b"bad_json" and h[H_STAGE] == b"VALUE_CONVERTER"
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in rec.headers)
    ctx = read_dlq_headers(rec.headers)
    assert (ctx.reason, ctx.topic, ctx.partition, ctx.offset, ctx.timestamp_ms) == (
        "bad_json", "trail.events", 3, 12345, TS_2010)


def test_dlq_late_events_and_missing_timestamp():
    rec = dlq_record(b"k", b"v", "late", topic="t", partition=0, offset=0, timestamp_ms=None)
    assert dict(rec.headers)[H_STAGE] == b"TRANSFORMATION"
    assert read_dlq_headers(rec.headers).timestamp_ms is None
    with pytest.raises(ValueError, match="not a TRAIL dead-letter record"):
        read_dlq_headers([("trace", b"x")])


def test_parse_rate_is_at_least_microseconds_per_event():
    """Not a benchmark: catches an accidental slow path (e.g. exceptions or per-event numpy)."""
    import time

    values = [encode_event(f"item{k % 500}", TS_2010 + k, "purchase", f"u{k % 97}", 2.0) for k in range(50_000)]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        r = parse_batch(values, offsets=np.arange(len(values)), now_ms=NOW)
        best = min(best, time.perf_counter() - t)
    assert len(r.batch) == len(values)
    assert best / len(values) < 20e-6  # measured ~1 µs/event on 2 cores
