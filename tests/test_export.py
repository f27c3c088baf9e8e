"""export.onnx: what it records, and parity of the ONNX files with PyTorch, re-checked independently here.

The export itself (tests/serving_artefact.py, cached) already fails beyond its tolerances; these
tests re-check at shapes the export did not use, and the tokenizer on edge cases.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx import TOLERANCE, ExportError, require_parity
from stream.serving.artefact import Artefact, sha256_of
from stream.serving.onnx_models import CPU, Generator, NumericModel, ScoreModel
from stream.core.prompts import render_prompt
from stream.core.trends import TrendConfig
from serving_artefact import exported_artefact


@pytest.fixture(scope="module")
def artefact() -> Artefact:
    d = exported_artefact()
    return Artefact.load(d, TrendConfig.from_spec(json.loads((d / "manifest.json").read_text())["feature_spec"]))


@pytest.fixture(scope="module")
def model(artefact):
    from trainer.model import load

    m, _ = load(artefact.root)  # LoRA not merged: the model as trained
    return m


@pytest.fixture(scope="module")
def prompts(artefact, model) -> tuple[list[str], np.ndarray]:
    from export.onnx import sample_prompts
    from trainer.model import Manifest

    s = sample_prompts(model, Manifest.load(artefact.root), 10, seed=7)
    return s.prompts, s.features


def test_manifest_records_files_and_parity(artefact):
    onnx = artefact.onnx
    for role, rec in onnx["files"].items():
        path = artefact.root / rec["path"]
        assert path.stat().st_size == rec["bytes"] and sha256_of(path) == rec["sha256"], role
    parity = onnx["parity"]
    assert parity["tokenizer"]["identical"] == parity["tokenizer"]["prompts"] > 0
    assert parity["score.fp32"]["max_scaled_diff"] <= TOLERANCE["fp32"]
    shapes = parity["score.fp32"]["shapes"].values()
    assert len({b for b, _ in shapes}) >= 3 and len({t for _, t in shapes}) >= 3  # not only the traced shape
    assert parity["numeric"]["max_abs_diff"] <= 1e-5
    assert parity["generator"]["identical"] == parity["generator"]["prompts"] > 0
    assert "score.int8" in parity
    if "score.int8" in onnx["files"]:
        assert parity["score.int8"]["max_scaled_diff"] <= TOLERANCE["int8"]
    else:
        assert "rejected" in parity["score.int8"]
    assert onnx["tokenizer"]["end_token"] == "<|im_end|>"


def test_score_path_matches_pytorch_at_new_shapes(artefact, model, prompts):
    texts, x = prompts
    tok = artefact.tokenizer()
    sess = ScoreModel(artefact.path("score.fp32"), [CPU], threads=2)
    rows = tok.ids(texts)
    for b, cut in ((2, None), (7, None), (4, 15), (1, 6)):
        sel = [r[:cut] if cut else r for r in rows[:b]]
        ids, mask = tok.pad(sel)
        with torch.no_grad():
            ref = model.score(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(x[:b])).numpy()
        scaled = np.abs(sess(ids, mask, x[:b]) - ref) / np.maximum(1.0, np.abs(ref))
        assert scaled.max() <= TOLERANCE["fp32"], (b, cut)
    # right padding does not change a row's score: alone or next to a longer row, the same
    alone = sess(*tok.pad([rows[0][:12]]), x[:1])
    padded = sess(*tok.pad([rows[0][:12], rows[1]]), x[:2])[:1]
    assert np.abs(alone - padded).max() / max(1.0, abs(float(alone[0]))) < 1e-4


def test_numeric_branch_matches(artefact, model, prompts):
    _, x = prompts
    with torch.no_grad():
        ref = model.head.numeric(torch.from_numpy(x)).squeeze(-1).numpy()
    assert np.abs(NumericModel(artefact.path("numeric"))(x) - ref).max() <= 1e-5


def test_tokenizer_gives_trail_encode_prompts_ids(artefact, model, prompts):
    texts, _ = prompts
    edge = [
        render_prompt("Doormat “Happy Christmas” – red/green, 60×40 cm — very long title indeed", "Home, garden",
                      {**{f"{k}_{w}": 3.0 for k in ("count", "prev_count", "users", "velocity", "accel")
                          for w in ("1d", "7d", "28d")}, "age_h": 30.0}, 7, month="Dec"),
        "x " * 300,  # longer than max_prompt_tokens: truncated the same way
        "Item: 12345\n1d:0 events",
    ]
    tok = artefact.tokenizer()
    for batch in (texts, edge, texts[:1]):
        ids, mask = model.encode_prompts(batch)
        ours, our_mask = tok.encode(batch)
        assert np.array_equal(ours, ids.numpy()) and np.array_equal(our_mask, mask.numpy())
    assert tok.ids(["x " * 300])[0].__len__() == artefact.max_prompt_tokens
    assert tok.ids(texts[:1])[0][0] == model.tokenizer("a").input_ids[0]  # BOS, as the trainer


def test_decode_matches_transformers(artefact, model):
    tok = artefact.tokenizer()
    for text in (" Rising: 41 sales in the last 7 days , up from 12 . It's not slowing", " Flat ; 3 users ! Isn't it ?"):
        ids = model.tokenizer(text, add_special_tokens=False).input_ids + [tok.end_id]
        assert tok.decode(ids) == model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_generator_is_greedy_trail_explain(artefact, model, prompts):
    texts, _ = prompts
    tok = artefact.tokenizer()
    gen = Generator(artefact.path("generator"), [CPU], tok.end_id, threads=2)
    limit = 20
    theirs = model.explain(texts[-1:], max_new_tokens=limit)
    ours = tok.decode(gen.generate(tok.ids(texts[-1:])[0], limit))
    assert ours == theirs[0]


def test_parity_beyond_tolerance_fails_the_export():
    require_parity("score.fp32", {"max_abs_diff": 5e-4}, 1e-3)
    with pytest.raises(ExportError, match="differs from PyTorch by 0.002"):
        require_parity("score.fp32", {"max_abs_diff": 2e-3, "cases": {}}, 1e-3)


def test_cli_rejects_a_directory_without_manifest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export.onnx", "--model", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2 and "not a TRAIL artefact" in proc.stderr
