"""The export writes its record beside the ONNX files (DIR/onnx/export.json, git-ignored with them) and
leaves the trainer's manifest.json as it is, so running the demo (which exports the committed model once)
leaves a clone exactly as cloned; stream.model.artefact reads the record from there."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from serving_artefact import COMMITTED, exported_artefact
from stream.core.trends import TrendConfig
from stream.model.artefact import EXPORT_RECORD, ONNX_DIR, ROLES, Artefact, ArtefactError, read_export, sha256_of

REPO = Path(__file__).resolve().parents[1]


def test_the_export_record_lies_beside_the_onnx_files_and_the_manifest_is_untouched():
    d = exported_artefact()
    manifest = json.loads((d / "manifest.json").read_text())
    assert "onnx" not in manifest  # the trainer's manifest, as trainer.fit wrote it
    if d != COMMITTED:  # a copy of the committed weights exported in the cache: its manifest is the committed one
        assert (d / "manifest.json").read_bytes() == (COMMITTED / "manifest.json").read_bytes()  # byte for byte
    record = json.loads((d / ONNX_DIR / EXPORT_RECORD).read_text())
    assert set(ROLES) <= set(record["files"]) and record["export_version"] == "5"
    for role, rec in record["files"].items():
        assert (d / rec["path"]).stat().st_size == rec["bytes"] and sha256_of(d / rec["path"]) == rec["sha256"], role
    art = Artefact.load(d, TrendConfig.from_spec(manifest["feature_spec"]))
    assert art.onnx == record == read_export(d)


def test_the_record_is_git_ignored_and_the_committed_manifest_has_no_export_section():
    assert "onnx" not in json.loads((COMMITTED / "manifest.json").read_text())
    assert "embed_dim" not in json.loads((COMMITTED / "manifest.json").read_text())["trail_config"]
    ignored = subprocess.run(["git", "check-ignore", "-q", f"models/trail-smollm2/{ONNX_DIR}/{EXPORT_RECORD}"],
                             cwd=REPO)
    assert ignored.returncode == 0, "the export record must be git-ignored with the ONNX files"


def test_an_artefact_without_its_record_is_not_exported(tmp_path):
    d = exported_artefact()
    copy = tmp_path / "a"  # the manifest copied, the ONNX files linked (cheap), no export record
    (copy / ONNX_DIR).mkdir(parents=True)
    shutil.copy(d / "manifest.json", copy / "manifest.json")
    for f in (d / ONNX_DIR).iterdir():
        if f.name != EXPORT_RECORD:
            (copy / ONNX_DIR / f.name).symlink_to(f)
    trend = TrendConfig.from_spec(json.loads((copy / "manifest.json").read_text())["feature_spec"])
    with pytest.raises(ArtefactError, match="has no ONNX export: run `python -m export.onnx"):
        Artefact.load(copy, trend)
    (copy / ONNX_DIR / EXPORT_RECORD).write_text("{")
    with pytest.raises(ArtefactError, match="is not valid JSON"):
        Artefact.load(copy, trend)


def test_the_range_head_export_lies_in_the_onnx_folder_and_a_stale_export_is_refused(tmp_path):
    """The committed model has a range head: its weights are committed, its ONNX export (export.range, run by
    export.onnx) goes to the git-ignored onnx/ folder, so the demo's export leaves `git status` empty."""
    assert (COMMITTED / "range_head.safetensors").is_file() and (COMMITTED / "range_head.json").is_file()
    for name in ("range_head.onnx", "range_head.onnx.json"):
        assert subprocess.run(["git", "check-ignore", "-q", f"models/trail-smollm2/{ONNX_DIR}/{name}"],
                              cwd=REPO).returncode == 0
    d = exported_artefact()
    assert (d / ONNX_DIR / "range_head.onnx").is_file() and (d / ONNX_DIR / "range_head.onnx.json").is_file()
    assert not (d / "range_head.onnx").exists() and not (d / "range_head.onnx.json").exists()
    copy = tmp_path / "a"  # an export from before the range head: every file but range_head.onnx
    (copy / ONNX_DIR).mkdir(parents=True)
    for f in d.iterdir():
        if f.is_file():
            shutil.copy(f, copy / f.name)
    for f in (d / ONNX_DIR).iterdir():
        if not f.name.startswith("range_head"):
            (copy / ONNX_DIR / f.name).symlink_to(f)
    trend = TrendConfig.from_spec(json.loads((copy / "manifest.json").read_text())["feature_spec"])
    with pytest.raises(ArtefactError, match="has a range head but an export without it"):
        Artefact.load(copy, trend, verify=False)
    # a range head retrained after the export (trainer.quantiles) is not served as the old one
    for f in (d / ONNX_DIR).iterdir():
        if f.name.startswith("range_head"):
            shutil.copy(f, copy / ONNX_DIR / f.name)
    Artefact.load(copy, trend, verify=False)  # the export of these very weights
    weights = copy / "range_head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtefactError, match="names other weights.*export.range --model"):
        Artefact.load(copy, trend, verify=False)
    record = copy / ONNX_DIR / "range_head.onnx.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "source"}))
    with pytest.raises(ArtefactError, match="names no weights"):
        Artefact.load(copy, trend, verify=False)
