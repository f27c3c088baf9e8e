"""Typed output records: what the scorer and explainer publish to Kafka and the sink stores.

Pure module (no Kafka, Faust or ClickHouse import). Each record validates itself on
construction, so a bad value fails where it was made rather than in a ClickHouse batch
minutes later. `to_dict()` is the JSON contract of DESIGN.md (tick as ISO-8601 UTC),
`to_json()` its orjson bytes, `from_dict()` / `from_json()` the inverse.

`tick` accepts a timezone-aware datetime, an ISO-8601 string or epoch milliseconds and is
kept as an aware UTC datetime with millisecond precision (the store's DateTime64(3)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import orjson

from stream.core.forecast import OUTLOOKS

# Explanation.reason (stream.core.faithfulness.grammar.reason_of), reason_source and driver
REASONS = ("trend", "level", "neighbourhood", "season", "text", None)
REASON_SOURCES = ("drivers", "rule", None)
DRIVER_GROUPS = ("trend", "level", "neighbourhood", "season", "text")
# the explanation generator's export, by its artefact role (stream.model.teacher_forced.generator_role)
GENERATOR_OF_ROLE = {"generator": "fp32", "generator.nbits": "nbits8", "generator.int8": "int8"}
GENERATORS = tuple(GENERATOR_OF_ROLE.values())

__all__ = ["Prediction", "Explanation", "TrendSnapshot", "RecordError", "to_tick", "tick_iso", "tick_ms", "Record",
           "ItemInfo", "load_json"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class RecordError(ValueError):
    """A record field has the wrong type or an impossible value."""


def to_tick(value: datetime | str | int | float) -> datetime:
    """Normalise a tick to an aware UTC datetime truncated to milliseconds."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise RecordError(f"tick {value!r} is a naive datetime; give it a timezone (UTC)")
        dt = value.astimezone(timezone.utc)
    elif isinstance(value, bool):
        raise RecordError(f"tick must be a datetime, ISO-8601 string or epoch ms, got {value!r}")
    elif isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise RecordError(f"tick {value!r} is not a finite epoch-ms value")
        dt = datetime.fromtimestamp(int(value) / 1000.0, tz=timezone.utc)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise RecordError(f"tick {value!r} is not an ISO-8601 timestamp") from None
        if dt.tzinfo is None:
            raise RecordError(f"tick {value!r} has no UTC offset; write it as ...Z or ...+00:00")
        dt = dt.astimezone(timezone.utc)
    else:
        raise RecordError(f"tick must be a datetime, ISO-8601 string or epoch ms, got {type(value).__name__}")
    return dt.replace(microsecond=dt.microsecond - dt.microsecond % 1000)


def tick_ms(tick: datetime) -> int:
    """A tick (as `to_tick` gives it) in epoch milliseconds, exactly (no float rounding)."""
    return (tick - _EPOCH) // timedelta(milliseconds=1)


def tick_iso(tick: datetime) -> str:
    """ISO-8601 with millisecond precision and a Z suffix, e.g. 2011-12-01T00:00:00.000Z."""
    return tick.strftime("%Y-%m-%dT%H:%M:%S.") + f"{tick.microsecond // 1000:03d}Z"


def _text(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"{name} must not be empty")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # numpy scalars are registered as numbers.Real but not int/float
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RecordError(f"{name} must be a number, got {type(value).__name__}") from None
    value = float(value)
    if not math.isfinite(value):
        raise RecordError(f"{name} must be finite, got {value}")
    return value


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise RecordError(f"{name} must be an integer, got a bool")
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise RecordError(f"{name} must be an integer, got {value!r}") from None
    if as_int != value:
        raise RecordError(f"{name} must be an integer, got {value!r}")
    if as_int < minimum:
        raise RecordError(f"{name} must be >= {minimum}, got {as_int}")
    return as_int


def _mapping(name: str, value: Any) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise RecordError(f"{name} must be a mapping of name -> number, got {type(value).__name__}")
    return value


def _signals(value: Any) -> dict[str, float]:
    return {_text("signal name", k): _number(f"signals[{k!r}]", v) for k, v in _mapping("signals", value).items()}


def load_json(raw: bytes | str, kind: str, error: type[ValueError] = RecordError) -> Any:
    """orjson.loads; bytes that are not JSON raise `error` ("<kind> is not valid JSON: ...")."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as ex:
        raise error(f"{kind} is not valid JSON: {ex}") from None


def _require(data: Mapping[str, Any], names: tuple[str, ...], kind: str) -> None:
    if not isinstance(data, Mapping):
        raise RecordError(f"{kind} must be a JSON object, got {type(data).__name__}")
    missing = [n for n in names if n not in data]
    if missing:
        raise RecordError(f"{kind} is missing {', '.join(missing)}")


class _Record:
    __slots__ = ()

    table: ClassVar[str]
    _fields: ClassVar[tuple[str, ...]]
    _optional: ClassVar[tuple[str, ...]] = ()  # fields that records written before them may lack

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self._fields}
        out["tick"] = tick_iso(out["tick"])
        for name in ("signals", "drivers"):
            if out.get(name) is not None:
                out[name] = dict(out[name])
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        _require(data, tuple(n for n in cls._fields if n not in cls._optional), cls.__name__)
        return cls(**{name: data[name] for name in cls._fields if name in data})

    @classmethod
    def from_json(cls, raw: bytes | str):
        return cls.from_dict(load_json(raw, cls.__name__))

    @property
    def key(self) -> tuple[str, datetime, str]:
        """The store's de-duplication key: a replayed record with this key replaces, never adds."""
        return (self.item_id, self.tick, self.model_version)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Prediction(_Record):
    """One scored item at one tick (topic trail.predictions, table trail_predictions)."""

    item_id: str
    tick: datetime
    score: float
    predicted_count: float
    rank: int
    signals: dict[str, float]
    model_version: str
    # the count's 80% range (its 10% and 90% quantiles); None from a model without quantile heads
    predicted_low: float | None = None
    predicted_high: float | None = None
    # what moved the forecast away from the item's current pace: each input group's share (trend, level, season, text)
    # of log1p(median count) - log1p(pace), summing to it (stream.core.drivers); None: not attributed
    drivers: dict[str, float] | None = None

    table: ClassVar[str] = "trail_predictions"
    _fields: ClassVar[tuple[str, ...]] = ("item_id", "tick", "score", "predicted_count", "rank", "signals", "model_version",
                                          "predicted_low", "predicted_high", "drivers")
    _optional: ClassVar[tuple[str, ...]] = ("predicted_low", "predicted_high", "drivers")

    def __post_init__(self) -> None:
        object.__setattr__(self, "item_id", _text("item_id", self.item_id))
        object.__setattr__(self, "tick", to_tick(self.tick))
        object.__setattr__(self, "score", _number("score", self.score))
        predicted = _number("predicted_count", self.predicted_count)
        if predicted < 0:
            raise RecordError(f"predicted_count must be >= 0, got {predicted}")
        object.__setattr__(self, "predicted_count", predicted)
        object.__setattr__(self, "rank", _count("rank", self.rank, 1))
        object.__setattr__(self, "signals", _signals(self.signals))
        object.__setattr__(self, "model_version", _text("model_version", self.model_version))
        low, high = self.predicted_low, self.predicted_high
        if (low is None) != (high is None):
            raise RecordError("predicted_low and predicted_high come together (both or neither)")
        if low is not None:
            low, high = _number("predicted_low", low), _number("predicted_high", high)
            if not 0 <= low <= high:
                raise RecordError(f"the range must satisfy 0 <= predicted_low <= predicted_high, got [{low}, {high}]")
            object.__setattr__(self, "predicted_low", low)
            object.__setattr__(self, "predicted_high", high)
        if self.drivers is not None:
            object.__setattr__(self, "drivers", {_text("driver name", k): _number(f"drivers[{k!r}]", v)
                                                 for k, v in _mapping("drivers", self.drivers).items()})


@dataclass(frozen=True, slots=True)
class Explanation(_Record):
    """The explainer's sentence for one top item at one tick (trail.explanations, trail_explanations).

    `explanation` is what is published, `raw_explanation` what the model decoded; `repaired` says the
    stream's verify-and-revise step changed it. `faithful` is the checker's verdict on the published
    text. `forecast` is the direction the text states ("rise" / "steady" / "fall", None when it states
    none) and `forecast_agrees` whether that is the direction of the model's own predicted count.
    `decoding` says how the text was decoded: "greedy", or "sampled t=<temperature> p=<top_p> seed=<seed>"
    (stream.core.decoding); None: not said (records written before it). It travels on Kafka only: the
    store's columns (stream.store.clickhouse.TABLE_COLUMNS) do not include it. `reason` is the kind of
    true reason a text gives for a forecast against the main window's trend: "trend" (a longer window's
    trend), "level" (the count against the longest window's pace) or None (no such forecast, or no
    reason given; stream.core.faithfulness.grammar.stated_reason), and, from a model that gives drivers,
    "neighbourhood" (its semantic neighbours' trend), "season" (the same weeks last year, or the calendar's
    push: "this time of year lifts it") or "text" (the item's kind: "the kind of item it is lifts it").
    `reason_source`: "drivers" when the reason is the model's top driver, "rule" when today's rule gave it
    (no drivers, or a top driver with no words the checker verifies), None when no reason is given (or
    not said: records written before it).
    `driver`: the model's top driver for this forecast (grammar.top_driver), None without drivers or when no
    group pushes a rise or fall its way.
    `generator`: which export of the model wrote `raw_explanation`: "fp32", "nbits8" (the weight-only 8-bit copy,
    served only where it re-passed its parity check on this CPU) or "int8" (stream.model.teacher_forced.generator_role;
    GENERATORS); None: not said (records written before it). Kafka only, like `decoding`.
    """

    item_id: str
    tick: datetime
    rank: int
    explanation: str
    faithful: bool
    claims_checked: int
    model_version: str
    raw_explanation: str | None = None  # None: as published
    repaired: bool = False
    forecast: str | None = None
    forecast_agrees: bool = False
    decoding: str | None = None
    reason: str | None = None
    reason_source: str | None = None
    driver: str | None = None
    generator: str | None = None

    table: ClassVar[str] = "trail_explanations"
    _fields: ClassVar[tuple[str, ...]] = ("item_id", "tick", "rank", "explanation", "raw_explanation", "repaired",
                                          "faithful", "claims_checked", "forecast", "forecast_agrees", "reason",
                                          "reason_source", "driver", "decoding", "generator", "model_version")

    def __post_init__(self) -> None:
        object.__setattr__(self, "item_id", _text("item_id", self.item_id))
        object.__setattr__(self, "tick", to_tick(self.tick))
        object.__setattr__(self, "rank", _count("rank", self.rank, 1))
        object.__setattr__(self, "explanation", _text("explanation", self.explanation, allow_empty=True))
        raw = self.explanation if self.raw_explanation is None else self.raw_explanation
        object.__setattr__(self, "raw_explanation", _text("raw_explanation", raw, allow_empty=True))
        for name in ("faithful", "repaired", "forecast_agrees"):
            object.__setattr__(self, name, _flag(name, getattr(self, name)))
        if self.forecast is not None and self.forecast not in OUTLOOKS:
            raise RecordError(f"forecast must be one of {OUTLOOKS} or None, got {self.forecast!r}")
        if self.forecast is None and self.forecast_agrees:
            raise RecordError("forecast_agrees without a forecast")
        if self.reason not in REASONS:
            raise RecordError(f"reason must be one of {REASONS[:-1]} or None, got {self.reason!r}")
        if self.reason_source not in REASON_SOURCES:
            raise RecordError(f"reason_source must be one of {REASON_SOURCES[:-1]} or None, got {self.reason_source!r}")
        if self.reason is None and self.reason_source is not None:
            raise RecordError(f"reason_source {self.reason_source!r} without a reason")
        if self.driver is not None and self.driver not in DRIVER_GROUPS:
            raise RecordError(f"driver must be one of {DRIVER_GROUPS} or None, got {self.driver!r}")
        object.__setattr__(self, "claims_checked", _count("claims_checked", self.claims_checked, 0))
        if self.decoding is not None:
            object.__setattr__(self, "decoding", _text("decoding", self.decoding))
        if self.generator is not None and self.generator not in GENERATORS:
            raise RecordError(f"generator must be one of {GENERATORS} or None, got {self.generator!r}")
        object.__setattr__(self, "model_version", _text("model_version", self.model_version))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Explanation:
        """Also reads records written before the provenance fields (raw = published, not repaired) and before
        `decoding`, `reason`, `reason_source`, `driver` or `generator` (None)."""
        _require(data, ("item_id", "tick", "rank", "explanation", "faithful", "claims_checked", "model_version"),
                 cls.__name__)
        return cls(**{name: data[name] for name in cls._fields if name in data})


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise RecordError(f"{name} must be a bool, got {value!r}")


@dataclass(frozen=True, slots=True)
class TrendSnapshot(_Record):
    """An item's trend signals at a tick, whether or not it was scored.

    Dashboards read realised counts from here: the count over the horizon window at tick
    t + h is what actually happened in (t, t + h]. `model_version` is the feature spec
    the signals were computed with (e.g. "signals-v1"), so the key matches the other tables.
    """

    item_id: str
    tick: datetime
    signals: dict[str, float]
    model_version: str = field(default="signals")

    table: ClassVar[str] = "trail_trend_snapshots"
    _fields: ClassVar[tuple[str, ...]] = ("item_id", "tick", "signals", "model_version")

    def __post_init__(self) -> None:
        object.__setattr__(self, "item_id", _text("item_id", self.item_id))
        object.__setattr__(self, "tick", to_tick(self.tick))
        object.__setattr__(self, "signals", _signals(self.signals))
        object.__setattr__(self, "model_version", _text("model_version", self.model_version))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        _require(data, ("item_id", "tick", "signals"), cls.__name__)
        return cls(data["item_id"], data["tick"], data["signals"], data.get("model_version", "signals"))


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """What the prompt names an item by, from its `trail.items` record (None: not known)."""

    title: str | None = None
    category: str | None = None
    description: str | None = None  # part of the item text the model encodes (stream.core.prompts.item_text)


Record = Prediction | Explanation | TrendSnapshot
RECORD_TYPES: dict[str, type[_Record]] = {t.table: t for t in (Prediction, Explanation, TrendSnapshot)}
