"""onnxruntime sessions for the exported TRAIL model: score path, numeric prior, greedy generator.

Providers are chosen once, at start: CUDA when onnxruntime-gpu is installed and a GPU
answers, else CPU; which one actually runs is read back from the session (onnxruntime
silently drops a provider it cannot initialise, e.g. onnxruntime-gpu without a GPU) and
logged. On CUDA, inputs and outputs go through IO binding, and the generator keeps its
key/value cache on the GPU between steps.

The generator is optimum's `text-generation-with-past` export of the merged model; the
loop below is the greedy search of `Trail.explain` (transformers' `generate` with
do_sample=False) in numpy: prompt in one pass, then one token per step with the cache,
stopping at the end token or after `max_new_tokens`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(prefer: str = "auto") -> list[str]:
    """Providers to ask for, best first: `auto` = CUDA if this onnxruntime build has it, then CPU."""
    if prefer not in ("auto", "cuda", "cpu"):
        raise ValueError(f"provider {prefer!r}: use auto, cuda or cpu")
    if prefer == "cpu":
        return [CPU]
    if CUDA in available_providers():
        return [CUDA, CPU]
    if prefer == "cuda":
        raise RuntimeError("TRAIL_PROVIDER=cuda but this onnxruntime has no CUDAExecutionProvider: "
                           "pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
    return [CPU]


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # onnxruntime's own warnings (e.g. a provider it dropped) go through our log line
    return so


def open_session(path: Path, providers: list[str], threads: int | None = None, role: str = "") -> Any:
    """An InferenceSession; a missing or corrupt file is a clear error now."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: ONNX file not found ({role})")
    try:
        sess = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise RuntimeError(f"{path} ({role}) cannot be loaded by onnxruntime: {e}") from e
    got = sess.get_providers()
    if providers[0] == CUDA and got[0] != CUDA:
        log.warning("onnx.cuda_unavailable", role=role, asked=providers, using=got,
                    reason="onnxruntime-gpu is installed but CUDA could not be initialised; falling back to CPU")
    return sess


def on_cuda(sess: Any) -> bool:
    return sess.get_providers()[0] == CUDA


def default_threads() -> int | None:
    v = os.environ.get("TRAIL_ORT_THREADS", "").strip()
    return int(v) if v else None


class ScoreModel:
    """input_ids (B, T), attention_mask (B, T), features (B, S) -> score (B,): predicted log1p(count)."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None, role: str = "score") -> None:
        self.sess = open_session(path, providers, threads, role)
        self.path = Path(path)
        self.cuda = on_cuda(self.sess)
        self.provider = self.sess.get_providers()[0]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, x: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids.astype(np.int64, copy=False), "attention_mask": mask.astype(np.int64, copy=False),
                "features": x.astype(np.float32, copy=False)}
        if not self.cuda:
            return self.sess.run(["score"], feed)[0].astype(np.float32, copy=False)
        binding = self.sess.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("score", "cuda")
        self.sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)


class NumericModel:
    """features (B, S) -> the score head's numeric branch (B,): the cheap prior over every active item."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        # A 3-layer MLP: the CPU is faster than a round trip to the GPU.
        self.sess = open_session(path, [CPU], threads, "numeric")

    def __call__(self, x: np.ndarray, batch: int = 8192) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, np.float32)
        return np.concatenate([self.sess.run(["score"], {"features": x[i : i + batch]})[0]
                               for i in range(0, len(x), batch)]).astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Cache:
    names: list[tuple[str, str]]  # (input name, output name) per cache tensor
    kv_heads: int
    head_dim: int
    dtype: Any


class Generator:
    """Greedy decoding on optimum's decoder-with-past export; one prompt at a time, as Trail.explain."""

    def __init__(self, path: Path, providers: list[str], end_id: int, threads: int | None = None) -> None:
        self.sess = open_session(path, providers, threads, "generator")
        self.cuda = on_cuda(self.sess)
        self.end_id = end_id
        inputs = {i.name: i for i in self.sess.get_inputs()}
        self.inputs = set(inputs)
        past = sorted((n for n in inputs if n.startswith("past_key_values.")),
                      key=lambda n: (int(n.split(".")[1]), n.split(".")[2]))
        if not past or "input_ids" not in inputs:
            raise RuntimeError(f"{path}: not a decoder-with-past export (inputs {sorted(inputs)})")
        shape = inputs[past[0]].shape  # [batch, kv_heads, past_len, head_dim]
        dtype = np.float16 if inputs[past[0]].type == "tensor(float16)" else np.float32
        self.cache = _Cache([(n, n.replace("past_key_values", "present")) for n in past], int(shape[1]),
                            int(shape[3]), dtype)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """New token ids after the prompt (the end token, when reached, is the last)."""
        c = self.cache
        ids = np.asarray([prompt_ids], np.int64)
        n = ids.shape[1]
        past: dict[str, Any] = {name: np.zeros((1, c.kv_heads, 0, c.head_dim), c.dtype) for name, _ in c.names}
        out: list[int] = []
        for step in range(max_new_tokens):
            total = n + len(out)
            feed: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64)}
            if "position_ids" in self.inputs:
                feed["position_ids"] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None, :]
            logits, past = self._step(feed, past)
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
            if token == self.end_id:
                break
            ids = np.asarray([[token]], np.int64)
        return out

    def _step(self, feed: dict[str, Any], past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        names = self.cache.names
        if not self.cuda:
            outputs = self.sess.run(["logits"] + [o for _, o in names], {**feed, **past})
            return outputs[0], {i: v for (i, _), v in zip(names, outputs[1:])}
        binding = self.sess.io_binding()
        for k, v in feed.items():
            binding.bind_cpu_input(k, v)
        for k, v in past.items():
            if isinstance(v, np.ndarray):
                binding.bind_cpu_input(k, v)
            else:
                binding.bind_ortvalue_input(k, v)
        binding.bind_output("logits", "cpu")
        for _, o in names:
            binding.bind_output(o, "cuda")  # the cache stays on the GPU between steps
        self.sess.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), {i: v for (i, _), v in zip(names, values[1:])}
