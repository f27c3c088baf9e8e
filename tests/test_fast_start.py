"""The demo's first minutes: an export that has written its score path but not yet its generator is served
(predictions now, explanations once the generator is recorded), and exports are shared across clones."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from stream.ingest.config import WorkerConfig
from stream.model.artefact import Artefact, ArtefactError, read_export, write_export
from stream.serving.config import ServingConfig

REPO = Path(__file__).resolve().parent.parent


def pending_clone(src: Path, dst: Path, pending: str = "generator") -> tuple[Path, dict]:
    """A copy of the artefact's manifest with links to its ONNX files, and the record export.onnx writes
    between the score path and the generator (the role not in "files", named in "pending")."""
    dst.mkdir(parents=True)
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    for f in (src / "onnx").rglob("*"):
        if f.is_file() and f.name != "export.json":
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).symlink_to(f)
    full = read_export(src)
    partial = {**full, "files": {k: v for k, v in full["files"].items() if k != pending}, "pending": [pending]}
    write_export(dst, partial)
    return dst, full


def test_a_pending_generator_is_served_only_when_asked_and_nothing_else_may_be_pending(artefact_dir, trend, tmp_path):
    d, _ = pending_clone(artefact_dir, tmp_path / "a")
    with pytest.raises(ArtefactError, match="under way or was interrupted.*export.onnx"):
        Artefact.load(d, trend)  # a plain load (the tests, the report, a second demo) wants the whole export
    art = Artefact.load(d, trend, pending_ok=True)
    assert art.pending == ["generator"] and not art.has("generator") and art.has("item_encoder")
    h, _ = pending_clone(artefact_dir, tmp_path / "b", pending="head")
    with pytest.raises(ArtefactError, match="head"):
        Artefact.load(h, trend, pending_ok=True)  # only the generator may follow: the score path is the first part


def test_serving_scores_without_the_generator_and_explains_once_the_export_records_it(artefact_dir, trend, tmp_path):
    from stream.serving.service import Serving

    d, full = pending_clone(artefact_dir, tmp_path / "a")
    serving = Serving(ServingConfig(model_dir=d, explain_top=2, horizon_days=7, threads=1),
                      replace(WorkerConfig(), trend=trend))
    assert serving.explainer is None and serving.scorer is not None
    assert serving.artefact.pending == ["generator"]

    async def main() -> None:
        waiter = asyncio.create_task(serving.explaining.await_generator(every_s=0.05))
        await asyncio.sleep(0.3)
        assert not waiter.done() and serving.explainer is None  # the record still says pending
        write_export(d, full)  # what export.onnx does once the generator passed its parity check
        await asyncio.wait_for(waiter, 60)
        assert serving.explainer is not None and not serving.artefact.pending and serving.artefact.has("generator")
        await serving.explainer.stop()
        serving.explainer.executor.shutdown(True)

    asyncio.run(main())
    serving.scoring._executor.shutdown(True)


def test_the_demo_exports_once_per_weights_into_the_cache(trend, tmp_path):
    from stream.model.artefact import TRAINED_FILES
    from stream.tools.demo import served_artefact, weights_key

    committed = REPO / "models" / "trail-smollm2"
    if (committed / "onnx").exists():
        pytest.skip("the committed artefact is exported in place here: the demo serves it as it is")
    model = tmp_path / "trail-smollm2"
    model.mkdir()
    for name in TRAINED_FILES:
        src = committed / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, model / name)
    cache = tmp_path / "cache"
    home = served_artefact(model, trend, cache)
    assert home.parent == cache / "exports" and home.name == f"trail-smollm2-{weights_key(model)}"
    assert sorted(p.name for p in home.iterdir()) == sorted(TRAINED_FILES)
    other_clone = tmp_path / "clone2" / "trail-smollm2"
    shutil.copytree(model, other_clone)
    assert served_artefact(other_clone, trend, cache) == home  # a second clone finds the same export
    (other_clone / "score_head.safetensors").write_bytes(b"retrained")
    assert weights_key(other_clone) != weights_key(model)  # other weights: another export
