"""The `trail.events` record: parsing, validation, and dead-letter records.

Pure module (orjson, msgspec + numpy only). The hot path is `parse_batch`: it takes the raw
values of one poll (one partition) and returns the good events as numpy columns
(`EventBatch`) plus `Reject`s with a machine-readable reason. A reject never
raises; the caller sends it to `trail.events.dlq` with `dlq_record`. A poll is
parsed column by column (msgspec structs, `_parse_fast`); the records that fail or
might fail a test there are decided record by record with orjson (`_parse_each`),
and the two agree on every input (tests/test_events_fast.py).

Value schema (JSON):
    {"item_id": str, "user_id": str?, "ts": epoch ms int or ISO-8601 str,
     "event_type": "view"|"click"|"cart"|"purchase"|"rating", "weight": number?}

Value limits (`ValidationConfig`): `item_id` and `user_id` hold no control
character (Unicode category Cc: U+0000-U+001F, U+007F-U+009F, so NUL, \\t, \\n,
DEL, C1) and at most `max_id_chars` characters (default 256); `item_id` is not
empty or whitespace-only. `weight` is a JSON number (not a boolean), finite and
within [`min_weight`, `max_weight`] (default +-1e6); absent or null means 1.0.

What `weight` means: the purchase quantity (Online Retail II; negative is a
return) or the rating value (MovieLens). It is validated and carried in
`EventBatch.weight`, but the trend tables count interactions and distinct users
and do not use it in this version: a weighted signal would change the feature
spec and need a retrain of the shipped model.

Reject reasons: `bad_encoding` (not UTF-8), `bad_json` (includes numbers that
overflow a double, e.g. 1e400, and NaN/Infinity, which are not JSON),
`not_object`, `missing_field:<f>`, `bad_type:<f>` (wrong JSON type),
`bad_value:<f>` for f in item_id, user_id, weight (right type, value outside
the limits above; an empty item_id is `bad_value:item_id`), `unknown_event_type`,
`absurd_ts`, `oversized`, `key_mismatch` (a Kafka key present that is not the
item id, which would put an item's events on several partitions); `late` is
assigned by the trend table, not here.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, Literal

import msgspec
import numpy as np
import orjson

EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase", "rating")
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)
# Interned strings, so event_type columns share five objects.
_EVENT_TYPE_CANON = {t: t for t in EVENT_TYPES}

REASON_BAD_ENCODING = "bad_encoding"
REASON_BAD_JSON = "bad_json"
REASON_NOT_OBJECT = "not_object"
REASON_UNKNOWN_EVENT_TYPE = "unknown_event_type"
REASON_ABSURD_TS = "absurd_ts"
REASON_OVERSIZED = "oversized"
REASON_KEY_MISMATCH = "key_mismatch"
REASON_LATE = "late"

DAY_MS = 86_400_000
TS_1990_MS = 631_152_000_000  # 1990-01-01T00:00:00Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def missing_field(name: str) -> str:
    return f"missing_field:{name}"


def bad_type(name: str) -> str:
    return f"bad_type:{name}"


def bad_value(name: str) -> str:
    return f"bad_value:{name}"


# Unicode category Cc is exactly these two ranges (C0 + DEL, C1). str.isprintable() is the cheap
# first test (a printable string holds no Cc); the regex decides only for the rare strings that
# are not printable for another reason (NBSP, zero-width joiner, ...), which are allowed.
_CONTROL_SEARCH = re.compile(r"[\x00-\x1f\x7f-\x9f]").search
_MAX_FINITE = sys.float_info.max
_STR = frozenset({str})
_NONE = frozenset({type(None)})
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class ValidationConfig:
    """Limits applied to every record.

    `min_ts_ms` is an absolute lower bound (default 1990-01-01); the upper bound
    is `now + max_future_ms`, with "now" passed to `parse_batch` (so tests and
    replays can pin it) or read from the wall clock once per batch.
    """

    max_bytes: int = 64 * 1024
    min_ts_ms: int = TS_1990_MS
    max_future_ms: int = DAY_MS
    # weight is a purchase quantity (negative: a return) or a rating value; see the module doc
    min_weight: float = -1e6
    max_weight: float = 1e6
    max_id_chars: int = 256  # item_id / user_id length limit, in characters


@dataclass(slots=True)
class EventBatch:
    """Good events of one poll, as parallel numpy columns.

    `offset` is the Kafka offset of each event (-1 when the events did not come
    from Kafka); `partition` is the source partition of the whole batch (-1 when
    none); `index` is each event's position in the raw batch it was parsed from.
    """

    item_id: np.ndarray  # object (str)
    user_id: np.ndarray  # object (str or None)
    ts_ms: np.ndarray  # int64, epoch ms UTC
    event_type: np.ndarray  # object (one of EVENT_TYPES)
    weight: np.ndarray  # float64
    offset: np.ndarray  # int64
    partition: int = -1
    index: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = np.arange(len(self.item_id), dtype=np.int64)
        n = len(self.item_id)
        for name in ("user_id", "ts_ms", "event_type", "weight", "offset", "index"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"EventBatch column {name} has {len(getattr(self, name))} rows, item_id has {n}")

    def __len__(self) -> int:
        return len(self.item_id)

    @classmethod
    def empty(cls, partition: int = -1) -> EventBatch:
        obj = np.empty(0, dtype=object)
        return cls(obj, obj.copy(), np.empty(0, np.int64), obj.copy(), np.empty(0, np.float64),
                   np.empty(0, np.int64), partition, np.empty(0, np.int64))

    @classmethod
    def from_frame(cls, df: Any, partition: int = -1) -> EventBatch:
        """Build from the event frame (docs/architecture.md): item_id, user_id, ts (ms), event_type, weight.

        An `offset` column is used when present, otherwise offsets are -1.
        """
        missing = [c for c in ("item_id", "ts") if c not in df.columns]
        if missing:
            raise ValueError(f"event frame lacks column(s) {missing}; has {list(df.columns)}")
        n = len(df)
        item_id = df["item_id"].to_numpy(dtype=object)
        if "user_id" in df.columns:
            user = df["user_id"]
            user_id = user.astype(object).where(user.notna(), None).to_numpy(dtype=object)
        else:
            user_id = np.full(n, None, dtype=object)
        if "event_type" in df.columns:
            event_type = df["event_type"].to_numpy(dtype=object)
        else:
            event_type = np.full(n, "view", dtype=object)
        weight = df["weight"].to_numpy(dtype=np.float64) if "weight" in df.columns else np.ones(n)
        offset = df["offset"].to_numpy(dtype=np.int64) if "offset" in df.columns else np.full(n, -1, np.int64)
        return cls(item_id, user_id, df["ts"].to_numpy(dtype=np.int64), event_type, weight, offset,
                   partition, np.arange(n, dtype=np.int64))

    def to_frame(self) -> Any:
        import pandas as pd

        # explicit object dtype: pandas 3 would turn str columns into its str dtype (None -> NaN)
        return pd.DataFrame({"item_id": pd.Series(self.item_id, dtype=object),
                             "user_id": pd.Series(self.user_id, dtype=object), "ts": self.ts_ms,
                             "event_type": pd.Series(self.event_type, dtype=object), "weight": self.weight})

    def take(self, idx: np.ndarray) -> EventBatch:
        """Rows `idx` (integer indices or a boolean mask), same partition."""
        return EventBatch(self.item_id[idx], self.user_id[idx], self.ts_ms[idx], self.event_type[idx],
                          self.weight[idx], self.offset[idx], self.partition, self.index[idx])


@dataclass(frozen=True, slots=True)
class Reject:
    index: int  # position in the raw batch
    reason: str


@dataclass(frozen=True, slots=True)
class ParseResult:
    batch: EventBatch
    rejects: list[Reject]


def _iso_to_ms(s: str) -> int | None:
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    if dt.tzinfo is None:  # naive timestamps are taken as UTC
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _ONE_MS


def _bad_id(s: str, max_chars: int) -> bool:
    """True when an id string breaks the limits: too long, or holding a control character (Cc)."""
    return len(s) > max_chars or (not s.isprintable() and _CONTROL_SEARCH(s) is not None)


def _diagnose(obj: Any, lo: int, hi: int, config: ValidationConfig) -> str:
    """Reason for a decoded value that failed the fast path (called only for rejects)."""
    if type(obj) is not dict:
        return REASON_NOT_OBJECT
    for f in ("item_id", "ts", "event_type"):
        if f not in obj or obj[f] is None:
            return missing_field(f)
    item = obj["item_id"]
    if type(item) is not str:
        return bad_type("item_id")
    if not item or item.isspace() or _bad_id(item, config.max_id_chars):
        return bad_value("item_id")
    user = obj.get("user_id")
    if user is not None:
        if type(user) is not str:
            return bad_type("user_id")
        if _bad_id(user, config.max_id_chars):
            return bad_value("user_id")
    et = obj["event_type"]
    if type(et) is not str:
        return bad_type("event_type")
    if et not in _EVENT_TYPE_SET:
        return REASON_UNKNOWN_EVENT_TYPE
    w = obj.get("weight")
    if w is not None:
        if type(w) not in (int, float):  # bool is not a number here
            return bad_type("weight")
        if not (math.isfinite(w) and config.min_weight <= w <= config.max_weight):
            return bad_value("weight")
    ts = obj["ts"]
    if type(ts) is str:
        ms = _iso_to_ms(ts)
        if ms is None:
            return bad_type("ts")
    elif type(ts) is int:
        ms = ts
    else:
        return bad_type("ts")
    if not lo <= ms <= hi:
        return REASON_ABSURD_TS
    raise AssertionError(f"record passed every check but was rejected: {obj!r}")


def _decode_error_reason(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return REASON_BAD_ENCODING
    return REASON_BAD_JSON


class _Event(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The fast path's decoding target: typed fields, no dict per record, any other field an error."""

    item_id: str
    ts: int | str
    event_type: Literal["view", "click", "cart", "purchase", "rating"]
    user_id: str | None = None
    weight: float | None = None


_decode_event = msgspec.json.Decoder(_Event).decode
_get_item = attrgetter("item_id")
_get_ts = attrgetter("ts")
_get_event_type = attrgetter("event_type")
_get_user = attrgetter("user_id")
_get_weight = attrgetter("weight")
_INT = frozenset({int})


_DUMMY_VALUE = b'{"item_id":"-","ts":0,"event_type":"view"}'  # stands in for a flagged record
_MAX_RESTARTS = 64  # decode failures in one poll beyond which the loop takes the whole poll


def _fromiter(it, n: int) -> np.ndarray:
    return np.fromiter(it, bool, n)


def _id_flags(ids: list[str], n: int, limit: int | None) -> np.ndarray:
    """True where an id may break the limits: not printable (a Cc is possible; the loop decides) or too long."""
    flags = ~_fromiter(map(str.isprintable, ids), n)
    if limit is not None:
        flags |= np.fromiter(map(len, ids), np.int64, n) > limit
    return flags


def _parse_fast(values: Sequence[bytes | None], offsets: Sequence[int] | np.ndarray | None, partition: int,
                keys: Sequence[bytes | None] | None, config: ValidationConfig, now_ms: int) -> ParseResult | None:
    """`parse_batch` column by column: msgspec decodes straight into typed structs and the tests run in
    C-level loops (map, numpy) instead of one Python iteration per record. A record that fails or might
    fail any test is flagged and decided by `_parse_each`; the others pass every test of the loop with
    the same values. None: the loop takes the whole poll (a None value, many undecodable records)."""
    n = len(values)
    try:
        if None in values:
            return None
        lens = np.fromiter(map(len, values), np.int64, n)  # type: ignore[arg-type]
        longest = int(lens.max())
        flag = lens > config.max_bytes
        id_limit = config.max_id_chars if longest > config.max_id_chars else None  # an id has no more chars than bytes
        todo = values if not flag.any() else [_DUMMY_VALUE if f else v for v, f in zip(values, flag.tolist())]
        # msgspec accepts a subset of what orjson does (tests/test_events_fast.py): an unknown field, a
        # wrong type, a repeated field with an invalid value... fail here, and the loop decides with orjson
        objs: list[_Event] = []
        restarts = 0
        while len(objs) < n:
            try:
                objs.extend(map(_decode_event, todo[len(objs):]))
            except (msgspec.DecodeError, msgspec.ValidationError):
                restarts += 1
                if restarts > _MAX_RESTARTS:
                    return None
                flag[len(objs)] = True
                objs.append(_decode_event(_DUMMY_VALUE))
        items = list(map(_get_item, objs))
        tss = list(map(_get_ts, objs))
        types = list(map(_get_event_type, objs))  # msgspec returns the Literal's own (interned) strings
        users = list(map(_get_user, objs))
        weights = list(map(_get_weight, objs))
        flag |= ~_fromiter(map(bool, items), n) | _fromiter(map(str.isspace, items), n) | _id_flags(items, n, id_limit)
        if set(map(type, users)) != _NONE:
            flag |= _id_flags([u or "" for u in users], n, id_limit)  # "" passes every id test of a user
        if set(map(type, tss)) != _INT:
            tss = [t if type(t) is int else _iso_to_ms(t) for t in tss]
            if None in tss:
                flag |= np.array([t is None for t in tss], bool)
                tss = [config.min_ts_ms - 1 if t is None else t for t in tss]
        try:
            ts_arr = np.array(tss, dtype=np.int64)
        except OverflowError:  # beyond int64: out of range anyway
            ts_arr = np.array([t if _I64_MIN <= t <= _I64_MAX else config.min_ts_ms - 1 for t in tss], np.int64)
        flag |= (ts_arr < config.min_ts_ms) | (ts_arr > now_ms + config.max_future_ms)
        if None in weights:
            weights = [1.0 if w is None else w for w in weights]
        w_arr = np.array(weights, dtype=np.float64)
        # clamped to the finite doubles, so the one range test also rejects inf and NaN
        min_w = max(config.min_weight, -_MAX_FINITE)
        max_w = min(config.max_weight, _MAX_FINITE)
        flag |= ~((w_arr >= min_w) & (w_arr <= max_w))
        if keys is not None:
            encoded = list(map(str.encode, items))
            if encoded != list(keys):
                flag |= np.array([k is not None and k != e for k, e in zip(keys, encoded)], bool)
    except Exception:  # noqa: BLE001 - whatever failed, the record-by-record loop names it
        return None
    batch = _batch(items, users, ts_arr, types, w_arr, offsets, partition, np.arange(n, dtype=np.int64))
    if not flag.any():
        return ParseResult(batch, [])
    flagged = np.flatnonzero(flag)
    judged = _parse_each([values[i] for i in flagged.tolist()], None, partition,
                         None if keys is None else [keys[i] for i in flagged.tolist()], config, now_ms)
    rejects = [Reject(int(flagged[r.index]), r.reason) for r in judged.rejects]
    accepted = flagged[judged.batch.index]  # the flagged records the loop accepted: its values replace ours
    batch.item_id[accepted] = judged.batch.item_id
    batch.user_id[accepted] = judged.batch.user_id
    batch.ts_ms[accepted] = judged.batch.ts_ms
    batch.event_type[accepted] = judged.batch.event_type
    batch.weight[accepted] = judged.batch.weight
    return ParseResult(batch.take(np.sort(np.concatenate([np.flatnonzero(~flag), accepted]))), rejects)


def parse_batch(
    values: Sequence[bytes | None],
    *,
    offsets: Sequence[int] | np.ndarray | None = None,
    partition: int = -1,
    keys: Sequence[bytes | None] | None = None,
    config: ValidationConfig = ValidationConfig(),
    now_ms: int | None = None,
) -> ParseResult:
    """Parse and validate the raw values of one batch.

    `keys`, when given, are checked against item_id (a None key is allowed).
    `now_ms` pins "now" for the future-timestamp bound (default: wall clock).
    """
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    if values:
        fast = _parse_fast(values, offsets, partition, keys, config, now_ms)
        if fast is not None:
            return fast
    return _parse_each(values, offsets, partition, keys, config, now_ms)


def _parse_each(values: Sequence[bytes | None], offsets: Sequence[int] | np.ndarray | None, partition: int,
                keys: Sequence[bytes | None] | None, config: ValidationConfig, now_ms: int) -> ParseResult:
    """`parse_batch` record by record: the reference the fast path agrees with, and the judge of
    every record the fast path flags."""
    lo = config.min_ts_ms
    hi = now_ms + config.max_future_ms
    max_bytes = config.max_bytes
    max_id = config.max_id_chars
    # clamped to the finite doubles, so the one range test also rejects inf and NaN
    min_w = max(config.min_weight, -_MAX_FINITE)
    max_w = min(config.max_weight, _MAX_FINITE)
    ctrl = _CONTROL_SEARCH
    loads = orjson.loads
    JSONDecodeError = orjson.JSONDecodeError
    canon = _EVENT_TYPE_CANON
    iso = _iso_to_ms

    items: list[str] = []
    users: list[str | None] = []
    tss: list[int] = []
    types: list[str] = []
    weights: list[float] = []
    good: list[int] = []
    rejects: list[Reject] = []

    for i, raw in enumerate(values):
        if raw is None:
            rejects.append(Reject(i, REASON_BAD_JSON))
            continue
        n_raw = len(raw)
        if n_raw > max_bytes:
            rejects.append(Reject(i, REASON_OVERSIZED))
            continue
        try:
            obj = loads(raw)
        except JSONDecodeError:
            rejects.append(Reject(i, _decode_error_reason(raw)))
            continue
        # Fast path: one dict lookup per field and exact type checks; anything
        # unusual falls through to _diagnose, which names the reason.
        try:
            item = obj["item_id"]
            ts = obj["ts"]
            et = canon[obj["event_type"]]
        except (KeyError, TypeError):
            rejects.append(Reject(i, _diagnose(obj, lo, hi, config)))
            continue
        user = obj.get("user_id")
        w = obj.get("weight")
        if type(ts) is not int:
            ts = iso(ts) if type(ts) is str else None
        # ids: isprintable() is the cheap test, the Cc regex runs only on non-printable strings;
        # an id longer than max_id chars needs a longer value, so short values skip the length test
        if (type(item) is not str or not item or ts is None or not lo <= ts <= hi
                or (not item.isprintable() and ctrl(item)) or item.isspace()
                or (user is not None and (type(user) is not str or (not user.isprintable() and ctrl(user))))
                or (n_raw > max_id and (len(item) > max_id or (user is not None and len(user) > max_id)))):
            rejects.append(Reject(i, _diagnose(obj, lo, hi, config)))
            continue
        if w is None:
            w = 1.0
        else:
            if type(w) is not float:
                if type(w) is int:  # orjson ints fit in 64 bits, so float() cannot overflow
                    w = float(w)
                else:  # bool, str, list, ...
                    rejects.append(Reject(i, bad_type("weight")))
                    continue
            if not min_w <= w <= max_w:
                rejects.append(Reject(i, bad_value("weight")))
                continue
        if keys is not None:
            k = keys[i]
            if k is not None and k != item.encode():
                rejects.append(Reject(i, REASON_KEY_MISMATCH))
                continue
        items.append(item)
        users.append(user)
        tss.append(ts)
        types.append(et)
        weights.append(w)
        good.append(i)

    batch = _batch(items, users, np.array(tss, dtype=np.int64), types, np.array(weights, dtype=np.float64),
                   offsets, partition, np.array(good, dtype=np.int64))
    return ParseResult(batch, rejects)


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # np.array(list_of_str) would make a fixed-width str array
    out[:] = values
    return out


def _batch(items: list, users: list, ts: np.ndarray, types: list, weights: np.ndarray,
           offsets: Sequence[int] | np.ndarray | None, partition: int, idx: np.ndarray) -> EventBatch:
    """The accepted records as columns; `idx`: their positions in the poll (their offsets' index)."""
    off = (np.full(len(idx), -1, dtype=np.int64) if offsets is None
           else np.asarray(offsets, dtype=np.int64)[idx])
    return EventBatch(_objects(items), _objects(users), ts, _objects(types), weights, off, partition, idx)


def encode_event(item_id: str, ts_ms: int, event_type: str, user_id: str | None = None,
                 weight: float | None = None) -> bytes:
    """The canonical value bytes of one event (what replay and tests produce)."""
    obj: dict[str, Any] = {"item_id": item_id, "ts": ts_ms, "event_type": event_type}
    if user_id is not None:
        obj["user_id"] = user_id
    if weight is not None:
        obj["weight"] = weight
    return orjson.dumps(obj)


# --- dead-letter records ---------------------------------------------------------------------
# Header names follow Kafka Connect's dead-letter queue (errors.deadletterqueue.context.headers.enable),
# so existing DLQ tooling can read them; trail.* headers add the machine-readable reason and the
# source record's timestamp. Header values are UTF-8 strings, as Connect writes them.

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_STAGE = "__connect.errors.stage"
H_CLASS = "__connect.errors.class.name"
H_EXC_CLASS = "__connect.errors.exception.class.name"
H_EXC_MESSAGE = "__connect.errors.exception.message"
H_REASON = "trail.errors.reason"
H_TIMESTAMP = "trail.errors.timestamp"

_STAGE = {REASON_LATE: "TRANSFORMATION"}  # every other reason is a parse/validation failure


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """What to send to the DLQ topic: key and value are the source record's bytes, untouched."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None


def dlq_record(
    key: bytes | None,
    value: bytes | None,
    reason: str,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    source_headers: Sequence[tuple[str, bytes]] = (),
) -> DlqRecord:
    """A dead-letter record for a rejected source record.

    The source record's own headers come first, unchanged; the error context follows.
    """
    stage = _STAGE.get(reason, "VALUE_CONVERTER")
    ctx = [
        (H_TOPIC, topic),
        (H_PARTITION, str(partition)),
        (H_OFFSET, str(offset)),
        (H_STAGE, stage),
        (H_CLASS, "stream.core.events.parse_batch" if stage == "VALUE_CONVERTER" else "stream.core.trends.TrendTable"),
        (H_EXC_CLASS, "trail.InvalidEvent" if stage == "VALUE_CONVERTER" else "trail.LateEvent"),
        (H_EXC_MESSAGE, reason),
        (H_REASON, reason),
        (H_TIMESTAMP, "" if timestamp_ms is None else str(timestamp_ms)),
    ]
    headers = list(source_headers) + [(k, v.encode()) for k, v in ctx]
    return DlqRecord(key, value, headers, timestamp_ms)


@dataclass(frozen=True, slots=True)
class DlqContext:
    """The error context read back from a DLQ record's headers."""

    reason: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


def read_dlq_headers(headers: Sequence[tuple[str, bytes]]) -> DlqContext:
    """Inverse of the context part of `dlq_record` (the last value of each name wins)."""
    h = {k: v.decode() for k, v in headers if k.startswith(("__connect.errors.", "trail.errors."))}
    missing = [k for k in (H_REASON, H_TOPIC, H_PARTITION, H_OFFSET) if k not in h]
    if missing:
        raise ValueError(f"not a TRAIL dead-letter record: headers {missing} missing")
    ts = h.get(H_TIMESTAMP, "")
    return DlqContext(h[H_REASON], h[H_TOPIC], int(h[H_PARTITION]), int(h[H_OFFSET]), int(ts) if ts else None)
