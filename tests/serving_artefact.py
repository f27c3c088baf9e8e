"""An exported TRAIL artefact for the serving tests, built once and cached on disk.

Source: the committed models/trail-smollm2 when it exists and has this code's score design
(`item-state-v2`; used as is when its export is current), else a tiny model fitted here
(`trainer.fit --steps 2` on Online Retail II's 300 busiest items, a few minutes). The export goes to $TRAIL_CACHE/test-artefacts/<key>, where the key
hashes the trained weights and export.onnx's EXPORT_VERSION, so a changed model or export
format is exported again and an unchanged one is reused by every later run. The item states shipped
with the model (models/trail-smollm2/item_states, keyed by what they were computed from) go beside the
export as the demo puts them, so the serving tests meet the demo's start: real items' states read, not encoded.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from stream.model.artefact import TRAINED_FILES
from stream.tools.demo import copy_shipped
from shared_cache import CACHE_DIR

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "models" / "trail-smollm2"


def _export_version() -> str:
    """export.onnx's EXPORT_VERSION, read without importing torch."""
    import re

    m = re.search(r'^EXPORT_VERSION = "([^"]+)"', (REPO / "export" / "onnx.py").read_text(), re.M)
    if m is None:
        raise RuntimeError("export/onnx.py has no EXPORT_VERSION")
    return m.group(1)


def _run(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _current(directory: Path) -> bool:
    from stream.model.artefact import Artefact, ArtefactError

    try:
        art = Artefact.load(directory, _trend_of(directory))
    except ArtefactError:
        return False
    return art.onnx.get("export_version") == _export_version()  # an export of an older format is made again


def _trend_of(directory: Path):
    import json

    from stream.core.trends import TrendConfig

    return TrendConfig.from_spec(json.loads((directory / "manifest.json").read_text())["feature_spec"])


def _hash_tree(h: "hashlib._Hash", path: Path) -> None:
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        if f.name == "manifest.json":
            import json

            m = json.loads(f.read_text())
            m.pop("onnx", None)
            h.update(json.dumps(m, sort_keys=True).encode())
        else:
            h.update(f.read_bytes())


def _v2(directory: Path) -> bool:
    import json

    from stream.model.artefact import SCORE_DESIGN

    try:
        return json.loads((directory / "manifest.json").read_text()).get("score_design") == SCORE_DESIGN
    except (OSError, ValueError):
        return False


def _trained() -> Path:
    if (COMMITTED / "manifest.json").is_file() and _v2(COMMITTED):
        return COMMITTED
    # keyed by the trainer's model code: a changed head or LoRA layout cannot load an older fit's weights
    code = hashlib.sha256(b"".join((REPO / "trainer" / f).read_bytes() for f in ("model.py", "fit.py")))
    target = CACHE_DIR / "test-artefacts" / f"tiny-retail-fit-v2-{code.hexdigest()[:12]}"
    if not (target / "manifest.json").is_file():
        for old in target.parent.glob("tiny-retail-fit*"):  # one tiny fit on disk
            if old.is_dir() and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["trainer.fit", "--dataset", "retail", "--out", str(tmp), "--steps", "2", "--max-train-cutoffs", "8",
              "--max-valid-cutoffs", "2", "--max-items", "300", "--budget-minutes", "2", "--version", "trail-test-tiny"])
        shutil.rmtree(tmp / "checkpoint", ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def exported_artefact() -> Path:
    """Path to an exported artefact (item encoder, score head, generator, tokenizer)."""
    root = CACHE_DIR / "test-artefacts"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one exporter at a time (pytest-xdist, parallel CI jobs)
        source = _trained()
        if source == COMMITTED and _current(COMMITTED):
            return COMMITTED
        h = hashlib.sha256()
        for name in TRAINED_FILES:
            if (source / name).exists():
                _hash_tree(h, source / name)
        h.update(_export_version().encode())
        target = root / f"export-{h.hexdigest()[:16]}"
        if (target / "manifest.json").is_file() and _current(target):
            copy_shipped(source, target)
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in TRAINED_FILES:
            src = source / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.exists():
                shutil.copy2(src, tmp / name)
        _run(["export.onnx", "--model", str(tmp), "--prompts", "12", "--explain", "3"])
        copy_shipped(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in root.glob("export-*"):  # keep the disk bounded: one export per model
            if old != target and old.is_dir() and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
        return target


if __name__ == "__main__":
    print(exported_artefact(), file=sys.stdout)
    os._exit(0)
