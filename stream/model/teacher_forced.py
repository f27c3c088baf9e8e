"""Teacher-forced top-1 agreement of a generator file with recorded fp32 tokens: the parity measure of a
quantised generator (export.nbits), and the check the stream repeats on its own CPU before serving one
(`generator_role`, which the explainer and export.bench both ask), since a quantised model's integer kernels
differ from CPU to CPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from stream.model.onnx_models import CPU, session_options

if TYPE_CHECKING:
    from stream.model.artefact import Artefact

log = structlog.get_logger(__name__)


def all_positions_session(path: Path, threads: int | None = 1) -> Any:
    """The generator with its LM head on every position (the export slices the last one,
    export.onnx.last_position_logits), for teacher forcing."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    g = model.graph
    cut = next((n for n in g.node if n.name == "/trail/last_position"), None)
    if cut is not None:
        for n in g.node:
            n.input[:] = [cut.input[0] if i == cut.output[0] else i for i in n.input]
        g.node.remove(cut)
        for o in g.output:
            if o.name == "logits":
                o.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=[CPU])


def teacher_forced_logits(sess: Any, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """(len(continuation), V): the logits that predict each continuation token, prompt + continuation in one pass."""
    ids = np.array([prompt + continuation], np.int64)
    feed: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in {i.name for i in sess.get_inputs()}:
        feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    logits = sess.run(["logits"], feed)[0][0]
    return logits[len(prompt) - 1: len(prompt) + len(continuation) - 1]


def top1_agreement(path: Path, check: dict[str, Any], threads: int | None = 1) -> float:
    """Share of the recorded positions (check: "prompts", "continuations", "fp32_top1", token ids) where the
    generator at `path` puts the same token first as the fp32 generator did where it was exported."""
    sess = all_positions_session(path, threads)
    agree = total = 0
    for p, c, top in zip(check["prompts"], check["continuations"], check["fp32_top1"]):
        if c:
            agree += int((teacher_forced_logits(sess, p, c).argmax(-1) == np.asarray(top)).sum())
            total += len(c)
    return agree / total if total else 0.0


def generator_role(artefact: "Artefact", providers: list[str]) -> str:
    """The generator file the explainer runs: on CPU, a quantised copy when the export wrote one: the
    weight-only n-bit one first (export.nbits) if it passes its parity check again on this CPU (its integer
    kernels differ from CPU to CPU: teacher-forced top-1 agreement with the fp32 tokens the export recorded,
    a few seconds), else the dynamic int8 one (export.onnx --generator-int8); fp32 otherwise."""
    if providers[0] != CPU:
        return "generator"
    if artefact.has("generator.nbits"):
        parity = artefact.parity("generator.nbits")
        check, minimum = parity.get("check"), parity.get("min_top1_agreement")
        agreement = top1_agreement(artefact.path("generator.nbits"), check) if check and minimum else None
        if agreement is not None and agreement >= minimum:
            log.info("serving.generator_nbits", top1_agreement=round(agreement, 4), minimum=minimum)
            return "generator.nbits"
        log.warning("serving.generator_nbits_refused", top1_agreement=agreement, minimum=minimum,
                    note="the quantised generator does not hold its parity with fp32 on this CPU (or its export "
                         "recorded no check); serving the next generator")
    return "generator.int8" if artefact.has("generator.int8") else "generator"
