"""Headless Chromium (Debian's `chromium` package, installed by `./trail setup`) driven over the
DevTools protocol with aiohttp's websocket client: load a page, read its DOM, its console errors,
uncaught exceptions and failed loads, and take a screenshot.

    async with Chromium.launch(tmp_path) as browser:
        page = await browser.open("http://localhost:6066/")
        page.errors                        # console errors, exceptions, failed requests (with URLs)
        await page.eval("document.querySelectorAll('tr.mover').length")
        await page.screenshot(path)
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Page:
    browser: Chromium
    session: str
    errors: list[str] = field(default_factory=list)

    async def eval(self, expression: str) -> Any:
        r = await self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                    session=self.session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} raised in the page: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def screenshot(self, path: Path, width: int = 1280) -> Path:
        height = int(await self.eval("Math.min(document.documentElement.scrollHeight, 2400)"))
        await self.browser.send("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                                session=self.session)
        r = await self.browser.send("Page.captureScreenshot", {"format": "png"}, session=self.session)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path


class Chromium:
    def __init__(self, proc: subprocess.Popen, ws_url: str) -> None:
        self.proc = proc
        self.ws_url = ws_url
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._events: dict[str, list[tuple[str, dict]]] = {}  # session -> events
        self._pages: dict[str, Page] = {}
        self._http: aiohttp.ClientSession | None = None
        self._ws: Any = None
        self._reader: asyncio.Task | None = None

    @classmethod
    async def launch(cls, profile_dir: Path, timeout_s: float = 30.0) -> Chromium:
        exe = chromium_path()
        if exe is None:
            raise FileNotFoundError("no chromium on PATH (./trail setup installs Debian's chromium)")
        proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
             f"--user-data-dir={profile_dir}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        loop = asyncio.get_running_loop()
        lines: list[str] = []

        def read_url() -> str:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace")
                lines.append(line)
                m = re.search(r"DevTools listening on (ws://\S+)", line)
                if m:
                    return m.group(1)
            raise RuntimeError("chromium exited before it listened:\n" + "".join(lines[-20:]))

        try:
            ws_url = await asyncio.wait_for(loop.run_in_executor(None, read_url), timeout_s)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        # keep draining stderr so chromium never blocks on a full pipe
        loop.run_in_executor(None, lambda: [None for _ in proc.stderr])  # type: ignore[union-attr]
        self = cls(proc, ws_url)
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(ws_url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aenter__(self) -> Chromium:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            if "id" in data:
                fut = self._waiting.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
            else:
                session = data.get("sessionId", "")
                self._events.setdefault(session, []).append((data["method"], data.get("params", {})))
                page = self._pages.get(session)
                if page is not None:
                    _collect_error(page, data["method"], data.get("params", {}))

    async def send(self, method: str, params: dict | None = None, *, session: str | None = None,
                   timeout_s: float = 30.0) -> dict:
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        msg: dict[str, Any] = {"id": i, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self._ws.send_json(msg)
        return await asyncio.wait_for(fut, timeout_s)

    async def open(self, url: str, timeout_s: float = 30.0) -> Page:
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self, session)
        self._pages[session] = page
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self.send(f"{domain}.enable", session=session)
        self._events[session] = []
        await self.send("Page.navigate", {"url": url}, session=session)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not any(m == "Page.loadEventFired" for m, _ in self._events.get(session, [])):
            if loop.time() > deadline:
                raise TimeoutError(f"{url} did not load within {timeout_s} s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # late console messages
        return page

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _collect_error(page: Page, method: str, params: dict) -> None:
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        page.errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
    elif method == "Runtime.exceptionThrown":
        page.errors.append("exception: " + str(params.get("exceptionDetails", {}).get("text")))
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        e = params["entry"]
        page.errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
    elif method == "Network.loadingFailed":
        page.errors.append(f"network: {params.get('errorText')} {params.get('type', '')}")
    elif method == "Network.responseReceived" and params.get("response", {}).get("status", 200) >= 400:
        r = params["response"]
        page.errors.append(f"http {r['status']}: {r.get('url')}")
