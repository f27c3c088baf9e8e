"""parse_batch's all-good fast path (msgspec, column by column) decides exactly as the record-by-record
loop (orjson): same events, same values, same rejects, on clean polls, dirty polls and the inputs
where msgspec and orjson themselves disagree."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stream.core.events as events
from stream.core.events import ValidationConfig, encode_event, parse_batch

NOW = 1_700_000_000_000
TS = 1_262_304_000_000


def _loop_only(monkeypatch: pytest.MonkeyPatch, *args, **kw):
    with monkeypatch.context() as m:
        m.setattr(events, "_parse_fast", lambda *a, **k: None)
        return parse_batch(*args, **kw)


def _same(a, b) -> None:
    assert a.rejects == b.rejects
    x, y = a.batch, b.batch
    assert x.partition == y.partition
    for name in ("item_id", "user_id", "event_type", "ts_ms", "weight", "offset", "index"):
        u, v = getattr(x, name), getattr(y, name)
        assert u.dtype == v.dtype, name
        assert u.tolist() == v.tolist(), name
    # bit-identical weights (-0.0 vs 0.0 compare equal)
    assert x.weight.tobytes() == y.weight.tobytes()
    assert [type(v) for v in x.weight.tolist()] == [type(v) for v in y.weight.tolist()]


def _both(monkeypatch, values, keys=None, config=ValidationConfig()):
    offsets = list(range(100, 100 + len(values)))
    kw = dict(offsets=offsets, partition=3, keys=keys, config=config, now_ms=NOW)
    fast = parse_batch(values, **kw)
    _same(fast, _loop_only(monkeypatch, values, **kw))
    return fast


def test_clean_poll_takes_the_fast_path(monkeypatch):
    values = [encode_event(f"i{k % 7}", TS + k, "view", f"u{k % 3}" if k % 2 else None, 1.5 if k % 3 else None)
              for k in range(50)]
    values.append(b'{"item_id":"x","ts":"2010-01-01T00:00:00Z","event_type":"rating","weight":4}')
    calls = []
    real = events._parse_fast

    def spy(*a):
        calls.append(out := real(*a))
        return out

    monkeypatch.setattr(events, "_parse_fast", spy)
    fast = parse_batch(values, offsets=list(range(len(values))), partition=1,
                       keys=[v and None for v in values], now_ms=NOW)
    assert calls and calls[0] is not None  # the fast path decided this poll
    assert len(fast.batch) == len(values) and fast.rejects == []
    # a poll with bad records too: the loop judges only those
    dirty = values[:10] + [b"{", encode_event("x", 5, "view")] + values[10:]
    calls.clear()
    res = parse_batch(dirty, offsets=list(range(len(dirty))), partition=1, now_ms=NOW)
    assert calls and calls[0] is not None
    assert [(r.index, r.reason) for r in res.rejects] == [(10, "bad_json"), (11, "absurd_ts")]
    assert len(res.batch) == len(values) and 10 not in res.batch.index and 11 not in res.batch.index
    monkeypatch.undo()
    _both(monkeypatch, values)
    _both(monkeypatch, dirty)


BASE = b'"ts":1262304000000,"event_type":"view"'
# Inputs on which orjson and msgspec differ, or that sit on a validation edge.
EDGE = [
    b'{"item_id":"a",' + BASE + b',"weight":true}',  # bool weight: orjson True, bad_type
    b'{"item_id":"a","ts":-9223372036854775809,"event_type":"view"}',  # below int64
    b'{"item_id":"a","ts":18446744073709551615,"event_type":"view"}',  # uint64 max
    b'{"item_id":"a","ts":1262304000000.0,"event_type":"view"}',
    b'{"item_id":"a",' + BASE + b',"event_type":"bogus"}',  # repeated field: the last one counts
    b'{"item_id":"a","ts":1262304000000,"event_type":"bogus","event_type":"view"}',
    b'{"item_id":"a","item_id":"b",' + BASE + b'}',
    b'{"item_id":"a",' + BASE + b',"weight":1e400}',
    b'{"item_id":"a",' + BASE + b',"weight":9007199254740993}',
    b'{"item_id":"a",' + BASE + b',"weight":1000000}',
    b'{"item_id":"a",' + BASE + b',"weight":1000001}',
    b'{"item_id":"a",' + BASE + b',"weight":-0.0}',
    b'{"item_id":"a",' + BASE + b',"weight":1E2}',
    b'{"item_id":"a",' + BASE + b',"extra":{"x":[1]}}',
    b'{"item_id":"a","user_id":"u9","weight":2.5,' + BASE + b',"extra":[1]}',  # msgspec fails, orjson accepts
    b'{"item_id":"a",' + BASE + b',"deep":' + b"[" * 2000 + b"]" * 2000 + b'}',
    b'{"item_id":"a",' + BASE + b',"extra":1e400}',
    b'{"item\\u005fid":"a",' + BASE + b'}',
    b'{"item_id":"\\ud800",' + BASE + b'}',
    b'{"item_id":"\\u0000",' + BASE + b'}',
    b'{"item_id":"a\\u0085",' + BASE + b'}',  # C1 control
    b'{"item_id":"a\\u00a0",' + BASE + b'}',  # not printable, not a control: allowed
    b'{"item_id":"a\x7f",' + BASE + b'}',
    b'{"item_id":" \\t",' + BASE + b'}',
    b'{"item_id":" ",' + BASE + b'}',
    b'{"item_id":"",' + BASE + b'}',
    b'{"item_id":"a","user_id":"",' + BASE + b'}',
    b'{"item_id":"a","user_id":" ",' + BASE + b'}',
    b'{"item_id":"a","user_id":"\\u0001",' + BASE + b'}',
    b'{"item_id":"a","user_id":7,' + BASE + b'}',
    b'{"item_id":7,' + BASE + b'}',
    b'{"item_id":null,' + BASE + b'}',
    b'{"item_id":"a","ts":"2010-01-01T00:00:00Z","event_type":"view"}',
    b'{"item_id":"a","ts":"yesterday","event_type":"view"}',
    b'{"item_id":"a","ts":null,"event_type":"view"}',
    b'{"item_id":"a","ts":true,"event_type":"view"}',
    b'\xef\xbb\xbf{"item_id":"a",' + BASE + b'}',
    b' {"item_id":"a",' + BASE + b'} ',
    b'{"item_id":"a",' + BASE + b'}x',
    b'{"item_id":"\xff",' + BASE + b'}',
    b'["a"]',
    b'"a"',
    b'null',
    b'',
    None,
    ("{" + '"item_id":"' + "x" * 257 + '",' + BASE.decode() + "}").encode(),
    ("{" + '"item_id":"' + "\u00e9" * 256 + '",' + BASE.decode() + "}").encode(),
    b'{"item_id":"a","ts":4102444800000,"event_type":"view"}',  # 2100: future
    b'{"item_id":"a","ts":600000000000,"event_type":"view"}',  # 1989
]
GOOD = encode_event("a", TS, "view", "u", 2.0)


@pytest.mark.parametrize("value", EDGE, ids=range(len(EDGE)))
def test_edges_alone_and_in_a_clean_poll(monkeypatch, value):
    _both(monkeypatch, [value])
    _both(monkeypatch, [GOOD, value, GOOD])


def test_keys(monkeypatch):
    values = [encode_event("a", TS, "view"), encode_event("b", TS, "view"), encode_event("c", TS, "view")]
    _both(monkeypatch, values, keys=[b"a", None, b"c"])
    _both(monkeypatch, values, keys=[b"a", b"x", b"c"])
    _both(monkeypatch, values, keys=[b"a", b"b", b"c"])


def test_limits_of_another_config(monkeypatch):
    config = ValidationConfig(max_bytes=80, max_id_chars=3, min_weight=0.0, max_weight=10.0, max_future_ms=0)
    for value in [encode_event("abc", TS, "view", "xyz", 10.0), encode_event("abcd", TS, "view"),
                  encode_event("abc", TS, "view", "wxyz"), encode_event("a", TS, "view", None, -1.0),
                  encode_event("a", NOW + 1, "view"), encode_event("a", TS, "view", "u" * 3, 0.5) + b" " * 60]:
        _both(monkeypatch, [value], config=config)
        _both(monkeypatch, [encode_event("a", TS, "view"), value], config=config)


# Fields as raw JSON text, so that repeats, odd numbers and escapes reach both decoders. Each field is
# valid about half the time, so that records with one bad field among good ones are common.
_good_ids = st.text(alphabet="ab1 \u00e9", min_size=1, max_size=4).map(lambda s: f'"{s}"')
_ids = st.one_of(_good_ids, _good_ids, st.sampled_from(
    ['""', '" "', '"  "', '"\\t"', '"\\u0000"', '"a\\u0085"', '"\\u00a0"', '"\\ud83d\\ude00"', '"\\ud800"',
     "null", "7", "[]", '"' + "z" * 300 + '"']),
    st.text(max_size=6).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'))
_good_ts = st.integers(events.TS_1990_MS, NOW + events.DAY_MS).map(str)
_ts = st.one_of(_good_ts, _good_ts, st.integers(-2**65, 2**65).map(str), st.sampled_from(
    [str(events.TS_1990_MS - 1), str(NOW + events.DAY_MS + 1), "1262304000000.0", '"2010-01-01T00:00:00Z"',
     '"2010-01-01"', '"1989-12-31"', '"nope"', "null", "true", "1.262304e12", "-0"]))
_types = st.sampled_from(['"view"', '"click"', '"cart"', '"purchase"', '"rating"', '"view"', '"bogus"',
                          '"vi\\u0065w"', "1", "null"])
_good_weights = st.one_of(st.floats(-1e6, 1e6).map(repr), st.integers(-10**6, 10**6).map(str))
_weights = st.one_of(_good_weights, _good_weights, st.floats(allow_nan=False).map(repr).map(
    lambda s: s.replace("inf", "1e400")), st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["null", "true", "1e400", "-0.0", "1E2", "1000000.0000000001", "-1000000", "1000001",
                     '"1"', "[1]", "NaN"]))
_field = st.one_of(st.tuples(st.just("item_id"), _ids), st.tuples(st.just("user_id"), _ids),
                   st.tuples(st.just("ts"), _ts), st.tuples(st.just("event_type"), _types),
                   st.tuples(st.just("weight"), _weights),
                   st.tuples(st.sampled_from(["extra", "item"]), st.sampled_from(["1", '"x"', "{}", "[[1]]", "1e400"])))


@st.composite
def _records(draw):
    fields = [("item_id", draw(_ids)), ("ts", draw(_ts)), ("event_type", draw(_types))]
    if draw(st.booleans()):
        fields.append(("user_id", draw(_ids)))
    if draw(st.booleans()):
        fields.append(("weight", draw(_weights)))
    if draw(st.integers(0, 3)) == 0:
        fields += draw(st.lists(_field, max_size=2))
    fields = draw(st.permutations(fields))
    raw = ("{" + ",".join(f'"{k}":{v}' for k, v in fields) + "}").encode()
    mutate = draw(st.sampled_from(["none"] * 8 + ["truncate", "bytes"]))
    if mutate == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mutate == "bytes":
        raw = raw + draw(st.sampled_from([b"\xff", b" ", b"\n", b"}", b"\x00"]))
    return raw


_clean = st.builds(lambda i, u, t, w: encode_event(f"i{i}", TS + t, "view", None if u < 0 else f"u{u}",
                                                   None if w < 0 else float(w)),
                   st.integers(0, 5), st.integers(-1, 5), st.integers(0, 10**9), st.integers(-1, 10))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(_records(), _clean, _clean), min_size=1, max_size=8), st.booleans())
def test_fast_path_equals_the_loop(monkeypatch, values, with_keys):
    keys = None
    if with_keys:
        keys = [None if k % 3 == 0 else f"i{k % 5}".encode() for k in range(len(values))]
    _both(monkeypatch, values, keys=keys)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_clean, min_size=1, max_size=20))
def test_clean_polls_equal_the_loop(monkeypatch, values):
    fast = _both(monkeypatch, values)
    assert len(fast.batch) == len(values)
    assert np.array_equal(fast.batch.index, np.arange(len(values)))
