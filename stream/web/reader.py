"""What the pages show, read from the results store.

`StoreReader` holds one clickhouse-connect client per reading thread (the embedded chdb store
admits clients of one process only, and this is the worker's process: the sink writes through its
own client meanwhile). Every value a request sends is a bound query parameter (`parameters=`),
never text in the SQL. `AsyncReader` runs the reads off the event loop: a small thread pool, a
semaphore in front of it (requests beyond it wait their turn) and a timeout per read.

The store may be older or newer than this code: optional columns (the forecast range
`predicted_low` / `predicted_high` and the `drivers` map of trail_predictions) are looked up in
`system.columns` and read only when the table has them; the pages show them when present.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from stream.store import dashboards
from stream.store.clickhouse import StoreConfig, connect
from stream.store.dashboards import DashboardParams

T = TypeVar("T")
OPTIONAL_PREDICTION_COLUMNS = ("predicted_low", "predicted_high", "drivers")
EXPLANATION_COLUMNS = ("tick", "rank", "explanation", "faithful", "repaired", "forecast", "forecast_agrees", "reason")
MAX_ITEM_ID = 200  # characters; longer ids are a bad request, not a query


class StoreUnavailable(RuntimeError):
    """The store did not answer (in time): the page says so with a 503."""


@dataclass(frozen=True)
class PageConfig:
    top_n: int = 20  # movers shown by default
    count_signal: str = "count_7d"  # the count over the forecast horizon (what predicted_count forecasts)
    horizon_hours: int = 168
    spark_signal: str = "count_1d"  # the sparkline's recent counts (the shortest window)
    spark_ticks: int = 30  # ticks in a sparkline
    item_ticks: int = 500  # most recent ticks on an item page
    window_ticks: int = 24  # rolling accuracy window
    ndcg_k: int = 10
    threads: int = 2  # reading threads (and concurrent reads)
    timeout_s: float = 10.0  # per read

    @classmethod
    def from_settings(cls, settings: Any) -> PageConfig:
        """Signals and horizon of this deployment: TRAIL_HORIZON_DAYS (else a week) and TRAIL_WINDOWS."""
        windows = [name for name, _ in settings.worker.trend.windows]
        serving = settings.serving
        days = getattr(serving, "horizon_days", None) or 7.0
        bucket_s = settings.worker.trend.bucket_ms / 1000
        by_len = {round(n * bucket_s / 3600): f"count_{name}" for name, n in settings.worker.trend.windows}
        hours = max(1, round(days * 24))
        count = by_len.get(hours, "count_7d" if "7d" in windows else f"count_{windows[-1]}")
        return cls(count_signal=count, horizon_hours=hours, spark_signal=f"count_{windows[0]}")


@dataclass
class Status:
    """The store's latest tick: None while nothing has been predicted (the 'waiting' state)."""

    tick: datetime | None = None
    model_version: str | None = None
    items: int = 0
    ticks: int = 0
    written_at: datetime | None = None

    @property
    def waiting(self) -> bool:
        return self.tick is None


@dataclass
class Mover:
    rank: int
    item_id: str
    score: float
    predicted_count: float
    predicted_low: float | None = None
    predicted_high: float | None = None
    drivers: dict[str, float] | None = None
    signals: dict[str, float] = field(default_factory=dict)
    explanation: str | None = None
    faithful: bool | None = None
    repaired: bool | None = None
    claims_checked: int | None = None
    forecast: str | None = None
    reason: str | None = None
    recent: list[tuple[datetime, float]] = field(default_factory=list)  # (tick, count) oldest first
    title: str | None = None


@dataclass
class Movers:
    status: Status
    movers: list[Mover]  # the latest tick's top N
    spark_signal: str
    explained: list[Mover] = field(default_factory=list)  # the movers explained at `explained_tick`
    explained_tick: datetime | None = None
    tick: datetime | None = None


@dataclass
class ItemPoint:
    tick: datetime
    rank: int
    score: float
    predicted_count: float
    count_now: float | None
    realised_count: float | None  # None while the forecast period is open
    predicted_low: float | None = None
    predicted_high: float | None = None
    drivers: dict[str, float] | None = None


@dataclass
class ItemPage:
    item_id: str
    status: Status
    predictions: list[ItemPoint]
    counts: list[tuple[datetime, float]]  # (tick, count over the horizon window), oldest first
    explanations: list[dict[str, Any]]  # newest first
    title: str | None = None


@dataclass
class AccuracyRow:
    tick: datetime
    items: int
    mae_log1p: float | None
    rmse_log1p: float | None
    spearman: float | None
    ndcg: float | None
    predicted_total: float
    realised_total: float
    mae_log1p_rolling: float | None


@dataclass
class Accuracy:
    status: Status
    rows: list[AccuracyRow]
    count_signal: str
    horizon_hours: int
    ndcg_k: int


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) or math.isinf(f) else f


def _utc(v: Any) -> Any:
    """The store's DateTime64(3, 'UTC') values arrive naive (chdb) or aware (HTTP): aware UTC either way."""
    if isinstance(v, datetime) and v.tzinfo is None:
        return v.replace(tzinfo=timezone.utc)
    return v


def _rows(column_names: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [{k: _utc(v) for k, v in zip(column_names, row)} for row in rows]


def _missing_table(e: Exception) -> bool:
    text = str(e)
    return "UNKNOWN_TABLE" in text or "UNKNOWN_DATABASE" in text or "doesn't exist" in text or "does not exist" in text


class StoreReader:
    """Synchronous reads (run them in a worker thread: see AsyncReader)."""

    def __init__(self, store: StoreConfig, config: PageConfig = PageConfig()) -> None:
        self.store = store
        self.config = config
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    def client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            c = connect(self.store, create_database=False)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing at shutdown: nothing left to tell
                pass

    def _query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        r = self.client().query(sql, parameters=dict(parameters or {}))
        return _rows(r.column_names, r.result_rows)

    def _dashboard(self, name: str, params: DashboardParams) -> list[dict]:
        r = dashboards.run(self.client(), name, params)
        return _rows(r.column_names, r.result_rows)

    def ping(self) -> bool:
        """The store answers (a database the sink has not created yet is an answer too)."""
        try:
            self.client().query("SELECT 1")
        except Exception as e:  # noqa: BLE001
            if not _missing_table(e):
                raise
        return True

    def columns(self, table: str) -> set[str]:
        return {r["name"] for r in self._query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}", {"t": table})}

    def status(self) -> Status:
        try:
            rows = self._query("SELECT count() AS n, max(tick) AS latest, argMax(model_version, tick) AS model, "
                               "uniqExact(tick) AS ticks, max(written_at) AS last_write FROM trail_predictions")
        except Exception as e:  # noqa: BLE001 - no table yet: the sink has not created the schema
            if _missing_table(e):
                return Status()
            raise
        r = rows[0]
        if not r["n"]:
            return Status()
        latest = self._query("SELECT count() AS n FROM trail_predictions FINAL WHERE tick = {t:DateTime64(3, 'UTC')}",
                             {"t": r["latest"]})
        return Status(tick=r["latest"], model_version=r["model"], items=int(latest[0]["n"]),
                      ticks=int(r["ticks"]), written_at=r["last_write"])

    def _optional(self) -> list[str]:
        have = self.columns("trail_predictions")
        return [c for c in OPTIONAL_PREDICTION_COLUMNS if c in have]

    def movers(self, top_n: int) -> Movers:
        """The latest tick's top `top_n`, and the movers the explainer explained at its latest explained tick
        (explanations trail the ranking by the time generation takes)."""
        status = self.status()
        if status.waiting:
            return Movers(status, [], self.config.spark_signal)
        mv = status.model_version or ""
        rows = self._dashboard("top_n", DashboardParams(top_n=top_n, model_version=mv))
        movers = [Mover(rank=int(r["rank"]), item_id=r["item_id"], score=float(r["score"]),
                        predicted_count=float(r["predicted_count"]), signals=dict(r["signals"] or {}),
                        explanation=r.get("explanation"), faithful=r.get("faithful"),
                        claims_checked=r.get("claims_checked"), forecast=r.get("forecast"), reason=r.get("reason"))
                  for r in rows]
        if not movers:
            return Movers(status, [], self.config.spark_signal)
        tick = rows[0]["tick"]
        self._fill(movers, tick, mv)
        explained = [Mover(rank=int(r["rank"]), item_id=r["item_id"], score=float(r["score"]),
                           predicted_count=float(r["predicted_count"]), signals=dict(r["signals"] or {}),
                           explanation=r["explanation"], faithful=bool(r["faithful"]), repaired=bool(r["repaired"]),
                           claims_checked=int(r["claims_checked"]), forecast=r["forecast"], reason=r.get("reason"))
                     for r in self._query(
                         "WITH (SELECT max(tick) FROM trail_explanations WHERE model_version = {mv:String}) AS t "
                         "SELECT e.item_id AS item_id, e.tick AS tick, e.rank AS rank, e.explanation AS explanation, "
                         "e.faithful AS faithful, e.repaired AS repaired, e.claims_checked AS claims_checked, "
                         "e.forecast AS forecast, e.reason AS reason, p.score AS score, "
                         "p.predicted_count AS predicted_count, p.signals AS signals "
                         "FROM (SELECT * FROM trail_explanations FINAL WHERE tick = t AND model_version = {mv:String}) AS e "
                         "JOIN (SELECT item_id, score, predicted_count, signals FROM trail_predictions FINAL "
                         "      WHERE tick = t AND model_version = {mv:String}) AS p ON p.item_id = e.item_id "
                         "ORDER BY e.rank, e.item_id", {"mv": mv})]
        explained_tick = None
        if explained:
            explained_tick = self._query("SELECT max(tick) AS t FROM trail_explanations WHERE model_version = {mv:String}",
                                         {"mv": mv})[0]["t"]
            self._fill(explained, explained_tick, mv)
        return Movers(status, movers, self.config.spark_signal, explained, explained_tick, tick)

    def _fill(self, movers: list[Mover], tick: datetime, mv: str) -> None:
        """The range and drivers (when the store has them), the repair mark and the sparkline of `movers` at `tick`."""
        ids = [m.item_id for m in movers]
        by_id = {m.item_id: m for m in movers}
        extra = self._optional()
        if extra:
            for r in self._query(
                    f"SELECT item_id, {', '.join(extra)} FROM trail_predictions FINAL "  # names from our own list
                    "WHERE tick = {tick:DateTime64(3, 'UTC')} AND model_version = {mv:String} "
                    "AND has({items:Array(String)}, item_id)",
                    {"tick": tick, "mv": mv, "items": ids}):
                m = by_id[r["item_id"]]
                m.predicted_low, m.predicted_high = _num(r.get("predicted_low")), _num(r.get("predicted_high"))
                m.drivers = dict(r["drivers"]) if r.get("drivers") else None
        for r in self._query(
                "SELECT item_id, repaired FROM trail_explanations FINAL WHERE tick = {tick:DateTime64(3, 'UTC')} "
                "AND model_version = {mv:String} AND has({items:Array(String)}, item_id)",
                {"tick": tick, "mv": mv, "items": ids}):
            by_id[r["item_id"]].repaired = bool(r["repaired"])
        for r in self._query(
                "SELECT item_id, groupArray((tick, n)) AS points FROM ("
                "  SELECT item_id, tick, signals[{sig:String}] AS n FROM trail_trend_snapshots FINAL"
                "  WHERE has({items:Array(String)}, item_id) AND mapContains(signals, {sig:String})"
                "    AND tick <= {tick:DateTime64(3, 'UTC')} AND tick >= ("
                "      SELECT min(t) FROM (SELECT DISTINCT tick AS t FROM trail_trend_snapshots"
                "        WHERE tick <= {tick:DateTime64(3, 'UTC')} ORDER BY t DESC LIMIT {n:UInt32}))"
                "  ORDER BY item_id, tick) GROUP BY item_id",
                {"sig": self.config.spark_signal, "items": ids, "tick": tick, "n": self.config.spark_ticks}):
            by_id[r["item_id"]].recent = [(_utc(t), float(n)) for t, n in r["points"]]

    def item(self, item_id: str, *, ticks: int | None = None) -> ItemPage | None:
        """The item's predictions, counts and explanations; None when the store has never seen it."""
        status = self.status()
        n = ticks or self.config.item_ticks
        history = [] if status.waiting else self._dashboard("item_history", DashboardParams(
            items=(item_id,), model_version=status.model_version or "", count_signal=self.config.count_signal,
            horizon_hours=self.config.horizon_hours))
        history = history[-n:]
        extra = self._optional() if history else []
        ranges: dict[datetime, dict] = {}
        if extra:
            ranges = {r["tick"]: r for r in self._query(
                f"SELECT tick, {', '.join(extra)} FROM trail_predictions FINAL "  # names from our own list
                "WHERE item_id = {item:String} AND model_version = {mv:String}",
                {"item": item_id, "mv": status.model_version})}
        points = []
        for r in history:
            x = ranges.get(r["tick"], {})
            points.append(ItemPoint(tick=r["tick"], rank=int(r["rank"]), score=float(r["score"]),
                                    predicted_count=float(r["predicted_count"]), count_now=_num(r["count_now"]),
                                    realised_count=_num(r["realised_count"]),
                                    predicted_low=_num(x.get("predicted_low")),
                                    predicted_high=_num(x.get("predicted_high")),
                                    drivers=dict(x["drivers"]) if x.get("drivers") else None))
        try:
            counts = self._query(
                "SELECT tick, n FROM (SELECT tick, signals[{sig:String}] AS n FROM trail_trend_snapshots FINAL "
                "WHERE item_id = {item:String} AND mapContains(signals, {sig:String}) ORDER BY tick DESC "
                "LIMIT {n:UInt32}) ORDER BY tick",
                {"sig": self.config.count_signal, "item": item_id, "n": n})
            have = self.columns("trail_explanations")
            cols = [c for c in EXPLANATION_COLUMNS if c in have]
            explanations = self._query(
                f"SELECT {', '.join(cols)} FROM trail_explanations FINAL "  # names from our own list
                "WHERE item_id = {item:String} ORDER BY tick DESC LIMIT {n:UInt32}", {"item": item_id, "n": 50})
        except Exception as e:  # noqa: BLE001
            if not _missing_table(e):
                raise
            counts, explanations = [], []
        if not points and not counts and not explanations:
            return None
        return ItemPage(item_id=item_id, status=status, predictions=points,
                        counts=[(r["tick"], float(r["n"])) for r in counts], explanations=explanations)

    def accuracy(self, window_ticks: int | None = None) -> Accuracy:
        c = self.config
        status = self.status()
        if status.waiting:
            return Accuracy(status, [], c.count_signal, c.horizon_hours, c.ndcg_k)
        params = DashboardParams(model_version=status.model_version or "", count_signal=c.count_signal,
                                 horizon_hours=c.horizon_hours, window_ticks=window_ticks or c.window_ticks,
                                 top_n=c.ndcg_k)
        rows = self._dashboard("accuracy", params)
        out = [AccuracyRow(tick=r["tick"], items=int(r["items"]), mae_log1p=_num(r["mae_log1p"]),
                           rmse_log1p=_num(r["rmse_log1p"]), spearman=_num(r["spearman"]), ndcg=_num(r["ndcg"]),
                           predicted_total=float(r["predicted_total"]), realised_total=float(r["realised_total"]),
                           mae_log1p_rolling=_num(r["mae_log1p_rolling"]))
               for r in rows]
        return Accuracy(status, out, c.count_signal, c.horizon_hours, c.ndcg_k)


class AsyncReader:
    """StoreReader's reads off the event loop: `threads` reading threads, as many reads at a time
    (others wait for a turn, within the same timeout), each bounded by `timeout_s`."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        n = max(1, reader.config.threads)
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="trail-web")
        self._slots = asyncio.Semaphore(n)
        self.timeout_s = reader.config.timeout_s

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError:
            raise StoreUnavailable(f"the results store is busy: no read slot within {self.timeout_s:g} s") from None
        fut = loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        fut.add_done_callback(lambda _: self._slots.release())  # the slot is held until the read really ends
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise StoreUnavailable(f"the results store did not answer within {self.timeout_s:g} s") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.reader.close()

