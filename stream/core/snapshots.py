"""Trend snapshot records (the `trail.snapshots` topic): one per active item per tick.

Pure module. Key: item_id; value (JSON):
    {"item_id": str, "as_of": ISO-8601 UTC, "as_of_ms": int, "partition": int,
     "items": int, "signals": {name: float, ...}}
`partition` is the source partition of trail.events (the record goes to the same
partition number of the snapshot topic) and `items` the number of items in that
partition's snapshot at `as_of`, so a reader can tell when it holds all of it.
Floats survive the JSON round trip exactly (orjson writes the shortest repr).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from stream.core.trends import Signals


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    item_id: str
    as_of_ms: int
    partition: int
    items: int
    signals: dict[str, float]


def encode_snapshot(signals: Signals, partition: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of every item in one partition's signals."""
    head = {"as_of": iso_ms(signals.as_of_ms), "as_of_ms": signals.as_of_ms, "partition": partition,
            "items": len(signals)}
    names = signals.names
    dumps = orjson.dumps
    out = []
    for item, row in zip(signals.item_ids, signals.values.tolist()):
        out.append((item.encode(), dumps({"item_id": item, **head, "signals": dict(zip(names, row))})))
    return out


def decode_snapshot(value: bytes) -> SnapshotRecord:
    obj = orjson.loads(value)
    try:
        return SnapshotRecord(obj["item_id"], int(obj["as_of_ms"]), int(obj["partition"]), int(obj["items"]),
                              {k: float(v) for k, v in obj["signals"].items()})
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a trend snapshot record: {value[:200]!r}") from e
