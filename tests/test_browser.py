"""What a person sees: `./trail demo` on a real log (Online Retail II's busiest items) through the real
broker, worker and embedded store, its page loaded in headless Chromium (Debian's package, which
`./trail setup` installs), driven over the DevTools protocol (tests/browser.py).

Checks the movers table is filled, an item page's chart is drawn, the accuracy page shows its rows
(or says no forecast period has passed),
no page logs a console error, an exception or a failed load; /ready is 200 and /metrics has the
TRAIL series. Screenshots go to the test's folder, and to docs/img/ with TRAIL_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from browser import Chromium, chromium_path
from serving_artefact import exported_artefact

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
ITEMS = 150  # the busiest items: a small real log, so the worker's first tick comes quickly


def small_retail_log(folder: Path) -> tuple[Path, Path]:
    from shared_cache import CACHE_DIR
    from stream.core.datasets import load_dataset

    ds = load_dataset("retail", cache_dir=CACHE_DIR)
    busiest = ds.events["item_id"].value_counts().index[:ITEMS]
    events = ds.events[ds.events["item_id"].isin(busiest)][["item_id", "user_id", "ts"]]
    items = ds.items[ds.items["item_id"].isin(busiest)][["item_id", "title", "category"]]
    folder.mkdir(parents=True, exist_ok=True)
    events.to_parquet(folder / "events.parquet", index=False)
    items.to_parquet(folder / "items.parquet", index=False)
    return folder / "events.parquet", folder / "items.parquet"


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            raise AssertionError(f"the demo exited ({proc.returncode}):\n{path.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{path.read_text()[-3000:]}")


async def fetch(url: str) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, await r.text()


async def poll(url: str, ok, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = await fetch(url)
            if ok(*last):
                return last[1]
        except OSError as e:
            last = (None, repr(e))
        await asyncio.sleep(1.0)
    raise AssertionError(f"{url} never answered as expected within {timeout_s} s; last: {last}")


async def see_the_pages(base: str, shots: Path, profile: Path) -> dict:
    seen: dict = {}
    ready = orjson.loads(await poll(base + "ready", lambda s, _: s == 200, 120))
    assert ready["first_tick"] and ready["store"]
    # some ticks of history, so the sparklines and the item chart have a few points each
    await poll(base + "api/status", lambda s, b: s == 200 and orjson.loads(b)["ticks"] >= 10, 240)
    # an item the explainer has explained (its top movers by rise), and a passed forecast period
    movers = orjson.loads(await poll(base + "api/movers", lambda s, b: s == 200 and '"explained":[{' in b, 240))
    explained = movers["explained"][0]
    # a tick's outcome is known once a snapshot falls exactly at tick + horizon: a live worker ticks every
    # bucket, an accelerated replay jumps buckets, so here there may be none yet (the pending message shows)
    await poll(base + "api/accuracy", lambda s, b: s == 200, 60)
    async with await Chromium.launch(profile) as browser:
        page = await browser.open(base)
        seen["rows"] = await page.eval("document.querySelectorAll('#movers tr.mover').length")
        seen["sparklines"] = await page.eval("document.querySelectorAll('#movers svg.sparkline polyline').length")
        seen["status"] = await page.eval("document.getElementById('status').textContent")
        seen["explained_rows"] = await page.eval(
            "Array.from(document.querySelectorAll('#explained tr.mover')).map(r => r.textContent)")
        seen["first_item"] = await page.eval("document.querySelector('#movers tr.mover a').getAttribute('href')")
        seen["movers_errors"] = list(page.errors)
        await page.screenshot(shots / "movers.png")

        page = await browser.open(base + seen["first_item"].lstrip("/"))
        seen["chart_paths"] = await page.eval(
            "Array.from(document.querySelectorAll('#item-chart path.pred')).map(p => p.getAttribute('d'))")
        seen["item_errors"] = list(page.errors)
        await page.screenshot(shots / "item.png")

        page = await browser.open(base + "items/" + explained["item_id"])
        seen["explanations"] = await page.eval(
            "Array.from(document.querySelectorAll('#explanations tbody tr')).map(r => r.textContent)")
        seen["explained_errors"] = list(page.errors)

        page = await browser.open(base + "accuracy")
        seen["accuracy_rows"] = await page.eval("document.querySelectorAll('#accuracy tbody tr').length")
        seen["accuracy_pending"] = await page.eval("document.getElementById('pending') !== null")
        seen["accuracy_errors"] = list(page.errors)
        await page.screenshot(shots / "accuracy.png")
    seen["explained_text"] = explained["explanation"]
    seen["metrics"] = (await fetch(base + "metrics"))[1]
    return seen


def test_a_person_sees_the_movers_items_and_accuracy_in_a_browser(tmp_path):
    if chromium_path() is None:
        pytest.skip("no chromium: ./trail setup installs Debian's chromium when it runs as root or with sudo")
    model = exported_artefact()
    events, items = small_retail_log(tmp_path / "log")
    var = tmp_path / "var"
    err = tmp_path / "demo.err"
    env = dict(os.environ, TRAIL_EXPLAIN_TOP="2")
    with open(err, "wb") as e, open(tmp_path / "demo.out", "wb") as o:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream.tools.demo", "--events", str(events), "--items", str(items), "--duration", "400",
             "--speed", "172800", "--warmup-days", "35", "--tick", "2", "--model", str(model), "--var", str(var)],
            cwd=REPO, env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    try:
        url = wait_for_line(err, r"page: (http://localhost:\d+/)", proc, 120).group(1)
        wait_for_line(err, r"first prediction:", proc, 300)
        shots = REPO / "docs" / "img" if os.environ.get("TRAIL_UPDATE_SCREENSHOTS") == "1" else tmp_path / "shots"
        seen = asyncio.run(see_the_pages(url, shots, tmp_path / "chromium"))
    finally:
        proc.send_signal(signal.SIGINT)  # the demo stops the replay, the worker, the broker
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert f"the page was at {url}" in (tmp_path / "demo.out").read_text()

    assert seen["rows"] == 20 and seen["sparklines"] >= 10, seen
    assert re.search(r"model \S+ · last tick \d{4}-\d\d-\d\d", seen["status"]), seen["status"]
    assert seen["chart_paths"] and re.match(r"M[\d.]+,[\d.]+( L[\d.]+,[\d.]+)+", seen["chart_paths"][0]), seen
    assert seen["explained_rows"] and all(re.search("[✓✎✗]", row) for row in seen["explained_rows"]), seen
    assert any(seen["explained_text"] in row and re.search("[✓✎✗]", row) for row in seen["explanations"]), seen
    assert seen["accuracy_rows"] >= 1 or seen["accuracy_pending"], seen
    for name in ("movers_errors", "item_errors", "explained_errors", "accuracy_errors"):
        assert seen[name] == [], (name, seen[name])
    metrics = seen["metrics"]
    for series in ("trail_events_consumed_total", "trail_ticks_ranked_total", "trail_sink_rows_written_total"):
        value = re.search(rf"^{series} (\S+)$", metrics, re.M)
        assert value and float(value.group(1)) > 0, (series, metrics[:2000])
    assert re.search(r'^trail_consumer_lag\{partition="\d+"\} ', metrics, re.M)
    assert re.search(r"^trail_tick_duration_seconds_count [1-9]", metrics, re.M)
