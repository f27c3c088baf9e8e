"""The serving side of the model: artefact checks (refuse to start), features, providers, scoring, ranking."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from stream.settings import SettingsError, WorkerConfig, load_settings
from stream.core.features import Normalisation
from stream.core.records import ItemInfo
from stream.model.artefact import Artefact, ArtefactError
from stream.model.onnx_models import CPU, CUDA, choose_providers
from stream.model.item_states import KEEP_STORES, ItemStateCache, ItemStateStore, prune_stores, store_key
from stream.serving.scorer import (ScoredChunk, ScoredChunkError, ScoredPart,
                                   TickScorer, WarmUp, rank_tick, text_for)
from stream.serving.parts import Publisher, ScorerService, ServingStats
from stream.serving.parts import Ranker as RankerPart
from stream.serving.service import Serving, ServingConfig
from stream.core.trends import Signals


@pytest.fixture(scope="module")
def scorer(artefact_dir, trend) -> TickScorer:
    return TickScorer(Artefact.load(artefact_dir, trend), provider="cpu", horizon_days=7, threads=2)


@pytest.fixture(scope="module")
def retail_cutoff(trend, cache_dir):
    """The signals of candidates at a real Online Retail II cut-off, with titles."""
    from stream.core.datasets import load_dataset
    from trainer.examples import build_examples

    ds = load_dataset("retail", cache_dir=cache_dir)
    ex = build_examples(ds, trend, horizon_days=7)
    rows = ex.rows(ex.cutoffs[-3:-2])
    # 240 of its ~2,600 items (every one gets the full score; the whole tick is export.bench's `tick_items`):
    # a cold item costs an LLM pass on 2 CPU cores, and several tests here start from a cold cache
    rows = rows.sample(n=min(240, len(rows)), random_state=0).sort_index().reset_index(drop=True)
    names = trend.signal_names
    signals = Signals(int(rows["cutoff_ms"].iloc[0]), rows["item_id"].tolist(), names,
                      rows[list(names)].to_numpy(np.float64))
    desc = rows["description"] if "description" in rows else [None] * len(rows)
    items = {i: ItemInfo(t if isinstance(t, str) else None, c if isinstance(c, str) else None,
                         d if isinstance(d, str) else None)
             for i, t, c, d in zip(rows["item_id"], rows["title"], rows["category"], desc)}
    return rows, signals, items


def clone(src: Path, dst: Path) -> Path:
    """A copy of the artefact's manifest with links to its files (cheap to corrupt one)."""
    dst.mkdir(parents=True)
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    for f in (src / "onnx").rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).symlink_to(f)
    return dst


def edit_manifest(directory: Path, fn) -> None:
    """Edit the manifest as Artefact.load sees it: manifest.json plus the export record as its "onnx" section."""
    from stream.model.artefact import read_export, write_export

    m = json.loads((directory / "manifest.json").read_text())
    m["onnx"] = read_export(directory)
    fn(m)
    (directory / "onnx" / "export.json").unlink(missing_ok=True)  # a link to the shared artefact's: not through it
    write_export(directory, m.pop("onnx"))
    (directory / "manifest.json").write_text(json.dumps(m))


# ---- refuse to start --------------------------------------------------------------------------------

def test_a_sound_artefact_loads(artefact_dir, trend):
    art = Artefact.load(artefact_dir, trend)
    assert art.has("item_encoder") and art.has("head") and art.has("generator") and art.has("tokenizer")
    assert art.horizon_days(7) == 7
    assert art.manifest["score_design"] == "item-state-v2"


@pytest.mark.parametrize("case", ["v1", "other_design", "text_version"])
def test_refuses_another_score_design_or_item_text(artefact_dir, trend, tmp_path, case):
    """A v1 artefact (one LLM score path over the prompt, no score_design) is refused: retrain, re-export."""
    d = clone(artefact_dir, tmp_path / "a")
    if case == "v1":
        edit_manifest(d, lambda m: (m.pop("score_design"), m.pop("item_state")))
        expected = r"no score_design \(a v1 artefact.*serves score_design 'item-state-v2'.*retrain it"
    elif case == "other_design":
        edit_manifest(d, lambda m: m.__setitem__("score_design", "item-state-v3"))
        expected = "score_design 'item-state-v3'.*retrain"
    else:
        edit_manifest(d, lambda m: m["item_state"].__setitem__("text_version", "i0"))
        expected = "item text version 'i0'.*ITEM_TEXT_VERSION.*retrain"
    with pytest.raises(ArtefactError, match=expected):
        Artefact.load(d, trend)


def test_refuses_another_feature_spec(artefact_dir, trend):
    other = replace(trend, windows=(("1d", 24), ("14d", 336)))
    with pytest.raises(ArtefactError, match="feature spec.*windows"):
        Artefact.load(artefact_dir, other)


def test_refuses_another_prompt_version(artefact_dir, trend):
    with pytest.raises(ArtefactError, match="prompt version 'p1'|prompt version"):
        Artefact.load(artefact_dir, trend, prompt_version="p999")


def test_serving_refuses_at_construction(artefact_dir, trend, tmp_path):
    d = clone(artefact_dir, tmp_path / "a")
    edit_manifest(d, lambda m: m.__setitem__("prompt_version", "p0"))
    with pytest.raises(ArtefactError, match="prompt version 'p0'"):
        Serving(ServingConfig(model_dir=d), replace(WorkerConfig(), trend=trend))


@pytest.mark.parametrize("case", ["no_dir", "no_manifest", "bad_json", "not_exported", "missing_file", "truncated",
                                  "altered", "unloadable", "missing_field"])
def test_refuses_a_broken_artefact(artefact_dir, trend, tmp_path, case):
    d = clone(artefact_dir, tmp_path / "a")
    numeric = d / "onnx" / "head.onnx"
    expected = {
        "no_dir": "does not exist", "no_manifest": "no manifest.json", "bad_json": "not valid JSON",
        "not_exported": "run `python -m export.onnx", "missing_file": "head.onnx.*missing",
        "truncated": "truncated", "altered": "sha256", "unloadable": "cannot be loaded by onnxruntime",
        "missing_field": "lacks feature_spec",
    }[case]
    if case == "no_dir":
        d = tmp_path / "nowhere"
    elif case == "no_manifest":
        (d / "manifest.json").unlink()
    elif case == "bad_json":
        (d / "manifest.json").write_text('{"model_version": ')
    elif case == "not_exported":
        edit_manifest(d, lambda m: m.__setitem__("onnx", {}))
    elif case == "missing_file":
        numeric.unlink()
    elif case in ("truncated", "altered", "unloadable"):
        data = numeric.read_bytes()
        numeric.unlink()
        if case == "truncated":
            numeric.write_bytes(data[: len(data) // 2])
        else:
            numeric.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:] if case == "altered" else b"\0" * len(data))
        if case == "unloadable":  # a file that matches its record but is no ONNX model
            from stream.model.artefact import sha256_of

            edit_manifest(d, lambda m: m["onnx"]["files"]["head"].update(sha256=sha256_of(numeric)))
    elif case == "missing_field":
        edit_manifest(d, lambda m: m.pop("feature_spec"))
    with pytest.raises((ArtefactError, RuntimeError), match=expected):
        TickScorer(Artefact.load(d, trend), horizon_days=7, provider="cpu")


def test_horizon_must_be_one_the_model_was_trained_on(artefact_dir, trend, tmp_path):
    d = clone(artefact_dir, tmp_path / "a")
    edit_manifest(d, lambda m: m.__setitem__("horizon_days", {"retail": 7.0, "ml100k": 3.0}))
    art = Artefact.load(d, trend)
    with pytest.raises(ArtefactError, match="set TRAIL_HORIZON_DAYS"):
        art.horizon_days(None)
    with pytest.raises(ArtefactError, match=r"trained on horizons \[3, 7\]"):
        art.horizon_days(5)
    assert art.horizon_days(3) == 3


# ---- providers -------------------------------------------------------------------------------------------

def test_provider_falls_back_to_cpu_when_cuda_cannot_start(artefact_dir, trend, monkeypatch):
    """onnxruntime-gpu on a machine without a GPU: CUDA is offered but cannot run; CPU takes over, logged."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert choose_providers("auto") == [CUDA, CPU]
    with capture_logs() as logs:
        sc = TickScorer(Artefact.load(artefact_dir, trend), horizon_days=7)
    assert sc.provider == CPU
    assert sc.batch == 32
    assert any(entry["event"] == "onnx.cuda_unavailable" for entry in logs)


def test_provider_choice(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert choose_providers("auto") == [CPU]
    assert choose_providers("cpu") == [CPU]
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        choose_providers("cuda")
    with pytest.raises(ValueError):
        choose_providers("tpu")


# ---- features and scores ---------------------------------------------------------------------------------

def test_features_equal_the_trainers(artefact_dir, trend):
    """The stream serves the normalisation the trainer fitted, with the one definition of it."""
    from trainer.model import Manifest

    m = json.loads((artefact_dir / "manifest.json").read_text())
    raw = np.random.default_rng(0).normal(0, 50, (200, len(m["normalisation"]["names"])))
    raw[:, ::3] = np.abs(raw[:, ::3]).round()
    served = Artefact.load(artefact_dir, trend).features()
    trained = Normalisation.from_dict(Manifest.load(artefact_dir).normalisation)  # what trainer.model.load builds
    assert served == trained and served.to_dict() == m["normalisation"]
    assert np.array_equal(served.apply(raw), trained.apply(raw))


def test_tick_scores_equal_trainer_score_frame(artefact_dir, scorer, retail_cutoff, cache_dir):
    """Stream scoring of a tick == the trainer's scoring of the same cut-off: every item, full score."""
    from stream.core.features import predicted_count
    from trainer.inference import score_frame
    from trainer.model import load

    rows, signals, items = retail_cutoff
    model, _ = load(artefact_dir, cache_dir=cache_dir)
    score, log_count = score_frame(model, rows, 7.0, progress=False)
    fresh = TickScorer(scorer.artefact, provider="cpu", horizon_days=7, threads=2)
    preds = rank_tick([fresh.score(signals.as_of_ms, signals, items)], 0, fresh.model_version)
    got = {p.item_id: p for p in preds}
    assert len(got) == len(rows) == len(set(rows["item_id"]))  # every active item, no subset
    s = np.array([got[i].score for i in rows["item_id"]])
    c = np.array([got[i].predicted_count for i in rows["item_id"]])
    assert (np.abs(s - score) / np.maximum(1.0, np.abs(score))).max() < 1e-3
    expect_c = predicted_count(log_count)
    if fresh.range is not None:  # with a range head the published count is its median (trainer.evaluate's trail)
        from trainer.evaluate import trail_range

        expect_low, expect_c, expect_high = trail_range(model, str(artefact_dir), rows, 7.0)
        assert not np.allclose(expect_c, predicted_count(log_count))
        low = np.array([got[i].predicted_low for i in rows["item_id"]])
        high = np.array([got[i].predicted_high for i in rows["item_id"]])
        # the published range is the trainer's, calibrated alike (stream.core.calibration.apply_offsets)
        assert (np.abs(low - expect_low) / np.maximum(1.0, expect_low)).max() < 1e-2
        assert (np.abs(high - expect_high) / np.maximum(1.0, expect_high)).max() < 1e-2
        assert (low <= c + 1e-6).all() and (c <= high + 1e-6).all()  # the count lies inside its range
    assert (np.abs(c - expect_c) / np.maximum(1.0, expect_c)).max() < 1e-2
    assert sorted(p.rank for p in preds) == list(range(1, len(rows) + 1))
    assert fresh.stats.last["items"] == fresh.stats.last["encoded"] == len(rows)


def test_item_states_are_cached_and_invalidated_by_a_catalogue_change(scorer, retail_cutoff):
    _, signals, items = retail_cutoff
    sc = TickScorer(scorer.artefact, provider="cpu", horizon_days=7, threads=2, cache_items=10_000)
    n = len(signals)
    first = sc.score(signals.as_of_ms, signals, items)
    assert sc.stats.last["encoded"] == n and sc.cache.misses == n and len(sc.cache) == n
    again = sc.score(signals.as_of_ms, signals, items)  # warm: nothing encoded, same scores
    assert sc.stats.last["encoded"] == 0 and sc.cache.hits == n
    assert np.array_equal(first.score, again.score) and np.array_equal(first.log_count, again.log_count)
    # the catalogue's record of one item changes: that item alone is encoded again
    item = signals.item_ids[0]
    old = items.get(item) or ItemInfo()
    changed = {**items, item: ItemInfo((old.title or item) + " XL", old.category, old.description)}
    third = sc.score(signals.as_of_ms, signals, changed)
    assert sc.stats.last["encoded"] == 1 and sc.cache.invalidations == 1
    assert np.array_equal(third.score[1:], first.score[1:])
    want = sc.encode([text_for(item, changed[item])])[0]
    assert np.array_equal(sc.cache.get(item, text_for(item, changed[item])), want)
    assert third.score[0] != first.score[0] or third.log_count[0] != first.log_count[0]
    # a tick with new items encodes only those; ids unknown to the catalogue are named by their id
    sub = Signals(signals.as_of_ms, ["never-seen-1", "never-seen-2", *signals.item_ids[:3]], signals.names,
                  np.concatenate([signals.values[:2], signals.values[:3]]))
    sc.score(sub.as_of_ms, sub, changed)
    assert sc.stats.last["encoded"] == 2


def test_item_state_cache_is_a_bounded_lru():
    cache = ItemStateCache(capacity=2)
    a, b, c = (np.full(4, v, np.float32) for v in (1, 2, 3))
    cache.put("a", "A", a)
    cache.put("b", "B", b)
    assert cache.get("a", "A") is a  # a is now the most recent
    cache.put("c", "C", c)  # b, the least recently used, goes
    assert "b" not in cache and "a" in cache and "c" in cache and cache.evictions == 1
    assert cache.get("a", "A (new title)") is None and "a" not in cache and cache.invalidations == 1
    assert cache.nbytes() == c.nbytes and len(cache) == 1
    with pytest.raises(ValueError):
        ItemStateCache(0)


def test_several_workers_rank_as_one(scorer, retail_cutoff):
    """Parts scored per partition and merged give the single-process ranking, also when truncated."""
    from stream.tools.replay import _partition_for

    _, signals, items = retail_cutoff
    whole = rank_tick([scorer.score(signals.as_of_ms, signals, items)], 0, scorer.model_version)
    part_of = np.array([_partition_for(i.encode(), 3) for i in signals.item_ids])
    for publish_top in (0, 20):
        parts = []
        scorer.publish_top = publish_top  # each part keeps its local top publish_top by score
        try:
            for p in range(3):
                idx = np.flatnonzero(part_of == p)
                sub = Signals(signals.as_of_ms, [signals.item_ids[i] for i in idx], signals.names, signals.values[idx])
                part = scorer.score(signals.as_of_ms, sub, items, partitions=[p], total_partitions=3)
                if publish_top:
                    assert len(part.item_ids) <= publish_top
                parts.append(ScoredPart.from_chunks([ScoredChunk.from_json(m) for m in part.messages(chunk=50)]))
        finally:
            scorer.publish_top = 0
        merged = rank_tick(parts, publish_top, scorer.model_version)
        expect = whole[:publish_top] if publish_top else whole
        assert [(p.item_id, p.rank) for p in merged] == [(p.item_id, p.rank) for p in expect]
        assert np.allclose([p.score for p in merged], [p.score for p in expect], rtol=1e-6, atol=1e-5)
        assert np.allclose([p.predicted_count for p in merged], [p.predicted_count for p in expect], rtol=1e-5)
        assert merged[0].signals == expect[0].signals


def test_the_tick_is_scored_in_the_scorer_thread(scorer, retail_cutoff):
    """The tick hook (ScorerService.on_tick) runs TickScorer.score (item encoding included) in its executor, not on the event loop."""
    import asyncio
    import threading

    _, signals, items = retail_cutoff
    threads = []
    saved = []
    real = scorer.score

    def score(*args, **kw):
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    def save_states(force=False):
        saved.append(threading.current_thread().name)
        return True

    class Producer:
        sent = 0

        async def send(self, *_, **__):
            Producer.sent += 1
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

    topics = WorkerConfig().topics
    stats = ServingStats()
    publisher = Publisher(topics.predictions, topics.explanations, None, stats)
    publisher.producer = Producer()
    fake_scorer = type("S", (), {"score": staticmethod(score), "stats": scorer.stats,
                                 "save_due": staticmethod(lambda force=False: True),
                                 "save_states": staticmethod(save_states)})()
    serving = ScorerService(fake_scorer, ServingConfig(), type("C", (), {"items": items})(), publisher, None,
                            topics.partitions, "w", stats)
    try:
        asyncio.run(serving.on_tick(signals.as_of_ms, signals))
    finally:
        serving._executor.shutdown()
    assert threads and threads[0].startswith("trail-scorer") and Producer.sent >= 1
    assert saved and saved[0].startswith("trail-scorer")  # the item-state store is written there too


# ---- the item-state store and the warm-up ------------------------------------------------------------

def _states(n: int, h: int = 4) -> list[np.ndarray]:
    return [np.full(h, i, np.float32) for i in range(n)]


def test_item_state_store_round_trip(tmp_path):
    store = ItemStateStore(tmp_path / "item_states" / "onnx-k.npz", "k", 4, every_s=3600)
    cache = ItemStateCache(10)
    a, b, c = _states(3)
    cache.put("a", "A", a)
    cache.put("b", "Bé ✓", b)  # any text: stored as UTF-8
    cache.put("c", "C", c)
    cache.get("a", "A")  # a is the most recent now: the order on disk is the LRU's
    assert store.load(cache) == 0 and not store.due(cache)  # no file yet; the cache is what was read
    cache.put("d", "D", np.full(4, 9, np.float32))
    assert store.due(cache)  # first write: not throttled
    assert store.save(cache) and store.path.is_file() and not store.due(cache)
    assert list(store.path.parent.iterdir()) == [store.path]  # the temporary file became the store
    cache.put("e", "E", np.zeros(4, np.float32))
    assert not store.due(cache) and store.due(cache, force=True)  # changed, but written a moment ago

    again = ItemStateCache(10)
    assert ItemStateStore(store.path, "k", 4).load(again) == 4
    assert [e[0] for e in again.entries()] == ["b", "c", "a", "d"]
    assert np.array_equal(again.get("b", "Bé ✓"), b) and np.array_equal(again.get("a", "A"), a)
    assert again.get("c", "C (new title)") is None and again.invalidations == 1  # a changed text is a miss

    small = ItemStateCache(2)  # more on disk than the cache holds: the most recently used ones
    assert ItemStateStore(store.path, "k", 4).load(small) == 2
    assert [e[0] for e in small.entries()] == ["a", "d"] and small.evictions == 0

    empty = ItemStateStore(tmp_path / "empty.npz", "k", 4)
    assert empty.save(ItemStateCache(3)) and empty.load(ItemStateCache(3)) == 0


def test_a_write_keeps_the_most_recent_stores_and_removes_the_rest(tmp_path):
    import os

    old = []
    for i in range(KEEP_STORES + 2):  # other models' files, written one second apart
        f = tmp_path / f"{'onnx-' if i % 2 else ''}old{i}.npz"
        f.write_bytes(b"x")
        os.utime(f, (1000 + i, 1000 + i))
        old.append(f)
    (tmp_path / "notes.txt").write_text("not a store")
    store = ItemStateStore(tmp_path / "onnx-k.npz", "k", 4)
    cache = ItemStateCache(3)
    cache.put("a", "A", np.zeros(4, np.float32))
    assert store.save(cache)
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == sorted([store.path.name, "notes.txt"] + [f.name for f in old[-(KEEP_STORES - 1):]])
    assert prune_stores(tmp_path, store.path) == []  # nothing more to remove
    assert ItemStateStore(store.path, "k", 4).load(ItemStateCache(3)) == 1


@pytest.mark.parametrize("case", ["torn", "garbage", "other_key", "other_hidden_size", "trainer_format", "bad_offsets"])
def test_item_state_store_ignores_a_torn_or_foreign_file(tmp_path, case):
    path = tmp_path / "onnx-k.npz"
    cache = ItemStateCache(10)
    for i, state in enumerate(_states(50)):
        cache.put(f"i{i}", f"text {i}", state)
    ItemStateStore(path, "other" if case == "other_key" else "k", 4).save(cache)
    if case == "other_hidden_size":
        wide = ItemStateCache(10)
        wide.put("x", "X", np.zeros(8, np.float32))
        ItemStateStore(path, "k", 8).save(wide)
    elif case == "torn":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "garbage":
        path.write_bytes(b"not a store at all" * 100)
    elif case == "trainer_format":  # trainer.model._StateCache's layout
        np.savez(path, keys=np.array(["ab"]), states=np.zeros((1, 4), np.float32))
    elif case == "bad_offsets":
        with np.load(path) as z:
            arrays = dict(z)
        arrays["text_ends"] = arrays["text_ends"][::-1].copy()
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    fresh = ItemStateCache(10)
    store = ItemStateStore(path, "k", 4)
    with capture_logs() as logs:
        assert store.load(fresh) == 0
    assert len(fresh) == 0
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["item_store.ignored"]
    fresh.put("a", "A", np.ones(4, np.float32))  # and the next write replaces the bad file
    assert store.save(fresh) and ItemStateStore(path, "k", 4).load(ItemStateCache(10)) == 1


def test_store_key_follows_the_encoder_and_the_item_text(tmp_path, monkeypatch):
    """The store's file changes with whatever changes a state besides its text, read from the manifest."""
    import copy

    from stream.core import prompts

    files = {role: {"path": f"onnx/{role}.onnx", "bytes": 1, "sha256": f"{i}" * 64}
             for i, role in enumerate(("item_encoder", "head", "generator", "tokenizer"))}
    manifest = {"onnx": {"files": files}, "trail_config": {"max_item_tokens": 48}, "item_state": {"hidden_size": 4}}
    art = Artefact(tmp_path, manifest)
    key = store_key(art)

    def edited(fn) -> Artefact:
        m = copy.deepcopy(manifest)
        fn(m)
        return Artefact(tmp_path, m)

    assert store_key(edited(lambda m: None)) == key
    assert store_key(edited(lambda m: m["onnx"]["files"]["item_encoder"].__setitem__("sha256", "f" * 64))) != key
    assert store_key(edited(lambda m: m["onnx"]["files"]["tokenizer"].__setitem__("sha256", "f" * 64))) != key
    assert store_key(edited(lambda m: m["trail_config"].__setitem__("max_item_tokens", 7))) != key
    assert store_key(edited(lambda m: m["onnx"]["files"]["head"].__setitem__("sha256", "f" * 64))) == key
    assert store_key(edited(lambda m: m["onnx"]["files"]["generator"].__setitem__("sha256", "f" * 64))) == key
    store = ItemStateStore.for_artefact(art, tmp_path / "item_states")
    assert store.path == tmp_path / "item_states" / f"onnx-{key}.npz" and store.hidden_size == 4
    monkeypatch.setattr(prompts, "ITEM_TEXT_VERSION", "i999")
    assert store_key(art) != key


def test_warm_up_encodes_the_catalogue_and_a_restart_is_warm(scorer, retail_cutoff, tmp_path):
    _, signals, items = retail_cutoff
    n = 24
    sub = Signals(signals.as_of_ms, signals.item_ids[:n], signals.names, signals.values[:n])
    catalogue = {i: items[i] for i in sub.item_ids if i in items}
    art = scorer.artefact
    def store() -> ItemStateStore:  # the encoder's own store: the states shipped with the model are not read here
        return dataclasses.replace(ItemStateStore.for_artefact(art, tmp_path), shipped=[], shipped_key="")

    sc = TickScorer(art, provider="cpu", horizon_days=7, threads=2, store=store())
    with capture_logs() as logs:
        first = sc.warm(catalogue, limit=10)  # at most 10
    assert (first.items, first.encoded, first.from_disk) == (len(catalogue), 10, 0) and len(sc.cache) == 10
    assert any(e["event"] == "serving.warming" and e["done"] == e["total"] == 10 for e in logs)
    assert sc.store.path.is_file()  # written after the warm-up
    rest = sc.warm(catalogue, limit=50_000)
    assert rest.encoded == len(catalogue) - 10 and sc.warm(catalogue, limit=50_000).encoded == 0
    assert sc.warm(catalogue, limit=0).encoded == 0
    part = sc.score(sub.as_of_ms, sub, catalogue)
    assert len(catalogue) == n and sc.stats.last["encoded"] == 0 and sc.stats.last["items"] == n
    assert not sc.save_due(force=True)  # the warm-up wrote everything already

    restarted = TickScorer(art, provider="cpu", horizon_days=7, threads=2, store=store())
    again = restarted.score(sub.as_of_ms, sub, catalogue)
    assert restarted.stats.last["encoded"] == 0 and restarted.store.loaded == len(sc.cache)
    assert np.array_equal(again.score, part.score) and np.array_equal(again.log_count, part.log_count)
    warm = restarted.warm(catalogue, limit=50_000)
    assert (warm.encoded, warm.from_disk) == (0, n)
    # a catalogue record that changed is encoded again at the next warm-up
    item = next(iter(catalogue))
    changed = {**catalogue, item: ItemInfo((catalogue[item].title or item) + " XL", catalogue[item].category)}
    assert restarted.warm(changed, limit=50_000).encoded == 1


def test_serving_warms_up_in_the_scorer_thread():
    import asyncio
    import threading

    calls = []

    def warm(items, limit, should_stop):
        calls.append((threading.current_thread().name, dict(items), limit, should_stop()))
        return WarmUp(len(items), 2, 0.5, 1)

    serving = ScorerService(type("S", (), {"warm": staticmethod(warm), "cache": ItemStateCache(3)})(),
                            ServingConfig(warm_items=123),
                            type("C", (), {"items": {"a": ItemInfo("A"), "b": ItemInfo("B")}})(), None, None, 1, "w",
                            ServingStats())
    try:
        with capture_logs() as logs:
            done = asyncio.run(serving.warm_up())
    finally:
        serving._executor.shutdown()
    assert done == WarmUp(2, 2, 0.5, 1)
    (thread, items, limit, stopping), = calls
    assert thread.startswith("trail-scorer") and set(items) == {"a", "b"} and limit == 123 and not stopping
    assert [{k: e[k] for k in ("items", "encoded", "seconds", "from_disk")} for e in logs
            if e["event"] == "serving.warmed"] == [{"items": 2, "encoded": 2, "seconds": 0.5, "from_disk": 1}]


def test_scored_chunks_round_trip_and_reject_malformed_messages():
    values = np.arange(12, dtype=np.float64).reshape(4, 3)
    part = ScoredPart(5_000, list("abcd"), np.array([0.5, 1.5, 2.5, 3.5]), np.array([1.0, 0.0, 0.25, 2.0]),
                      ("x", "y", "z"), values, [1, 2], 3, "w1")
    messages = part.messages(chunk=3)
    assert len(messages) == 2
    back = ScoredPart.from_chunks([ScoredChunk.from_json(m) for m in reversed(messages)])
    assert (back.as_of_ms, back.item_ids, back.names, back.partitions, back.total_partitions, back.source) == \
        (5_000, list("abcd"), ("x", "y", "z"), [1, 2], 3, "w1")
    assert np.array_equal(back.values, values) and np.array_equal(back.score, part.score)
    assert np.array_equal(back.log_count, part.log_count)
    good = json.loads(messages[0])
    for bad, why in [(b"not json", "not valid JSON"), (b"[1]", "JSON object"),
                     ({k: v for k, v in good.items() if k != "names"}, "lacks names"),
                     ({**good, "as_of_ms": "5000"}, "as_of_ms"), ({**good, "chunk": 2}, "chunk 2 of 2"),
                     ({**good, "partitions": [1, "2"]}, "partitions"),
                     ({**good, "score": [1.0, "x", 2.0]}, "numbers only"),
                     ({**good, "log_count": [1.0]}, "log_count has shape"),
                     ({**good, "values": [[1.0, 2.0]] * 3}, "values")]:
        raw = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        with pytest.raises(ScoredChunkError, match=why):
            ScoredChunk.from_json(raw)


def test_the_ranker_skips_malformed_messages_and_ranks_complete_ticks():
    """_rank_loop: a bad message is logged and skipped; a tick is ranked once its parts cover every partition."""
    import asyncio
    from types import SimpleNamespace

    def part(partition: int, ids: str) -> ScoredPart:
        n = len(ids)
        return ScoredPart(7_000, list(ids), np.arange(n, dtype=np.float64), np.zeros(n), ("x",),
                          np.ones((n, 1)), [partition], 2, f"w{partition}")

    messages = [b"{oops", *part(0, "abc").messages(chunk=2), b'{"as_of_ms": 7000}', *part(1, "de").messages()]
    records = [SimpleNamespace(value=v, offset=i) for i, v in enumerate(messages)]

    class Ranker:
        calls = 0

        async def getmany(self, **_):
            self.calls += 1
            if self.calls > 1:
                raise asyncio.CancelledError
            return {"tp": records}

    ranked = []

    async def rank(as_of, tp):
        ranked.append((as_of, sorted(i for p in serving._ticks.pop(as_of).parts() for i in p.item_ids)))

    serving = RankerPart.__new__(RankerPart)
    serving._ranker, serving._ticks, serving._last_ranked, serving.stats = Ranker(), {}, None, ServingStats()
    serving._rank = rank
    with capture_logs() as logs, pytest.raises(asyncio.CancelledError):
        asyncio.run(serving._rank_loop())
    bad = [e for e in logs if e["event"] == "ranker.bad_message"]
    assert [e["offset"] for e in bad] == [0, 3] and "lacks" in bad[1]["error"]
    assert ranked == [(7_000, list("abcde"))]


def test_an_empty_tick(scorer, trend):
    empty = Signals(0, [], trend.signal_names, np.zeros((0, len(trend.signal_names))))
    assert rank_tick([scorer.score(0, empty)], 0, scorer.model_version) == []


def test_serving_config_from_settings(tmp_path):
    cfg = load_settings({"TRAIL_MODEL_DIR": str(tmp_path), "TRAIL_ITEM_CACHE_SIZE": "7", "TRAIL_PROVIDER": "cpu",
                         "TRAIL_HORIZON_DAYS": "7", "TRAIL_EXPLAIN_BY": "rank_jump"}).serving
    assert (cfg.model_dir, cfg.cache_items, cfg.provider, cfg.horizon_days, cfg.explain_by) == (
        tmp_path, 7, "cpu", 7.0, "rank_jump")
    assert load_settings({}).serving is None  # no model, no serving
    default = load_settings({"TRAIL_MODEL_DIR": str(tmp_path), "TRAIL_CACHE": str(tmp_path / "cache")}).serving
    assert (default.cache_items, default.warm_items) == (200_000, 20_000)
    assert default.item_store_dir == tmp_path / "cache" / "item_states"  # beside the trainer's item states
    assert load_settings({"TRAIL_MODEL_DIR": str(tmp_path), "TRAIL_ITEM_WARM": "0"}).serving.warm_items == 0
    with pytest.raises(SettingsError, match="TRAIL_ITEM_WARM='-1': must be a whole number >= 0"):
        load_settings({"TRAIL_ITEM_WARM": "-1"})
    with pytest.raises(SettingsError, match="TRAIL_ITEM_CACHE_SIZE='many'"):
        load_settings({"TRAIL_ITEM_CACHE_SIZE": "many"})
    with pytest.raises(SettingsError, match="TRAIL_PROVIDER='gpu': must be one of auto, cuda, cpu"):
        load_settings({"TRAIL_PROVIDER": "gpu"})


def test_serving_path_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import stream.serving.service, stream.serving.scorer, stream.serving.explainer, stream.ingest.catalogue, "
            "stream.model.artefact, stream.model.onnx_models; "
            "print([m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'trainer', 'export', 'optimum', 'peft')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
