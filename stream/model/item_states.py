"""The item states of a model artefact, kept: an LRU cache in memory (`ItemStateCache`) and its file on disk
(`ItemStateStore`, `<TRAIL_CACHE>/item_states/onnx-<key>.npz`), keyed by what a state depends on (`store_key`),
and the directory's pruning (`prune_stores`) that the stream's files and the trainer's torch-side ones share.
The stream's scorer (stream.serving.scorer, whose module doc says when it reads and writes) and the trainer
(trainer.model) both import it from here: neither imports the other."""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from stream.model.artefact import Artefact, item_text_version

log = structlog.get_logger(__name__)

DEFAULT_CACHE_ITEMS = 200_000
SAVE_EVERY_S = 60.0  # least seconds between two writes of the item-state store after ticks
STORE_FORMAT = "trail-onnx-item-states-v1"
KEEP_STORES = 8  # item-state files kept in the directory, most recently written first: a rollback finds its own


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
