"""Item states shipped with the model (stream.model.item_states, export.item_states): the committed ones are
what the real item encoder computes from the texts the worker renders; a store serves them only under their
key and after a sample re-encoded agrees, drops them all when it does not; a head-first export
(export.onnx --head-first) lets a scorer with shipped states score before the item encoder exists."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from stream.core.records import ItemInfo
from stream.core.trends import Signals, TrendConfig
from stream.model.artefact import TRAINED_FILES, Artefact, ArtefactError, read_export, write_export
from stream.model.item_states import (SHIPPED_DIR, SHIPPED_TOLERANCE, ItemStateCache, ItemStateStore, ShippedStates,
                                      shipped_key, state_difference)
from stream.serving.scorer import TickScorer, text_for

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "models" / "trail-smollm2"
SHIPPED = COMMITTED / SHIPPED_DIR / "retail.npz"


@pytest.fixture(scope="module")
def art(artefact_dir, trend) -> Artefact:
    return Artefact.load(artefact_dir, trend)


@pytest.fixture(scope="module")
def scorer(art) -> TickScorer:
    return TickScorer(art, provider="cpu", horizon_days=7, threads=2)


@pytest.fixture(scope="module")
def retail_items(cache_dir):
    from stream.core.datasets import load_dataset

    return load_dataset("retail", cache_dir=cache_dir).items


def trained(model: Path) -> Artefact:
    from export.item_states import trained as of

    return of(model)


def test_the_committed_states_are_what_the_encoder_computes_from_the_worker_s_texts(art, scorer, retail_items):
    from export.item_states import catalogue_texts

    assert SHIPPED.is_file() and SHIPPED.stat().st_size < 8_000_000
    key = shipped_key(trained(COMMITTED))
    if shipped_key(art) != key:
        pytest.skip("the test artefact is not an export of the committed weights (serving_artefact fitted one)")
    f = ShippedStates.read(SHIPPED, key, art.hidden_size)
    ids, texts = catalogue_texts(retail_items)  # replay's record -> the catalogue -> the scorer's text
    assert f.ids == ids and f.texts == texts  # every retail item, with the text the worker encodes
    pick = np.linspace(0, len(ids) - 1, 24).astype(int)
    fresh = scorer.encode([texts[i] for i in pick])
    shipped = f.states[pick].astype(np.float32)
    diff = state_difference(fresh, shipped)
    assert diff <= SHIPPED_TOLERANCE, diff
    assert diff > 0  # float16: not a copy of float32 states, the comparison measures something
    # what float16 does to the score: far below the export's end-to-end tolerance (1e-3)
    x = np.random.default_rng(0).normal(size=(len(pick), len(scorer.features.names))).astype(np.float32)
    a, b = scorer.head(x, fresh), scorer.head(x, shipped)
    assert max(float(np.abs(p - q).max()) for p, q in zip(a, b)) < 1e-3


def shipped_file(root: Path, key: str, ids: list[str], texts: list[str], states: np.ndarray) -> Path:
    return ShippedStates(root / SHIPPED_DIR / "data.npz", key, ids, texts, states.astype(np.float16)).write()


def artefact_with(src: Path, dst: Path, record: dict | None = None) -> Path:
    """The trained files of `src` and links to its ONNX files, with `record` as the export record."""
    dst.mkdir(parents=True)
    for name in TRAINED_FILES:
        p = src / name
        if p.exists():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / name)
    for f in (src / "onnx").rglob("*"):
        if f.is_file() and f.name != "export.json":
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).symlink_to(f)
    write_export(dst, record if record is not None else read_export(src))
    return dst


ITEMS = {f"i{n}": ItemInfo(title, "Home", None) for n, title in enumerate(
    ["Red retrospot cake stand", "White hanging heart t-light holder", "Jumbo bag pink polkadot",
     "Set of 3 cake tins pantry design", "Paper chain kit 50's christmas", "Lunch bag red retrospot"])}


@pytest.mark.parametrize("case", ["true", "altered", "other_key"])
def test_a_store_serves_shipped_states_only_under_their_key_and_after_a_sample_agrees(art, scorer, artefact_dir,
                                                                                      tmp_path, case):
    d = artefact_with(artefact_dir, tmp_path / "model")
    a = Artefact.load(d, TrendConfig.from_spec(art.manifest["feature_spec"]))
    ids = list(ITEMS)
    texts = [text_for(i, ITEMS[i]) for i in ids]
    states = scorer.encode(texts)
    if case == "altered":  # what another base model or encoder would give: a state off by 1% of its scale
        states[3] += 0.01 * np.abs(states[3]).max()
    shipped_file(d, "not-this-model" if case == "other_key" else shipped_key(a), ids, texts, states)
    store = ItemStateStore.for_artefact(a, tmp_path / "cache")
    s = TickScorer(a, provider="cpu", horizon_days=7, threads=1, store=store)
    with capture_logs() as logs:
        s.load_states()
    events = {e["event"]: e for e in logs}
    user = {"u1": ItemInfo("A user's own item", "Garden", None)}  # not shipped: encoded as before
    got, encoded = s.item_states(ids + ["u1"], {**ITEMS, **user})
    assert np.allclose(got[-1], scorer.encode([text_for("u1", user["u1"])])[0], atol=1e-5)
    if case == "true":
        assert store.shipped_loaded == 6 and events["item_store.shipped_verified"]["difference"] <= SHIPPED_TOLERANCE
        assert encoded == 1  # the shipped six served, the user's item encoded
        assert np.array_equal(got[:-1], states.astype(np.float16).astype(np.float32))  # as shipped
    elif case == "altered":
        assert events["item_store.shipped_rejected"]["entries"] == 6 and events["item_store.shipped_rejected"]["log_level"] == "error"
        assert encoded == 7  # none of the shipped states used
    else:
        assert store.shipped_loaded == 0 and "not-this-model" in events["item_store.shipped_ignored"]["error"]
        assert encoded == 7
    # a catalogue record that changed since: the shipped state is a miss, as a cached one is
    if case == "true":
        changed = {**ITEMS, "i0": ItemInfo("Blue retrospot cake stand", "Home", None)}
        assert s.item_states(["i0"], changed)[1] == 1


def test_a_head_first_export_lets_shipped_states_score_before_the_encoder_is_recorded(art, scorer, artefact_dir,
                                                                                     tmp_path):
    from export.onnx import export_head_first

    trend = TrendConfig.from_spec(art.manifest["feature_spec"])
    model = tmp_path / "model"
    model.mkdir()
    for name in TRAINED_FILES:
        p = artefact_dir / name
        if p.exists():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, model / name)
    ids = list(ITEMS)
    texts = [text_for(i, ITEMS[i]) for i in ids]
    key = shipped_key(trained(model))
    shipped_file(model, key, ids, texts, scorer.encode(texts))
    record = export_head_first(model, "test")
    assert record["pending"] == ["tokenizer", "item_encoder", "generator"] and list(record["files"]) == ["head"]
    assert record["parity"]["head"]["max_abs_diff"] <= 1e-5
    with pytest.raises(ArtefactError, match="under way"):
        Artefact.load(model, trend)  # a plain load wants the whole export
    head_only = Artefact.load(model, trend, pending_ok=True)
    store = ItemStateStore.for_artefact(head_only, tmp_path / "cache")
    assert store.key == "" and not store.due(ItemStateCache(2), force=True)  # no file of its own before the encoder
    s = TickScorer(head_only, provider="cpu", horizon_days=7, threads=1, store=store)
    assert s.encoder is None
    names = trend.signal_names
    rng = np.random.default_rng(1)
    signals = Signals(1_300_000_000_000, ids, names, np.abs(rng.normal(size=(len(ids), len(names)))) * 5)
    with capture_logs() as logs:
        part = s.score(1_300_000_000_000, signals, ITEMS)
    assert s.encoder is None and "item_store.shipped_unverified" in {e["event"] for e in logs}
    assert sorted(part.item_ids) == sorted(ids) and s.stats.encoded == 0
    # scored as the full artefact scores them (its head on the same, shipped, states)
    full = TickScorer(art, provider="cpu", horizon_days=7, threads=1)
    for i, t, st in zip(ids, texts, ShippedStates.read(model / SHIPPED_DIR / "data.npz", key, art.hidden_size).states):
        full.cache.put(i, t, st.astype(np.float32))
    ref = full.score(1_300_000_000_000, signals, ITEMS)
    order = {i: n for n, i in enumerate(ref.item_ids)}
    assert np.allclose(part.score, ref.score[[order[i] for i in part.item_ids]], atol=1e-5)
    assert np.allclose(part.low, ref.low[[order[i] for i in part.item_ids]], atol=1e-5)
    # the export records the item encoder (here: the test artefact's files and record): the next tick opens
    # it, the store takes its own file and the shipped states are checked
    shutil.rmtree(model / "onnx")
    for f in (artefact_dir / "onnx").rglob("*"):
        if f.is_file() and f.name != "export.json":
            (model / f.relative_to(artefact_dir)).parent.mkdir(parents=True, exist_ok=True)
            (model / f.relative_to(artefact_dir)).symlink_to(f)
    write_export(model, read_export(artefact_dir))
    with capture_logs() as logs:
        s.score(1_300_000_000_000, signals, ITEMS)
    events = {e["event"] for e in logs}
    assert s.encoder is not None and {"scorer.encoder_ready", "item_store.shipped_verified"} <= events
    assert store.key and store.path.name == f"onnx-{store.key}.npz"
    assert s.tokenizer.end_id == scorer.tokenizer.end_id


def test_the_demo_copies_the_shipped_states_beside_its_export_and_uses_them_only_for_their_model(trend, tmp_path,
                                                                                                  retail_items):
    from stream.tools.demo import served_artefact, shipped_coverage, shipped_for

    if (COMMITTED / "onnx").exists():
        pytest.skip("the committed artefact is exported in place here: the demo serves it as it is")
    model = tmp_path / "trail-smollm2"
    model.mkdir()
    for name in (*TRAINED_FILES, SHIPPED_DIR):
        src = COMMITTED / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, model / name)
    home = served_artefact(model, trend, tmp_path / "cache")
    assert (home / SHIPPED_DIR / "retail.npz").read_bytes() == SHIPPED.read_bytes()
    found = shipped_for(home, "retail")
    assert found == home / SHIPPED_DIR / "retail.npz" and shipped_for(home, "ml100k") is None
    assert shipped_coverage(found, retail_items) == (len(retail_items), len(retail_items))
    changed = retail_items.copy()
    changed.loc[changed.index[:10], "title"] = "renamed"
    assert shipped_coverage(found, changed) == (len(retail_items) - 10, len(retail_items))
    (model / "adapter" / "adapter_model.safetensors").write_bytes(b"retrained")  # another model: not its states
    assert shipped_for(model, "retail") is None
