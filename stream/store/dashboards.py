"""Dashboard queries: the SQL in deploy/dashboards/*.sql, run with parameters, and the
Grafana dashboard built from the same files.

The .sql files use ClickHouse query parameters (`{top_n:UInt32}`), so they run unchanged
through clickhouse-connect (`parameters=`), `clickhouse-client --param_top_n=10`, or the
HTTP interface (`param_top_n=10`). Grafana's ClickHouse data source interpolates its own
variables instead, so `grafana_sql` rewrites each parameter into a dashboard variable or a
time macro; `python -m stream.store.dashboards --write` regenerates
deploy/grafana/dashboards/trail.json and `--check` fails when it is out of date.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream.store.clickhouse import REPO_ROOT

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client
    from clickhouse_connect.driver.query import QueryResult

DASHBOARD_DIR = REPO_ROOT / "deploy" / "dashboards"
GRAFANA_JSON = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "trail.json"
DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "trail-clickhouse"}
QUERIES = ("top_n", "movers", "item_history", "accuracy")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):([^{}]+)\}")

# ClickHouse parameter -> Grafana expression (variables are defined in `_variables`).
GRAFANA_SUBSTITUTIONS = {
    "top_n": "${top_n}",
    "model_version": "'${model_version}'",
    "items": "[${items:singlequote}]",
    "count_signal": "'${count_signal}'",
    "horizon_hours": "${horizon_hours}",
    "window_ticks": "${window_ticks}",
    "time_from": "$__fromTime",
    "time_to": "$__toTime",
}


@dataclass(frozen=True)
class DashboardParams:
    top_n: int = 20
    model_version: str = ""  # '' = the model that wrote the most recent tick
    items: tuple[str, ...] = ()
    count_signal: str = "count_7d"
    horizon_hours: int = 168
    window_ticks: int = 24
    time_from: datetime = datetime(1970, 1, 1, tzinfo=timezone.utc)
    time_to: datetime = datetime(2100, 1, 1, tzinfo=timezone.utc)

    def __post_init__(self) -> None:
        for name in ("top_n", "horizon_hours", "window_ticks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.count_signal):
            raise ValueError(f"count_signal {self.count_signal!r} is not a signal name like count_7d")


def load_sql(name: str, directory: Path = DASHBOARD_DIR) -> str:
    path = Path(directory) / f"{name}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"no dashboard query {path} (known: {', '.join(QUERIES)})")
    return path.read_text(encoding="utf-8")


def sql_parameters(sql: str) -> dict[str, str]:
    """{name: ClickHouse type} of the query parameters a SQL text uses."""
    found: dict[str, str] = {}
    for name, ch_type in _PARAM.findall(_strip_comments(sql)):
        if found.setdefault(name, ch_type.strip()) != ch_type.strip():
            raise ValueError(f"parameter {name} is used with two types: {found[name]} and {ch_type}")
    return found


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))


def run(client: Client, name: str, params: DashboardParams | None = None,
        directory: Path = DASHBOARD_DIR) -> QueryResult:
    """Run one dashboard query; only the parameters its SQL uses are sent."""
    sql = load_sql(name, directory)
    values = asdict(params or DashboardParams())
    values["items"] = list(values["items"])
    used = sql_parameters(sql)
    unknown = set(used) - set(values)
    if unknown:
        raise ValueError(f"{name}.sql uses parameters DashboardParams does not have: {sorted(unknown)}")
    return client.query(sql, parameters={k: values[k] for k in used})


def grafana_sql(sql: str) -> str:
    """The SQL with parameters replaced by Grafana variables and macros, comments dropped."""
    def sub(m: re.Match) -> str:
        try:
            return GRAFANA_SUBSTITUTIONS[m.group(1)]
        except KeyError:
            raise ValueError(f"no Grafana variable for parameter {m.group(1)}") from None

    return _PARAM.sub(sub, _strip_comments(sql)).strip()


def _target(sql: str, fmt: int) -> dict[str, Any]:
    # format: 0 = time series, 1 = table (grafana-clickhouse-datasource v4)
    return {"refId": "A", "datasource": DATASOURCE, "editorType": "sql", "format": fmt,
            "queryType": "timeseries" if fmt == 0 else "table", "rawSql": sql}


def _hide(*names: str) -> list[dict[str, Any]]:
    return [{"matcher": {"id": "byRegexp", "options": f".*{n}.*"},
             "properties": [{"id": "custom.hideFrom", "value": {"legend": True, "tooltip": True, "viz": True}}]}
            for n in names]


def _variables() -> list[dict[str, Any]]:
    def custom(name: str, label: str, values: list[str], default: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "custom", "query": ",".join(values),
                "current": {"text": default, "value": default},
                "options": [{"text": v, "value": v, "selected": v == default} for v in values]}

    items_sql = ("SELECT item_id FROM trail_predictions FINAL WHERE tick = (SELECT max(tick) FROM trail_predictions) "
                 "ORDER BY rank LIMIT 50")
    return [
        custom("top_n", "Top N", ["10", "20", "50", "100"], "20"),
        {"name": "model_version", "label": "Model version (empty = latest)", "type": "textbox", "query": "",
         "current": {"text": "", "value": ""}},
        {"name": "items", "label": "Items", "type": "query", "datasource": DATASOURCE,
         "definition": items_sql, "query": items_sql, "refresh": 2, "multi": True, "includeAll": False,
         "current": {}, "options": []},
        custom("count_signal", "Count signal (horizon window)", ["count_1d", "count_7d", "count_28d"], "count_7d"),
        custom("horizon_hours", "Forecast horizon (hours)", ["24", "168", "672"], "168"),
        custom("window_ticks", "Rolling window (ticks)", ["6", "24", "168"], "24"),
    ]


def grafana_dashboard(directory: Path = DASHBOARD_DIR) -> dict[str, Any]:
    sql = {name: grafana_sql(load_sql(name, directory)) for name in QUERIES}
    table_opts = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    panels = [
        {"id": 1, "type": "table", "title": "Top items now (with explanations)", "datasource": DATASOURCE,
         "gridPos": {"h": 12, "w": 24, "x": 0, "y": 0}, "targets": [_target(sql["top_n"], 1)],
         "options": table_opts,
         "fieldConfig": {"defaults": {}, "overrides": [
             {"matcher": {"id": "byName", "options": "explanation"},
              "properties": [{"id": "custom.width", "value": 640}, {"id": "custom.inspect", "value": True}]}]}},
        {"id": 2, "type": "table", "title": "Rank movers since the previous tick", "datasource": DATASOURCE,
         "gridPos": {"h": 10, "w": 12, "x": 0, "y": 12}, "targets": [_target(sql["movers"], 1)],
         "options": table_opts, "fieldConfig": {"defaults": {}, "overrides": []}},
        {"id": 3, "type": "timeseries", "title": "Rolling accuracy (log1p counts) and NDCG@$top_n of the published ranking, passed periods",
         "datasource": DATASOURCE, "gridPos": {"h": 10, "w": 12, "x": 12, "y": 12},
         "targets": [_target(sql["accuracy"], 0)],
         "fieldConfig": {"defaults": {"custom": {"drawStyle": "line", "lineWidth": 2}},
                         "overrides": _hide("items", "total", "^mae_log1p$", "^rmse_log1p$", "^spearman$")}},
        {"id": 4, "type": "timeseries", "title": "Score history vs actual counts ($items)",
         "datasource": DATASOURCE, "gridPos": {"h": 12, "w": 24, "x": 0, "y": 22},
         "targets": [_target(sql["item_history"], 0)],
         "fieldConfig": {"defaults": {"custom": {"drawStyle": "line", "lineWidth": 1, "spanNulls": False}},
                         "overrides": _hide("rank") + [
                             {"matcher": {"id": "byRegexp", "options": ".*score.*"},
                              "properties": [{"id": "custom.axisPlacement", "value": "right"}]}]}},
    ]
    return {
        "uid": "trail-overview",
        "title": "TRAIL: popularity forecasts and explanations",
        "tags": ["trail"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "1m",
        "time": {"from": "now-30d", "to": "now"},
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "panels": panels,
    }


def render_grafana_json(directory: Path = DASHBOARD_DIR) -> str:
    return json.dumps(grafana_dashboard(directory), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stream.store.dashboards",
                                 description="Build the Grafana dashboard JSON from deploy/dashboards/*.sql.")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"write {GRAFANA_JSON.relative_to(REPO_ROOT)}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the committed JSON differs from the SQL files")
    mode.add_argument("--print-sql", metavar="NAME", choices=QUERIES, help="print one query as Grafana runs it")
    args = ap.parse_args(argv)
    if args.print_sql:
        print(grafana_sql(load_sql(args.print_sql)))
        return 0
    text = render_grafana_json()
    if args.write:
        GRAFANA_JSON.parent.mkdir(parents=True, exist_ok=True)
        GRAFANA_JSON.write_text(text, encoding="utf-8")
        print(f"wrote {GRAFANA_JSON}")
        return 0
    current = GRAFANA_JSON.read_text(encoding="utf-8") if GRAFANA_JSON.exists() else ""
    if current != text:
        print(f"{GRAFANA_JSON} is out of date: run python -m stream.store.dashboards --write", file=sys.stderr)
        return 1
    print(f"{GRAFANA_JSON} matches deploy/dashboards/*.sql")
    return 0


def as_records(result: QueryResult) -> list[Mapping[str, Any]]:
    return [dict(zip(result.column_names, row)) for row in result.result_rows]


if __name__ == "__main__":
    sys.exit(main())
