"""Server-rendered HTML of the pages, charts as inline SVG: no JavaScript, no build step.

Every text from the store or the request is escaped (`html.escape`) before it reaches the page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from html import escape
from urllib.parse import quote

from stream.web.reader import Accuracy, ItemPage, Movers, Mover, Status

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header a{color:#fff;text-decoration:none;margin-right:14px}header h1{font-size:18px;margin:0}
header .meta{font-size:12px;opacity:.85;margin-left:auto}
main{padding:16px 24px;max-width:1280px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:6px 8px;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top}
th{font-size:12px;color:#56606b;font-weight:600;background:#eef1f4}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.range{color:#56606b;font-size:12px}.muted{color:#7a838d}
.mark-ok{color:#1b873f;font-weight:700}.mark-fix{color:#b26b00;font-weight:700}.mark-bad{color:#c0392b;font-weight:700}
.reason{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#e7eefb;color:#1d3557;margin-left:4px}
.waiting{background:#fff8e1;border:1px solid #f0c36d;padding:16px;border-radius:6px;font-size:16px}
.error{background:#fdecea;border:1px solid #e6a19a;padding:16px;border-radius:6px}
svg .pred{stroke:#1d6fd1;fill:none;stroke-width:2}svg .real{stroke:#d1495b;fill:none;stroke-width:2}
svg .now{stroke:#8a949e;fill:none;stroke-width:1.5;stroke-dasharray:4 3}svg .band{fill:#1d6fd1;fill-opacity:.15}
svg .spark{stroke:#1d6fd1;fill:none;stroke-width:1.5}svg .axis{stroke:#b9c0c7}svg text{font-size:11px;fill:#56606b}
svg .ndcg{stroke:#2a9d8f;fill:none;stroke-width:2}svg .mae{stroke:#d1495b;fill:none;stroke-width:2}
.legend span{margin-right:16px}.sw{display:inline-block;width:14px;height:3px;vertical-align:middle;margin-right:4px}
.drivers{font-size:12px;color:#56606b}
"""


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:,.{digits}f}"


def _when(t: datetime | None) -> str:
    return "–" if t is None else t.strftime("%Y-%m-%d %H:%M UTC")


def layout(title: str, status: Status | None, body: str, *, refresh_s: int | None = None) -> str:
    meta = ""
    if status is not None:
        meta = ("waiting for the first tick" if status.waiting else
                f"model {escape(status.model_version or '?')} · last tick {_when(status.tick)} · "
                f"{status.items:,} items ranked · {status.ticks:,} ticks")
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{refresh}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{escape(title)} · TRAIL</title><style>{CSS}</style></head><body>'
            f'<header><h1>TRAIL</h1><nav><a href="/">Movers</a><a href="/accuracy">Accuracy</a>'
            f'<a href="/api/movers">JSON</a><a href="/metrics">Metrics</a></nav>'
            f'<span class="meta" id="status">{meta}</span></header><main>{body}</main></body></html>')


def waiting_block() -> str:
    return ('<div class="waiting" id="waiting"><b>Waiting for the first tick.</b> The worker is running; the '
            "first ranking appears here once it has scored a tick (this page refreshes itself).</div>")


def error_page(code: int, message: str, status: Status | None = None) -> str:
    titles = {400: "Bad request", 404: "Not found", 503: "Store unavailable"}
    title = titles.get(code, "Error")
    return layout(title, status, f'<h2>{code} · {escape(title)}</h2><div class="error">{escape(message)}</div>'
                                 '<p><a href="/">Back to the movers</a></p>')


def mark(faithful: bool | None, repaired: bool | None) -> str:
    if faithful is None:
        return ""
    if not faithful:
        return '<span class="mark-bad" title="a claim is false against the signals">✗</span>'
    if repaired:
        return '<span class="mark-fix" title="faithful after the stream\'s repair step">✎</span>'
    return '<span class="mark-ok" title="every claim checked true against the signals">✓</span>'


def _polyline(xs: Sequence[float], ys: Sequence[float | None]) -> str:
    """SVG path data: segments broken where y is None."""
    out, pen = [], "M"
    for x, y in zip(xs, ys):
        if y is None:
            pen = "M"
            continue
        out.append(f"{pen}{x:.1f},{y:.1f}")
        pen = "L"
    return " ".join(out)


def sparkline(points: Sequence[tuple[datetime, float]], width: int = 120, height: int = 28) -> str:
    if not points:
        return '<span class="muted">–</span>'
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = (width - 4) / max(1, len(values) - 1)
    pts = " ".join(f"{2 + i * step:.1f},{height - 2 - (v - lo) / span * (height - 4):.1f}" for i, v in enumerate(values))
    last = values[-1]
    dot = f'<circle cx="2" cy="{height / 2:.1f}" r="2" fill="#1d6fd1"/>' if len(values) == 1 else ""
    return (f'<svg class="sparkline" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<title>{len(values)} ticks, {lo:,.0f} to {hi:,.0f}, now {last:,.0f}</title>'
            f'<polyline class="spark" points="{pts}"/>{dot}</svg>')


def _drivers(d: dict[str, float] | None) -> str:
    if not d:
        return ""
    parts = sorted(d.items(), key=lambda kv: -abs(kv[1]))
    return '<div class="drivers">drivers: ' + ", ".join(f"{escape(k)} {v:+.2f}" for k, v in parts) + "</div>"


def _explanation(m: Mover) -> str:
    if m.explanation is None:
        return '<span class="muted" title="the explainer explains the biggest movers of each tick">–</span>'
    reason = f'<span class="reason">{escape(m.reason)}</span>' if m.reason else ""
    return f"{mark(m.faithful, m.repaired)} {escape(m.explanation)}{reason}"


def _mover_rows(movers: Sequence[Mover]) -> str:
    rows = []
    for m in movers:
        name = escape(m.title) if m.title else escape(m.item_id)
        sub = f'<div class="muted">{escape(m.item_id)}</div>' if m.title else ""
        rng = (f'<div class="range">{_fmt(m.predicted_low)}–{_fmt(m.predicted_high)}</div>'
               if m.predicted_low is not None and m.predicted_high is not None else "")
        rows.append(
            f'<tr class="mover"><td class="num">{m.rank}</td>'
            f'<td><a href="/items/{quote(m.item_id, safe="")}">{name}</a>{sub}</td>'
            f'<td class="num">{m.score:.3f}</td><td class="num">{_fmt(m.predicted_count)}{rng}</td>'
            f"<td>{sparkline(m.recent)}</td><td>{_explanation(m)}{_drivers(m.drivers)}</td></tr>")
    has_range = any(m.predicted_low is not None for m in movers)
    pred_head = "predicted (10–90 %)" if has_range else "predicted"
    return (f"<thead><tr><th>#</th><th>item</th><th>score</th><th>{pred_head}</th><th>recent counts</th>"
            f"<th>explanation</th></tr></thead><tbody>{''.join(rows)}</tbody>")


def movers_page(data: Movers, top_n: int) -> str:
    s = data.status
    if s.waiting or not data.movers:
        return layout("Movers", s, waiting_block(), refresh_s=5)
    explained = ""
    if data.explained:
        explained = (f"<h2>Movers explained at {_when(data.explained_tick)}</h2>"
                     f'<table id="explained">{_mover_rows(data.explained)}</table>')
    body = (explained + f"<h2>Top {len(data.movers)} at {_when(data.tick or s.tick)}</h2>"
            f'<p class="muted">Predicted: the item\'s count over the next forecast period. Sparkline: '
            f"{escape(data.spark_signal)} over the last ticks. ✓ every claim checked true, ✎ faithful after repair, "
            f"✗ a claim is false.</p>"
            f'<table id="movers">{_mover_rows(data.movers)}</table>')
    return layout("Movers", s, body, refresh_s=15)


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _axes(width: int, height: int, pad: int, t0: datetime, t1: datetime, y_max: float, y_label: str) -> str:
    return (f'<line class="axis" x1="{pad}" y1="{height - pad}" x2="{width - 8}" y2="{height - pad}"/>'
            f'<line class="axis" x1="{pad}" y1="8" x2="{pad}" y2="{height - pad}"/>'
            f'<text x="{pad}" y="{height - pad + 14}">{t0:%Y-%m-%d}</text>'
            f'<text x="{width - 8}" y="{height - pad + 14}" text-anchor="end">{t1:%Y-%m-%d}</text>'
            f'<text x="{pad - 4}" y="14" text-anchor="end">{y_max:,.0f}</text>'
            f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">0</text>'
            f'<text x="{pad + 4}" y="18">{escape(y_label)}</text>')


def item_chart(page: ItemPage, count_signal: str, horizon_hours: int, width: int = 860, height: int = 280) -> str:
    """Predicted against realised on one time axis, the end of each forecast period: the forecast made at tick t
    for (t, t + horizon] is drawn at t + horizon, where the count over the horizon window that ended there (the
    trend snapshots' `count_signal`) is what happened in that period."""
    h = timedelta(hours=horizon_hours)
    pts = page.predictions
    counts = page.counts
    ticks = [p.tick + h for p in pts] + [t for t, _ in counts]
    if not ticks:
        return '<p class="muted">nothing to chart yet</p>'
    t0, t1 = min(ticks), max(ticks)
    values = [p.predicted_count for p in pts] + [v for _, v in counts] + [p.predicted_high or 0 for p in pts]
    y_max = max(values + [1.0])
    pad = 44
    x = _scale(t0.timestamp(), t1.timestamp() if t1 > t0 else t0.timestamp() + 1, pad, width - 8)
    y = _scale(0, y_max, height - pad, 8)
    parts = [_axes(width, height, pad, t0, t1, y_max, f"{count_signal}: count per forecast period, at its end")]
    band = [p for p in pts if p.predicted_low is not None and p.predicted_high is not None]
    if len(band) >= 2:
        upper = " ".join(f"{x((p.tick + h).timestamp()):.1f},{y(p.predicted_high):.1f}" for p in band)
        lower = " ".join(f"{x((p.tick + h).timestamp()):.1f},{y(p.predicted_low):.1f}" for p in reversed(band))
        parts.append(f'<polygon class="band" points="{upper} {lower}"><title>10–90 % range</title></polygon>')
    if counts:
        parts.append(f'<path class="real" d="{_polyline([x(t.timestamp()) for t, _ in counts], [y(v) for _, v in counts])}">'
                     f"<title>what happened: {escape(count_signal)} at each tick</title></path>")
    if pts:
        xs = [x((p.tick + h).timestamp()) for p in pts]
        parts.append(f'<path class="pred" d="{_polyline(xs, [y(p.predicted_count) for p in pts])}">'
                     "<title>forecast, drawn at the end of its period</title></path>")
        if len(pts) == 1:  # one tick: a dot, so the forecast shows
            parts.append(f'<circle cx="{xs[0]:.1f}" cy="{y(pts[0].predicted_count):.1f}" r="3" fill="#1d6fd1"/>')
    legend = ('<div class="legend"><span><i class="sw" style="background:#1d6fd1"></i>predicted for the period ending '
              'here</span><span><i class="sw" style="background:#d1495b"></i>realised: the count over the period '
              'ending here</span>'
              + ('<span><i class="sw" style="background:#b9d3f3"></i>10–90 % range</span>' if band else "") + "</div>")
    return (f'<svg id="item-chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'style="background:#fff">{"".join(parts)}</svg>{legend}')


def item_page(page: ItemPage, count_signal: str, horizon_hours: int) -> str:
    name = escape(page.title or page.item_id)
    latest = page.predictions[-1] if page.predictions else None
    summary = ""
    if latest is not None:
        rng = (f" (10–90 %: {_fmt(latest.predicted_low)}–{_fmt(latest.predicted_high)})"
               if latest.predicted_low is not None and latest.predicted_high is not None else "")
        summary = (f"<p>Latest: rank <b>{latest.rank}</b> at {_when(latest.tick)}, score {latest.score:.3f}, "
                   f"predicted <b>{_fmt(latest.predicted_count)}</b>{rng}; count so far {_fmt(latest.count_now)}."
                   f"</p>{_drivers(latest.drivers)}")
    rows = []
    for e in page.explanations:
        reason = f'<span class="reason">{escape(e["reason"])}</span>' if e.get("reason") else ""
        rows.append(f'<tr><td class="num">{_when(e["tick"])}</td><td class="num">{e["rank"]}</td>'
                    f'<td>{mark(e.get("faithful"), e.get("repaired"))} {escape(e["explanation"])}{reason}</td></tr>')
    expl = (f'<table id="explanations"><thead><tr><th>tick</th><th>rank</th><th>explanation</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>" if rows else '<p class="muted">no explanation yet</p>')
    preds = []
    for p in reversed(page.predictions[-50:]):
        rng = (f' <span class="range">{_fmt(p.predicted_low)}–{_fmt(p.predicted_high)}</span>'
               if p.predicted_low is not None and p.predicted_high is not None else "")
        preds.append(f'<tr><td class="num">{_when(p.tick)}</td><td class="num">{p.rank}</td>'
                     f'<td class="num">{p.score:.3f}</td><td class="num">{_fmt(p.predicted_count)}{rng}</td>'
                     f'<td class="num">{_fmt(p.realised_count)}</td><td class="num">{_fmt(p.count_now)}</td></tr>')
    body = (f"<h2>{name}</h2>" + (f'<p class="muted">item {escape(page.item_id)}</p>' if page.title else "")
            + summary + item_chart(page, count_signal, horizon_hours)
            + "<h3>Explanations</h3>" + expl
            + '<h3>Predictions (latest 50)</h3><table id="predictions"><thead><tr><th>tick</th><th>rank</th>'
              "<th>score</th><th>predicted</th><th>realised</th><th>count so far</th></tr></thead>"
            + f"<tbody>{''.join(preds)}</tbody></table>"
            + '<p class="muted">Realised: the count over the forecast period, known once a tick falls at its end '
              "(the chart compares each forecast with the count over the window ending where its period ends).</p>")
    return layout(page.title or page.item_id, page.status, body)


def _dots(xs: Sequence[float], ys: Sequence[float | None], color: str) -> str:
    return "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in zip(xs, ys) if y is not None)


def accuracy_chart(data: Accuracy, width: int = 860, height: int = 220) -> str:
    rows = data.rows
    if len(rows) < 1:
        return ""
    t0, t1 = rows[0].tick, rows[-1].tick
    pad = 44
    x = _scale(t0.timestamp(), t1.timestamp() if t1 > t0 else t0.timestamp() + 1, pad, width - 8)
    maes = [r.mae_log1p for r in rows]
    y_max = max([m for m in maes if m is not None] + [1.0])
    y_mae = _scale(0, y_max, height - pad, 8)
    y_ndcg = _scale(0, 1, height - pad, 8)
    xs = [x(r.tick.timestamp()) for r in rows]
    return (f'<svg id="accuracy-chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'style="background:#fff">{_axes(width, height, pad, t0, t1, y_max, "MAE of log(1+count); NDCG 0–1")}'
            f'<path class="mae" d="{_polyline(xs, [None if m is None else y_mae(m) for m in maes])}"/>'
            f'<path class="ndcg" d="{_polyline(xs, [None if r.ndcg is None else y_ndcg(r.ndcg) for r in rows])}"/>'
            + _dots(xs, [None if m is None else y_mae(m) for m in maes], "#d1495b")
            + _dots(xs, [None if r.ndcg is None else y_ndcg(r.ndcg) for r in rows], "#2a9d8f")
            + '</svg><div class="legend"><span><i class="sw" style="background:#d1495b"></i>MAE (log1p)</span>'
            f'<span><i class="sw" style="background:#2a9d8f"></i>NDCG@{data.ndcg_k}</span></div>')


def accuracy_page(data: Accuracy) -> str:
    s = data.status
    if s.waiting:
        return layout("Accuracy", s, waiting_block(), refresh_s=10)
    if not data.rows:
        return layout("Accuracy", s, f'<h2>Accuracy</h2><div class="waiting" id="pending">No outcome is known yet: '
                                     f"a tick's outcome is the trend snapshot taken {data.horizon_hours} hours (of "
                                     f"the log's time) after it. A live worker snapshots every bucket; a replay at an "
                                     f"accelerated clock jumps buckets and may take a while to land on one.</div>", refresh_s=30)
    rows = "".join(
        f'<tr><td class="num">{_when(r.tick)}</td><td class="num">{r.items:,}</td>'
        f'<td class="num">{_fmt(r.mae_log1p, 3)}</td><td class="num">{_fmt(r.ndcg, 3)}</td>'
        f'<td class="num">{_fmt(r.spearman, 3)}</td><td class="num">{_fmt(r.predicted_total)}</td>'
        f'<td class="num">{_fmt(r.realised_total)}</td></tr>' for r in reversed(data.rows))
    body = (f"<h2>Accuracy of the ticks whose outcome is known</h2>"
            f'<p class="muted">Realised: {escape(data.count_signal)} {data.horizon_hours} h after the tick. MAE on '
            f"log(1+count) over the items scored at the tick; NDCG@{data.ndcg_k} of the published ranking with the "
            f"realised counts as gains.</p>{accuracy_chart(data)}"
            f'<table id="accuracy"><thead><tr><th>tick</th><th>items</th><th>MAE log1p</th>'
            f"<th>NDCG@{data.ndcg_k}</th><th>Spearman</th><th>predicted total</th><th>realised total</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")
    return layout("Accuracy", s, body, refresh_s=60)
