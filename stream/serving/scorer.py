"""Scores the active items of a tick with the exported TRAIL model (onnxruntime, no torch).

Per tick, as the trainer scores an evaluation cut-off (trainer.inference.score_frame):

1. features of every active item (`Features`: the manifest's normalisation);
2. the cheap prior: the score head's numeric branch (numeric.onnx, a small MLP) on all of them;
3. the top `top_n` by that prior get the LLM score path (score.onnx): prompt rendered by
   `stream.core.prompts.render_prompt` with the item's title/category, tokenised by the
   artefact's tokenizer, batched by length (little padding), `batch` prompts per run;
4. every other item keeps its numeric-branch score.

Choosing the LLM candidates by the numeric branch (rather than recent count or risers) is
what training and evaluation do, so the served ranking is the evaluated one.

With several workers each scores the items of its own partitions (`ScoredPart`) and
`rank_tick` merges the parts of a tick into one global ranking: the global top `top_n` by
the prior take their LLM score, the rest their numeric score, exactly as one process
would. Each part therefore carries its local top (top_n + publish_top) by the prior, with
LLM scores for the local top_n (a superset of the global top_n's members in its
partitions); stream.serving.service moves the parts through a single-partition topic to one ranker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import structlog

from stream.serving.artefact import Artefact, ArtefactError
from stream.serving.onnx_models import CPU, NumericModel, ScoreModel, choose_providers
from stream.core.prompts import render_prompt
from stream.core.records import Prediction, to_tick
from stream.core.trends import Signals

log = structlog.get_logger(__name__)

CPU_BATCH = 32
CUDA_BATCH = 512
PART_CHUNK_ITEMS = 500  # items per ranking-topic message (~100 kB)


def season_of(as_of_ms: int) -> str:
    """The month shown in the prompt ("Dec"), as trainer.inference.season_of."""
    return datetime.fromtimestamp(as_of_ms / 1000, UTC).strftime("%b")


MAX_LOG_COUNT = 40.0  # e^40 events: beyond any real count, and far from float overflow (~709)


def predicted_count(score: np.ndarray) -> np.ndarray:
    """log1p(count) -> count, as trainer.model.predicted_count (clipped: a wild score must not
    become an infinite count that the record contract rejects)."""
    return np.expm1(np.clip(score, 0.0, MAX_LOG_COUNT))


@dataclass(frozen=True)
class ItemInfo:
    title: str | None = None
    category: str | None = None


@dataclass
class ScoredPart:
    """One worker's scored items of one tick (its local top by the prior, or all)."""

    as_of_ms: int
    item_ids: list[str]
    numeric: np.ndarray  # (N,) numeric-branch score
    llm: np.ndarray  # (N,) LLM score path, NaN where not computed
    names: tuple[str, ...]
    values: np.ndarray  # (N, S) raw signals
    partitions: list[int] | None = None  # the event partitions covered; None = all of them
    total_partitions: int = 1
    source: str = ""  # which worker

    def messages(self, chunk: int = PART_CHUNK_ITEMS) -> list[bytes]:
        """orjson messages for the ranking topic (chunked: a retail tick has thousands of items)."""
        n = len(self.item_ids)
        chunks = max(1, math.ceil(n / chunk))
        out = []
        for c in range(chunks):
            sl = slice(c * chunk, (c + 1) * chunk)
            llm = [None if math.isnan(v) else v for v in self.llm[sl].tolist()]
            out.append(orjson.dumps({
                "as_of_ms": self.as_of_ms, "source": self.source, "chunk": c, "chunks": chunks,
                "partitions": self.partitions, "total_partitions": self.total_partitions, "names": list(self.names),
                "item_ids": self.item_ids[sl], "numeric": self.numeric[sl].tolist(), "llm": llm,
                "values": self.values[sl].tolist(),
            }))
        return out

    @staticmethod
    def from_messages(raw: list[dict[str, Any]]) -> ScoredPart:
        raw = sorted(raw, key=lambda m: m["chunk"])
        first = raw[0]
        names = tuple(first["names"])
        values = [v for m in raw for v in m["values"]]
        return ScoredPart(
            as_of_ms=int(first["as_of_ms"]), item_ids=[i for m in raw for i in m["item_ids"]],
            numeric=np.asarray([v for m in raw for v in m["numeric"]], np.float64),
            llm=np.asarray([np.nan if v is None else v for m in raw for v in m["llm"]], np.float64),
            names=names, values=np.asarray(values, np.float64).reshape(len(values), len(names)),
            partitions=first["partitions"], total_partitions=int(first["total_partitions"]), source=first["source"],
        )


@dataclass
class ScorerStats:
    ticks: int = 0
    items: int = 0
    llm_items: int = 0
    seconds: float = 0.0
    llm_seconds: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)


class TickScorer:
    """The per-tick scoring work; synchronous (stream.serving.service runs it in an executor thread)."""

    def __init__(self, artefact: Artefact, *, top_n: int = 100, publish_top: int = 0, batch: int | None = None,
                 provider: str = "auto", variant: str = "auto", horizon_days: float | None = None,
                 threads: int | None = None) -> None:
        if top_n < 0 or publish_top < 0:
            raise ValueError("top_n and publish_top must be >= 0")
        self.artefact = artefact
        self.model_version = artefact.model_version
        self.features = artefact.features()
        self.tokenizer = artefact.tokenizer()
        self.horizon_days = artefact.horizon_days(horizon_days)
        self.top_n = top_n
        self.publish_top = publish_top
        providers = choose_providers(provider)
        self.variant = self._variant(variant, providers)
        self.numeric = NumericModel(artefact.path("numeric"), threads)
        self.model = ScoreModel(artefact.path(f"score.{self.variant}"), providers, threads, f"score.{self.variant}")
        if variant == "auto" and self.model.provider == CPU and providers[0] != CPU:
            # CUDA was asked for but could not start: take the variant made for CPUs
            cpu_variant = self._variant("auto", [CPU])
            if cpu_variant != self.variant:
                self.variant = cpu_variant
                self.model = ScoreModel(artefact.path(f"score.{cpu_variant}"), [CPU], threads, f"score.{cpu_variant}")
        self.provider = self.model.provider
        self.batch = batch or (CUDA_BATCH if self.model.cuda else CPU_BATCH)
        self.stats = ScorerStats()
        log.info("scorer.ready", model_version=self.model_version, provider=self.provider, variant=self.variant,
                 batch=self.batch, top_n=top_n, horizon_days=self.horizon_days,
                 parity=artefact.parity(f"score.{self.variant}").get("max_abs_diff"))

    def _variant(self, asked: str, providers: list[str]) -> str:
        if asked == "auto":
            order = ("fp16", "fp32") if providers[0] != CPU else ("int8", "fp32")
            return next(v for v in order if self.artefact.has(f"score.{v}"))
        if asked not in ("fp32", "int8", "fp16"):
            raise ValueError(f"score variant {asked!r}: use auto, fp32, int8 or fp16")
        if not self.artefact.has(f"score.{asked}"):
            raise ArtefactError(f"model {self.model_version} has no {asked} score path; export it "
                                f"(python -m export.onnx --model {self.artefact.root} --{asked}) or use TRAIL_SCORE_VARIANT=auto")
        return asked

    # ---- the pieces ------------------------------------------------------------------------------
    def prompts(self, as_of_ms: int, signals: Signals, rows: np.ndarray, items: dict[str, ItemInfo]) -> list[str]:
        month = season_of(as_of_ms)
        names = signals.names
        out = []
        for i in rows.tolist():
            info = items.get(signals.item_ids[i]) or ItemInfo()
            out.append(render_prompt(info.title, info.category, dict(zip(names, signals.values[i].tolist())),
                                     self.horizon_days, item_id=signals.item_ids[i], month=month))
        return out

    def llm_scores(self, prompts: list[str], x: np.ndarray) -> np.ndarray:
        """Score path over prompts, batched by token length."""
        rows = self.tokenizer.ids(prompts)
        order = np.argsort([len(r) for r in rows], kind="stable")
        out = np.empty(len(rows), np.float32)
        for start in range(0, len(order), self.batch):
            idx = order[start : start + self.batch]
            ids, mask = self.tokenizer.pad([rows[i] for i in idx])
            out[idx] = self.model(ids, mask, x[idx])
        return out

    def score(self, as_of_ms: int, signals: Signals, items: dict[str, ItemInfo] | None = None,
              partitions: list[int] | None = None, total_partitions: int = 1, source: str = "") -> ScoredPart:
        """This worker's part of a tick: the prior on all items, the LLM on its top_n."""
        import time

        t0 = time.perf_counter()
        items = items or {}
        x = self.features.of_signals(signals, self.horizon_days)
        numeric = self.numeric(x).astype(np.float64)
        order = np.argsort(-numeric, kind="stable")
        keep = order if self.publish_top == 0 else order[: self.top_n + self.publish_top]
        cand = order[: self.top_n]
        llm = np.full(len(signals), np.nan)
        t1 = time.perf_counter()
        if len(cand):
            llm[cand] = self.llm_scores(self.prompts(as_of_ms, signals, cand, items), x[cand])
        t2 = time.perf_counter()
        s = self.stats
        s.ticks += 1
        s.items += len(signals)
        s.llm_items += len(cand)
        s.seconds += t2 - t0
        s.llm_seconds += t2 - t1
        s.last = {"items": len(signals), "llm_items": len(cand), "seconds": round(t2 - t0, 3),
                  "llm_items_per_s": round(len(cand) / (t2 - t1), 1) if len(cand) and t2 > t1 else None}
        return ScoredPart(as_of_ms, [signals.item_ids[i] for i in keep.tolist()], numeric[keep], llm[keep],
                          tuple(signals.names), signals.values[keep], partitions, total_partitions, source)


def rank_tick(parts: list[ScoredPart], top_n: int, publish_top: int, model_version: str) -> list[Prediction]:
    """One global ranking from the parts of a tick: ranks 1..K, K = all items or publish_top."""
    if not parts:
        return []
    as_of = parts[0].as_of_ms
    if any(p.as_of_ms != as_of for p in parts):
        raise ValueError("rank_tick: parts of different ticks")
    seen: set[str] = set()
    ids: list[str] = []
    num, llm, values, names = [], [], [], parts[0].names
    for p in parts:
        if p.names != names:
            raise ValueError("rank_tick: parts with different signal names")
        for i, item in enumerate(p.item_ids):
            if item in seen:  # a partition scored twice across a rebalance
                continue
            seen.add(item)
            ids.append(item)
            num.append(p.numeric[i])
            llm.append(p.llm[i])
            values.append(p.values[i])
    numeric, llm_arr = np.asarray(num), np.asarray(llm)
    final = numeric.copy()
    prior = np.argsort(-numeric, kind="stable")[:top_n]
    has_llm = ~np.isnan(llm_arr[prior])
    final[prior[has_llm]] = llm_arr[prior[has_llm]]
    if not has_llm.all():
        log.warning("rank.missing_llm_scores", items=int((~has_llm).sum()), as_of_ms=as_of)
    # highest score first; ties by item id, so every ranker orders a tick the same way
    order = sorted(range(len(ids)), key=lambda i: (-final[i], ids[i]))
    if publish_top:
        order = order[:publish_top]
    tick = to_tick(as_of)
    counts = predicted_count(final)
    return [Prediction(ids[i], tick, float(final[i]), float(counts[i]), r, dict(zip(names, values[i].tolist())),
                       model_version) for r, i in enumerate(order, start=1)]
