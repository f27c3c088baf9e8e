"""Trained TRAIL artefact -> the ONNX files the stream serves, with parity checks against PyTorch.

    python -m export.onnx --model models/trail-smollm2 [--int8] [--fp16]

Writes into DIR/onnx/ and records every file (size, sha256) and every parity figure in
the manifest's "onnx" section:

  score.onnx         the score path: decoder (LoRA merged) -> hidden state at the last
                     real prompt token -> score head. No LM head. Inputs input_ids and
                     attention_mask (B, T) int64, features (B, S) float32; output score (B,).
                     Batch and sequence axes are dynamic.
  score.int8.onnx    (--int8) dynamic int8 quantisation of its MatMuls, for CPUs
  score.fp16.onnx    (--fp16) float16 weights and activations (float32 inputs/outputs), for GPUs
  numeric.onnx       the score head's numeric branch alone (features -> score): the stream's
                     cheap prior over every active item
  generator/model.onnx  optimum's text-generation-with-past export of the merged model, for
                     the explanations (greedy, serving loop in stream.serving.onnx_models.Generator)
  tokenizer.json     the tokenizer the model was trained with (the `tokenizers` library reads it)

Parity, on real prompts (the last cut-off of each training dataset: the numeric branch's
top items, as the stream picks them, plus a random sample): the serving tokenizer must give
exactly `Trail.encode_prompts`' ids; ONNX scores vs PyTorch `Trail.score` (the unmerged
LoRA model, as trained) at several batch sizes and sequence lengths, not only the traced
shape, max abs diff recorded, and the export fails beyond --tolerance; the int8/fp16
variants get their own figure and are dropped (not recorded, so never served) beyond
theirs; greedy explanations of the ONNX generator must equal `Trail.explain`'s.
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

from stream.serving.artefact import MANIFEST, ONNX_DIR, PromptTokenizer, file_record, sha256_of
from stream.serving.onnx_models import CPU, CUDA, Generator, NumericModel, ScoreModel, available_providers
from trainer.model import ADAPTER_DIR, HEAD_FILE, Manifest, Trail

log = structlog.get_logger(__name__)

OPSET = 17
EXPORT_VERSION = "1"  # bump when the files or the manifest's onnx section change shape
# max |onnx - torch| / max(1, |torch|) of the score (log1p(count) units)
TOLERANCE = {"fp32": 1e-3, "int8": 0.15, "fp16": 0.05}
BATCH_SIZES = (1, 3, 8)
TRUNCATE_TO = (9, 23)  # re-test at sequence lengths unlike the traced one
TRACE_BATCH = 4


class ScorePath(nn.Module):
    """Trail.score with an explicit causal mask and positions, so that every shape traces as dynamic."""

    def __init__(self, model: Trail) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.head = model.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0)  # right padding: positions 0..T-1
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, T)
        bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
        hs = self.decoder(input_ids=input_ids, attention_mask=bias, position_ids=pos, cache_position=pos[0],
                          use_cache=False).last_hidden_state  # (B, T, H)
        last = attention_mask.sum(dim=1) - 1  # (B,) last real token
        h = hs[torch.arange(input_ids.shape[0]), last]  # (B, H)
        return self.head(h, features)


class NumericPath(nn.Module):
    def __init__(self, model: Trail) -> None:
        super().__init__()
        self.numeric = model.head.numeric

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.numeric(features).squeeze(-1)


class ExportError(RuntimeError):
    """Parity failed or the artefact cannot be exported; nothing was recorded in the manifest."""


@dataclass
class Sample:
    prompts: list[str]
    features: np.ndarray  # (N, S) float32


# ---- real prompts --------------------------------------------------------------------------

def sample_prompts(model: Trail, manifest: Manifest, n: int, seed: int = 0, datasets: list[str] | None = None,
                   events: str | None = None, items: str | None = None) -> Sample:
    """Prompts and features of real items at each dataset's last cut-off: the numeric top and a random rest.

    `datasets`: built-in names (default: the manifest's training datasets); `events`/`items`:
    an event log (and item table) instead, scored at the manifest's first horizon.
    """
    from stream.core.trends import TrendConfig
    from stream.core.datasets import load_dataset
    from trainer.examples import build_examples
    from trainer.inference import features_of, numeric_scores, prompts_of

    if events:
        loaded = [(load_dataset(events, items), float(next(iter(manifest.horizon_days.values()), 7.0)))]
    else:
        names = datasets or list(manifest.datasets)
        if not names:
            raise ExportError("the manifest names no training dataset; pass --dataset NAME or --events PATH")
        loaded = []
        for name in names:
            ds = load_dataset(name)
            loaded.append((ds, float(manifest.horizon_days.get(name, ds.horizon_days))))
    trend = TrendConfig.from_spec(manifest.feature_spec)
    per = max(2, n // len(loaded))
    prompts: list[str] = []
    feats: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for ds, horizon in loaded:
        ex = build_examples(ds, trend, horizon_days=horizon)
        rows = ex.rows(ex.cutoffs[-1:])
        order = np.argsort(-numeric_scores(model, rows, horizon), kind="stable")
        top = order[: per // 2]
        rest = rng.choice(order[per // 2 :], size=min(per - len(top), len(order) - len(top)), replace=False)
        pick = rows.iloc[np.concatenate([top, rest])].reset_index(drop=True)
        prompts += prompts_of(pick, model.norm.names[:-1], horizon)
        feats.append(features_of(model, pick, horizon))
    return Sample(prompts, np.concatenate(feats))


# ---- parity ------------------------------------------------------------------------------------

def score_cases(tok: PromptTokenizer, sample: Sample) -> list[tuple[str, list[list[int]], np.ndarray]]:
    """(name, token rows, features) batches of several sizes and lengths, in a shuffled order."""
    rows = tok.ids(sample.prompts)
    n = len(rows)
    order = np.random.default_rng(1).permutation(n)
    cases = [(f"all{n}", rows, sample.features)]
    start = 0
    for b in BATCH_SIZES:
        idx = order[start : start + b] if start + b <= n else order[:b]
        start += b
        cases.append((f"batch{b}", [rows[i] for i in idx], sample.features[idx]))
    for t in TRUNCATE_TO:
        idx = order[: min(5, n)]
        cases.append((f"len{t}", [rows[i][:t] for i in idx], sample.features[idx]))
    return cases


@torch.no_grad()
def torch_scores(model: Trail, ids: np.ndarray, mask: np.ndarray, x: np.ndarray) -> np.ndarray:
    return model.score(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(x)).float().numpy()


def score_parity(run, tok: PromptTokenizer, cases, reference: dict[str, np.ndarray]) -> dict:
    """Max |onnx - torch| per case, absolute and scaled by max(1, |torch|) (float32 keeps ~7 digits)."""
    diffs, scaled = {}, {}
    for name, rows, x in cases:
        ids, mask = tok.pad(rows)
        d = np.abs(run(ids, mask, x) - reference[name])
        diffs[name] = float(d.max())
        scaled[name] = float((d / np.maximum(1.0, np.abs(reference[name]))).max())
    return {"max_abs_diff": max(diffs.values()), "max_scaled_diff": max(scaled.values()), "cases": diffs,
            "shapes": {name: [len(rows), max(len(r) for r in rows)] for name, rows, _ in cases}}


def require_parity(role: str, result: dict, tolerance: float) -> None:
    """Fail the export when an ONNX file differs from PyTorch by more than `tolerance`
    (absolute for scores within +-1, relative beyond: `max_scaled_diff`)."""
    diff = result.get("max_scaled_diff", result["max_abs_diff"])
    if diff > tolerance:
        raise ExportError(f"ONNX {role} differs from PyTorch by {diff:.3g} > tolerance {tolerance} "
                          f"(max abs diff {result['max_abs_diff']:.3g}; per case: {result.get('cases', {})})")


def check_tokenizer(model: Trail, tok: PromptTokenizer, prompts: list[str]) -> dict:
    """The serving tokenizer must give exactly Trail.encode_prompts' ids (BOS, truncation, padding)."""
    ids, mask = model.encode_prompts(prompts)
    ours, our_mask = tok.encode(prompts)
    if ours.shape == tuple(ids.shape) and np.array_equal(ours, ids.numpy()) and np.array_equal(our_mask, mask.numpy()):
        return {"prompts": len(prompts), "identical": len(prompts)}
    for i, p in enumerate(prompts):
        theirs = ids[i][mask[i].bool()].tolist()
        mine = tok.ids([p])[0]
        if mine != theirs:
            raise ExportError(f"serving tokenizer differs from Trail.encode_prompts on {p!r}: {mine} vs {theirs}")
    raise ExportError("serving tokenizer pads differently from Trail.encode_prompts")


# ---- writing -----------------------------------------------------------------------------------

def export_score(model: Trail, tok: PromptTokenizer, sample: Sample, path: Path) -> None:
    ids, mask = tok.encode(sample.prompts[:TRACE_BATCH])
    args = (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(sample.features[:TRACE_BATCH]))
    with torch.no_grad():
        torch.onnx.export(
            ScorePath(model).eval(), args, str(path), input_names=["input_ids", "attention_mask", "features"],
            output_names=["score"], opset_version=OPSET, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "features": {0: "batch"}, "score": {0: "batch"}},
        )


def export_numeric(model: Trail, n_features: int, path: Path) -> None:
    with torch.no_grad():
        torch.onnx.export(NumericPath(model).eval(), (torch.zeros(2, n_features),), str(path), input_names=["features"],
                          output_names=["score"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"features": {0: "batch"}, "score": {0: "batch"}})


def quantise_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(m, str(dst))


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
    return out / "model.onnx"


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


# ---- main --------------------------------------------------------------------------------------

def export(directory: Path, int8: bool = True, fp16: bool = False, n_prompts: int = 24, n_explain: int = 6,
           tolerance: float = TOLERANCE["fp32"], datasets: list[str] | None = None, events: str | None = None,
           items: str | None = None, command: str = "") -> dict:
    from trainer.model import load

    started = time.time()
    directory = Path(directory)
    manifest = Manifest.load(directory)
    out = directory / ONNX_DIR
    tmp_out = directory / (ONNX_DIR + ".tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    tmp_out.mkdir(parents=True)
    threads = torch.get_num_threads()
    stages = ["load", "sample", "reference", "score", "numeric", "variants", "generator", "record"]
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
    model, manifest = load(directory)  # unmerged: the reference is the model as trained
    model.tokenizer.backend_tokenizer.save(str(tmp_out / "tokenizer.json"))
    tok = PromptTokenizer(tmp_out / "tokenizer.json", model.cfg.max_prompt_tokens,
                          bool(getattr(model.tokenizer, "clean_up_tokenization_spaces", False)))
    stage()
    sample = sample_prompts(model, manifest, n_prompts, datasets=datasets, events=events, items=items)
    tok_parity = check_tokenizer(model, tok, sample.prompts)
    stage()
    cases = score_cases(tok, sample)
    reference = {name: torch_scores(model, *tok.pad(rows), x) for name, rows, x in cases}
    explain_prompts = sample.prompts[:n_explain]
    reference_explanations = model.explain(explain_prompts)
    model.lm = model.lm.merge_and_unload()  # the LoRA folded into the weights: one plain decoder to export
    model.eval()

    stage()
    score_path = tmp_out / "score.onnx"
    export_score(model, tok, sample, score_path)
    parity: dict[str, dict] = {"tokenizer": tok_parity}
    parity["score.fp32"] = score_parity(ScoreModel(score_path, [CPU], threads), tok, cases, reference)
    parity["score.fp32"]["tolerance"] = tolerance
    require_parity("score.fp32", parity["score.fp32"], tolerance)
    stage()
    numeric_path = tmp_out / "numeric.onnx"
    export_numeric(model, sample.features.shape[1], numeric_path)
    with torch.no_grad():
        ref_numeric = model.head.numeric(torch.from_numpy(sample.features)).squeeze(-1).numpy()
    diff = float(np.abs(NumericModel(numeric_path, threads)(sample.features) - ref_numeric).max())
    parity["numeric"] = {"max_abs_diff": diff, "items": len(sample.features), "tolerance": 1e-5}
    require_parity("numeric", parity["numeric"], 1e-5)

    stage()
    variants = {"fp32": score_path}
    wanted = [("int8", tmp_out / "score.int8.onnx", quantise_int8)] if int8 else []
    if fp16:
        wanted.append(("fp16", tmp_out / "score.fp16.onnx", convert_fp16))
    for name, path, make in wanted:
        make(score_path, path)
        providers = [CUDA, CPU] if name == "fp16" and CUDA in available_providers() else [CPU]
        try:
            result = score_parity(ScoreModel(path, providers, threads), tok, cases, {k: v for k, v in reference.items()})
        except RuntimeError as e:  # e.g. float16 kernels missing on this CPU build
            log.warning("export.variant_unverified", variant=name, error=str(e).splitlines()[0][:300])
            path.unlink()
            parity[f"score.{name}"] = {"rejected": f"could not be run here to check parity: {str(e).splitlines()[0][:200]}"}
            continue
        result["tolerance"] = TOLERANCE[name]
        result["provider"] = providers[0]
        try:
            require_parity(f"score.{name}", result, TOLERANCE[name])
        except ExportError as e:
            log.warning("export.variant_rejected", variant=name, max_abs_diff=result["max_abs_diff"],
                        tolerance=TOLERANCE[name])
            result["rejected"] = str(e)[:300]
            path.unlink()
        else:
            variants[name] = path
        parity[f"score.{name}"] = result

    stage()
    gen_path = export_generator(model, tmp_out / "generator")
    gen = Generator(gen_path, [CPU], tok.end_id, threads)
    parity["generator"] = generator_parity(gen, tok, explain_prompts, reference_explanations,
                                           model.cfg.max_explanation_tokens)
    if parity["generator"]["identical"] != len(explain_prompts):
        d = parity["generator"]["first_difference"]
        raise ExportError(f"ONNX greedy explanations differ from Trail.explain on "
                          f"{len(explain_prompts) - parity['generator']['identical']} of {len(explain_prompts)} prompts; "
                          f"first: {d['prompt']!r}: torch {d['torch']!r} vs onnx {d['onnx']!r}")
    del gen

    stage()
    if out.exists():
        shutil.rmtree(out)
    tmp_out.rename(out)
    files = {f"score.{k}": file_record(directory, out / p.relative_to(tmp_out)) for k, p in variants.items()}
    files["numeric"] = file_record(directory, out / "numeric.onnx")
    files["generator"] = file_record(directory, out / "generator" / "model.onnx")
    files["tokenizer"] = file_record(directory, out / "tokenizer.json")
    manifest = Manifest.load(directory)
    manifest.onnx = {
        "files": files,
        "parity": parity,
        "inputs": {"input_ids": "int64 (batch, sequence)", "attention_mask": "int64 (batch, sequence)",
                   "features": f"float32 (batch, {sample.features.shape[1]})"},
        "outputs": {"score": "float32 (batch,) predicted log1p(next-period count)"},
        "tokenizer": {"end_token": "<|im_end|>", "end_id": tok.end_id,
                      "clean_up_tokenization_spaces": tok.clean_up_spaces,
                      "max_prompt_tokens": model.cfg.max_prompt_tokens},
        "opset": OPSET,
        "export_version": EXPORT_VERSION,
        "source": source_hashes(directory),
        "versions": versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "stage_seconds": timings,
        "command": command,
    }
    manifest.save(directory)
    bar.close()
    return manifest.onnx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m export.onnx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="artefact directory written by trainer.fit")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="also write the int8 dynamic-quantised score path for CPUs (default: on)")
    ap.add_argument("--fp16", action="store_true", help="also write a float16 score path for GPUs")
    ap.add_argument("--prompts", type=int, default=24, help="real prompts for the score parity check (default 24)")
    ap.add_argument("--explain", type=int, default=6, help="prompts for the greedy-explanation parity check (default 6)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE["fp32"],
                    help=f"max abs score difference allowed, fp32 (default {TOLERANCE['fp32']})")
    ap.add_argument("--dataset", action="append", default=None,
                    help="dataset for the parity prompts (default: the manifest's training datasets)")
    ap.add_argument("--events", default=None, help="an event log (CSV/Parquet/JSONL) for the parity prompts instead")
    ap.add_argument("--items", default=None, help="item table for --events")
    args = ap.parse_args(argv)
    if not (args.model / MANIFEST).is_file():
        ap.error(f"--model {args.model}: not a TRAIL artefact (no {MANIFEST}); train one with python -m trainer.fit")
    if args.prompts < max(BATCH_SIZES) + TRACE_BATCH:
        ap.error(f"--prompts must be at least {max(BATCH_SIZES) + TRACE_BATCH}")
    command = "python -m export.onnx " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        onnx = export(args.model, int8=args.int8, fp16=args.fp16, n_prompts=args.prompts, n_explain=args.explain,
                      tolerance=args.tolerance, datasets=args.dataset, events=args.events, items=args.items,
                      command=command)
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    summary = {role: {k: v for k, v in p.items() if k in ("max_abs_diff", "identical", "prompts", "rejected")}
               for role, p in onnx["parity"].items()}
    print(json.dumps({"files": {r: f["path"] for r, f in onnx["files"].items()}, "parity": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
