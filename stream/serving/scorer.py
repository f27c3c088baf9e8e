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
   `log_count` (predicted log1p of the next-period count; `predicted_count` is its count). With a range
   head (stream.model.count_range) the published items' `log_count` is the range head's median instead,
   with its 10% / 90% quantiles as the range: count and range come from one model.

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

States shipped with the artefact (`DIR/item_states/*.npz`, stream.model.item_states) are read under the
store's own entries; a sample is re-encoded before any is used, or, with a head-first export (export.onnx
--head-first: the head recorded before the item encoder), as soon as the encoder is recorded: until then
the scorer scores the items that have states and an item without one waits for the encoder (`open_encoder`).

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

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, ValidationError

from stream.core.attribution import DRIVER_GROUPS
from stream.core.faithfulness.grammar import prompt_forecast
from stream.core.features import predicted_count
from stream.core.forecast import PredictedCount
from stream.core.prompts import item_text, render_prompt
from stream.core.records import ItemInfo, Prediction, to_tick
from stream.core.trends import Signals
from stream.model.artefact import Artefact, ArtefactError, PromptTokenizer, read_export
from stream.model.count_range import CountRange
from stream.model.onnx_models import CPU, ItemEncoder, ScoreHeadModel, choose_providers
from stream.model.item_states import DEFAULT_CACHE_ITEMS, ItemStateCache, ItemStateStore

log = structlog.get_logger(__name__)

DRIVER_ITEMS = 256  # per worker and tick, the top items by score whose drivers are computed (the explained ones)

CPU_BATCH = 32
CUDA_BATCH = 512
PART_CHUNK_ITEMS = 500  # items per ranking-topic message (~100 kB)
ENCODER_WAIT_S = 1800.0  # most seconds an item waits for a head-first export's item encoder


def prompt_for(item_id: str, info: ItemInfo | None, signals: Mapping[str, float], horizon_days: int,
               month: str, forecast: PredictedCount | None = None) -> str:
    """The prompt of one item at one tick: what the explainer continues (with the tick's `forecast` of it)."""
    info = info or ItemInfo()
    shown = None if forecast is None else prompt_forecast(forecast, signals, horizon_days)
    return render_prompt(info.title, info.category, signals, horizon_days, item_id=item_id, month=month,
                         forecast=shown)


def text_for(item_id: str, info: ItemInfo | None) -> str:
    """The item block the LLM encodes into the item's state (stream.core.prompts.item_text)."""
    info = info or ItemInfo()
    return item_text(info.title, info.category, description=info.description, item_id=item_id)


class ScoredChunkError(ValueError):
    """A ranking-topic message that is not a valid ScoredChunk; the message says what is wrong."""


class _ChunkWire(BaseModel):
    """The ranking topic's message as it arrives (orjson); pydantic checks the types, `ScoredChunk.from_dict`
    the shapes that tie the fields together."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, frozen=True)

    as_of_ms: NonNegativeInt
    source: str
    chunk: NonNegativeInt
    chunks: PositiveInt
    partitions: list[NonNegativeInt] | None
    total_partitions: PositiveInt
    names: list[str]
    item_ids: list[str]
    score: list[float]
    log_count: list[float]
    values: list[list[float]]
    low: list[float] | None = None  # a range head's 10% quantile
    high: list[float] | None = None
    drivers: list[list[float] | None] | None = None


_NUMBERS = {"score", "log_count", "values", "low", "high", "drivers"}


def _wire_error(e: ValidationError) -> ScoredChunkError:
    """The first problem pydantic found, in the words of the ranking topic's contract."""
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return ScoredChunkError(f"scored chunk is not valid JSON: {err['ctx']['error']}")
    if err["type"] == "model_type":
        return ScoredChunkError(f"scored chunk must be a JSON object, got {type(err['input']).__name__}")
    name = str(err["loc"][0]) if err["loc"] else "message"
    if err["type"] == "missing":
        missing = [str(x["loc"][0]) for x in e.errors() if x["type"] == "missing"]
        return ScoredChunkError(f"scored chunk lacks {', '.join(missing)}")
    if name in _NUMBERS:
        if err["type"] == "finite_number":
            return ScoredChunkError(f"scored chunk: {name} must be finite")
        if len(err["loc"]) > 1:
            return ScoredChunkError(f"scored chunk: {name} must hold numbers only")
    where = "".join(f"[{x}]" if isinstance(x, int) else ("." if i else "") + str(x) for i, x in enumerate(err["loc"]))
    return ScoredChunkError(f"scored chunk: {where}: {err['msg']}, got {err.get('input')!r}")


def _shaped(name: str, value: list, shape: tuple[int, ...]) -> np.ndarray:
    if len(value) != shape[0] or (len(shape) == 2 and any(len(row) != shape[1] for row in value)):
        got = (len(value),) if len(shape) == 1 else (len(value), *sorted({len(row) for row in value}))
        raise ScoredChunkError(f"scored chunk: {name} has shape {got}, expected {shape}")
    return np.asarray(value, dtype=np.float64).reshape(shape)


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
    drivers: np.ndarray | None = None  # (N, G) each DRIVER_GROUPS group's share of log1p(count) - log1p(pace)

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
        """Parse and validate one message (pydantic, straight from the bytes); anything malformed raises
        ScoredChunkError."""
        try:
            return cls._of(_ChunkWire.model_validate_json(raw))
        except ValidationError as e:
            raise _wire_error(e) from None

    @classmethod
    def from_dict(cls, data: Any) -> ScoredChunk:
        try:
            return cls._of(_ChunkWire.model_validate(data))
        except ValidationError as e:
            raise _wire_error(e) from None

    @classmethod
    def _of(cls, w: _ChunkWire) -> ScoredChunk:
        if w.chunk >= w.chunks:
            raise ScoredChunkError(f"scored chunk: chunk {w.chunk} of {w.chunks}")
        n = len(w.item_ids)
        low = high = drivers = None
        if w.low is not None:  # a range head's output (older workers send none)
            if w.high is None:
                raise ScoredChunkError("scored chunk: low comes with high")
            low, high = _shaped("low", w.low, (n,)), _shaped("high", w.high, (n,))
            if w.drivers is not None:  # a row of null: not attributed
                drivers = _shaped("drivers", [[np.nan] * len(DRIVER_GROUPS) if r is None else r for r in w.drivers],
                                  (n, len(DRIVER_GROUPS)))
        return cls(
            as_of_ms=w.as_of_ms, source=w.source, chunk=w.chunk, chunks=w.chunks,
            partitions=None if w.partitions is None else tuple(w.partitions), total_partitions=w.total_partitions,
            names=tuple(w.names), item_ids=tuple(w.item_ids), score=_shaped("score", w.score, (n,)),
            log_count=_shaped("log_count", w.log_count, (n,)),
            values=_shaped("values", w.values, (n, len(w.names))), low=low, high=high, drivers=drivers,
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
        self.horizon_days = artefact.horizon_days(horizon_days)
        self.publish_top = publish_top
        self._providers, self._threads, self._batch = choose_providers(provider), threads, batch
        # A few small matrix products per item: the CPU beats a round trip to the GPU.
        self.head = ScoreHeadModel(artefact.path("head"), [CPU], threads)
        # the count's range and drivers (stream.model.count_range), when the artefact has a range head
        self.range = CountRange.open(artefact.root, self.features, threads, horizon_days=self.horizon_days)
        # the item encoder and the tokenizers; None while a head-first export writes them (`open_encoder`)
        self.encoder: ItemEncoder | None = None
        self._tokenizer: PromptTokenizer | None = None  # prompts (the explainer's: `tokenizer`)
        self.item_tokenizer: PromptTokenizer | None = None
        self.provider = self._providers[0]
        self.batch = batch or CPU_BATCH
        self._opening = threading.Lock()
        self.cache = ItemStateCache(cache_items)
        self.store = store
        self._loaded = store is None
        self.hidden_size = artefact.hidden_size
        self.stats = ScorerStats()
        if artefact.has("item_encoder"):
            self._open(artefact)
        log.info("scorer.ready", model_version=self.model_version, provider=self.provider, batch=self.batch,
                 horizon_days=self.horizon_days, cache_items=cache_items,
                 store=None if store is None else str(store.path),
                 parity=artefact.parity("item_encoder").get("max_abs_diff"),
                 encoder="ready" if self.encoder is not None else "pending: the export writes it")

    # ---- the item encoder ------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PromptTokenizer:
        """The prompts' tokenizer (the explainer's, built once the export recorded the generator: by then
        it has recorded the tokenizer too)."""
        if self._tokenizer is None and not self.open_encoder():
            raise ArtefactError(f"{self.artefact.root}: the export has not recorded the tokenizer yet")
        return self._tokenizer

    def _open(self, artefact: Artefact) -> None:
        self._tokenizer = artefact.tokenizer()
        self.item_tokenizer = artefact.item_tokenizer()
        self.encoder = ItemEncoder(artefact.path("item_encoder"), self._providers, self._threads)
        self.provider = self.encoder.provider
        self.batch = self._batch or (CUDA_BATCH if self.encoder.cuda else CPU_BATCH)
        self.artefact = artefact

    def open_encoder(self) -> bool:
        """Whether the item encoder is open: a head-first export (export.onnx --head-first) records it after
        the head, so until then the export record is read again (cheap) and the encoder opened once there;
        the store then takes its own file and the shipped states are checked (stream.model.item_states)."""
        if self.encoder is not None:
            return True
        with self._opening:
            if self.encoder is not None:
                return True
            root = self.artefact.root
            try:
                art = Artefact(root, {**self.artefact.manifest, "onnx": read_export(root)})
                art.check_files(verify=False, pending_ok=True)
            except ArtefactError:
                return False  # between two records of the export (a failed export is the exporter's to report)
            if not art.has("item_encoder"):
                return False
            if art.onnx.get("source") != self.artefact.onnx.get("source"):
                raise ArtefactError(f"{root}: the export now records other trained weights than this worker "
                                    f"started on; restart it")
            self._open(art)
            log.info("scorer.encoder_ready", provider=self.provider, parity=art.parity("item_encoder").get("max_abs_diff"))
            if self.store is not None:
                self.store.rekey(art, self.cache)
            return True

    def _await_encoder(self, items: int, every_s: float = 1.0) -> None:
        """Block (the scorer's thread) until the export records the item encoder; at most ENCODER_WAIT_S."""
        t0 = time.monotonic()
        log.warning("scorer.awaiting_encoder", items=items,
                    note="items without a shipped state wait for the export of the item encoder")
        while not self.open_encoder():
            if time.monotonic() - t0 > ENCODER_WAIT_S:
                raise ArtefactError(f"{self.artefact.root}: the export has not recorded the item encoder after "
                                    f"{ENCODER_WAIT_S:.0f} s; run `python -m export.onnx --model {self.artefact.root}`")
            time.sleep(every_s)

    # ---- the item-state store --------------------------------------------------------------------
    def load_states(self) -> int:
        """Read the store into the cache, once (the first warm-up or tick does); the entries it gave."""
        if not self._loaded:
            self._loaded = True
            self.store.load(self.cache)
            if self.encoder is None and self.store.unverified:
                log.warning("item_store.shipped_unverified", entries=self.store.unverified,
                            note="shipped states serve until the export writes the item encoder; a sample of them "
                                 "is then encoded and compared, and all are dropped if it differs")
        if self.store is not None and self.store.unverified and self.open_encoder():
            self.store.verify_shipped(self.cache, self.encode)  # before any is used, or as soon as the encoder is
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
        if self.encoder is None:
            self._await_encoder(len(texts))
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
            # the published count is the range head's median, so it lies inside the published range
            # (the score head's count fell below the 10% quantile for 5-10% of test rows); the score ranks
            log_count = log_count.copy()
            log_count[keep] = ranged.log_mid
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
