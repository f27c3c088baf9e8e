"""Explanations for the top movers of each tick: ONNX generation (seeded sampling) + the faithfulness check.

The explainer is slower than scoring (about a second per explanation on a CPU) and must
never hold it up, so it runs as its own task with its own executor thread and a mailbox
of one request (`stream.core.mailbox.Mailbox`): `offer()` never blocks; a request not yet
started is replaced by a newer tick's (latest tick wins) and counted as dropped, and a
request being worked on stops between two items when a newer one arrives (its remaining
items are counted as dropped).

Movers (top `m` of a tick's predictions):
- `rise` (default): predicted count for the horizon minus the current pace (the count of
  the window closest to the horizon, scaled to the horizon's length) - the items the model
  expects to grow most;
- `rank_jump`: previous tick's rank minus this tick's rank (an item new to the ranking
  jumps from just below the last rank).

Generation is batched and constrained when the explainer is given `generate_batch` (the ONNX
generator's `Generator.generate_batch`) and a `constraint` (stream.model.constraint.ClaimConstraint):
the movers of a tick are decoded together (up to `batch_size` at a time), each row held by
llguidance to its own claim grammar (stream.core.faithfulness.grammar: only the numbers its
prompt shows, direction words true, the forecast clause forced to
`outlook(predicted_count, pace(signals, horizon))` of the record's own prediction). A newer
tick then interrupts a request between two batches. Without them (tests, a bare callable), one
item at a time, unconstrained.

Batched decoding samples among the tokens the grammar allows (`temperature`, `top_p`:
TRAIL_EXPLAIN_TEMPERATURE / TRAIL_EXPLAIN_TOP_P; 0 is greedy), which keeps the texts true while
they stop collapsing into one template. Each mover has its own seed,
`stream.core.decoding.explanation_seed(model_version, item_id, tick in ms)`, so a replayed tick
gives the same texts whatever shares its batch; the record's `decoding` says how it was decoded
("greedy" or "sampled t=1.0 p=0.95 seed=...") and whether the claim grammar held it (", claim
grammar"; ", unconstrained" when none is set or one could not be built for the batch).

Each explanation is verified and revised against the signals it was generated from
(`stream.core.faithfulness.repair`: wrong numbers and directions are corrected, a clause with a
claim that cannot be corrected is dropped); the record carries the checker's verdict on
the published text, `faithful`, and `claims_checked`; and says what happened: `raw_explanation`
(as decoded), `repaired`, the stated `forecast` and whether it agrees with the model's own
predicted direction (`forecast_agrees`, stream.core.forecast), and the kind of reason a mover's
text gives (`reason`: "trend", "level", "neighbourhood", "season", "text" or None; grammar.reason_of), where
it came from (`reason_source`: "drivers", the prediction's top driver, or "rule") and the top driver
(`driver`). The grammar states the record's own size and range ("About 40 events next week, likely
25–55."; the size alone from a model without quantile heads) and, when the prediction carries
`drivers`, gives its top driver as the reason (grammar.reason_plan); the checker holds the forecast
clauses to the same prediction (stream.core.forecast.PredictedCount).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from stream.core import decoding
from stream.core.faithfulness import check, repair
from stream.core.faithfulness.grammar import CONSTRAINED_MAX_NEW_TOKENS, claim_grammar, reason_of, reason_plan, top_driver
from stream.core.mailbox import Mailbox
from stream.model.artefact import PromptTokenizer
from stream.model.onnx_models import lower_thread_priority
from stream.core.forecast import PredictedCount, outlook, pace
from stream.core.records import Explanation, Prediction, tick_ms

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
    batches: int = 0  # generate_batch calls
    constrained: int = 0  # explanations decoded under the claim grammar
    guide_seconds: float = 0.0  # of `seconds`: computing and applying the grammar's token masks

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


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
                 publish: Callable[[list[Explanation]], Awaitable[None]], executor: Executor | None = None, *,
                 horizon_days: float = 7.0,
                 generate_batch: Callable[..., list[list[int]]] | None = None,
                 constraint=None, batch_size: int = 8, constrained_max_new_tokens: int | None = None,
                 temperature: float = decoding.EXPLAIN_TEMPERATURE, top_p: float = decoding.EXPLAIN_TOP_P,
                 generator: str | None = None, nice: int = 0) -> None:
        decoding.check(temperature, top_p)
        self.generator = generator  # which export decodes (records.GENERATORS), stated on every record
        self.generate = generate
        self.generate_batch = generate_batch
        # batched decoding: sampled among the allowed tokens (temperature > 0) with one seed per mover, or greedy
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.constraint = constraint  # stream.model.constraint.ClaimConstraint, or None: unconstrained
        self.batch_size = max(1, batch_size)
        # the grammar ends every text itself; room for its longest shapes (a reason and the size and range
        # sentence: ~75 tokens with 3-4 digit counts)
        self.constrained_max_new_tokens = constrained_max_new_tokens or max(max_new_tokens, CONSTRAINED_MAX_NEW_TOKENS)
        self.horizon_days = horizon_days
        self.tokenizer = tokenizer
        self.model_version = model_version
        self.max_new_tokens = max_new_tokens
        self.publish = publish
        self._own_executor = executor is None
        # its own thread decodes at `nice` (TRAIL_EXPLAIN_NICE): the CPU ingest and scoring leave
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="trail-explainer",
                                                       initializer=lower_thread_priority, initargs=(nice,))
        self.stats = ExplainerStats()
        self._mailbox: Mailbox[ExplainRequest] = Mailbox()
        self._task: asyncio.Task | None = None

    # ---- the mailbox ------------------------------------------------------------------------------
    def offer(self, request: ExplainRequest) -> None:
        """Queue the request of a new tick; never blocks. An older request not started yet is dropped."""
        if not request.movers:
            return
        stale = self._mailbox.put(request)
        if stale is not None:
            self.stats.dropped_requests += 1
            self.stats.dropped_items += len(stale.movers)
            log.info("explainer.dropped_stale", tick_ms=stale.tick_ms, newer_tick_ms=request.tick_ms,
                     dropped_requests=self.stats.dropped_requests)

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
        await self._mailbox.wait_idle(timeout)

    # ---- the work -----------------------------------------------------------------------------------
    def forecast_of(self, p: Prediction) -> str:
        """The direction of the record's own prediction: what the forecast clause must say."""
        return outlook(p.predicted_count, pace(p.signals, self.horizon_days))

    def size_of(self, p: Prediction) -> PredictedCount:
        """The record's predicted count and range: what the text states and the checker holds it to."""
        return PredictedCount.of(p, self.horizon_days)

    def seed_of(self, p: Prediction) -> int:
        """The sampling seed of this prediction's explanation: (model version, item, tick) only."""
        return decoding.explanation_seed(self.model_version, p.item_id, tick_ms(p.tick))

    def explain_batch(self, movers: list[Mover]) -> list[tuple[Explanation, int]]:
        """Generate (one batch, constrained when a constraint is set), verify and revise (runs in the executor)."""
        if self.generate_batch is None:
            return [self.explain_one(m) for m in movers]
        ids = self.tokenizer.ids([m.prompt for m in movers])
        guide = None
        limit = self.max_new_tokens
        if self.constraint is not None:
            try:
                guide = self.constraint.guide([
                    claim_grammar(m.prediction.signals, self.horizon_days, self.forecast_of(m.prediction),
                                  size=self.size_of(m.prediction), drivers=m.prediction.drivers).lark()
                    for m in movers])
                limit = self.constrained_max_new_tokens
            except Exception:  # noqa: BLE001 - a grammar that cannot be built: decode free, repair and say so
                log.exception("explainer.no_constraint", item_ids=[m.prediction.item_id for m in movers])
        if decoding.sampled(self.temperature):
            seeds = [self.seed_of(m.prediction) for m in movers]
            new = self.generate_batch(ids, limit, guide, temperature=self.temperature, top_p=self.top_p, seeds=seeds)
            how = [decoding.describe(self.temperature, self.top_p, s, grammar=guide is not None) for s in seeds]
        else:
            new = self.generate_batch(ids, limit, guide)
            how = [decoding.describe(self.temperature, self.top_p, grammar=guide is not None)] * len(movers)
        self.stats.batches += 1
        if guide is not None:
            self.stats.constrained += len(movers)
            self.stats.guide_seconds += guide.seconds
        return [self._record(m, n, d) for m, n, d in zip(movers, new, how)]

    def explain_one(self, mover: Mover) -> tuple[Explanation, int]:
        """Generate, decode, verify and revise one explanation (runs in the executor)."""
        if self.generate_batch is not None:
            return self.explain_batch([mover])[0]
        ids = self.tokenizer.ids([mover.prompt])[0]
        return self._record(mover, self.generate(ids, self.max_new_tokens))

    def _record(self, mover: Mover, new: list[int], how: str | None = None) -> tuple[Explanation, int]:
        p = mover.prediction
        # verify and revise: claims the checker can correct against the signals are corrected,
        # the rest of an unfaithful clause is dropped; `faithful` is the checker's verdict on what is published
        raw = self.tokenizer.decode(new)
        size = self.size_of(p)
        fixed = repair(raw, p.signals, title=mover.title, prediction=size)
        if fixed.changed:
            self.stats.repaired += 1
        agrees = fixed.outlook is not None and fixed.outlook == self.forecast_of(p)
        reason = reason_of(check(fixed.text, p.signals, title=mover.title, prediction=size).claims, p.signals,
                           self.horizon_days, fixed.outlook, p.drivers) if fixed.faithful else None
        # where the reason came from: the model's top driver when the text gives it, else today's rule
        plan = reason_plan(p.signals, self.horizon_days, fixed.outlook, p.drivers) if fixed.outlook else None
        driver = top_driver(p.drivers, fixed.outlook)
        source = None if reason is None else "drivers" if (plan is not None and plan.source == "drivers"
                                                            and reason == plan.kind) else "rule"
        return (Explanation(p.item_id, p.tick, p.rank, fixed.text, fixed.faithful, fixed.checked, self.model_version,
                            raw_explanation=raw, repaired=fixed.changed, forecast=fixed.outlook, forecast_agrees=agrees,
                            reason=reason, reason_source=source, driver=driver, decoding=how,
                            generator=self.generator),
                len(new))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = await self._mailbox.get()
            try:
                await self._explain(loop, request)
            finally:
                self._mailbox.task_done()

    async def _explain(self, loop: asyncio.AbstractEventLoop, request: ExplainRequest) -> None:
        self.stats.requests += 1
        if self.generate_batch is not None:
            await self._explain_batched(loop, request)
            return
        for i, mover in enumerate(request.movers):
            if self._mailbox.waiting is not None:  # a newer tick arrived: the rest of this one is stale
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


    async def _explain_batched(self, loop: asyncio.AbstractEventLoop, request: ExplainRequest) -> None:
        movers = request.movers
        for start in range(0, len(movers), self.batch_size):
            if start and self._mailbox.waiting is not None:  # a newer tick arrived: the rest of this one is stale
                left = len(movers) - start
                self.stats.dropped_items += left
                log.info("explainer.interrupted", tick_ms=request.tick_ms, dropped_items=left)
                break
            chunk = movers[start : start + self.batch_size]
            t0 = loop.time()
            try:
                results = await loop.run_in_executor(self.executor, self.explain_batch, chunk)
                await self.publish([r for r, _ in results])
            except Exception:  # noqa: BLE001 - one bad batch must not stop the explainer
                self.stats.failed += len(chunk)
                log.exception("explainer.failed", item_ids=[m.prediction.item_id for m in chunk], tick_ms=request.tick_ms)
                continue
            self.stats.explained += len(results)
            self.stats.faithful += sum(int(r.faithful) for r, _ in results)
            self.stats.tokens += sum(n for _, n in results)
            self.stats.seconds += loop.time() - t0


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
