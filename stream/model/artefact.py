"""A TRAIL model artefact as the stream serves it: manifest checks, features, tokenizer. No torch.

`python -m export.onnx --model DIR` writes `DIR/onnx/` and records every file it wrote
(path, size, sha256, parity figures) beside them, in `DIR/onnx/export.json` (git-ignored with the
files it describes: the committed manifest.json is the trainer's and an export leaves it as it is).
`Artefact.load` reads both back (the record as the manifest's "onnx" section) and refuses, with a message that says what to do, an artefact that

- has no manifest, or a manifest that is not valid JSON or lacks a field;
- was trained on another feature spec (`TrendConfig.spec()`), prompt version
  (`stream.core.prompts.PROMPT_VERSION`), score design (`SCORE_DESIGN`: item states + a head; a v1
  artefact with one prompt-reading score path is refused: retrain and re-export it) or item-text
  version (`stream.core.prompts.ITEM_TEXT_VERSION`) than this code computes;
- was never exported, or whose ONNX files are missing, truncated or altered
  (size and sha256 are checked, so a corrupt file fails at start, not at the first tick).

`features()` is the trainer's own normalisation (`stream.core.features.Normalisation`:
signed log1p, then the training mean/std recorded in the manifest), and `PromptTokenizer`
the serving copy of `Trail.encode_prompts` (and, truncated at `max_item_tokens`, of
`Trail.encode_items`) on the `tokenizers` library (Rust), tested to produce exactly what the
trainer produces.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream.core.features import FeatureError, Normalisation
from stream.core import prompts as _prompts
from stream.core.prompts import PROMPT_VERSION
from stream.core.trends import TrendConfig

MANIFEST = "manifest.json"
ONNX_DIR = "onnx"
# what training writes (trainer.fit; trainer.quantiles the range head, when there is one), before any export
RANGE_WEIGHTS = "range_head.safetensors"
RANGE_ONNX = "range_head.onnx"  # in ONNX_DIR: export.range's graph of the range head
RANGE_PARITY = "range_head.onnx.json"  # in ONNX_DIR: export.range's parity record, with the weights' sha256
TRAINED_FILES = (MANIFEST, "score_head.safetensors", "adapter", RANGE_WEIGHTS, "range_head.json")
EXPORT_RECORD = "export.json"  # in ONNX_DIR: what export.onnx wrote (files, parity, tokenizer), beside the files
END_TOKEN = "<|im_end|>"

# What the score is made of (docs/model.md): the LLM encodes each item's text once into a state,
# a small head combines it with the trend signals every tick. The manifest's "score_design" must say so.
SCORE_DESIGN = "item-state-v2"
DEFAULT_MAX_ITEM_TOKENS = 32
# Files export.onnx writes, by role (the export record's "files" maps role -> record).
ROLES = ("item_encoder", "head", "generator", "tokenizer")
REQUIRED_ROLES = ROLES
# export.onnx writes the score path first and records it with the generator "pending" while it exports that:
# a stream may serve predictions from such a record (`Artefact.load(..., pending_ok=True)`) and explain later.
# With --head-first it records the head alone first (the item encoder and tokenizer pending too): a scorer
# that has its items' states shipped with the artefact (stream.model.item_states) scores from it meanwhile.
DEFERRABLE_ROLES = ("generator", "item_encoder", "tokenizer")


def item_text_version() -> str | None:
    """The item-text version this code renders (stream.core.prompts.ITEM_TEXT_VERSION), if it has one."""
    v = getattr(_prompts, "ITEM_TEXT_VERSION", None)
    return None if v is None else str(v)


class ArtefactError(RuntimeError):
    """The model artefact cannot be served; the message says why and what to do."""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_export(root: str | Path) -> dict[str, Any]:
    """The export record of an artefact (DIR/onnx/export.json); {} when it was never exported."""
    path = Path(root) / ONNX_DIR / EXPORT_RECORD
    if not path.is_file():
        return {}
    return _json_object(path, "export again")


def _json_object(path: Path, remedy: str) -> dict[str, Any]:
    """A JSON object read from `path`; anything else is an ArtefactError ending with `remedy`."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtefactError(f"{path} is not valid JSON ({e}); {remedy}") from e
    if not isinstance(data, dict):
        raise ArtefactError(f"{path} is not a JSON object; {remedy}")
    return data


def write_export(root: str | Path, record: dict[str, Any]) -> Path:
    """Write the export record atomically (a new file, never through a link to another artefact's)."""
    path = Path(root) / ONNX_DIR / EXPORT_RECORD
    tmp = path.with_name(f".{EXPORT_RECORD}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def file_record(root: Path, path: Path) -> dict[str, Any]:
    """What the export record says about one exported file (path relative to the artefact)."""
    return {"path": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied by its decode when the tokenizer asks for it)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


class PromptTokenizer:
    """Right-padded prompt ids, as `Trail.encode_prompts`; decoding, as `Trail.explain`."""

    def __init__(self, path: Path, max_prompt_tokens: int, clean_up_spaces: bool) -> None:
        from tokenizers import Tokenizer  # the Rust library; no transformers, no torch

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            raise ArtefactError(f"{path}: not a readable tokenizer.json ({e})") from e
        self.tok.no_truncation()
        self.tok.no_padding()
        end = self.tok.token_to_id(END_TOKEN)
        if end is None:
            raise ArtefactError(f"{path}: the tokenizer has no {END_TOKEN} token")
        self.end_id = end
        self.max_prompt_tokens = max_prompt_tokens
        self.clean_up_spaces = clean_up_spaces

    def ids(self, prompts: list[str]) -> list[list[int]]:
        return [e.ids[: self.max_prompt_tokens] for e in self.tok.encode_batch(prompts)]

    def pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) int64 ids right-padded with the end token, (B, T) int64 mask."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.end_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.ids(prompts))

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True)
        return (clean_up_tokenization(text) if self.clean_up_spaces else text).strip()


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: artefact {a.get(k)!r} vs stream {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class Artefact:
    root: Path
    manifest: dict[str, Any]

    # ---- loading and validation -----------------------------------------------
    @classmethod
    def load(cls, root: str | Path, trend: TrendConfig, prompt_version: str = PROMPT_VERSION,
             verify: bool = True, pending_ok: bool = False) -> Artefact:
        """Read and check an exported artefact against the stream's `trend` windows (the caller's settings);
        every failure is an ArtefactError saying what to do. `pending_ok`: accept an export still writing
        its generator (the record's "pending"; `pending` then names it), the score path complete."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise ArtefactError(f"model directory {root} does not exist (set TRAIL_MODEL_DIR to a TRAIL artefact)")
        if not path.is_file():
            raise ArtefactError(f"{root} is not a TRAIL model artefact: no {MANIFEST}")
        manifest = _json_object(path, "the artefact is corrupt")
        missing = [k for k in ("model_version", "feature_spec", "normalisation", "prompt_version", "trail_config",
                               "horizon_days") if k not in manifest]
        if missing:
            raise ArtefactError(f"{path} lacks {', '.join(missing)}; not a TRAIL artefact or written by an older trainer")
        art = cls(root, {**manifest, "onnx": read_export(root)})
        art.check_design()
        art.check_compatible(trend, prompt_version)
        art.check_files(verify, pending_ok)
        return art

    def check_design(self) -> None:
        """The score design and item-text version this code serves (a v1 artefact has neither)."""
        design = self.manifest.get("score_design")
        if design != SCORE_DESIGN:
            found = "no score_design (a v1 artefact: one LLM score path over the whole prompt)" if design is None \
                else f"score_design {design!r}"
            raise ArtefactError(
                f"model {self.model_version} at {self.root} has {found}; this stream serves score_design "
                f"{SCORE_DESIGN!r} (item states + score head): retrain it with this code (python -m trainer.fit), "
                f"then re-export the new artefact to ONNX")
        state = self.manifest.get("item_state")
        if not isinstance(state, dict) or not isinstance(state.get("hidden_size"), int):
            raise ArtefactError(f"model {self.model_version}: the manifest's item_state section is missing or lacks "
                                f"hidden_size; retrain / re-export it")
        if state.get("pooling", "mean") != "mean":
            raise ArtefactError(f"model {self.model_version} pools item states by {state.get('pooling')!r}; this "
                                f"stream's encoder export is mean-pooled: retrain it")
        ours = item_text_version()
        if ours is not None and state.get("text_version") != ours:
            raise ArtefactError(
                f"model {self.model_version} encodes item text version {state.get('text_version')!r}, this stream "
                f"renders {ours!r} (stream.core.prompts.ITEM_TEXT_VERSION): retrain the model, or serve it with the "
                f"code it was trained with")

    def check_compatible(self, trend: TrendConfig, prompt_version: str) -> None:
        ours = trend.spec()
        theirs = self.manifest["feature_spec"]
        if theirs != ours:
            raise ArtefactError(
                f"model {self.model_version} was trained on another feature spec than this stream computes "
                f"({'; '.join(_diff(theirs, ours))}). Serve it with the trend settings it was trained with "
                f"(TRAIL_BUCKET_S, TRAIL_WINDOWS, TRAIL_EMA_HALFLIFE_S, TRAIL_DECAYS) or retrain it."
            )
        if self.manifest["prompt_version"] != prompt_version:
            raise ArtefactError(
                f"model {self.model_version} was trained on prompt version {self.manifest['prompt_version']!r}, "
                f"this stream renders {prompt_version!r} (stream.core.prompts.PROMPT_VERSION): retrain the model, "
                f"or serve it with the code it was trained with."
            )
        names = self.manifest["normalisation"].get("names", [])
        if list(names[:-1]) != list(trend.signal_names):
            raise ArtefactError(f"model {self.model_version} reads signals {names[:-1]}, the stream computes "
                                f"{list(trend.signal_names)}")

    def check_files(self, verify: bool = True, pending_ok: bool = False) -> None:
        onnx = self.manifest.get("onnx") or {}
        files = onnx.get("files") or {}
        if not files:
            raise ArtefactError(f"model {self.model_version} at {self.root} has no ONNX export: "
                                f"run `python -m export.onnx --model {self.root}` first")
        pending = self.pending
        if pending and not (pending_ok and set(pending) <= set(DEFERRABLE_ROLES)):
            raise ArtefactError(f"{self.root}: the export of {', '.join(pending)} is under way or was interrupted; "
                                f"wait for it, or run `python -m export.onnx --model {self.root}` again")
        absent = [r for r in REQUIRED_ROLES if r not in files and r not in pending]
        if absent:
            raise ArtefactError(f"{self.root}: the export lacks {', '.join(absent)}; run `python -m export.onnx "
                                f"--model {self.root}` again")
        for role, rec in files.items():
            path = self.root / rec["path"]
            if not path.is_file():
                raise ArtefactError(f"{path} ({role}) is missing; run `python -m export.onnx --model {self.root}` again")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise ArtefactError(f"{path} ({role}) is {size} bytes, the export wrote {rec['bytes']}: the file is "
                                    f"truncated or was replaced; export again")
            if verify and sha256_of(path) != rec["sha256"]:
                raise ArtefactError(f"{path} ({role}) does not match the sha256 the export recorded: the file is "
                                    f"corrupt; export again")
        # a range head (trainer.quantiles) is served from its export (export.range, run by export.onnx)
        weights = self.root / RANGE_WEIGHTS
        if weights.is_file() and not (self.root / ONNX_DIR / RANGE_ONNX).is_file():
            raise ArtefactError(f"{self.root} has a range head but an export without it (an export from before "
                                f"the range head was added); run `python -m export.onnx --model {self.root}` again")
        if weights.is_file():
            self.check_range_source(weights)

    def check_range_source(self, weights: Path) -> None:
        """The range head's export must come from the weights beside it: a range head retrained after the export
        (trainer.quantiles) would otherwise be served as the old one, with the new one's calibration offsets."""
        record_path = self.root / ONNX_DIR / RANGE_PARITY
        try:
            source = json.loads(record_path.read_text()).get("source") or {}
        except (OSError, ValueError) as e:
            raise ArtefactError(f"{record_path} is unreadable ({e}); run `python -m export.onnx --model {self.root}` "
                                f"again") from None
        if source.get(RANGE_WEIGHTS) != sha256_of(weights):
            why = "its record names no weights" if not source else "its record names other weights"
            raise ArtefactError(f"{self.root}: the range head's export does not come from {RANGE_WEIGHTS} ({why}: a "
                                f"range head retrained after the export); run `python -m export.onnx --model "
                                f"{self.root}` again, or `python -m export.range --model {self.root}` for the range "
                                f"head alone (seconds)")

    # ---- what the serving code reads -------------------------------------------------
    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def onnx(self) -> dict[str, Any]:
        return self.manifest.get("onnx") or {}

    @property
    def pending(self) -> list[str]:
        """Roles the export has not written yet (it writes the score path first, then the generator)."""
        return list(self.onnx.get("pending") or [])

    def has(self, role: str) -> bool:
        return role in self.onnx.get("files", {})

    def path(self, role: str) -> Path:
        rec = self.onnx.get("files", {}).get(role)
        if rec is None:
            raise ArtefactError(f"{self.root}: the export has no {role} file")
        return self.root / rec["path"]

    def parity(self, role: str) -> dict[str, Any]:
        return self.onnx.get("parity", {}).get(role, {})

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.manifest["trail_config"].get("max_prompt_tokens", 80))

    @property
    def max_item_tokens(self) -> int:
        return int(self.manifest["trail_config"].get("max_item_tokens", DEFAULT_MAX_ITEM_TOKENS))

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["item_state"]["hidden_size"])

    @property
    def max_explanation_tokens(self) -> int:
        return int(self.manifest["trail_config"].get("max_explanation_tokens", 48))

    def features(self) -> Normalisation:
        try:
            return Normalisation.from_dict(self.manifest["normalisation"])
        except (FeatureError, KeyError, TypeError, ValueError) as e:
            raise ArtefactError(f"model {self.model_version}: manifest normalisation is unusable ({e}); "
                                f"the artefact is corrupt") from e

    def tokenizer(self) -> PromptTokenizer:
        tok = self.onnx.get("tokenizer", {})
        return PromptTokenizer(self.path("tokenizer"), self.max_prompt_tokens,
                               bool(tok.get("clean_up_tokenization_spaces", False)))

    def item_tokenizer(self) -> PromptTokenizer:
        """Item texts -> ids as `Trail.encode_items` (truncated at max_item_tokens)."""
        tok = self.onnx.get("tokenizer", {})
        return PromptTokenizer(self.path("tokenizer"), self.max_item_tokens,
                               bool(tok.get("clean_up_tokenization_spaces", False)))

    def horizon_days(self, requested: float | None = None) -> int:
        """The forecast horizon to serve: `requested` (TRAIL_HORIZON_DAYS), else the artefact's only one."""
        known = sorted({int(round(float(v))) for v in self.manifest["horizon_days"].values()})
        if requested is not None:
            h = int(round(float(requested)))
            if h not in known:
                raise ArtefactError(f"horizon {requested} d: model {self.model_version} was trained on horizons "
                                    f"{known} d only (set TRAIL_HORIZON_DAYS to one of them)")
            return h
        if len(known) != 1:
            by_set = ", ".join(f"{k}: {v}" for k, v in sorted(self.manifest["horizon_days"].items()))
            raise ArtefactError(f"model {self.model_version} was trained on several horizons ({by_set}); "
                                f"set TRAIL_HORIZON_DAYS to the one of the data this stream serves")
        return known[0]
