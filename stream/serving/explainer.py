"""Explanations for the top movers of each tick: ONNX greedy generation + the faithfulness check.

The explainer is slower than scoring (about a second per explanation on a CPU) and must
never hold it up, so it runs as its own task with its own executor thread and a mailbox
of one request: `offer()` never blocks; a request not yet started is replaced by a newer
tick's (latest tick wins) and counted as dropped, and a request being worked on stops
between two items when a newer one arrives (its remaining items are counted as dropped).

Movers (top `m` of a tick's predictions):
- `rise` (default): predicted count for the horizon minus the current pace (the count of
  the window closest to the horizon, scaled to the horizon's length) - the items the model
  expects to grow most;
- `rank_jump`: previous tick's rank minus this tick's rank (an item new to the ranking
  jumps from just below the last rank).

Each explanation is verified and revised against the signals it was generated from
(`stream.core.faithfulness.repair`: wrong numbers and directions are corrected, a clause with a
claim that cannot be corrected is dropped); the record carries the checker's verdict on
the published text, `faithful`, and `claims_checked`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from stream.core.faithfulness import repair
from stream.serving.artefact import PromptTokenizer
from stream.core.prompts import main_window, signal_windows, window_hours
from stream.core.records import Explanation, Prediction

log = structlog.get_logger(__name__)

MOVER_CRITERIA = ("rise", "rank_jump")


@dataclass(frozen=True)
class Mover:
    prediction: Prediction
    prompt: str
    title: str | None = None


@dataclass(frozen=True)
class ExplainRequest:
    tick_ms: int
    movers: list[Mover]


@dataclass
class ExplainerStats:
    requests: int = 0
    explained: int = 0
    faithful: int = 0
    dropped_requests: int = 0  # replaced before they started
    dropped_items: int = 0  # items of dropped or interrupted requests
    repaired: int = 0  # explanations the checker corrected before publishing
    failed: int = 0
    seconds: float = 0.0
    tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def pace(signals: dict[str, float], horizon_days: float) -> float:
    """The current count at the horizon's length: the closest window's count, scaled."""
    windows = signal_windows(signals)
    w = main_window(windows, horizon_days)
    return signals[f"count_{w}"] * horizon_days * 24 / window_hours(w)


def select_movers(predictions: list[Prediction], m: int, by: str = "rise", horizon_days: float = 7,
                  previous_ranks: dict[str, int] | None = None) -> list[Prediction]:
    """The top `m` movers of one tick's predictions (ties: the better rank)."""
    if by not in MOVER_CRITERIA:
        raise ValueError(f"mover criterion {by!r}: use one of {MOVER_CRITERIA}")
    if m <= 0 or not predictions:
        return []
    if by == "rise":
        key = {p.item_id: p.predicted_count - pace(p.signals, horizon_days) for p in predictions}
    else:
        prev = previous_ranks or {}
        floor = len(prev) + 1
        key = {p.item_id: prev.get(p.item_id, floor) - p.rank for p in predictions}
    return sorted(predictions, key=lambda p: (-key[p.item_id], p.rank))[:m]


class Explainer:
    """Latest-wins explanation worker; see the module doc."""

    def __init__(self, generate: Callable[[list[int], int], list[int]], tokenizer: PromptTokenizer,
                 model_version: str, max_new_tokens: int,
                 publish: Callable[[list[Explanation]], Awaitable[None]], executor: Executor | None = None) -> None:
        self.generate = generate
        self.tokenizer = tokenizer
        self.model_version = model_version
        self.max_new_tokens = max_new_tokens
        self.publish = publish
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="trail-explainer")
        self.stats = ExplainerStats()
        self._pending: ExplainRequest | None = None
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None

    # ---- the mailbox ------------------------------------------------------------------------------
    def offer(self, request: ExplainRequest) -> None:
        """Queue the request of a new tick; never blocks. An older request not started yet is dropped."""
        if not request.movers:
            return
        if self._pending is not None:
            self.stats.dropped_requests += 1
            self.stats.dropped_items += len(self._pending.movers)
            log.info("explainer.dropped_stale", tick_ms=self._pending.tick_ms, newer_tick_ms=request.tick_ms,
                     dropped_requests=self.stats.dropped_requests)
        self._pending = request
        self._idle.clear()
        self._ready.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="trail-explainer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._own_executor:
            self.executor.shutdown(wait=False)

    async def wait_idle(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._idle.wait(), timeout)

    # ---- the work -----------------------------------------------------------------------------------
    def explain_one(self, mover: Mover) -> tuple[Explanation, int]:
        """Generate, decode, verify and revise one explanation (runs in the executor)."""
        p = mover.prediction
        ids = self.tokenizer.ids([mover.prompt])[0]
        new = self.generate(ids, self.max_new_tokens)
        # verify and revise: claims the checker can correct against the signals are corrected,
        # the rest of an unfaithful clause is dropped; `faithful` is the checker's verdict on what is published
        fixed = repair(self.tokenizer.decode(new), p.signals, title=mover.title)
        if fixed.changed:
            self.stats.repaired += 1
        return (Explanation(p.item_id, p.tick, p.rank, fixed.text, fixed.faithful, fixed.checked, self.model_version),
                len(new))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._ready.wait()
            self._ready.clear()
            request, self._pending = self._pending, None
            if request is None:
                if self._pending is None:
                    self._idle.set()
                continue
            self.stats.requests += 1
            for i, mover in enumerate(request.movers):
                if self._pending is not None:  # a newer tick arrived: the rest of this one is stale
                    left = len(request.movers) - i
                    self.stats.dropped_items += left
                    log.info("explainer.interrupted", tick_ms=request.tick_ms, dropped_items=left)
                    break
                t0 = loop.time()
                try:
                    record, tokens = await loop.run_in_executor(self.executor, self.explain_one, mover)
                    await self.publish([record])
                except Exception:  # noqa: BLE001 - one bad item must not stop the explainer
                    self.stats.failed += 1
                    log.exception("explainer.failed", item_id=mover.prediction.item_id, tick_ms=request.tick_ms)
                    continue
                self.stats.explained += 1
                self.stats.faithful += int(record.faithful)
                self.stats.tokens += tokens
                self.stats.seconds += loop.time() - t0
            if self._pending is None:
                self._idle.set()
            else:
                self._ready.set()


@dataclass
class MoverPicker:
    """Remembers the previous tick's ranks for the rank-jump criterion."""

    m: int
    by: str = "rise"
    horizon_days: float = 7
    previous: dict[str, int] = field(default_factory=dict)

    def __call__(self, predictions: list[Prediction]) -> list[Prediction]:
        movers = select_movers(predictions, self.m, self.by, self.horizon_days, self.previous)
        self.previous = {p.item_id: p.rank for p in predictions}
        return movers
