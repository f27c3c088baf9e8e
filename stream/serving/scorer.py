"""Scores the active items of a tick with the exported TRAIL model (onnxruntime, no torch).

Every active item gets the full TRAIL score every tick, as the trainer scores an evaluation
cut-off (trainer.inference):

1. features of every active item (`stream.core.features.Normalisation`, the trainer's, from the manifest);
2. its item state: the fine-tuned LLM's mean-pooled last hidden layer over
   `item_text(title, category, description)` (item_encoder.onnx), computed once per item and kept in an
   LRU cache (`ItemStateCache`) keyed by item id and text: an item met for the first time, or whose
   `trail.items` record (title, category, description) changed,
   is encoded again; the new items of a tick are encoded together, sorted by length, `batch` per run;
3. the score head (head.onnx, a small network) on all of them at once: `score` (the ranking score) and
   `log_count` (predicted log1p of the next-period count; `predicted_count` is its count).

All of it runs in the scorer's executor thread (stream.serving.service), never on the event loop.

The cache persists (`ItemStateStore`): `<TRAIL_CACHE>/item_states/onnx-<key>.npz`, beside the trainer's
torch-side `<key>.npz` files (trainer.model), holds every cached item's id, text and state. The key
(`store_key`) hashes what a state depends on besides its text: the sha256 the export recorded for
item_encoder.onnx and tokenizer.json (read from the manifest, not re-hashed), the item-token limit and
`ITEM_TEXT_VERSION`; a re-exported model or another item text gets a new file. It is read once, before
the first warm-up or tick (the most recently used entries, up to the cache's capacity); a torn or
foreign file is logged and ignored. It is written atomically (temporary file, then rename) when the
cache changed: after a tick at most every `SAVE_EVERY_S`, after the warm-up and at stop. Each model
writes its own file, so after a write the directory keeps the `KEEP_STORES` most recently written
(`prune_stores`, the trainer's files included) and deletes the rest.

The warm-up (`TickScorer.warm`, run by `Serving.start` once the catalogue has caught up, before the
first tick; at most TRAIL_ITEM_WARM items) encodes the catalogue's items the cache lacks, so the first
tick of a fresh worker does not encode the whole catalogue while the tick hooks fall behind, and a
restarted worker, warm from disk, encodes only what changed.

Memory of the cache: one float32 state of `hidden_size` (576 for SmolLM2-135M: 2,304 bytes) plus its
text and dict entry, about 2.6 kB per item: the default 200,000 items (TRAIL_ITEM_CACHE_SIZE) hold at
most ~0.5 GB; Online Retail II's 5.3k products take ~14 MB (and about as much on disk). Evicted items
are encoded again when they return.

With several workers each scores the items of its own partitions (`ScoredPart`) and `rank_tick`
merges the parts of a tick into one global ranking by score. Each part carries every item it scored,
or its local top `publish_top` by score (a superset of the global top `publish_top`'s members in its
partitions, so the merged ranking is the single-process one); stream.serving.service moves the parts
through a single-partition topic to one ranker, as `ScoredChunk` messages (orjson, validated when read).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog

from stream.core.attribution import DRIVER_GROUPS
from stream.core.features import predicted_count
from stream.serving.count_range import CountRange
from stream.core.prompts import item_text, render_prompt
from stream.core.records import ItemInfo, Prediction, load_json, to_tick
from stream.core.trends import Signals
from stream.serving.artefact import Artefact, item_text_version
from stream.serving.onnx_models import CPU, ItemEncoder, ScoreHeadModel, choose_providers

log = structlog.get_logger(__name__)

DRIVER_ITEMS = 256  # per worker and tick, the top items by score whose drivers are computed (the explained ones)

CPU_BATCH = 32
CUDA_BATCH = 512
DEFAULT_CACHE_ITEMS = 200_000
PART_CHUNK_ITEMS = 500  # items per ranking-topic message (~100 kB)
SAVE_EVERY_S = 60.0  # least seconds between two writes of the item-state store after ticks
STORE_FORMAT = "trail-onnx-item-states-v1"
KEEP_STORES = 8  # item-state files kept in the directory, most recently written first: a rollback finds its own


def prompt_for(item_id: str, info: ItemInfo | None, signals: Mapping[str, float], horizon_days: int,
               month: str) -> str:
    """The prompt of one item at one tick: what the explainer continues."""
    info = info or ItemInfo()
    return render_prompt(info.title, info.category, signals, horizon_days, item_id=item_id, month=month)


def text_for(item_id: str, info: ItemInfo | None) -> str:
    """The item block the LLM encodes into the item's state (stream.core.prompts.item_text)."""
    info = info or ItemInfo()
    return item_text(info.title, info.category, description=info.description, item_id=item_id)


class ItemStateCache:
    """Item id -> (text, state), least recently used evicted beyond `capacity` items.

    A lookup with a text other than the cached one (the catalogue's record changed) is a miss
    that drops the stale entry (`invalidations`)."""

    def __init__(self, capacity: int = DEFAULT_CACHE_ITEMS) -> None:
        if capacity < 1:
            raise ValueError("item state cache capacity must be >= 1")
        self.capacity = capacity
        self._d: OrderedDict[str, tuple[str, np.ndarray]] = OrderedDict()
        self.hits = self.misses = self.invalidations = self.evictions = 0
        self.puts = 0  # how often it changed: the store writes only a cache that did

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._d

    def get(self, item_id: str, text: str) -> np.ndarray | None:
        entry = self._d.get(item_id)
        if entry is not None:
            if entry[0] == text:
                self._d.move_to_end(item_id)
                self.hits += 1
                return entry[1]
            del self._d[item_id]
            self.invalidations += 1
        self.misses += 1
        return None

    def fresh(self, item_id: str, text: str) -> bool:
        """Whether `item_id` is cached with `text`; unlike `get`, no counter or recency changes."""
        entry = self._d.get(item_id)
        return entry is not None and entry[0] == text

    def entries(self) -> list[tuple[str, str, np.ndarray]]:
        """(item id, text, state) of every entry, least recently used first."""
        return [(item, text, state) for item, (text, state) in self._d.items()]

    def put(self, item_id: str, text: str, state: np.ndarray) -> None:
        self.puts += 1
        self._d[item_id] = (text, state)
        self._d.move_to_end(item_id)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)
            self.evictions += 1

    def nbytes(self) -> int:
        """Bytes held by the cached states (the arrays alone)."""
        return sum(s.nbytes for _, s in self._d.values())


def store_key(artefact: Artefact) -> str:
    """What an item state depends on besides its text: the encoder and tokenizer files (the sha256 the
    export recorded in the manifest: not re-hashed at start), the item-token limit, the item-text version."""
    files = artefact.onnx.get("files", {})
    parts = [STORE_FORMAT, files["item_encoder"]["sha256"], files["tokenizer"]["sha256"],
             str(artefact.max_item_tokens), str(artefact.hidden_size), str(item_text_version())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _pack(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one uint8 array of their UTF-8 bytes and the (N,) int64 end offsets (no pickle, no padding)."""
    raw = [v.encode() for v in strings]
    ends = np.cumsum([len(r) for r in raw], dtype=np.int64) if raw else np.zeros(0, np.int64)
    return np.frombuffer(b"".join(raw), np.uint8), ends


def _unpack(blob: np.ndarray, ends: np.ndarray) -> list[str]:
    if blob.dtype != np.uint8 or blob.ndim != 1 or ends.dtype != np.int64 or ends.ndim != 1:
        raise ValueError("packed strings of the wrong type")
    if len(ends) and (ends[0] < 0 or np.any(np.diff(ends) < 0) or ends[-1] != len(blob)):
        raise ValueError("packed string offsets out of order")
    data = blob.tobytes()
    starts = [0, *ends[:-1].tolist()]
    return [data[a:b].decode() for a, b in zip(starts, ends.tolist())]


@dataclass
class ItemStateStore:
    """An `ItemStateCache` on disk: one .npz (no pickle) of item ids, texts and (N, H) float32 states,
    least recently used first; see the module doc."""

    path: Path
    key: str
    hidden_size: int
    every_s: float = SAVE_EVERY_S
    loaded: int = 0  # entries the last `load` put into the cache
    saved_puts: int = -1  # the cache's `puts` when it was last read or written; -1: neither yet
    saved_at: float = -math.inf  # time.monotonic() of the last write (or failed one)

    @classmethod
    def for_artefact(cls, artefact: Artefact, directory: Path, every_s: float = SAVE_EVERY_S) -> ItemStateStore:
        key = store_key(artefact)
        return cls(Path(directory) / f"onnx-{key}.npz", key, artefact.hidden_size, every_s)

    def load(self, cache: ItemStateCache) -> int:
        """Put the stored entries into `cache` (the most recent ones when there are more than it holds);
        how many. A missing file is no entries; a torn, foreign or unreadable one is logged and ignored."""
        self.loaded = 0
        if self.path.is_file():
            t0 = time.perf_counter()
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    if str(z["format"]) != STORE_FORMAT or str(z["key"]) != self.key:
                        raise ValueError(f"written for {z['format']} / key {z['key']}, not {self.key}")
                    ids, texts = _unpack(z["ids"], z["id_ends"]), _unpack(z["texts"], z["text_ends"])
                    states = z["states"]
                if states.dtype != np.float32 or states.shape != (len(ids), self.hidden_size) or len(texts) != len(ids):
                    raise ValueError(f"states {states.dtype} {states.shape} for {len(ids)} ids, {len(texts)} texts; "
                                     f"expected hidden size {self.hidden_size}")
            except Exception as e:  # noqa: BLE001 - a cache file must never stop the worker: encode again instead
                log.warning("item_store.ignored", path=str(self.path), error=f"{type(e).__name__}: {e}")
            else:
                keep = max(0, len(ids) - cache.capacity)
                for item, text, state in zip(ids[keep:], texts[keep:], states[keep:]):
                    cache.put(item, text, state)
                self.loaded = len(ids) - keep
                log.info("item_store.loaded", path=str(self.path), entries=self.loaded, dropped=keep,
                         seconds=round(time.perf_counter() - t0, 3))
        self.saved_puts = cache.puts
        return self.loaded

    def due(self, cache: ItemStateCache, force: bool = False) -> bool:
        """Whether `cache` changed since it was read or last written, and the last write is `every_s` old."""
        changed = cache.puts != self.saved_puts
        return changed and (force or time.monotonic() - self.saved_at >= self.every_s)

    def save(self, cache: ItemStateCache) -> bool:
        """Write every entry of `cache`, atomically (a reader sees the old file or the new one, never a part)."""
        t0 = time.perf_counter()
        puts, entries = cache.puts, cache.entries()
        ids, id_ends = _pack([e[0] for e in entries])
        texts, text_ends = _pack([e[1] for e in entries])
        states = (np.stack([e[2] for e in entries]).astype(np.float32, copy=False) if entries
                  else np.zeros((0, self.hidden_size), np.float32))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        self.saved_at = time.monotonic()  # a failed write is retried after every_s too, not every tick
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, format=np.array(STORE_FORMAT), key=np.array(self.key), ids=ids, id_ends=id_ends,
                         texts=texts, text_ends=text_ends, states=states)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("item_store.save_failed", path=str(self.path), error=str(e))
            return False
        self.saved_puts = puts
        prune_stores(self.path.parent, self.path)
        log.info("item_store.saved", path=str(self.path), entries=len(entries), bytes=self.path.stat().st_size,
                 seconds=round(time.perf_counter() - t0, 3))
        return True


def prune_stores(directory: Path, current: Path, keep: int = KEEP_STORES) -> list[Path]:
    """Delete all but the `keep` most recently written .npz files of `directory` (never `current`);
    the paths removed. A file another process removes first, or cannot be removed, is left to it."""
    try:
        stores = [(f.stat().st_mtime, f) for f in Path(directory).glob("*.npz") if f != current]
    except OSError:
        return []
    removed = []
    for _, f in sorted(stores, reverse=True)[max(0, keep - 1):]:
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            continue
    if removed:
        log.info("item_store.pruned", directory=str(directory), removed=[f.name for f in removed], kept=keep)
    return removed


class ScoredChunkError(ValueError):
    """A ranking-topic message that is not a valid ScoredChunk; the message says what is wrong."""


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScoredChunkError(f"scored chunk: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ScoredChunkError(f"scored chunk: {name} must be >= {minimum}, got {value}")
    return value


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ScoredChunkError(f"scored chunk: {name} must be a list of strings")
    return tuple(value)


def _floats(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(value, list):
        raise ScoredChunkError(f"scored chunk: {name} must be a list")
    try:
        out = np.asarray(value)
    except (TypeError, ValueError):  # ragged rows
        raise ScoredChunkError(f"scored chunk: {name} must have shape {shape}") from None
    if out.size and out.dtype.kind not in "iuf":
        raise ScoredChunkError(f"scored chunk: {name} must hold numbers only")
    if out.shape != shape and not (out.size == 0 and 0 in shape):
        raise ScoredChunkError(f"scored chunk: {name} has shape {out.shape}, expected {shape}")
    return out.astype(np.float64).reshape(shape)


@dataclass(frozen=True, eq=False)
class ScoredChunk:
    """One message of the ranking topic: chunk `chunk` of `chunks` of one worker's ScoredPart of a tick."""

    as_of_ms: int
    source: str  # which worker
    chunk: int
    chunks: int
    partitions: tuple[int, ...] | None  # the event partitions the part covers; None = all of them
    total_partitions: int
    names: tuple[str, ...]  # the signals, in `values` column order
    item_ids: tuple[str, ...]
    score: np.ndarray  # (N,) TRAIL ranking score
    log_count: np.ndarray  # (N,) predicted log1p(next-period count)
    values: np.ndarray  # (N, S) raw signals
    low: np.ndarray | None = None  # (N,) the count's 10% quantile (a model with a range head; else None)
    high: np.ndarray | None = None  # (N,) its 90% quantile
    drivers: np.ndarray | None = None  # (N, G) each DRIVER_GROUPS group's contribution to log1p(count)

    _fields = ("as_of_ms", "source", "chunk", "chunks", "partitions", "total_partitions", "names", "item_ids",
               "score", "log_count", "values")

    def to_json(self) -> bytes:
        return orjson.dumps({
            "as_of_ms": self.as_of_ms, "source": self.source, "chunk": self.chunk, "chunks": self.chunks,
            "partitions": None if self.partitions is None else list(self.partitions),
            "total_partitions": self.total_partitions, "names": list(self.names), "item_ids": list(self.item_ids),
            "score": self.score.tolist(), "log_count": self.log_count.tolist(), "values": self.values.tolist(),
        } | ({} if self.low is None else {"low": self.low.tolist(), "high": self.high.tolist(),
                                          "drivers": None if self.drivers is None else
                                          [None if np.isnan(r).any() else r for r in self.drivers.tolist()]}))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ScoredChunk:
        """Parse and validate one message; anything malformed raises ScoredChunkError."""
        return cls.from_dict(load_json(raw, "scored chunk", ScoredChunkError))

    @classmethod
    def from_dict(cls, data: Any) -> ScoredChunk:
        if not isinstance(data, dict):
            raise ScoredChunkError(f"scored chunk must be a JSON object, got {type(data).__name__}")
        missing = [k for k in cls._fields if k not in data]
        if missing:
            raise ScoredChunkError(f"scored chunk lacks {', '.join(missing)}")
        chunks = _int("chunks", data["chunks"], 1)
        chunk = _int("chunk", data["chunk"], 0)
        if chunk >= chunks:
            raise ScoredChunkError(f"scored chunk: chunk {chunk} of {chunks}")
        total = _int("total_partitions", data["total_partitions"], 1)
        partitions = data["partitions"]
        if partitions is not None:
            if not isinstance(partitions, list):
                raise ScoredChunkError("scored chunk: partitions must be null or a list of integers")
            partitions = tuple(_int("partitions[]", q, 0) for q in partitions)
        if not isinstance(data["source"], str):
            raise ScoredChunkError("scored chunk: source must be a string")
        names = _strings("names", data["names"])
        item_ids = _strings("item_ids", data["item_ids"])
        n = len(item_ids)
        score = _floats("score", data["score"], (n,))
        log_count = _floats("log_count", data["log_count"], (n,))
        if not (np.isfinite(score).all() and np.isfinite(log_count).all()):
            raise ScoredChunkError("scored chunk: score and log_count must be finite")
        low = high = drivers = None
        if data.get("low") is not None:  # a range head's output (older workers send none)
            low, high = _floats("low", data["low"], (n,)), _floats("high", data.get("high"), (n,))
            if isinstance(data.get("drivers"), list):  # a row of null: not attributed
                drivers = _floats("drivers", [[np.nan] * len(DRIVER_GROUPS) if r is None else r
                                              for r in data["drivers"]], (n, len(DRIVER_GROUPS)))
        return cls(
            as_of_ms=_int("as_of_ms", data["as_of_ms"], 0), source=data["source"], chunk=chunk, chunks=chunks,
            partitions=partitions, total_partitions=total, names=names, item_ids=item_ids, score=score,
            log_count=log_count, values=_floats("values", data["values"], (n, len(names))), low=low, high=high,
            drivers=drivers,
        )


@dataclass
class ScoredPart:
    """One worker's scored items of one tick (all of them, or its local top `publish_top` by score)."""

    as_of_ms: int
    item_ids: list[str]
    score: np.ndarray  # (N,) TRAIL ranking score
    log_count: np.ndarray  # (N,) predicted log1p(next-period count)
    names: tuple[str, ...]
    values: np.ndarray  # (N, S) raw signals
    partitions: list[int] | None = None  # the event partitions covered; None = all of them
    total_partitions: int = 1
    source: str = ""  # which worker
    low: np.ndarray | None = None  # (N,) the count's 10% / 90% quantiles and the drivers (N, G): a range head's
    high: np.ndarray | None = None
    drivers: np.ndarray | None = None

    def chunks(self, size: int = PART_CHUNK_ITEMS) -> list[ScoredChunk]:
        """The part as ranking-topic messages (chunked: a retail tick has thousands of items)."""
        n = len(self.item_ids)
        count = max(1, math.ceil(n / size))
        partitions = None if self.partitions is None else tuple(self.partitions)
        return [ScoredChunk(self.as_of_ms, self.source, c, count, partitions, self.total_partitions,
                            tuple(self.names), tuple(self.item_ids[c * size : (c + 1) * size]),
                            self.score[c * size : (c + 1) * size], self.log_count[c * size : (c + 1) * size],
                            self.values[c * size : (c + 1) * size],
                            *(None if a is None else a[c * size : (c + 1) * size]
                              for a in (self.low, self.high, self.drivers)))
                for c in range(count)]

    def messages(self, chunk: int = PART_CHUNK_ITEMS) -> list[bytes]:
        """orjson bytes of `chunks(chunk)`, one message each."""
        return [c.to_json() for c in self.chunks(chunk)]

    @staticmethod
    def from_chunks(chunks: list[ScoredChunk]) -> ScoredPart:
        """The part back from all its chunks (any order)."""
        chunks = sorted(chunks, key=lambda c: c.chunk)
        first = chunks[0]
        if any((c.as_of_ms, c.source, c.names) != (first.as_of_ms, first.source, first.names) for c in chunks):
            raise ScoredChunkError("scored chunks of different ticks, workers or signal names in one part")
        return ScoredPart(
            as_of_ms=first.as_of_ms, item_ids=[i for c in chunks for i in c.item_ids],
            score=np.concatenate([c.score for c in chunks]), log_count=np.concatenate([c.log_count for c in chunks]),
            names=first.names, values=np.concatenate([c.values for c in chunks]),
            partitions=None if first.partitions is None else list(first.partitions),
            total_partitions=first.total_partitions, source=first.source,
            **{k: (None if any(getattr(c, k) is None for c in chunks) else np.concatenate([getattr(c, k) for c in chunks]))
               for k in ("low", "high", "drivers")},
        )


@dataclass
class ScorerStats:
    ticks: int = 0
    items: int = 0
    encoded: int = 0  # item states computed (cache misses)
    seconds: float = 0.0
    encode_seconds: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WarmUp:
    """What `TickScorer.warm` did."""

    items: int  # catalogue items looked at
    encoded: int  # states computed now
    seconds: float
    from_disk: int  # entries the store put into the cache


class TickScorer:
    """The per-tick scoring work; synchronous (stream.serving.service runs it in an executor thread)."""

    def __init__(self, artefact: Artefact, *, publish_top: int = 0, batch: int | None = None, provider: str = "auto",
                 horizon_days: float | None = None, threads: int | None = None,
                 cache_items: int = DEFAULT_CACHE_ITEMS, store: ItemStateStore | None = None) -> None:
        if publish_top < 0:
            raise ValueError("publish_top must be >= 0")
        self.artefact = artefact
        self.model_version = artefact.model_version
        self.features = artefact.features()
        self.tokenizer = artefact.tokenizer()  # prompts (the explainer's)
        self.item_tokenizer = artefact.item_tokenizer()
        self.horizon_days = artefact.horizon_days(horizon_days)
        self.publish_top = publish_top
        providers = choose_providers(provider)
        self.encoder = ItemEncoder(artefact.path("item_encoder"), providers, threads)
        # A few small matrix products per item: the CPU beats a round trip to the GPU.
        self.head = ScoreHeadModel(artefact.path("head"), [CPU], threads)
        # the count's range and drivers (stream.serving.count_range), when the artefact has a range head
        self.range = CountRange.open(artefact.root, self.features.names, threads)
        self.provider = self.encoder.provider
        self.batch = batch or (CUDA_BATCH if self.encoder.cuda else CPU_BATCH)
        self.cache = ItemStateCache(cache_items)
        self.store = store
        self._loaded = store is None
        self.hidden_size = artefact.hidden_size
        self.stats = ScorerStats()
        log.info("scorer.ready", model_version=self.model_version, provider=self.provider, batch=self.batch,
                 horizon_days=self.horizon_days, cache_items=cache_items,
                 store=None if store is None else str(store.path),
                 parity=artefact.parity("item_encoder").get("max_abs_diff"))

    # ---- the item-state store --------------------------------------------------------------------
    def load_states(self) -> int:
        """Read the store into the cache, once (the first warm-up or tick does); the entries it gave."""
        if not self._loaded:
            self._loaded = True
            self.store.load(self.cache)
        return self.store.loaded if self.store is not None else 0

    def save_due(self, force: bool = False) -> bool:
        """Whether `save_states(force)` would write (cheap: the event loop may ask)."""
        return self.store is not None and self._loaded and self.store.due(self.cache, force)

    def save_states(self, force: bool = False) -> bool:
        """Write the cache to the store if it changed, at most every `store.every_s` unless `force`.
        Never before the store was read: that would replace the file with fewer entries."""
        return self.save_due(force) and self.store.save(self.cache)

    def warm(self, items: Mapping[str, ItemInfo], limit: int, should_stop: Callable[[], bool] = lambda: False,
             chunk: int | None = None) -> WarmUp:
        """Read the store, then encode the states of `items` (the catalogue) the cache lacks, at most
        `limit` (and the cache's capacity) of them, in catalogue order; logs its progress. `should_stop`
        is asked between chunks (a stop during start-up)."""
        t0 = time.perf_counter()
        from_disk = self.load_states()
        todo: list[tuple[str, str]] = []
        bound = min(limit, self.cache.capacity)
        if bound > 0:
            for item, info in items.items():
                text = text_for(item, info)
                if not self.cache.fresh(item, text):
                    todo.append((item, text))
                    if len(todo) >= bound:
                        break
        done = 0
        chunk = chunk or self.batch * 16
        for start in range(0, len(todo), chunk):
            if should_stop():
                log.info("serving.warm_stopped", done=done, total=len(todo))
                break
            part = todo[start : start + chunk]
            for (item, text), state in zip(part, self.encode([t for _, t in part])):
                self.cache.put(item, text, state)
            done += len(part)
            elapsed = time.perf_counter() - t0
            log.info("serving.warming", done=done, total=len(todo), items_per_s=round(done / max(elapsed, 1e-9), 1))
            self.save_states()  # throttled: a long warm-up cut short keeps what it did
        self.save_states(force=True)
        return WarmUp(len(items), done, round(time.perf_counter() - t0, 3), from_disk)

    # ---- the pieces ------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, H) item states of `texts`, batched by token length (little padding)."""
        out = np.empty((len(texts), self.hidden_size), np.float32)
        if not texts:
            return out
        rows = self.item_tokenizer.ids(texts)
        order = np.argsort([len(r) for r in rows], kind="stable")
        for start in range(0, len(order), self.batch):
            idx = order[start : start + self.batch]
            out[idx] = self.encoder(*self.item_tokenizer.pad([rows[i] for i in idx]))
        return out

    def item_states(self, item_ids: list[str], items: Mapping[str, ItemInfo]) -> tuple[np.ndarray, int]:
        """(N, H) states of the items, from the cache or encoded now (and cached); and how many were encoded."""
        states = np.empty((len(item_ids), self.hidden_size), np.float32)
        todo: dict[str, tuple[str, list[int]]] = {}  # item id -> (text, rows): an id twice is encoded once
        for i, item in enumerate(item_ids):
            text = text_for(item, items.get(item))
            cached = self.cache.get(item, text)
            if cached is not None:
                states[i] = cached
            else:
                todo.setdefault(item, (text, []))[1].append(i)
        if todo:
            new = self.encode([t for t, _ in todo.values()])
            for (item, (text, rows)), state in zip(todo.items(), new):
                states[rows] = state
                self.cache.put(item, text, state)
        return states, len(todo)

    def score(self, as_of_ms: int, signals: Signals, items: Mapping[str, ItemInfo] | None = None,
              partitions: list[int] | None = None, total_partitions: int = 1, source: str = "") -> ScoredPart:
        """This worker's part of a tick: the full TRAIL score of every active item."""
        t0 = time.perf_counter()
        self.load_states()
        items = items or {}
        x = self.features.of_signals(signals, self.horizon_days)
        states, encoded = self.item_states(list(signals.item_ids), items)
        t1 = time.perf_counter()
        score, log_count = self.head(x, states)
        score, log_count = score.astype(np.float64), log_count.astype(np.float64)
        keep = np.arange(len(signals))
        if self.publish_top:
            keep = np.array(sorted(keep.tolist(), key=lambda i: (-score[i], signals.item_ids[i]))[: self.publish_top],
                            dtype=np.int64)
        ranged = None
        if self.range is not None:  # drivers for this worker's top DRIVER_ITEMS by score (16 evaluations each)
            top = np.argsort(-score[keep], kind="stable")[:DRIVER_ITEMS]
            ranged = self.range(as_of_ms, x[keep], states[keep], attribute=top)
        t2 = time.perf_counter()
        s = self.stats
        s.ticks += 1
        s.items += len(signals)
        s.encoded += encoded
        s.seconds += t2 - t0
        s.encode_seconds += t1 - t0
        s.last = {"items": len(signals), "encoded": encoded, "seconds": round(t2 - t0, 3),
                  "encode_seconds": round(t1 - t0, 3), "head_seconds": round(t2 - t1, 3),
                  "cached_items": len(self.cache)}
        return ScoredPart(as_of_ms, [signals.item_ids[i] for i in keep.tolist()], score[keep], log_count[keep],
                          tuple(signals.names), signals.values[keep], partitions, total_partitions, source,
                          *((ranged.low, ranged.high, ranged.drivers) if ranged is not None else ()))


def rank_tick(parts: list[ScoredPart], publish_top: int, model_version: str) -> list[Prediction]:
    """One global ranking from the parts of a tick by TRAIL score: ranks 1..K, K = all items or publish_top."""
    if not parts:
        return []
    as_of = parts[0].as_of_ms
    if any(p.as_of_ms != as_of for p in parts):
        raise ValueError("rank_tick: parts of different ticks")
    seen: set[str] = set()
    ids: list[str] = []
    score, log_count, values, names = [], [], [], parts[0].names
    ranges: dict[str, tuple[float, float, dict[str, float] | None]] = {}
    for p in parts:
        if p.names != names:
            raise ValueError("rank_tick: parts with different signal names")
        for i, item in enumerate(p.item_ids):
            if item in seen:  # a partition scored twice across a rebalance
                continue
            seen.add(item)
            ids.append(item)
            score.append(p.score[i])
            log_count.append(p.log_count[i])
            values.append(p.values[i])
            if p.low is not None:
                drivers = (None if p.drivers is None or np.isnan(p.drivers[i]).any()
                           else dict(zip(DRIVER_GROUPS, p.drivers[i].tolist())))
                ranges[item] = (float(p.low[i]), float(p.high[i]), drivers)
    final = np.asarray(score, np.float64)
    # highest score first; ties by item id, so every ranker orders a tick the same way
    order = sorted(range(len(ids)), key=lambda i: (-final[i], ids[i]))
    if publish_top:
        order = order[:publish_top]
    tick = to_tick(as_of)
    counts = predicted_count(np.asarray(log_count, np.float64))
    return [Prediction(ids[i], tick, float(final[i]), float(counts[i]), r, dict(zip(names, values[i].tolist())),
                       model_version, *ranges.get(ids[i], ())) for r, i in enumerate(order, start=1)]
