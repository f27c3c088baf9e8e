"""Trained TRAIL artefact -> the ONNX files the stream serves, with parity checks against PyTorch.

    python -m export.onnx --model models/trail-smollm2

Writes into DIR/onnx/ and records every file (size, sha256) and every parity figure beside them, in
DIR/onnx/export.json (stream.model.artefact reads it; the trainer's manifest.json is left as it is):

  item_encoder.onnx  the item state: decoder (LoRA merged), last hidden layer mean-pooled over the
                     item text's tokens (BOS left out). Inputs input_ids, attention_mask (B, T) int64;
                     output item_state (B, H) float32. Batch and sequence axes are dynamic. The stream
                     runs it once per item (cached). No LM head.
  head.onnx          the score head: x (B, S) normalised signals + horizon, item_state (B, H) ->
                     score (B,) ranking score, log_count (B,) predicted log1p(count). Dynamic batch.
  generator/model.onnx  optimum's text-generation-with-past export of the merged model, for
                     the explanations (greedy, serving loop in stream.model.onnx_models.Generator);
                     its logits are the last position's only, (B, 1, V) (`last_position_logits`)
  tokenizer.json     the tokenizer the model was trained with (the `tokenizers` library reads it)

Parity, on real items (the last cut-off of each training dataset: the numeric part's top items
plus a random sample): the serving tokenizer must give exactly `Trail.encode_prompts`' and
`Trail.encode_items`' ids; ONNX item states vs PyTorch `Trail.item_state` (the unmerged LoRA
model, as trained) on the real item texts and at every B x T of ENCODER_BATCHES x
ENCODER_LENGTHS with padding (not only the traced shape); the ONNX head vs the PyTorch head
at HEAD_BATCHES; and end to end, head.onnx on item_encoder.onnx's states vs the PyTorch model's
score and log_count. Every figure is recorded and the export fails beyond its tolerance.
The item encoder and the head are fp32 only (dynamic int8 passed on one machine and failed on
another, its error depending on the CPU's kernels; the item encoder runs once per item, so its speed
matters far less than the per-tick path did). Greedy explanations of the ONNX generator must
equal `Trail.explain`'s. With `--generator-int8` the export also writes generator.int8/model.onnx,
a dynamic int8 copy of the generator that the stream serves on CPU when present; its greedy
identity with torch is measured and recorded (parity "generator.int8"), not required. Its error depends on
the CPU's integer kernels; `--generator-nbits 8` (export.nbits: weight-only 8-bit MatMulNBits) writes
generator.nbits/model.onnx, checked against the fp32 generator by teacher forcing (parity "generator.nbits",
required), which the stream serves first once the same check passes on its own CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
import torch.nn as nn
from tqdm import tqdm

from export.range import export_range
from stream.model.artefact import MANIFEST, ONNX_DIR, PromptTokenizer, file_record, sha256_of, write_export
from stream.model.artefact import SCORE_DESIGN, DEFAULT_MAX_ITEM_TOKENS
from stream.model.onnx_models import CPU, Generator, ItemEncoder, ScoreHeadModel
from trainer.model import ADAPTER_DIR, HEAD_FILE, Manifest, Trail
from trainer.quantiles import RANGE_FILE

log = structlog.get_logger(__name__)

OPSET = 17
EXPORT_VERSION = "5"  # bump when the files or the export record change shape (4: onnx/export.json; 5: the range
# head's parity record carries the sha256 of its weights, Artefact.check_range_source)
# max |onnx - torch| / max(1, |torch|): item states (scaled by the case's largest |state|), head outputs,
# and the end-to-end score/log_count (log1p(count) units)
TOLERANCE = {"item_encoder": 1e-3, "head": 1e-5, "score": 1e-3}
ENCODER_BATCHES = (1, 3, 17)
ENCODER_LENGTHS = (5, 19, 40)  # with padding: one row of T tokens, the others shorter
HEAD_BATCHES = (1, 7, 2600)  # 2600: a whole Online Retail II tick in one run
TRACE_BATCH = 4


def _decoder_hidden(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden layer (B, T, H) with an explicit causal + padding mask and explicit positions: transformers'
    own mask construction would bake the traced sequence length into the graph."""
    t = input_ids.shape[1]
    pos = torch.arange(t, device=input_ids.device).unsqueeze(0)  # right padding: positions 0..T-1
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, T)
    bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return decoder(input_ids=input_ids, attention_mask=bias, position_ids=pos, cache_position=pos[0],
                   use_cache=False).last_hidden_state


class ItemEncoderPath(nn.Module):
    """Trail.item_state on the merged decoder: the last hidden layer, mean-pooled over the item text's tokens
    (the leading BOS left out, as the trainer pools), as a graph dynamic in batch and sequence."""

    def __init__(self, model: Trail, decoder: nn.Module | None = None) -> None:
        super().__init__()
        self.decoder = model.decoder if decoder is None else decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hs = _decoder_hidden(self.decoder, input_ids, attention_mask)  # (B, T, H)
        not_bos = (torch.arange(input_ids.shape[1], device=input_ids.device) > 0).to(torch.float32)  # (T,)
        pool = (attention_mask.to(torch.float32) * not_bos[None, :]).unsqueeze(-1)  # (B, T, 1)
        return (hs * pool).sum(dim=1) / pool.sum(dim=1).clamp(min=1.0)  # (B, H)


class HeadPath(nn.Module):
    """The score head: x (B, S), item_state (B, H) -> score (B,), log_count (B,)."""

    def __init__(self, model: Trail) -> None:
        super().__init__()
        self.head = model.head

    def forward(self, x: torch.Tensor, item_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score, log_count = self.head(x, item_state)
        return score, log_count


class ExportError(RuntimeError):
    """Parity failed or the artefact cannot be exported; nothing was recorded in the manifest."""


@dataclass
class Sample:
    prompts: list[str]
    features: np.ndarray  # (N, S) float32
    texts: list[str]  # (N,) each row's item text (stream.core.prompts.item_text)


# ---- real prompts --------------------------------------------------------------------------

def sample_prompts(model: Trail, manifest: Manifest, n: int, seed: int = 0, datasets: list[str] | None = None,
                   events: str | None = None, items: str | None = None, *, cache_dir: Path) -> Sample:
    """Prompts and features of real items at each dataset's last cut-off: the numeric top and a random rest.

    `datasets`: built-in names (default: the manifest's training datasets); `events`/`items`:
    an event log (and item table) instead, scored at the manifest's first horizon. `cache_dir`: where the parsed
    built-in datasets are kept (`Settings.cache_dir`).
    """
    from stream.core.trends import TrendConfig
    from stream.core.datasets import load_dataset
    from trainer.examples import build_examples
    from trainer.inference import features_of, item_texts_of, numeric_scores, prompts_of

    if events:
        loaded = [(load_dataset(events, items, cache_dir=cache_dir),
                   float(next(iter(manifest.horizon_days.values()), 7.0)))]
    else:
        names = datasets or list(manifest.datasets)
        if not names:
            raise ExportError("the manifest names no training dataset; pass --dataset NAME or --events PATH")
        loaded = []
        for name in names:
            ds = load_dataset(name, cache_dir=cache_dir)
            loaded.append((ds, float(manifest.horizon_days.get(name, ds.horizon_days))))
    trend = TrendConfig.from_spec(manifest.feature_spec)
    per = max(2, n // len(loaded))
    prompts: list[str] = []
    texts: list[str] = []
    feats: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for ds, horizon in loaded:
        ex = build_examples(ds, trend, horizon_days=horizon)
        rows = ex.rows(ex.cutoffs[-1:])
        order = np.argsort(-numeric_scores(model, rows, horizon), kind="stable")
        top = order[: per // 2]
        rest = rng.choice(order[per // 2 :], size=min(per - len(top), len(order) - len(top)), replace=False)
        pick = rows.iloc[np.concatenate([top, rest])].reset_index(drop=True)
        prompts += prompts_of(pick, model.norm.signal_names, horizon)
        feats.append(features_of(model, pick, horizon))
        index, unique = item_texts_of(pick)
        texts += [unique[i] for i in index]
    return Sample(prompts, np.concatenate(feats), texts)


# ---- parity ------------------------------------------------------------------------------------

def encoder_cases(tok: PromptTokenizer, texts: list[str], seed: int = 1) -> list[tuple[str, list[list[int]]]]:
    """(name, token rows) of the item encoder's parity check: the real item texts as the stream tokenises
    them, and every (B, T) of ENCODER_BATCHES x ENCODER_LENGTHS, right-padded (rows of several lengths up
    to T in one batch; longer rows are real texts' tokens joined)."""
    rows = tok.ids(texts)
    stream_of_tokens = [t for r in rows for t in r[1:]] or [tok.end_id]
    bos = rows[0][:1] if rows and rows[0] else []
    rng = np.random.default_rng(seed)
    cases = [(f"texts{len(rows)}", rows)]
    for b in ENCODER_BATCHES:
        for t in ENCODER_LENGTHS:
            batch = []
            for i in range(b):
                n = t if i == 0 else int(rng.integers(2, t + 1))  # one row as long as T: the padded width
                start = int(rng.integers(0, len(stream_of_tokens)))
                body = [stream_of_tokens[(start + k) % len(stream_of_tokens)] for k in range(n - len(bos))]
                batch.append(bos + body)
            cases.append((f"b{b}xt{t}", batch))
    return cases


@torch.no_grad()
def torch_item_states(model: Trail, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return model.item_state(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()


def state_parity(run, tok: PromptTokenizer, cases, reference: dict[str, np.ndarray]) -> dict:
    """Max |onnx - torch| of the item states per case, absolute and scaled by max(1, max |torch|) of the case."""
    diffs, scaled = {}, {}
    for name, rows in cases:
        ids, mask = tok.pad(rows)
        ref = reference[name]
        d = float(np.abs(run(ids, mask) - ref).max())
        diffs[name] = d
        scaled[name] = d / max(1.0, float(np.abs(ref).max()))
    return {"max_abs_diff": max(diffs.values()), "max_scaled_diff": max(scaled.values()), "cases": diffs,
            "shapes": {name: [len(rows), max(len(r) for r in rows)] for name, rows in cases}}


def head_parity(run, model: Trail, x: np.ndarray, states: np.ndarray) -> dict:
    """ONNX head vs PyTorch head at batch sizes HEAD_BATCHES (real rows, tiled to the size)."""
    diffs = {}
    rng = np.random.default_rng(2)
    for b in HEAD_BATCHES:
        idx = rng.integers(0, len(x), size=b) if b > len(x) else rng.permutation(len(x))[:b]
        with torch.no_grad():
            ref = [t.float().numpy() for t in model.head(torch.from_numpy(x[idx]), torch.from_numpy(states[idx]))]
        got = run(x[idx], states[idx])
        diffs[f"batch{b}"] = max(float((np.abs(g - r) / np.maximum(1.0, np.abs(r))).max()) for g, r in zip(got, ref))
    return {"max_abs_diff": max(diffs.values()), "max_scaled_diff": max(diffs.values()), "cases": diffs,
            "batches": list(HEAD_BATCHES)}


def require_parity(role: str, result: dict, tolerance: float) -> None:
    """Fail the export when an ONNX file differs from PyTorch by more than `tolerance`
    (absolute for values within +-1, relative beyond: `max_scaled_diff`)."""
    diff = result.get("max_scaled_diff", result["max_abs_diff"])
    if diff > tolerance:
        raise ExportError(f"ONNX {role} differs from PyTorch by {diff:.3g} > tolerance {tolerance} "
                          f"(max abs diff {result['max_abs_diff']:.3g}; per case: {result.get('cases', {})})")


def check_tokenizer(model: Trail, tok: PromptTokenizer, prompts: list[str], encode=None) -> dict:
    """The serving tokenizer must give exactly Trail.encode_prompts' (or `encode`'s) ids (BOS, truncation, padding)."""
    ids, mask = (encode or model.encode_prompts)(prompts)
    ours, our_mask = tok.encode(prompts)
    if ours.shape == tuple(ids.shape) and np.array_equal(ours, ids.numpy()) and np.array_equal(our_mask, mask.numpy()):
        return {"prompts": len(prompts), "identical": len(prompts)}
    for i, p in enumerate(prompts):
        theirs = ids[i][mask[i].bool()].tolist()
        mine = tok.ids([p])[0]
        if mine != theirs:
            raise ExportError(f"serving tokenizer differs from the trainer's on {p!r}: {mine} vs {theirs}")
    raise ExportError("serving tokenizer pads differently from the trainer")


# ---- writing -----------------------------------------------------------------------------------

def export_item_encoder(model: Trail, tok: PromptTokenizer, texts: list[str], path: Path,
                        decoder: nn.Module | None = None) -> None:
    ids, mask = tok.encode(texts[:TRACE_BATCH])
    with torch.no_grad():
        torch.onnx.export(
            ItemEncoderPath(model, decoder).eval(), (torch.from_numpy(ids), torch.from_numpy(mask)), str(path),
            input_names=["input_ids", "attention_mask"], output_names=["item_state"], opset_version=OPSET,
            dynamo=False, dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "item_state": {0: "batch"}},
        )


def export_head(model: Trail, n_features: int, hidden: int, path: Path) -> None:
    with torch.no_grad():
        torch.onnx.export(HeadPath(model).eval(), (torch.zeros(2, n_features), torch.zeros(2, hidden)), str(path),
                          input_names=["x", "item_state"], output_names=["score", "log_count"], opset_version=OPSET,
                          dynamo=False, dynamic_axes={"x": {0: "batch"}, "item_state": {0: "batch"},
                                                      "score": {0: "batch"}, "log_count": {0: "batch"}})


def export_generator(model: Trail, out: Path) -> Path:
    """optimum's decoder-with-past export of the merged model; keeps only model.onnx and its configs."""
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory(prefix="trail-merged-") as tmp:
        model.lm.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        main_export(tmp, output=str(out), task="text-generation-with-past", device="cpu", do_validation=False)
    for f in out.iterdir():
        if f.name not in ("model.onnx", "model.onnx_data", "config.json", "generation_config.json"):
            f.unlink()
    last_position_logits(out / "model.onnx")
    return out / "model.onnx"


def last_position_logits(path: Path) -> None:
    """Make the generator's LM head read the last position only: logits (B, 1, V) instead of (B, T, V).

    The decoding loop reads logits[:, -1] (stream.model.onnx_models.Generator: every row is left-padded,
    within a step too), so the 49k-way head over the other positions of a prompt pass (about a fifth of its
    arithmetic, and B x T x 49,152 floats out of the session) was thrown away. A Slice of the final norm's
    output along the sequence axis goes before the head's MatMul."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    at, head = next(((i, n) for i, n in enumerate(g.node) if "logits" in n.output), (None, None))
    if head is None or head.op_type != "MatMul":
        raise ExportError(f"{path}: expected the logits to come from a MatMul (the LM head), found "
                          f"{head.op_type if head is not None else 'no node'}")
    consts = {"trail_last_starts": [-1], "trail_last_ends": [np.iinfo(np.int64).max], "trail_last_axes": [1]}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items())
    g.node.insert(at, helper.make_node("Slice", [head.input[0], *consts], ["trail_last_position"],
                                       name="/trail/last_position"))
    head.input[0] = "trail_last_position"
    logits = next(o for o in g.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_value = 1  # (batch_size, 1, vocab)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def quantise_generator(src: Path, dst: Path) -> Path:
    """Dynamic int8 (per-channel MatMul weights) of the generator, for CPUs: ~1.8x the batched explanations
    per second of fp32 on 2 cores. Its greedy text may differ from fp32's (recorded as parity, not required):
    the constrained decoding keeps every claim true whatever the logits."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    return dst


def generator_parity(gen: Generator, tok: PromptTokenizer, prompts: list[str], reference: list[str],
                     limit: int) -> dict:
    ours = [tok.decode(gen.generate(ids, limit)) for ids in tok.ids(prompts)]
    same = [a == b for a, b in zip(ours, reference)]
    result: dict = {"prompts": len(prompts), "identical": int(sum(same)), "max_new_tokens": limit,
                    "examples": [{"prompt": p, "explanation": e} for p, e in zip(prompts[:2], ours[:2])]}
    if not all(same):
        i = same.index(False)
        result["first_difference"] = {"prompt": prompts[i], "torch": reference[i], "onnx": ours[i]}
    return result


def lower_priority(niceness: int) -> None:
    """Every thread of this process (torch's pools included: on Linux niceness is per thread) `niceness`
    lower, so that a stream scoring beside the rest of the export gets the CPU first."""
    import os

    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [str(os.getpid())]:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), min(19, os.getpriority(os.PRIO_PROCESS, int(tid)) + niceness))
        except OSError:  # a thread that ended meanwhile, or no permission: a hint only
            pass


def source_hashes(directory: Path) -> dict[str, str]:
    """Hashes of the trained weights the export came from (the stream notices a stale export)."""
    out = {HEAD_FILE: sha256_of(directory / HEAD_FILE)}
    adapter = directory / ADAPTER_DIR / "adapter_model.safetensors"
    if adapter.is_file():
        out[f"{ADAPTER_DIR}/adapter_model.safetensors"] = sha256_of(adapter)
    return out


def versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        from importlib.metadata import version

        out["optimum-onnx"] = version("optimum-onnx")
    except Exception:  # noqa: BLE001 - informative only
        pass
    return out


def export_head_first(directory: Path, command: str = "") -> dict:
    """Write and record head.onnx (and the range head) alone, from the trained head weights without loading
    the base model: the record's "pending" names the item encoder, tokenizer and generator, written after it.
    A worker whose items' states were shipped with the artefact (stream.model.item_states) scores from here
    on. Parity against the PyTorch head at HEAD_BATCHES, on shipped states (else random ones) with
    standard-normal signals (what normalised signals are); `export` checks it again on real rows later."""
    from types import SimpleNamespace

    from stream.model.item_states import SHIPPED_DIR
    from trainer.model import load_head

    t0 = time.time()
    head = load_head(directory)
    manifest = Manifest.load(directory)
    n_features, hidden = len(manifest.normalisation["names"]), int(manifest.item_state["hidden_size"])
    out = directory / ONNX_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = SimpleNamespace(head=head)
    export_head(model, n_features, hidden, out / "head.onnx")
    rng = np.random.default_rng(3)
    states = None
    for f in sorted((directory / SHIPPED_DIR).glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            states = z["states"][:HEAD_BATCHES[-1]].astype(np.float32)
        break
    if states is None or states.shape[1:] != (hidden,):
        states = rng.normal(size=(HEAD_BATCHES[-1], hidden)).astype(np.float32)
    x = rng.normal(size=(len(states), n_features)).astype(np.float32)
    parity = {"head": head_parity(ScoreHeadModel(out / "head.onnx", [CPU]), model, x, states)}
    parity["head"]["tolerance"] = TOLERANCE["head"]
    parity["head"]["inputs"] = "head-first: shipped item states, standard-normal signals"
    require_parity("head", parity["head"], TOLERANCE["head"])
    if (directory / RANGE_FILE).is_file():
        parity["range_head"] = {"max_abs_diff": export_range(directory)["max_abs_diff"]}
    record = {"files": {"head": file_record(directory, out / "head.onnx")}, "parity": parity,
              "pending": ["tokenizer", "item_encoder", "generator"], "score_design": SCORE_DESIGN,
              "opset": OPSET, "export_version": EXPORT_VERSION, "source": source_hashes(directory),
              "versions": versions(), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(time.time() - t0, 1), "command": command}
    write_export(directory, record)
    return record


# ---- main --------------------------------------------------------------------------------------

def export(directory: Path, n_prompts: int = 24, n_explain: int = 6, tolerance: float = TOLERANCE["score"],
           datasets: list[str] | None = None, events: str | None = None, items: str | None = None,
           command: str = "", generator_int8: bool = False, generator_nice: int = 0,
           head_first: bool = False, generator_nbits: int = 0, *, cache_dir: Path) -> dict:
    """The score path (tokenizer, item encoder, head) is written and recorded first, with the generator
    "pending" in the record (a stream may serve predictions from it: `Artefact.load(pending_ok=True)`);
    then the generator's greedy reference, export and parity, and the full record. `generator_nice`:
    that second part runs this much lower in CPU priority (the demo's worker scores beside it). `head_first`:
    the head alone is written and recorded before all of that (`export_head_first`), and `generator_nice`
    applies to everything after it. `cache_dir` (`Settings.cache_dir`): the base model, the parsed datasets
    and the item states."""
    from trainer.model import load

    started = time.time()
    directory = Path(directory)
    manifest = Manifest.load(directory)
    design = getattr(manifest, "score_design", None)
    if design != SCORE_DESIGN:
        found = f"score_design {design!r}" if design else "no score_design (a v1 artefact: one LLM score path)"
        raise ExportError(f"{directory} has {found}; this export writes {SCORE_DESIGN!r} (item encoder + score "
                          f"head): retrain the model with this code (python -m trainer.fit), then export it")
    out = directory / ONNX_DIR
    tmp_out = directory / (ONNX_DIR + ".tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    tmp_out.mkdir(parents=True)
    threads = torch.get_num_threads()
    head_first_seconds = None
    if head_first:
        head_first_seconds = export_head_first(directory, command)["seconds"]
        if generator_nice:
            lower_priority(generator_nice)
    stages = ["load", "sample", "reference", "item_encoder", "head", "score_record", "generator_reference",
              "generator", "record"]
    bar = tqdm(stages, desc="export", unit="stage")
    it = iter(bar)
    timings: dict[str, float] = {}
    clock = [time.time(), ""]

    def stage() -> None:
        now = time.time()
        if clock[1]:
            timings[str(clock[1])] = round(now - float(clock[0]), 1)
        clock[0], clock[1] = now, next(it)
        bar.set_postfix_str(str(clock[1]))

    stage()
    model, manifest = load(directory, cache_dir=cache_dir)  # unmerged: the reference is the model as trained
    model.tokenizer.backend_tokenizer.save(str(tmp_out / "tokenizer.json"))
    clean_up = bool(getattr(model.tokenizer, "clean_up_tokenization_spaces", False))
    tok = PromptTokenizer(tmp_out / "tokenizer.json", model.cfg.max_prompt_tokens, clean_up)
    max_item_tokens = int(getattr(model.cfg, "max_item_tokens", DEFAULT_MAX_ITEM_TOKENS))
    item_tok = PromptTokenizer(tmp_out / "tokenizer.json", max_item_tokens, clean_up)
    stage()
    sample = sample_prompts(model, manifest, n_prompts, datasets=datasets, events=events, items=items,
                            cache_dir=cache_dir)
    parity: dict[str, dict] = {"tokenizer": check_tokenizer(model, tok, sample.prompts)}
    unique_texts = list(dict.fromkeys(sample.texts))
    parity["item_tokenizer"] = check_tokenizer(model, item_tok, unique_texts, encode=model.encode_items)
    stage()
    t_ref = time.time()
    enc_cases = encoder_cases(item_tok, unique_texts)
    enc_reference = {name: torch_item_states(model, *item_tok.pad(rows)) for name, rows in enc_cases}
    ref_states = torch_item_states(model, *item_tok.encode(sample.texts))  # (N, H) each sample row's state
    with torch.no_grad():
        ref_outputs = [t.float().numpy() for t in model.head(torch.from_numpy(sample.features),
                                                             torch.from_numpy(ref_states))]
    reference_seconds = {"score": round(time.time() - t_ref, 1)}
    # the score path is traced from a merged copy (the LoRA folded into the weights: one plain decoder),
    # so the model as trained stays for the generator's greedy reference, computed after the score files
    import copy

    merged = copy.deepcopy(model.lm).merge_and_unload().eval()
    merged_decoder = merged.get_base_model().model if hasattr(merged, "get_base_model") else merged.model

    stage()
    file_seconds: dict[str, dict[str, float]] = {}
    t0 = time.time()
    enc_path = tmp_out / "item_encoder.onnx"
    export_item_encoder(model, item_tok, unique_texts, enc_path, merged_decoder)
    t1 = time.time()
    encoder = ItemEncoder(enc_path, [CPU], threads)
    parity["item_encoder"] = state_parity(encoder, item_tok, enc_cases, enc_reference)
    parity["item_encoder"]["tolerance"] = TOLERANCE["item_encoder"]
    require_parity("item_encoder", parity["item_encoder"], TOLERANCE["item_encoder"])
    file_seconds["item_encoder"] = {"torch_reference": reference_seconds["score"], "export": round(t1 - t0, 1),
                                    "parity": round(time.time() - t1, 1)}
    stage()
    t0 = time.time()
    head_path = tmp_out / "head.onnx"
    export_head(model, sample.features.shape[1], ref_states.shape[1], head_path)
    t1 = time.time()
    head = ScoreHeadModel(head_path, [CPU], threads)
    parity["head"] = head_parity(head, model, sample.features, ref_states)
    parity["head"]["tolerance"] = TOLERANCE["head"]
    require_parity("head", parity["head"], TOLERANCE["head"])
    # end to end: the stream's path (ONNX states into the ONNX head) against the model as trained
    got = head(sample.features, encoder(*item_tok.encode(sample.texts)))
    e2e = {k: float((np.abs(g - r) / np.maximum(1.0, np.abs(r))).max())
           for k, g, r in zip(("score", "log_count"), got, ref_outputs)}
    parity["score"] = {"max_abs_diff": max(e2e.values()), "max_scaled_diff": max(e2e.values()), "cases": e2e,
                       "items": len(sample.texts), "tolerance": tolerance}
    require_parity("score (item_encoder.onnx + head.onnx)", parity["score"], tolerance)
    del encoder, head, merged, merged_decoder
    file_seconds["head"] = {"export": round(t1 - t0, 1), "parity": round(time.time() - t1, 1)}

    def record(files: dict, pending: list[str]) -> dict:
        return {
            "files": files,
            "parity": parity,
            "pending": pending,
            "score_design": SCORE_DESIGN,
            "inputs": {"item_encoder": {"input_ids": "int64 (batch, sequence)",
                                        "attention_mask": "int64 (batch, sequence)"},
                       "head": {"x": f"float32 (batch, {sample.features.shape[1]})",
                                "item_state": f"float32 (batch, {ref_states.shape[1]})"}},
            "outputs": {"item_encoder": {"item_state": f"float32 (batch, {ref_states.shape[1]}) mean of the last "
                                                       f"hidden layer over the item text's tokens, BOS left out"},
                        "head": {"score": "float32 (batch,) ranking score",
                                 "log_count": "float32 (batch,) predicted log1p(next-period count)"}},
            "tokenizer": {"end_token": "<|im_end|>", "end_id": tok.end_id,
                          "clean_up_tokenization_spaces": tok.clean_up_spaces,
                          "max_prompt_tokens": model.cfg.max_prompt_tokens, "max_item_tokens": max_item_tokens},
            "opset": OPSET,
            "export_version": EXPORT_VERSION,
            "source": source_hashes(directory),
            "versions": versions(),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - started, 1),
            "stage_seconds": dict(timings) | ({"head_first": head_first_seconds} if head_first else {}),
            "file_seconds": dict(file_seconds),
            "command": command,
        }

    stage()  # the score path, checked, in place: a stream can score from here on
    if head_first:  # beside the head-first files a worker may serve already (head.onnx replaced atomically)
        for f in tmp_out.iterdir():
            f.replace(out / f.name)
        tmp_out.rmdir()
    else:
        if out.exists():
            shutil.rmtree(out)
        tmp_out.rename(out)
    files = {"item_encoder": file_record(directory, out / "item_encoder.onnx"),
             "head": file_record(directory, out / "head.onnx"),
             "tokenizer": file_record(directory, out / "tokenizer.json")}
    if (directory / RANGE_FILE).is_file():  # the count's range head (trainer.quantiles) is part of the score path
        parity["range_head"] = {"max_abs_diff": export_range(directory)["max_abs_diff"]}
    write_export(directory, record(files, ["generator"]))
    if generator_nice and not head_first:
        lower_priority(generator_nice)

    stage()
    t_explain = time.time()
    explain_prompts = sample.prompts[:n_explain]
    reference_explanations = model.explain(explain_prompts)  # the unmerged model, as trained
    reference_seconds["generator"] = round(time.time() - t_explain, 1)
    model.lm = model.lm.merge_and_unload()  # the LoRA folded into the weights: one plain decoder to export
    model.eval()

    stage()
    gen_tmp = out / "generator.tmp"
    gen_path = export_generator(model, gen_tmp)
    gen = Generator(gen_path, [CPU], tok.end_id, threads)
    parity["generator"] = generator_parity(gen, tok, explain_prompts, reference_explanations,
                                           model.cfg.max_explanation_tokens)
    if parity["generator"]["identical"] != len(explain_prompts):
        d = parity["generator"]["first_difference"]
        raise ExportError(f"ONNX greedy explanations differ from Trail.explain on "
                          f"{len(explain_prompts) - parity['generator']['identical']} of {len(explain_prompts)} prompts; "
                          f"first: {d['prompt']!r}: torch {d['torch']!r} vs onnx {d['onnx']!r}")
    del gen
    if (out / "generator").exists():
        shutil.rmtree(out / "generator")
    gen_tmp.rename(out / "generator")
    if generator_int8:  # served on CPU when present (stream.serving.service); greedy identity recorded, not required
        q = quantise_generator(out / "generator" / "model.onnx", out / "generator.int8" / "model.onnx")
        parity["generator.int8"] = generator_parity(Generator(q, [CPU], tok.end_id, threads), tok, explain_prompts,
                                                    reference_explanations, model.cfg.max_explanation_tokens)
    if generator_nbits:  # served on CPU first when present; teacher-forced parity against fp32 required
        from export.nbits import NbitsError, build

        try:
            nbits_path, parity["generator.nbits"] = build(
                out, tok.ids(sample.prompts[: max(n_explain, 12)]), tok.end_id, model.cfg.max_explanation_tokens,
                tok.decode, bits=generator_nbits, threads=threads)
        except NbitsError as e:
            raise ExportError(str(e)) from e

    stage()
    files["generator"] = file_record(directory, out / "generator" / "model.onnx")
    if generator_int8:
        files["generator.int8"] = file_record(directory, out / "generator.int8" / "model.onnx")
    if generator_nbits:
        files["generator.nbits"] = file_record(directory, nbits_path)
    file_seconds["generator"] = {"torch_reference": reference_seconds["generator"],
                                 "export_and_parity": timings.get("generator", 0.0)}
    final = record(files, [])
    final.pop("pending")
    write_export(directory, final)
    bar.close()
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m export.onnx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="artefact directory written by trainer.fit")
    ap.add_argument("--prompts", type=int, default=24,
                    help="real items (prompts, item texts, signals) for the parity checks (default 24)")
    ap.add_argument("--explain", type=int, default=6, help="prompts for the greedy-explanation parity check (default 6)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE["score"],
                    help=f"max score / log_count difference allowed end to end (default {TOLERANCE['score']})")
    ap.add_argument("--dataset", action="append", default=None,
                    help="dataset for the parity prompts (default: the manifest's training datasets)")
    ap.add_argument("--events", default=None, help="an event log (CSV/Parquet/JSONL) for the parity prompts instead")
    ap.add_argument("--items", default=None, help="item table for --events")
    ap.add_argument("--generator-nice", type=int, default=0,
                    help="once the score path is written, run the generator's part this much lower in CPU priority "
                         "(the demo: 10, its worker scores meanwhile)")
    ap.add_argument("--head-first", action="store_true",
                    help="write and record head.onnx (and the range head) before loading the base model, the rest "
                         "pending: a stream with shipped item states (stream.model.item_states) scores from it; "
                         "--generator-nice then applies to everything after it (the demo)")
    ap.add_argument("--generator-int8", action="store_true",
                    help="also write generator.int8/model.onnx (dynamic int8), which the stream serves on CPU")
    ap.add_argument("--generator-nbits", type=int, choices=(4, 8), default=0,
                    help="also write generator.nbits/model.onnx (weight-only, this many bits: export.nbits), which "
                         "the stream serves on CPU first; its teacher-forced parity with fp32 is required")
    args = ap.parse_args(argv)
    if not (args.model / MANIFEST).is_file():
        ap.error(f"--model {args.model}: not a TRAIL artefact (no {MANIFEST}); train one with python -m trainer.fit")
    if args.prompts < 12:
        ap.error("--prompts must be at least 12")
    command = "python -m export.onnx " + " ".join(argv if argv is not None else sys.argv[1:])
    from stream.settings import load_settings

    cache_dir = load_settings().cache_dir  # the one environment read: TRAIL_CACHE
    try:
        onnx = export(args.model, n_prompts=args.prompts, n_explain=args.explain,
                      tolerance=args.tolerance, datasets=args.dataset, events=args.events, items=args.items,
                      command=command, generator_int8=args.generator_int8, generator_nice=args.generator_nice,
                      head_first=args.head_first, generator_nbits=args.generator_nbits, cache_dir=cache_dir)
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    summary = {role: {k: v for k, v in p.items() if k in ("max_abs_diff", "identical", "prompts", "rejected",
                                                            "top1_agreement", "max_abs_logit_diff")}
               for role, p in onnx["parity"].items()}
    print(json.dumps({"files": {r: f["path"] for r, f in onnx["files"].items()}, "parity": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
