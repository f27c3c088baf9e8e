"""onnxruntime sessions for the exported TRAIL model: item encoder, score head, greedy generator.

Providers are chosen once, at start: CUDA when onnxruntime-gpu is installed and a GPU
answers, else CPU; which one actually runs is read back from the session (onnxruntime
silently drops a provider it cannot initialise, e.g. onnxruntime-gpu without a GPU) and
logged. On CUDA, inputs and outputs go through IO binding, and the generator keeps its
key/value cache on the GPU between steps.

The generator is optimum's `text-generation-with-past` export of the merged model; the
loop below is the greedy search of `Trail.explain` (transformers' `generate` with
do_sample=False) in numpy: prompt in one pass, then one token per step with the cache,
stopping at the end token or after `max_new_tokens`. `generate_batch` runs several prompts
at once (left padding, per-row stop; equal to one at a time), optionally held to per-row
claim grammars (stream.model.constraint) with grammar-forced tokens fast-forwarded.

With `temperature > 0` it samples instead (`Sampler`): after the grammar's mask, softmax of
logits / temperature over the allowed tokens, a nucleus (top-p) cut, and a draw from the row's
own `numpy.random.Generator(PCG64(seed))`; a row's text then depends on its prompt and its seed
only, not on the other rows of its batch. Temperature 0 is the greedy argmax, unchanged.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from stream.core.decoding import check as check_sampling

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


def session_options(threads: int | None = None, spin: bool = True) -> Any:
    """`spin` False: the intra-op threads sleep as soon as a run ends instead of spinning for more work. For the
    tick's small networks (score head, range head), run back to back on the event loop's cores: their threads'
    spinning took CPU from each other's next run and from ingest, and a warm retail tick scored in 0.027-0.035 s
    without it against 0.039-0.061 s with it (2-core AMD EPYC, `export.bench`'s tick; docs/serving.md). The generator
    keeps spinning: its decode passes follow one another, and its 2-thread rate fell without it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # onnxruntime's own warnings (e.g. a provider it dropped) go through our log line
    return so


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (at most 19), so that its work takes only the CPU time the
    threads at normal priority leave: the explainer's decoding beside ingest and scoring (TRAIL_EXPLAIN_NICE). On
    Linux the nice value belongs to a thread (setpriority(2)); a single-thread onnxruntime session computes on the
    thread that calls it, so the whole decode runs at that priority. Elsewhere (no per-thread nice) it is logged and
    the thread keeps its priority, as it does where the OS refuses."""
    if nice <= 0:
        return
    if not sys.platform.startswith("linux"):
        log.warning("onnx.nice_unavailable", nice=nice, platform=sys.platform, note="no per-thread nice here")
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:  # a pool whose initializer raises is broken for good: decode at the caller's priority
        log.warning("onnx.nice_refused", nice=nice, error=str(e))


def open_session(path: Path, providers: list[str], threads: int | None = None, role: str = "",
                 spin: bool = True) -> Any:
    """An InferenceSession (`session_options`); a missing or corrupt file is a clear error now."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: ONNX file not found ({role})")
    try:
        sess = ort.InferenceSession(str(path), session_options(threads, spin), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise RuntimeError(f"{path} ({role}) cannot be loaded by onnxruntime: {e}") from e
    got = sess.get_providers()
    if providers[0] == CUDA and got[0] != CUDA:
        log.warning("onnx.cuda_unavailable", role=role, asked=providers, using=got,
                    reason="onnxruntime-gpu is installed but CUDA could not be initialised; falling back to CPU")
    return sess


def on_cuda(sess: Any) -> bool:
    return sess.get_providers()[0] == CUDA


class _Session:
    """One onnxruntime session run on numpy feeds; on CUDA through IO binding."""

    def __init__(self, path: Path, providers: list[str], threads: int | None, role: str, outputs: list[str],
                 spin: bool = True) -> None:
        self.sess = open_session(path, providers, threads, role, spin)
        self.path = Path(path)
        self.cuda = on_cuda(self.sess)
        self.provider = self.sess.get_providers()[0]
        self.outputs = outputs
        got = [o.name for o in self.sess.get_outputs()]
        if any(o not in got for o in outputs):
            raise RuntimeError(f"{path} ({role}): outputs {got}, expected {outputs}; export again")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.cuda:
            return [v.astype(np.float32, copy=False) for v in self.sess.run(self.outputs, feed)]
        binding = self.sess.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cuda")
        self.sess.run_with_iobinding(binding)
        return [v.astype(np.float32, copy=False) for v in binding.copy_outputs_to_cpu()]


class ItemEncoder(_Session):
    """input_ids, attention_mask (B, T) int64 -> item_state (B, H) float32: the fine-tuned LLM's last hidden
    layer, mean-pooled over the item text's tokens (item_encoder.onnx). Run once per item, cached by the scorer."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None, role: str = "item_encoder") -> None:
        super().__init__(path, providers, threads, role, ["item_state"])

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.run({"input_ids": ids.astype(np.int64, copy=False),
                         "attention_mask": mask.astype(np.int64, copy=False)})[0]


class ScoreHeadModel(_Session):
    """x (B, S) normalised signals, item_state (B, H) -> score (B,) ranking score, log_count (B,) predicted
    log1p(next-period count) (head.onnx). A small network: run on every active item every tick."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None, role: str = "head") -> None:
        super().__init__(path, providers, threads, role, ["score", "log_count"], spin=False)

    def __call__(self, x: np.ndarray, item_state: np.ndarray, batch: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        if len(x) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        scores, counts = [], []
        for i in range(0, len(x), batch):
            s, c = self.run({"x": np.ascontiguousarray(x[i : i + batch], np.float32),
                             "item_state": np.ascontiguousarray(item_state[i : i + batch], np.float32)})
            scores.append(s)
            counts.append(c)
        return np.concatenate(scores), np.concatenate(counts)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
                 candidates: int = 256) -> int:
    """One token drawn from a row of (masked) logits: softmax(logits / temperature) over the allowed
    (not -inf) tokens, cut to the nucleus (the fewest most likely tokens whose probability reaches top_p),
    renormalised, one uniform draw from `rng`.

    The tokens are ranked by (logit desc, token id asc), so a nucleus of one token is exactly the greedy
    argmax (ties: the lowest id, as numpy's argmax); then no number is drawn. Only the top `candidates`
    allowed tokens are sorted when they already hold top_p of the mass (np.argpartition; a full 49k sort
    otherwise), so an unconstrained step costs a partition, not a sort."""
    allowed = np.flatnonzero(logits > -np.inf)
    n = allowed.size
    if n <= 1:
        return int(allowed[0]) if n else int(logits.argmax())  # forced (or nothing allowed: as greedy)
    x = logits[allowed]  # ranked by the raw logits: the order of logits / temperature, without rounding ties
    e = np.exp((x - x.max()) * np.float32(1.0 / temperature))
    total = e.sum(dtype=np.float64)
    cand = None
    if n > candidates and top_p < 1:
        top = np.argpartition(-x, candidates - 1)[:candidates]
        if e[top].sum(dtype=np.float64) >= top_p * total:
            cand = top
    if cand is None:
        cand = np.arange(n)
    order = cand[np.lexsort((cand, -x[cand]))]  # logit desc, then token id asc (allowed is ascending)
    probs = e[order].astype(np.float64) / total
    k = len(order) if top_p >= 1 else min(len(order), int(np.searchsorted(np.cumsum(probs), top_p)) + 1)
    if k == 1:
        return int(allowed[order[0]])
    cum = np.cumsum(probs[:k])
    j = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), k - 1)
    return int(allowed[order[j]])


def row_seeds(seeds: Sequence[int] | None, rows: int) -> list[int]:
    """One sampling seed per row of a batch: `seeds` (exactly one per row), or 0 for every row when None."""
    out = [0] * rows if seeds is None else [int(s) for s in seeds]
    if len(out) != rows:
        raise ValueError(f"{len(out)} seeds for {rows} prompts: give one per row")
    return out


class Sampler:
    """Seeded nucleus sampling for the rows of one batch: one `numpy.random.Generator(PCG64(seed))` per row,
    drawn from only when that row has a real choice, so a row's draws depend on its own tokens alone."""

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int]) -> None:
        check_sampling(temperature, top_p)
        if temperature <= 0:
            raise ValueError("Sampler needs temperature > 0 (0 is greedy: no sampler)")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.rngs = [np.random.Generator(np.random.PCG64(int(s))) for s in seeds]

    def __len__(self) -> int:
        return len(self.rngs)

    def row(self, logits: np.ndarray, i: int) -> int:
        """The token of row i from its (V,) logits."""
        return sample_token(logits, self.temperature, self.top_p, self.rngs[i])

    def pick(self, logits: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """(B,) tokens: rows in `rows` sampled from their logits (B, V), the others 0 (not read)."""
        tokens = np.zeros(len(logits), np.int64)
        for i in rows:
            tokens[i] = self.row(logits[i], i)
        return tokens


@dataclass(frozen=True)
class _Cache:
    names: list[tuple[str, str]]  # (input name, output name) per cache tensor
    kv_heads: int
    head_dim: int
    dtype: Any


class Generator:
    """Greedy (or seeded sampled) decoding on optimum's decoder-with-past export, one prompt or a batch,
    optionally constrained."""

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

    def generate(self, prompt_ids: list[int], max_new_tokens: int, guide: Any = None, *,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[int]:
        """New token ids after the prompt (the end token, when reached, is the last)."""
        return self.generate_batch([prompt_ids], max_new_tokens, guide, temperature=temperature, top_p=top_p,
                                   seeds=[seed])[0]

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, guide: Any = None,
                       fast_forward: bool = True, *, temperature: float = 0.0, top_p: float = 1.0,
                       seeds: Sequence[int] | None = None, compact: bool = True) -> list[list[int]]:
        """Greedy continuations of several prompts in one batch: left padding, an attention mask that hides
        the padding, position ids counted from each row's first real token (as transformers' generate), and a
        stop per row (a finished row leaves the batch, see `compact`; without it, it is fed the end token until
        every row is done).

        `guide` (stream.model.constraint.Guide, one matcher per row) masks each row's logits before the
        argmax. With `fast_forward`, the tokens its grammar forces after a sampled one (the rest of a number
        or of a window phrase: about half of a constrained text) join that token in the next step's input, so
        one decoder pass advances a row by several tokens; rows of different lengths in one step are
        left-padded inside the step (masked slots), and each row's logits are read at its last real token.

        `temperature > 0` samples instead of the argmax (`Sampler`: after the guide's mask, top-p nucleus,
        row i drawing from PCG64(seeds[i]); seeds None: 0 for every row); forced tokens stay forced.
        `temperature` 0 is greedy, the same tokens as without these arguments.

        With `compact` (CPU only), a row that has finished leaves the batch: its slice of the cache, mask and
        positions is dropped, so the passes after it compute only the rows still writing: about a fifth fewer
        decoding slots on the bench's rows, 1.07-1.11x explanations per CPU-second. onnxruntime's CPU kernels
        compute each row from that row alone (a row subset's logits and cache are bitwise the full batch's),
        so the texts are the full batch's (tests/test_generator_speed.py)."""
        if not prompts:
            return []
        check_sampling(temperature, top_p)
        sampler = Sampler(temperature, top_p, row_seeds(seeds, len(prompts))) if temperature > 0 else None
        c = self.cache
        b = len(prompts)
        width = max(len(p) for p in prompts)
        ids = np.full((b, width), self.end_id, np.int64)
        mask = np.zeros((b, width), np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        next_pos = mask.sum(axis=1)  # (B,) position of each row's next token
        past: dict[str, Any] = {name: np.zeros((b, c.kv_heads, 0, c.head_dim), c.dtype) for name, _ in c.names}
        out: list[list[int]] = [[] for _ in range(b)]
        live = list(range(b))
        compact = compact and not self.cuda
        rows = list(range(b))  # the prompt (row of `out`) at each position of the batch fed to the model
        while live:
            feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
            if "position_ids" in self.inputs:
                feed["position_ids"] = positions
            logits, past = self._step(feed, past)
            if len(rows) == b:
                last = np.ascontiguousarray(logits[:, -1], dtype=np.float32)
            else:  # a compacted batch: its logits go back to their rows (the guide and sampler index by row)
                last = np.zeros((b, logits.shape[-1]), np.float32)
                last[rows] = logits[:, -1]
            if guide is not None:
                guide.mask(last, live)
            tokens = last.argmax(axis=1) if sampler is None else sampler.pick(last, live)
            if guide is not None:
                guide.advance(live, [int(tokens[i]) for i in live])
            step: dict[int, list[int]] = {}
            for i in live:
                t = int(tokens[i])
                out[i].append(t)
                step[i] = [t]
                if t == self.end_id or len(out[i]) >= max_new_tokens:
                    continue
                if guide is not None and fast_forward:
                    ff = guide.fast_forward(i, max_new_tokens - len(out[i]))
                    out[i] += ff
                    step[i] += ff
                    if guide.stopped(i) and len(out[i]) < max_new_tokens:
                        out[i].append(self.end_id)  # complete: the end token is the only one left
            live = [i for i in live if out[i][-1] != self.end_id and len(out[i]) < max_new_tokens]
            if not live:
                break
            if compact and len(live) < len(rows):
                alive = set(live)
                keep = [j for j, i in enumerate(rows) if i in alive]
                rows = [rows[j] for j in keep]
                mask = mask[keep]
                past = {name: v[keep] for name, v in past.items()}
            k = max(len(step[i]) for i in live)
            ids = np.full((len(rows), k), self.end_id, np.int64)
            new_mask = np.zeros((len(rows), k), np.int64)
            positions = np.zeros((len(rows), k), np.int64)
            for j, i in enumerate(rows):
                row = step.get(i, [self.end_id]) if i in live else [self.end_id]
                n = len(row)
                ids[j, k - n:] = row
                new_mask[j, k - n:] = 1
                positions[j, :] = next_pos[i]
                positions[j, k - n:] = next_pos[i] + np.arange(n)
                next_pos[i] += n
            mask = np.concatenate([mask, new_mask], axis=1)
        return out

    def close(self) -> None:
        """Nothing to stop (the session computes on its caller's thread); `ShardedGenerator.close` stops its threads."""

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


class ShardedGenerator:
    """`shards` single-thread sessions of one generator file, each decoding a contiguous share of a batch's rows,
    all at once (one thread each: onnxruntime and llguidance compute without the GIL). The explainer's way to use
    several CPU cores (TRAIL_EXPLAIN_THREADS > 1). On a 2-core VM (an AMD EPYC, export.bench's `cpu`), v12's 8-bit
    generator gave 4.5-4.7 explanations/s at 2.7 per CPU-second. One session with 2 intra-op threads gave 4.4-4.6
    at 2.2-2.3: its two threads meet at each of a decode pass's ~3,000 small kernels. One thread alone gave 3.0
    (docs/serving.md).
    Each row is decoded as in one batch (`Generator.generate_batch`: a row's logits come from that row alone), with
    its own seed and its own matcher (`Guide.part`). The first shard runs on the caller's thread, the others on
    this object's threads, started at `nice` (`lower_thread_priority`)."""

    def __init__(self, path: Path, providers: list[str], end_id: int, shards: int, nice: int = 0) -> None:
        if shards < 2:
            raise ValueError(f"a sharded generator needs 2 or more shards, got {shards} (use Generator)")
        self.parts = [Generator(path, providers, end_id, threads=1) for _ in range(shards)]
        self.end_id = end_id
        self.cuda = self.parts[0].cuda
        self._pool = ThreadPoolExecutor(shards - 1, thread_name_prefix="trail-generator-shard",
                                        initializer=lower_thread_priority, initargs=(nice,))

    def generate(self, prompt_ids: list[int], max_new_tokens: int, guide: Any = None, *,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[int]:
        return self.parts[0].generate(prompt_ids, max_new_tokens, guide, temperature=temperature, top_p=top_p,
                                      seed=seed)

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, guide: Any = None,
                       fast_forward: bool = True, *, temperature: float = 0.0, top_p: float = 1.0,
                       seeds: Sequence[int] | None = None, compact: bool = True) -> list[list[int]]:
        """`Generator.generate_batch`, the rows split into up to `shards` contiguous shards decoded at once."""
        if not prompts:
            return []
        seeds = row_seeds(seeds, len(prompts))
        shards = [s.tolist() for s in np.array_split(np.arange(len(prompts)), min(len(self.parts), len(prompts)))]
        guides = [guide.part(rows) if guide is not None else None for rows in shards]

        def run(k: int) -> list[list[int]]:
            rows = shards[k]
            return self.parts[k].generate_batch([prompts[i] for i in rows], max_new_tokens, guides[k], fast_forward,
                                                temperature=temperature, top_p=top_p, seeds=[seeds[i] for i in rows],
                                                compact=compact)

        rest = [self._pool.submit(run, k) for k in range(1, len(shards))]
        try:
            out = run(0)
        finally:
            wait(rest)  # no shard outlives its batch, even when one failed (the next batch reuses the sessions)
        for f in rest:
            out += f.result()
        if guide is not None:
            guide.absorb(guides)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def explain_generator(path: Path, providers: list[str], end_id: int, threads: int,
                      nice: int = 0) -> Generator | ShardedGenerator:
    """The explainer's generator for `threads` CPU threads: on CPU with 2 or more, a ShardedGenerator (a session
    per thread, its own threads at `nice`); else one session (on CUDA the GPU does the work whatever the threads)."""
    if threads > 1 and providers[0] == CPU:
        return ShardedGenerator(path, providers, end_id, threads, nice)
    return Generator(path, providers, end_id, threads)
