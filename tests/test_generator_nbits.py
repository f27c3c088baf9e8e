"""The weight-only 8-bit generator (export.nbits; issue 20, item 5): made from the shared test artefact's fp32
generator, it holds its teacher-forced parity with fp32, its constrained texts stay faithful, the export record
names it and the stream's explainer picks it on CPU (not on CUDA) once it passes the check again on this CPU,
and falls back to fp32 when it does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stream.core.faithfulness import check
from stream.core.faithfulness.grammar import CONSTRAINED_MAX_NEW_TOKENS, claim_grammar
from stream.core.forecast import PredictedCount
from stream.core.prompts import render_prompt
from stream.core.trends import TrendConfig
from stream.model.artefact import ONNX_DIR, Artefact, file_record, read_export, write_export
from stream.model.constraint import ClaimConstraint
from stream.model.onnx_models import CPU, CUDA, Generator
from serving_artefact import exported_artefact
from test_generator_speed import ITEMS

from export import nbits


def _trend(d: Path) -> TrendConfig:
    return TrendConfig.from_spec(json.loads((d / "manifest.json").read_text())["feature_spec"])


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The shared artefact with its files linked (not copied): the quantised generator is written beside them."""
    src = exported_artefact()
    dst = tmp_path_factory.mktemp("nbits") / "art"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != ONNX_DIR:
            (dst / f.name).symlink_to(f)
    (dst / ONNX_DIR).mkdir()
    for f in (src / ONNX_DIR).iterdir():
        if f.name == "export.json":
            shutil.copy(f, dst / ONNX_DIR / f.name)
        elif not f.name.startswith("generator."):
            (dst / ONNX_DIR / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="module")
def built(copy):
    art = Artefact.load(copy, _trend(copy))
    tok = art.tokenizer()
    prompts = tok.ids([render_prompt(t, c, s, 7, month="Dec") for t, c, s, _ in ITEMS[:3]])
    path, result = nbits.build(copy / ONNX_DIR, prompts, tok.end_id, 24, tok.decode)
    record = read_export(copy)
    record["files"][nbits.ROLE] = file_record(copy, path)
    record["parity"][nbits.ROLE] = result
    write_export(copy, record)
    return path, result


def test_the_8bit_generator_holds_its_parity_with_fp32(copy, built):
    path, result = built
    fp32 = copy / ONNX_DIR / "generator" / "model.onnx"
    assert path.stat().st_size < 0.6 * fp32.stat().st_size  # 8-bit blocks (the embedding lookup stays fp32)
    assert result["bits"] == 8 and result["accuracy_level"] == 4 and result["positions"] >= 3
    assert result["top1_agreement"] >= nbits.MIN_TOP1_AGREEMENT
    check = result["check"]  # what the stream repeats on its own CPU
    assert len(check["prompts"]) == len(check["fp32_top1"]) == 3
    assert [len(t) for t in check["fp32_top1"]] == [len(c) for c in check["continuations"]]
    assert 0 < result["max_abs_logit_diff"] < 10  # really quantised, and near fp32
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    assert next(n for n in nodes if "logits" in n.output).op_type == "MatMulNBits"  # the LM head (tied embedding)
    assert not [n.name for n in nodes if n.op_type == "MatMul" and ("/mlp/" in n.name or "_proj/" in n.name)]


def test_a_generator_below_the_threshold_is_refused_and_removed(copy, built, tmp_path):
    out = tmp_path / ONNX_DIR
    (out / "generator").mkdir(parents=True)
    (out / "generator" / "model.onnx").symlink_to(copy / ONNX_DIR / "generator" / "model.onnx")
    art = Artefact.load(copy, _trend(copy))
    tok = art.tokenizer()
    prompt = tok.ids([render_prompt(*ITEMS[0][:3], 7, month="Dec")])
    with pytest.raises(nbits.NbitsError, match="top-1 token agrees"):
        nbits.build(out, prompt, tok.end_id, 8, minimum=1.01)  # no quantised model agrees everywhere
    assert not (out / nbits.DIRNAME).exists()


def test_the_stream_serves_it_on_cpu_and_its_constrained_texts_are_faithful(copy, built):
    from stream.model.teacher_forced import generator_role

    art = Artefact.load(copy, _trend(copy))  # the record with the new file: size and sha256 verified
    assert art.has(nbits.ROLE) and art.parity(nbits.ROLE)["top1_agreement"] >= nbits.MIN_TOP1_AGREEMENT
    assert generator_role(art, [CPU]) == nbits.ROLE
    assert generator_role(art, [CUDA, CPU]) == "generator"
    tok = art.tokenizer()
    gen = Generator(art.path(generator_role(art, [CPU])), [CPU], tok.end_id, threads=1)
    prompts = tok.ids([render_prompt(t, c, s, 7, month="Dec") for t, c, s, _ in ITEMS])
    sizes = [PredictedCount(p, 7, 0.7 * p, 1.4 * p) for *_, p in ITEMS]
    grammars = [claim_grammar(s, 7, z.direction(s), size=z).lark() for (_, _, s, _), z in zip(ITEMS, sizes)]
    cc = ClaimConstraint(art.path("tokenizer"), tok.end_id)
    limit = max(art.max_explanation_tokens, CONSTRAINED_MAX_NEW_TOKENS)
    texts = [tok.decode(x) for x in gen.generate_batch(prompts, limit, cc.guide(grammars))]
    assert all(check(t, s, prediction=z).faithful for t, (_, _, s, _), z in zip(texts, ITEMS, sizes)), texts


def test_the_stream_falls_back_to_fp32_when_the_check_fails_on_its_cpu(copy, built):
    from stream.model.teacher_forced import generator_role

    art = Artefact.load(copy, _trend(copy))
    check = art.onnx["parity"][nbits.ROLE]["check"]
    check["fp32_top1"] = [[(t + 1) % 100 for t in top] for top in check["fp32_top1"]]  # tokens it never puts first
    assert generator_role(art, [CPU]) == "generator"
    del art.onnx["parity"][nbits.ROLE]["check"]  # an export that recorded no check is not served either
    assert generator_role(art, [CPU]) == "generator"
