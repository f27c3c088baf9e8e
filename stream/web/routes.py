"""The worker's web routes, on Faust's own aiohttp server (TRAIL_WEB_PORT):

    /                     movers of the latest tick           /api/movers?top=N
    /items/{item_id}      an item: counts, predictions, explanations   /api/items/{item_id}
    /accuracy             per tick once its outcome is known  /api/accuracy?window=N
    /api/status           model version, latest tick, ticks
    /metrics              Prometheus text format (stream.web.metrics)
    /health               liveness: 200 while the process serves requests
    /ready                200 once the first tick is ranked and the store answers; 503 before

Store reads run in stream.web.reader.AsyncReader (threads, bounded, with a timeout), never on the
event loop. A bad query parameter is a 400 naming it, an unknown item a 404, a store that does not
answer a 503; HTML for the pages, JSON ({"error": ...}) for /api/*.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
import structlog
from aiohttp import web
from faust.web.drivers.aiohttp import Web as AiohttpWeb

from stream.core.records import tick_iso
from stream.web import views
from stream.web.metrics import CONTENT_TYPE, Metrics
from stream.web.reader import MAX_ITEM_ID, AsyncReader, PageConfig, StoreReader, StoreUnavailable

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TrailWeb(AiohttpWeb):
    """Faust's aiohttp web server without its production index, which takes "/" ({"status": "OK"})."""

    production_blueprints = []  # noqa: RUF012 - Faust's class attribute


class BadRequest(ValueError):
    """A query parameter is malformed or out of range; the message names it."""


def int_param(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be from {lo} to {hi}, got {value}")
    return value


def only(query: Mapping[str, str], *known: str) -> None:
    unknown = sorted(set(query) - set(known))
    if unknown:
        allowed = ", ".join(known) if known else "none"
        raise BadRequest(f"unknown query parameter {unknown[0][:40]!r} (this page takes: {allowed})")


def _default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return tick_iso(obj)  # as the records on Kafka write ticks: 2011-12-01T00:00:00.000Z
    raise TypeError


def _plain(data: Any) -> Any:
    return dataclasses.asdict(data) if dataclasses.is_dataclass(data) else data


def json_response(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(_plain(data), default=_default,
                        option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME)
    return web.Response(body=body, status=status, content_type="application/json")


class TrailPages:
    """The handlers, over the app's parts (stream.app.Trail) and a reader of its store (None: no store)."""

    def __init__(self, parts: Any, reader: AsyncReader | None, config: PageConfig, metrics: Metrics) -> None:
        self.parts = parts
        self.reader = reader
        self.config = config
        self.metrics = metrics

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self._page(self.movers)), web.get("/items/{item_id}", self._page(self.item)),
                web.get("/accuracy", self._page(self.accuracy)),
                web.get("/api/movers", self._api(self.api_movers)), web.get("/api/status", self._api(self.api_status)),
                web.get("/api/items/{item_id}", self._api(self.api_item)),
                web.get("/api/accuracy", self._api(self.api_accuracy)),
                web.get("/metrics", self.prometheus), web.get("/health", self.health), web.get("/ready", self.ready)]

    def title(self, item_id: str) -> str | None:
        catalogue = getattr(getattr(self.parts, "serving", None), "catalogue", None)
        info = catalogue.items.get(item_id) if catalogue is not None else None
        return getattr(info, "title", None) or None

    # ---- error handling, one place for pages and one for the API ------------------------------------------
    def _page(self, fn: Handler) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except BadRequest as e:
                return web.Response(text=views.error_page(400, str(e)), status=400, content_type="text/html")
            except web.HTTPNotFound as e:
                return web.Response(text=views.error_page(404, e.text or "not found"), status=404,
                                    content_type="text/html")
            except StoreUnavailable as e:
                return web.Response(text=views.error_page(503, str(e)), status=503, content_type="text/html")
        return handler

    def _api(self, fn: Handler) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except BadRequest as e:
                return json_response({"error": str(e)}, 400)
            except web.HTTPNotFound as e:
                return json_response({"error": e.text or "not found"}, 404)
            except StoreUnavailable as e:
                return json_response({"error": str(e)}, 503)
        return handler

    def _store(self) -> AsyncReader:
        if self.reader is None:
            raise StoreUnavailable("this worker serves no model (TRAIL_MODEL_DIR unset), so it has no results store")
        return self.reader

    async def _read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._store().call(fn, *args, **kwargs)
        except StoreUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - a store error is the store's: 503 with what it said
            log.warning("web.store_error", error=repr(e)[:500])
            raise StoreUnavailable(f"the results store failed: {str(e).splitlines()[0][:300]}") from e

    # ---- views -------------------------------------------------------------------------------------------
    async def _movers(self, request: web.Request) -> Any:
        only(request.query, "top")
        top = int_param(request.query, "top", self.config.top_n, 1, 500)
        data = await self._read(self._store().reader.movers, top)
        for m in data.movers + data.explained:
            m.title = self.title(m.item_id)
        return data, top

    async def movers(self, request: web.Request) -> web.Response:
        data, top = await self._movers(request)
        return web.Response(text=views.movers_page(data, top), content_type="text/html")

    async def api_movers(self, request: web.Request) -> web.Response:
        data, _ = await self._movers(request)
        return json_response(data)

    async def _item(self, request: web.Request) -> Any:
        only(request.query, "ticks")
        item_id = request.match_info["item_id"]
        if not item_id.strip() or len(item_id) > MAX_ITEM_ID:
            raise BadRequest(f"an item id is 1 to {MAX_ITEM_ID} characters, got {len(item_id)}")
        ticks = int_param(request.query, "ticks", self.config.item_ticks, 1, 10_000)
        page = await self._read(self._store().reader.item, item_id, ticks=ticks)
        if page is None:
            raise web.HTTPNotFound(text=f"no item {item_id[:80]!r} in the results store: it was never scored")
        page.title = self.title(item_id)
        return page

    async def item(self, request: web.Request) -> web.Response:
        page = await self._item(request)
        return web.Response(text=views.item_page(page, self.config.count_signal, self.config.horizon_hours), content_type="text/html")

    async def api_item(self, request: web.Request) -> web.Response:
        return json_response(await self._item(request))

    async def _accuracy(self, request: web.Request) -> Any:
        only(request.query, "window")
        window = int_param(request.query, "window", self.config.window_ticks, 1, 10_000)
        return await self._read(self._store().reader.accuracy, window)

    async def accuracy(self, request: web.Request) -> web.Response:
        return web.Response(text=views.accuracy_page(await self._accuracy(request)), content_type="text/html")

    async def api_accuracy(self, request: web.Request) -> web.Response:
        return json_response(await self._accuracy(request))

    async def api_status(self, request: web.Request) -> web.Response:
        only(request.query)
        status = await self._read(self._store().reader.status)
        return json_response(dataclasses.asdict(status) | {"waiting": status.waiting})

    # ---- operator endpoints -------------------------------------------------------------------------------
    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    def first_tick_done(self) -> bool:
        serving = getattr(self.parts, "serving", None)
        if serving is not None:
            return serving.stats.ticks_ranked > 0
        worker = getattr(self.parts, "worker", None)
        return worker is not None and worker.ticks_published > 0

    async def ready(self, request: web.Request) -> web.Response:
        checks: dict[str, Any] = {"first_tick": self.first_tick_done()}
        if self.reader is not None:
            try:
                checks["store"] = await self.reader.call(self.reader.reader.ping)
            except Exception as e:  # noqa: BLE001 - not ready, and why
                checks["store"] = False
                checks["store_error"] = str(e).splitlines()[0][:300] if str(e) else repr(e)
        ok = checks["first_tick"] and checks.get("store", True) is True
        return json_response({"ready": ok, **checks}, 200 if ok else 503)

    def wire_ticks(self, worker: Any) -> None:
        """The tick timer's hooks around every other hook (call once the others are in place)."""
        worker.tick_hooks.insert(0, self.metrics.timer.start)
        worker.tick_hooks.append(self.metrics.timer.finish)


def build(parts: Any, store: Any, config: PageConfig) -> TrailPages:
    """The handlers for `parts`; `store` (a StoreConfig) None: no results store."""
    reader = AsyncReader(StoreReader(store, config)) if store is not None else None
    return TrailPages(parts, reader, config, Metrics(parts))


def install(app: Any, parts: Any, settings: Any) -> TrailPages:
    """Serve the pages from `app`'s (a faust.App's) web server; call before the worker starts."""
    app.web = TrailWeb(app)
    pages = build(parts, settings.store if settings.serving else None, PageConfig.from_settings(settings))
    app.web.web_app.router.add_routes(pages.routes())

    async def close(_: web.Application) -> None:
        if pages.reader is not None:
            pages.reader.close()

    app.web.web_app.on_cleanup.append(close)
    return pages
