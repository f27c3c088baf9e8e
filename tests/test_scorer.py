"""The serving side of the model: artefact checks (refuse to start), features, providers, scoring, ranking."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from stream.config import WorkerConfig
from stream.serving.artefact import Artefact, ArtefactError, Features
from stream.serving.onnx_models import CPU, CUDA, choose_providers
from stream.serving.scorer import ItemInfo, ScoredPart, TickScorer, rank_tick
from stream.serving.service import Serving, ServingConfig
from stream.core.trends import Signals, TrendConfig
from serving_artefact import exported_artefact


@pytest.fixture(scope="module")
def artefact_dir() -> Path:
    return exported_artefact()


@pytest.fixture(scope="module")
def trend(artefact_dir) -> TrendConfig:
    return TrendConfig.from_spec(json.loads((artefact_dir / "manifest.json").read_text())["feature_spec"])


@pytest.fixture(scope="module")
def scorer(artefact_dir, trend) -> TickScorer:
    return TickScorer(Artefact.load(artefact_dir, trend), top_n=12, variant="fp32", provider="cpu", horizon_days=7,
                      threads=2)


@pytest.fixture(scope="module")
def retail_cutoff(trend):
    """The signals of every candidate at a real Online Retail II cut-off, with titles."""
    from stream.core.datasets import load_dataset
    from trainer.examples import build_examples

    ds = load_dataset("retail")
    ex = build_examples(ds, trend, horizon_days=7)
    rows = ex.rows(ex.cutoffs[-3:-2])
    names = trend.signal_names
    signals = Signals(int(rows["cutoff_ms"].iloc[0]), rows["item_id"].tolist(), names,
                      rows[list(names)].to_numpy(np.float64))
    items = {i: ItemInfo(t if isinstance(t, str) else None, c if isinstance(c, str) else None)
             for i, t, c in zip(rows["item_id"], rows["title"], rows["category"])}
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
    m = json.loads((directory / "manifest.json").read_text())
    fn(m)
    (directory / "manifest.json").write_text(json.dumps(m))


# ---- refuse to start --------------------------------------------------------------------------------

def test_a_sound_artefact_loads(artefact_dir, trend):
    art = Artefact.load(artefact_dir, trend)
    assert art.has("score.fp32") and art.has("numeric") and art.has("generator") and art.has("tokenizer")
    assert art.horizon_days(7) == 7


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
    numeric = d / "onnx" / "numeric.onnx"
    expected = {
        "no_dir": "does not exist", "no_manifest": "no manifest.json", "bad_json": "not valid JSON",
        "not_exported": "run `python -m export.onnx", "missing_file": "numeric.onnx.*missing",
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
            from stream.serving.artefact import sha256_of

            edit_manifest(d, lambda m: m["onnx"]["files"]["numeric"].update(sha256=sha256_of(numeric)))
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
        sc = TickScorer(Artefact.load(artefact_dir, trend), top_n=4, horizon_days=7)
    assert sc.provider == CPU
    assert sc.variant == ("int8" if Artefact.load(artefact_dir, trend).has("score.int8") else "fp32")
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
    from trainer.model import Normalisation

    m = json.loads((artefact_dir / "manifest.json").read_text())
    raw = np.random.default_rng(0).normal(0, 50, (200, len(m["normalisation"]["names"])))
    raw[:, ::3] = np.abs(raw[:, ::3]).round()
    assert np.array_equal(Features.from_manifest(m["normalisation"]).apply(raw), Normalisation(**m["normalisation"]).apply(raw))


def test_tick_scores_equal_trainer_score_frame(artefact_dir, scorer, retail_cutoff):
    """Stream scoring of a tick == the trainer's scoring of the same cut-off (prompts, prior, LLM path)."""
    from trainer.inference import score_frame
    from trainer.model import load

    rows, signals, items = retail_cutoff
    model, _ = load(artefact_dir)
    expected = score_frame(model, rows, 7.0, top_n=scorer.top_n, progress=False)
    preds = rank_tick([scorer.score(signals.as_of_ms, signals, items)], scorer.top_n, 0, scorer.model_version)
    got = {p.item_id: p.score for p in preds}
    assert len(got) == len(rows)
    diff = np.abs(np.array([got[i] for i in rows["item_id"]]) - expected) / np.maximum(1.0, np.abs(expected))
    assert diff.max() < 1e-4
    assert sorted(p.rank for p in preds) == list(range(1, len(rows) + 1))
    assert scorer.stats.last["llm_items"] == scorer.top_n


def test_several_workers_rank_as_one(scorer, retail_cutoff):
    """Parts scored per partition and merged give the single-process ranking, also when truncated."""
    from stream.replay import _partition_for

    _, signals, items = retail_cutoff
    whole = rank_tick([scorer.score(signals.as_of_ms, signals, items)], scorer.top_n, 0, scorer.model_version)
    part_of = np.array([_partition_for(i.encode(), 3) for i in signals.item_ids])
    for publish_top in (0, 20):
        parts = []
        scorer.publish_top = publish_top  # each part keeps its local top (top_n + publish_top) by the prior
        try:
            for p in range(3):
                idx = np.flatnonzero(part_of == p)
                sub = Signals(signals.as_of_ms, [signals.item_ids[i] for i in idx], signals.names, signals.values[idx])
                part = scorer.score(signals.as_of_ms, sub, items, partitions=[p], total_partitions=3)
                if publish_top:
                    assert len(part.item_ids) <= scorer.top_n + publish_top
                parts.append(ScoredPart.from_messages([json.loads(m) for m in part.messages(chunk=50)]))
        finally:
            scorer.publish_top = 0
        merged = rank_tick(parts, scorer.top_n, publish_top, scorer.model_version)
        expect = whole[:publish_top] if publish_top else whole
        assert [(p.item_id, p.rank) for p in merged] == [(p.item_id, p.rank) for p in expect]
        assert np.allclose([p.score for p in merged], [p.score for p in expect], rtol=1e-6, atol=1e-5)
        assert merged[0].signals == expect[0].signals


def test_an_empty_tick(scorer, trend):
    empty = Signals(0, [], trend.signal_names, np.zeros((0, len(trend.signal_names))))
    assert rank_tick([scorer.score(0, empty)], scorer.top_n, 0, scorer.model_version) == []


def test_serving_config_from_env(tmp_path):
    cfg = ServingConfig.from_env({"TRAIL_MODEL_DIR": str(tmp_path), "TRAIL_SCORE_TOP_N": "7", "TRAIL_PROVIDER": "cpu",
                                  "TRAIL_HORIZON_DAYS": "7", "TRAIL_EXPLAIN_BY": "rank_jump"})
    assert (cfg.model_dir, cfg.top_n, cfg.provider, cfg.horizon_days, cfg.explain_by) == (tmp_path, 7, "cpu", 7.0,
                                                                                          "rank_jump")
    with pytest.raises(ValueError, match="TRAIL_SCORE_TOP_N"):
        ServingConfig.from_env({"TRAIL_SCORE_TOP_N": "many"})


def test_serving_path_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import stream.serving.service, stream.serving.scorer, stream.serving.explainer, stream.ingest.catalogue, "
            "stream.serving.artefact, stream.serving.onnx_models; "
            "print([m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'trainer', 'export', 'optimum', 'peft')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
