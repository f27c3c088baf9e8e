"""Print TRAIL's current top-N with explanations from the results store, and chart score history.

    python -m stream.tools.report                       # top 20 at the latest tick, embedded store
    python -m stream.tools.report --top 10 --png var/history.png --items 313,258
    CLICKHOUSE_URL=http://localhost:8123 python -m stream.tools.report

Reads the same store the sink writes (embedded chdb at TRAIL_CLICKHOUSE_PATH, or the server
at CLICKHOUSE_URL) through the dashboard queries in deploy/dashboards/. The embedded store
admits one process at a time: stop the worker first, or run ClickHouse as a server.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from stream.core.summary import reason_text, size_text
from stream.store import dashboards
from stream.store.dashboards import DashboardParams
from stream.store.clickhouse import StoreConfig, StoreError, connect
from stream.settings import SettingsError, load_settings

SIGNALS_SHOWN = ("count_7d", "velocity_7d", "users_7d")


def _fmt_num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def format_top(rows: Sequence[Mapping[str, Any]], width: int = 100) -> str:
    """A plain-text table: one line of numbers per item, its explanation wrapped beneath."""
    if not rows:
        return "(no predictions in the store yet)"
    first = rows[0]
    shown = [s for s in SIGNALS_SHOWN if any(s in (r.get("signals") or {}) for r in rows)]
    head = ["rank", "item", "score", "predicted"] + shown + ["faithful", "why"]
    table = []
    for r in rows:
        sig = r.get("signals") or {}
        faithful = r.get("faithful")
        # the size and range as the explanation states them ("~40 (25–55)"), the reason and its source
        table.append([str(r["rank"]), str(r["item_id"]), _fmt_num(r["score"]),
                      size_text(r["predicted_count"], r.get("predicted_low"), r.get("predicted_high"))]
                     + [_fmt_num(sig.get(s), 0) for s in shown]
                     + ["-" if faithful is None else f"{'yes' if faithful else 'NO'} ({r.get('claims_checked')} claims)"]
                     + [reason_text(r.get("reason"), r.get("reason_source"), r.get("driver")) or "-"])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    lines = [f"TRAIL top {len(rows)} at {first['tick']:%Y-%m-%d %H:%M} UTC, model {first['model_version']}", ""]
    lines.append("  ".join(h.rjust(w) if i != 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r, row in zip(rows, table):
        lines.append("  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        text = r.get("explanation")
        if text:
            lines.extend(textwrap.wrap(text, width=max(40, width - 6), initial_indent="      ",
                                       subsequent_indent="      "))
    return "\n".join(lines)


def plot_history(rows: Sequence[Mapping[str, Any]], path: Path, count_signal: str, horizon_hours: int) -> Path:
    """Score (top) and counts (bottom: observed, predicted, realised) per item over ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_item: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_item.setdefault(str(r["item_id"]), []).append(r)
    fig, (ax_score, ax_count) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for i, (item, hist) in enumerate(sorted(by_item.items())):
        color = f"C{i % 10}"
        t = [h["tick"] for h in hist]
        ax_score.plot(t, [h["score"] for h in hist], color=color, label=item)
        ax_count.plot(t, [_nan(h["count_now"]) for h in hist], color=color, label=f"{item} {count_signal}")
        ax_count.plot(t, [_nan(h["predicted_count"]) for h in hist], color=color, linestyle=":",
                      label=f"{item} predicted next {horizon_hours} h")
        ax_count.plot(t, [_nan(h["realised_count"]) for h in hist], color=color, linestyle="--",
                      label=f"{item} realised next {horizon_hours} h")
    ax_score.set_ylabel("score")
    ax_score.set_title("TRAIL score history")
    ax_score.legend(loc="upper left", fontsize="small")
    ax_count.set_ylabel("count")
    ax_count.set_xlabel("tick (UTC)")
    ax_count.legend(loc="upper left", fontsize="x-small", ncol=2)
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _store_config(args: argparse.Namespace, env: StoreConfig) -> StoreConfig:
    overrides: dict[str, Any] = {}
    if args.url:
        overrides["url"] = args.url
    if args.path:
        overrides["path"] = Path(args.path).absolute()
    if args.database:
        overrides["database"] = args.database
    config = replace(env, **overrides)
    if config.embedded and not Path(config.path).is_dir():
        raise StoreError(f"no embedded store at {Path(config.path).resolve()}: run the stream first, or set "
                         "TRAIL_CLICKHOUSE_PATH (--path) or CLICKHOUSE_URL (--url)")
    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stream.tools.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Store: CLICKHOUSE_URL / CLICKHOUSE_USER / CLICKHOUSE_PASSWORD / "
                                        "CLICKHOUSE_DATABASE, or the embedded TRAIL_CLICKHOUSE_PATH (./var/clickhouse).")
    ap.add_argument("--top", type=int, default=20, help="how many items (default 20)")
    ap.add_argument("--model-version", default="", help="model to show (default: the one that wrote the latest tick)")
    ap.add_argument("--png", type=Path, help="also write a score-history chart to this PNG file")
    ap.add_argument("--items", default="", help="comma-separated item ids for the chart (default: the top 5)")
    ap.add_argument("--count-signal", default="count_7d", help="signal holding the horizon-window count (count_7d)")
    ap.add_argument("--horizon-hours", type=int, default=168, help="forecast horizon in hours (168)")
    ap.add_argument("--width", type=int, default=100, help="wrap explanations at this width")
    ap.add_argument("--url", help="ClickHouse HTTP URL (overrides CLICKHOUSE_URL)")
    ap.add_argument("--path", help="embedded store directory (overrides TRAIL_CLICKHOUSE_PATH)")
    ap.add_argument("--database", help="database (overrides CLICKHOUSE_DATABASE, default trail)")
    args = ap.parse_args(argv)
    if args.top < 1:
        ap.error("--top must be >= 1")
    try:
        params = DashboardParams(top_n=args.top, model_version=args.model_version, count_signal=args.count_signal,
                                 horizon_hours=args.horizon_hours)
    except ValueError as ex:
        ap.error(str(ex))
    try:
        env = load_settings().store
        config = _store_config(args, env)
        client = connect(config, create_database=False)
    except (StoreError, SettingsError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    except Exception as ex:  # e.g. the server is unreachable: say where we looked
        print(f"error: cannot reach the store ({env.describe() if not args.url else args.url}): {ex}",
              file=sys.stderr)
        return 2
    try:
        try:
            top = dashboards.as_records(dashboards.run(client, "top_n", params))
        except Exception as ex:
            print(f"error: cannot read predictions from {config.describe()}: {ex}", file=sys.stderr)
            return 2
        print(format_top(top, args.width))
        if not top:
            return 1
        if args.png:
            items = tuple(i.strip() for i in args.items.split(",") if i.strip()) or tuple(r["item_id"] for r in top[:5])
            history = dashboards.as_records(dashboards.run(client, "item_history", replace(params, items=items)))
            missing = sorted(set(items) - {r["item_id"] for r in history})
            if missing:
                print(f"note: no predictions for {', '.join(missing)} (model {top[0]['model_version']})", file=sys.stderr)
            if not history:
                print("error: nothing to chart", file=sys.stderr)
                return 1
            written = plot_history(history, args.png, args.count_signal, args.horizon_hours)
            print(f"\nwrote {written} ({len({r['item_id'] for r in history})} items, {len(history)} points)")
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
