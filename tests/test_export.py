"""export.onnx: what it records, and parity of the ONNX files with PyTorch, re-checked independently here.

The export itself (tests/serving_artefact.py, cached) already fails beyond its tolerances; these
tests re-check at shapes the export did not use, and the tokenizers on edge cases.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx import ENCODER_BATCHES, ENCODER_LENGTHS, HEAD_BATCHES, TOLERANCE, ExportError, require_parity
from stream.model.artefact import Artefact, ArtefactError, sha256_of
from stream.model.onnx_models import CPU, Generator, ItemEncoder, ScoreHeadModel
from stream.core.prompts import item_text, render_prompt
from stream.core.trends import TrendConfig
from serving_artefact import exported_artefact

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def artefact() -> Artefact:
    d = exported_artefact()
    return Artefact.load(d, TrendConfig.from_spec(json.loads((d / "manifest.json").read_text())["feature_spec"]))


@pytest.fixture(scope="module")
def model(artefact, cache_dir):
    from trainer.model import load

    m, _ = load(artefact.root, cache_dir=cache_dir)  # LoRA not merged: the model as trained
    return m


@pytest.fixture(scope="module")
def sample(artefact, model, cache_dir):
    from export.onnx import sample_prompts
    from trainer.model import Manifest

    return sample_prompts(model, Manifest.load(artefact.root), 10, seed=7, cache_dir=cache_dir)


def test_manifest_records_files_and_parity(artefact):
    onnx = artefact.onnx
    assert set(onnx["files"]) == {"item_encoder", "head", "generator", "tokenizer"}  # fp32 only, no variants
    for role, rec in onnx["files"].items():
        path = artefact.root / rec["path"]
        assert path.stat().st_size == rec["bytes"] and sha256_of(path) == rec["sha256"], role
    parity = onnx["parity"]
    assert parity["tokenizer"]["identical"] == parity["tokenizer"]["prompts"] > 0
    assert parity["item_tokenizer"]["identical"] == parity["item_tokenizer"]["prompts"] > 0
    enc = parity["item_encoder"]
    assert enc["max_scaled_diff"] <= TOLERANCE["item_encoder"]
    shapes = {tuple(v) for k, v in enc["shapes"].items() if not k.startswith("texts")}
    assert shapes == {(b, t) for b in ENCODER_BATCHES for t in ENCODER_LENGTHS}  # not only the traced shape
    assert parity["head"]["max_scaled_diff"] <= TOLERANCE["head"] and parity["head"]["batches"] == list(HEAD_BATCHES)
    assert parity["score"]["max_scaled_diff"] <= TOLERANCE["score"]
    assert parity["generator"]["identical"] == parity["generator"]["prompts"] > 0
    assert onnx["tokenizer"]["end_token"] == "<|im_end|>"
    assert onnx["score_design"] == artefact.manifest["score_design"] == "item-state-v2"
    assert set(onnx["file_seconds"]) == {"item_encoder", "head", "generator"}


def test_item_encoder_matches_pytorch_at_new_shapes(artefact, model, sample):
    tok = artefact.item_tokenizer()
    enc = ItemEncoder(artefact.path("item_encoder"), [CPU], threads=2)
    rows = tok.ids(sample.texts)
    joined = [t for r in rows for t in r[1:]]
    for b, t in ((2, 7), (5, 33), (1, 48), (9, 3)):
        batch = [rows[0][:1] + joined[i * 3 : i * 3 + (t if i == 0 else max(1, t - 2 * i)) - 1] for i in range(b)]
        ids, mask = tok.pad(batch)
        with torch.no_grad():
            ref = model.item_state(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        d = np.abs(enc(ids, mask) - ref).max() / max(1.0, float(np.abs(ref).max()))
        assert d <= TOLERANCE["item_encoder"], (b, t, d)
    # right padding does not change an item's state: alone or next to a longer row, the same
    alone = enc(*tok.pad([rows[0]]))
    padded = enc(*tok.pad([rows[0], rows[0] + joined[:20]]))[:1]
    assert np.abs(alone - padded).max() / max(1.0, float(np.abs(alone).max())) < 1e-4


def test_head_matches_pytorch(artefact, model, sample):
    tok = artefact.item_tokenizer()
    head = ScoreHeadModel(artefact.path("head"), [CPU], threads=2)
    with torch.no_grad():
        states = model.item_state(*(torch.from_numpy(a) for a in tok.encode(sample.texts))).numpy()
    rng = np.random.default_rng(3)
    for b in (2, 11, 513):
        idx = rng.integers(0, len(states), b)
        x = sample.features[idx] + rng.normal(0, 0.1, (b, sample.features.shape[1])).astype(np.float32)
        with torch.no_grad():
            ref = [t.numpy() for t in model.head(torch.from_numpy(x), torch.from_numpy(states[idx]))]
        for got, want in zip(head(x, states[idx]), ref):
            assert got.shape == (b,)
            assert (np.abs(got - want) / np.maximum(1.0, np.abs(want))).max() <= TOLERANCE["head"]
    # the tick's small networks do not spin for more work after a run (stream.model.onnx_models.session_options)
    assert head.sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_tokenizers_give_the_trainers_ids(artefact, model, sample):
    edge = [
        render_prompt("Doormat “Happy Christmas” – red/green, 60×40 cm — very long title indeed", "Home, garden",
                      {**{f"{k}_{w}": 3.0 for k in ("count", "prev_count", "users", "velocity", "accel")
                          for w in ("1d", "7d", "28d")}, "age_h": 30.0}, 7, month="Dec"),
        "x " * 300,  # longer than max_prompt_tokens: truncated the same way
        "Item: 12345\n1d:0 events",
    ]
    tok = artefact.tokenizer()
    for batch in (sample.prompts, edge, sample.prompts[:1]):
        ids, mask = model.encode_prompts(batch)
        ours, our_mask = tok.encode(batch)
        assert np.array_equal(ours, ids.numpy()) and np.array_equal(our_mask, mask.numpy())
    assert tok.ids(["x " * 300])[0].__len__() == artefact.max_prompt_tokens
    assert tok.ids(sample.prompts[:1])[0][0] == model.tokenizer("a").input_ids[0]  # BOS, as the trainer
    items = artefact.item_tokenizer()
    texts = [*sample.texts, item_text(None, None, item_id="85123A"),
             item_text("Doormat “Happy Christmas” – red/green", "Home", description="word " * 200)]
    ids, mask = model.encode_items(texts)
    ours, our_mask = items.encode(texts)
    assert np.array_equal(ours, ids.numpy()) and np.array_equal(our_mask, mask.numpy())
    assert max(len(r) for r in items.ids(texts)) == artefact.max_item_tokens


def test_decode_matches_transformers(artefact, model):
    tok = artefact.tokenizer()
    for text in (" Rising: 41 sales in the last 7 days , up from 12 . It's not slowing", " Flat ; 3 users ! Isn't it ?"):
        ids = model.tokenizer(text, add_special_tokens=False).input_ids + [tok.end_id]
        assert tok.decode(ids) == model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_generator_is_greedy_trail_explain(artefact, model, sample):
    tok = artefact.tokenizer()
    gen = Generator(artefact.path("generator"), [CPU], tok.end_id, threads=2)
    limit = 20
    theirs = model.explain(sample.prompts[-1:], max_new_tokens=limit)
    ours = tok.decode(gen.generate(tok.ids(sample.prompts[-1:])[0], limit))
    assert ours == theirs[0]
    # the LM head reads the last position only (export.onnx.last_position_logits)
    logits = next(o for o in gen.sess.get_outputs() if o.name == "logits")
    assert logits.shape[1:] == [1, 49152]
    feed = {"input_ids": np.array([tok.ids(sample.prompts[:1])[0]], np.int64)}
    feed["attention_mask"] = np.ones_like(feed["input_ids"])
    feed |= {i.name: np.zeros((1, gen.cache.kv_heads, 0, gen.cache.head_dim), np.float32)
             for i in gen.sess.get_inputs() if i.name.startswith("past_key_values.")}
    if "position_ids" in gen.inputs:
        feed["position_ids"] = np.arange(feed["input_ids"].shape[1])[None]
    assert gen.sess.run(["logits"], feed)[0].shape == (1, 1, 49152)


def test_parity_beyond_tolerance_fails_the_export():
    require_parity("item_encoder", {"max_abs_diff": 5e-4}, 1e-3)
    with pytest.raises(ExportError, match="differs from PyTorch by 0.002"):
        require_parity("item_encoder", {"max_abs_diff": 2e-3, "cases": {}}, 1e-3)


def test_a_v1_artefact_is_refused_by_the_export_and_the_stream(artefact, tmp_path):
    """A v1 artefact (no score_design): the export stops before loading any weights, the stream at start."""
    d = tmp_path / "v1"
    d.mkdir()
    m = json.loads((artefact.root / "manifest.json").read_text())
    m.pop("score_design")
    m.pop("item_state")
    (d / "manifest.json").write_text(json.dumps(m))
    proc = subprocess.run([sys.executable, "-m", "export.onnx", "--model", str(d)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 1 and "no score_design (a v1 artefact" in proc.stderr and "retrain" in proc.stderr
    shutil.copytree(artefact.root / "onnx", d / "onnx", symlinks=True)
    with pytest.raises(ArtefactError, match="a v1 artefact.*retrain it with this code.*re-export"):
        Artefact.load(d, TrendConfig.from_spec(m["feature_spec"]))


def test_cli_rejects_a_directory_without_manifest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export.onnx", "--model", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "not a TRAIL artefact" in proc.stderr
