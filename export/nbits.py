"""A weight-only 8-bit copy of the generator (onnxruntime's MatMulNBits), for faster explanations on CPUs.

    python -m export.nbits --model models/trail-smollm2        # after export.onnx; or export.onnx --generator-nbits 8

Writes DIR/onnx/generator.nbits/model.onnx beside the fp32 generator and records it in the export record
(files "generator.nbits", parity "generator.nbits"); the stream serves it on CPU when present
(stream.model.teacher_forced.generator_role). Every MatMul weight of the decoder, the LM head included (it reads
the tied embedding through a Transpose, folded here into a constant so that the quantiser takes it), is
stored as `bits`-bit integers in blocks of `block_size` along K with an fp32 scale and zero point per
block; the embedding lookup stays fp32. v8 on 2 cores: ~1.3x the batched explanations per CPU-second of
fp32 (docs/serving.md "Weight-only quantisation"); 4-bit weights were faster still (~1.45x) but moved the
logits too far (top-1 agreement with fp32 0.78-0.85, no greedy text identical), so 8 is the default.

Why this and not `--generator-int8` (quantize_dynamic, MatMulInteger u8s8): both compute with int8
activations on kernels that MLAS picks by instruction set, and the dynamic one saturates in vpmaddubsw on
AVX2 without VNNI. MatMulNBits' AVX2 kernels for 8-bit weights avoid that saturation (each weight pair is
split into its low and high byte before vpmaddubsw, sqnbitgemm_kernel_avx2_int8_blklen64.h,
accumulate_q8_*), and its error stays at a few logits
(max |diff| 4.2, top-1 agreement 0.977 here). But its logits are not the same from one instruction set to
the next: teacher-forced on the same tokens, this Xeon (AVX-512 VNNI) and qemu -cpu EPYC-Rome (AVX2 only)
gave logits as far apart as either is from fp32 (docs/serving.md). So its parity is never assumed to carry
over to another CPU: the export checks it where it runs, records a few prompts' fp32 tokens (parity
"check"), and the stream repeats that check on its own CPU before serving the file and serves fp32 when it
fails (stream.model.teacher_forced.generator_role). accuracy_level 0/1 (fp32 compute, no integer products) was 4x
slower than fp32 for 8-bit weights (onnxruntime dequantises them on every call) and no faster for 4-bit.

Parity against the fp32 generator, defined so that it is deterministic and does not depend on the
quantised model's own earlier choices: the fp32 ONNX generator's greedy continuations of real prompts are
fed to both models in one pass each (teacher forcing, logits at every position); recorded are the largest
|logit difference|, the share of positions whose top-1 token agrees (required >= MIN_TOP1_AGREEMENT), and,
as information only, how many prompts' own greedy text is identical. The stream's explanations are
constrained to their claim grammar, so every claim stays true whatever the logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.model.teacher_forced import all_positions_session, teacher_forced_logits

BITS = 8
BLOCK_SIZE = 128
ACCURACY_LEVEL = 4  # int8 activations x n-bit weights in integers (see the docstring)
ROLE = "generator.nbits"
CHECK_PROMPTS = 3  # recorded for the stream's own check (a few seconds at start-up)
DIRNAME = "generator.nbits"
# share of teacher-forced positions whose top-1 token must equal the fp32 generator's. v8, 8-bit blocks of 128:
# 0.977 on 20 real prompts (993 positions), 0.971 on 12 others (610); 4-bit weights 0.78-0.85 (refused); kernels
# that saturate or otherwise break fall far lower
MIN_TOP1_AGREEMENT = 0.93


class NbitsError(Exception):
    """The quantised generator failed its parity check against fp32 (or could not be made)."""


def fold_transposed_weights(model: Any) -> int:
    """A MatMul that reads Transpose(initializer) (the LM head on the tied embedding) gets the transposed
    weight as its own initializer: the weight-only quantiser takes constant weights only."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    folded = 0
    for n in list(g.node):
        if n.op_type != "Transpose" or n.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[0]])
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), n.output[0]))
        g.node.remove(n)
        folded += 1
    return folded


def quantise(src: Path, dst: Path, bits: int = BITS, block_size: int = BLOCK_SIZE,
             accuracy_level: int = ACCURACY_LEVEL) -> Path:
    """src (the fp32 generator) -> dst, its MatMul weights in `bits`-bit blocks (MatMulNBits)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    fold_transposed_weights(model)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                             accuracy_level=accuracy_level or None, op_types_to_quantize=("MatMul",))
    q.process()
    if not any(n.op_type == "MatMulNBits" for n in q.model.model.graph.node):
        raise NbitsError(f"{src}: the quantiser replaced no MatMul")
    dst.parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(dst), use_external_data_format=False)  # 8-bit: ~255 MB, one file
    return dst


def _greedy(gen: Any, prompts: list[list[int]], max_new_tokens: int, batch: int = 6) -> list[list[int]]:
    """Greedy continuations, a few prompts a batch (rows are computed independently on CPU: the same tokens as
    one at a time, tests/test_generator_speed.py), ~3x faster than one by one."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        out += gen.generate_batch(prompts[i:i + batch], max_new_tokens)
    return out


def parity(fp32: Path, quantised: Path, prompts: list[list[int]], end_id: int, max_new_tokens: int,
           decode=None, threads: int | None = 1) -> dict[str, Any]:
    """The quantised generator against the fp32 one on `prompts` (token ids): see the module docstring."""
    from stream.model.onnx_models import CPU, Generator

    ref = Generator(fp32, [CPU], end_id, threads)
    continuations = _greedy(ref, prompts, max_new_tokens)
    del ref
    s32, sq = all_positions_session(fp32, threads), all_positions_session(quantised, threads)
    diffs, agree, positions, tops = [], 0, 0, []
    for p, c in zip(prompts, continuations):
        if not c:
            tops.append([])
            continue
        a, b = teacher_forced_logits(s32, p, c), teacher_forced_logits(sq, p, c)
        diffs.append(float(np.abs(a - b).max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += len(c)
        tops.append(a.argmax(-1).tolist())
    del s32, sq
    own = _greedy(Generator(quantised, [CPU], end_id, threads), prompts, max_new_tokens)
    same = [x == y for x, y in zip(own, continuations)]
    out: dict[str, Any] = {
        "reference": "fp32 generator, teacher-forced on its greedy continuations",
        "prompts": len(prompts), "positions": positions,
        "top1_agreement": round(agree / positions, 4) if positions else None,
        "min_top1_agreement": MIN_TOP1_AGREEMENT,
        "max_abs_logit_diff": round(max(diffs), 4) if diffs else None,
        "median_max_abs_logit_diff": round(float(np.median(diffs)), 4) if diffs else None,
        "greedy_identical": int(sum(same)), "max_new_tokens": max_new_tokens,
        # what the stream repeats on its own CPU before serving the file (stream.model.teacher_forced.generator_role):
        # the first CHECK_PROMPTS prompts, their fp32 continuations and fp32's top-1 tokens there
        "check": {"prompts": prompts[:CHECK_PROMPTS], "continuations": continuations[:CHECK_PROMPTS],
                  "fp32_top1": tops[:CHECK_PROMPTS]},
    }
    if decode is not None and not all(same):
        i = same.index(False)
        out["first_difference"] = {"fp32": decode(continuations[i]), "quantised": decode(own[i])}
    return out


def require(result: dict[str, Any], minimum: float = MIN_TOP1_AGREEMENT) -> None:
    got = result.get("top1_agreement")
    if got is None or got < minimum:
        raise NbitsError(f"the quantised generator's top-1 token agrees with fp32's at {got} of "
                         f"{result.get('positions')} teacher-forced positions, below the {minimum} required")


def build(out_dir: Path, prompts: list[list[int]], end_id: int, max_new_tokens: int, decode=None,
          bits: int = BITS, block_size: int = BLOCK_SIZE, accuracy_level: int = ACCURACY_LEVEL,
          threads: int | None = 1, minimum: float = MIN_TOP1_AGREEMENT) -> tuple[Path, dict[str, Any]]:
    """Quantise out_dir/generator/model.onnx into out_dir/generator.nbits/model.onnx (an ONNX dir of an
    export) and check it: (path, parity record). Raises NbitsError (the file removed) below `minimum`."""
    import shutil

    t0 = time.time()
    dst = quantise(out_dir / "generator" / "model.onnx", out_dir / DIRNAME / "model.onnx", bits, block_size,
                   accuracy_level)
    result = parity(out_dir / "generator" / "model.onnx", dst, prompts, end_id, max_new_tokens, decode, threads)
    result |= {"bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
               "seconds": round(time.time() - t0, 1)}
    try:
        require(result, minimum)
    except NbitsError:
        shutil.rmtree(dst.parent, ignore_errors=True)
        raise
    return dst, result


def add_to_export(directory: Path, n_prompts: int = 20, bits: int = BITS, block_size: int = BLOCK_SIZE,
                  accuracy_level: int = ACCURACY_LEVEL, *, cache_dir: Path) -> dict[str, Any]:
    """The quantised generator added to an existing export (its record updated): parity on real prompts of
    the manifest's datasets (export.rows.explain_rows, as the stream meets them)."""
    from export.rows import explain_rows
    from stream.core.trends import TrendConfig
    from stream.model.artefact import ONNX_DIR, Artefact, file_record, read_export, write_export

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    art = Artefact.load(directory, TrendConfig.from_spec(manifest["feature_spec"]))
    tok = art.tokenizer()
    prompts = tok.ids([p for p, _, _ in explain_rows(manifest, n_prompts, seed=1, cache_dir=cache_dir)])
    path, result = build(directory / ONNX_DIR, prompts, tok.end_id, art.max_explanation_tokens, tok.decode, bits,
                         block_size, accuracy_level)
    record = read_export(directory)
    record["files"][ROLE] = file_record(directory, path)
    record["parity"][ROLE] = result
    write_export(directory, record)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.nbits", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="an exported artefact (python -m export.onnx first)")
    ap.add_argument("--prompts", type=int, default=20, help="real prompts for the parity check (default 20)")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=BITS, help=f"weight bits (default {BITS})")
    ap.add_argument("--block-size", type=int, choices=(32, 64, 128), default=BLOCK_SIZE,
                    help=f"weights per quantisation block along K (default {BLOCK_SIZE})")
    args = ap.parse_args(argv)
    from stream.settings import load_settings

    try:
        result = add_to_export(args.model, args.prompts, args.bits, args.block_size,
                               cache_dir=load_settings().cache_dir)  # the one environment read: TRAIL_CACHE
    except NbitsError as e:
        print(f"export.nbits failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
