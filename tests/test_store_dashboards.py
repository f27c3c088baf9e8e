"""Dashboard queries, the Grafana dashboard and `python -m stream.tools.report` on real data.

The store is loaded through the sink with MovieLens-100K (the wheel `recbole` ships it):
daily trend snapshots of every active movie over its last weeks, RecentPop-style predictions
of the top 50 and explanations of the top 10. Every query's answer is checked against the
same numbers computed here in Python.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import spearmanr

from stream.tools import report
from stream.store import dashboards
from stream.store.dashboards import DashboardParams
from stream.core.records import Explanation, Prediction, TrendSnapshot
from stream.store.sink import ResultSink, SinkConfig
from stream.store.clickhouse import REPO_ROOT, StoreConfig, connect

DAY = 86_400
MODEL = "recentpop-ml100k"
GHOST_MODEL = "other-model"
HORIZON = timedelta(hours=168)


@dataclass
class StoreData:
    ticks: list[datetime]
    snapshots: list[TrendSnapshot]
    predictions: list[Prediction]
    explanations: list[Explanation]


def _ml100k() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None:
        pytest.skip("MovieLens-100K comes with the wheel recbole (pip install --no-deps recbole)")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"


def build_store_data(n_ticks: int = 40, top_k: int = 50, explained: int = 10) -> StoreData:
    d = _ml100k()
    ev = pd.read_csv(d / "ml-100k.inter", sep="\t", usecols=[0, 1, 3], names=["user", "item", "ts"], header=0)
    titles = pd.read_csv(d / "ml-100k.item", sep="\t", usecols=[0, 1], names=["item", "title"], header=0)
    title = dict(zip(titles["item"].astype(str), titles["title"]))
    ev = ev.sort_values("ts", kind="stable")
    ts = ev["ts"].to_numpy(np.int64)
    codes, items = pd.factorize(ev["item"].astype(str))
    users = ev["user"].to_numpy(np.int64)
    n_items = len(items)
    last_day = int(ts.max()) // DAY * DAY

    def counts(t0: int, t1: int) -> np.ndarray:
        lo, hi = np.searchsorted(ts, [t0, t1])
        return np.bincount(codes[lo:hi], minlength=n_items).astype(float)

    data = StoreData([], [], [], [])
    for k in range(n_ticks):
        t = last_day - DAY * (n_ticks - 1 - k)
        tick = datetime.fromtimestamp(t, tz=timezone.utc)
        data.ticks.append(tick)
        sig = {"count_1d": counts(t - DAY, t), "count_7d": counts(t - 7 * DAY, t),
               "count_28d": counts(t - 28 * DAY, t), "prev_count_7d": counts(t - 14 * DAY, t - 7 * DAY)}
        lo, hi = np.searchsorted(ts, [t - 7 * DAY, t])
        pairs = np.unique(np.stack([codes[lo:hi], users[lo:hi]]), axis=1)
        sig["users_7d"] = np.bincount(pairs[0], minlength=n_items).astype(float)
        sig["velocity_7d"] = sig["count_7d"] - sig["prev_count_7d"]
        active = np.flatnonzero(sig["count_28d"] > 0)
        for i in active:
            data.snapshots.append(TrendSnapshot(items[i], tick, {n: float(v[i]) for n, v in sig.items()}, "signals-v1"))
        predicted = 0.5 * sig["count_7d"] + 0.5 * sig["count_28d"] / 4.0
        ranked = sorted(active, key=lambda i: (-predicted[i], items[i]))[:top_k]
        for rank, i in enumerate(ranked, 1):
            s = {n: float(v[i]) for n, v in sig.items()}
            # every other prediction with a range and drivers (a model with quantile heads), the rest without
            ranged = rank % 2 == 0
            data.predictions.append(Prediction(
                items[i], tick, float(np.log1p(predicted[i])), float(predicted[i]), rank, s, MODEL,
                predicted_low=0.6 * float(predicted[i]) if ranged else None,
                predicted_high=1.5 * float(predicted[i]) if ranged else None,
                drivers={"trend": 0.2, "level": -0.4, "neighbourhood": 0.1} if ranged else None))
            if rank <= explained:
                text = (f"{title.get(items[i], items[i])} had {s['count_7d']:.0f} ratings in the last 7 days "
                        f"({s['velocity_7d']:+.0f} on the week before) from {s['users_7d']:.0f} users.")
                # every third a mover with a stated reason, every third no forecast: the columns travel
                forecast, reason = (("fall", "level"), ("rise", None), (None, None))[rank % 3]
                source = None if reason is None else ("drivers" if ranged else "rule")
                data.explanations.append(Explanation(items[i], tick, rank, text, True, 3, MODEL, forecast=forecast,
                                                     reason=reason, reason_source=source,
                                                     driver="level" if ranged and forecast else None))
    return data


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    data = build_store_data()
    config = StoreConfig(path=tmp_path_factory.mktemp("dash") / "clickhouse")
    with ResultSink(config, SinkConfig(batch_rows=20_000, spill_dir=config.path.parent / "spill")) as sink:
        # as the stream does it: tick by tick, snapshots, then predictions, then explanations
        for tick in data.ticks:
            sink.submit([s for s in data.snapshots if s.tick == tick])
            sink.submit([p for p in data.predictions if p.tick == tick])
            sink.submit([e for e in data.explanations if e.tick == tick])
        # a replay of the last tick (Kafka redelivery after a worker restart) must not show twice
        sink.submit([p for p in data.predictions if p.tick == data.ticks[-1]])
        # another model that scored an item no snapshot holds a week later (so it sold nothing)
        sink.submit([Prediction("ghost", data.ticks[k], 0.1, 2.0, 1, {"count_7d": 1.0}, GHOST_MODEL) for k in (-12, -3)])
        assert sink.flush(timeout=60)
    client = connect(config)
    yield data, config, client
    client.close()


def naive(dt: datetime) -> datetime:
    return dt.replace(tzinfo=None)


def realised_lookup(data: StoreData):
    observed = {(s.item_id, s.tick): s.signals["count_7d"] for s in data.snapshots}
    snap_ticks = {s.tick for s in data.snapshots}

    def realised(item: str, tick: datetime) -> float | None:
        later = tick + HORIZON
        if (item, later) in observed:
            return observed[(item, later)]
        return 0.0 if later in snap_ticks else None

    return realised


def test_top_n_is_the_latest_ranking_with_explanations(loaded):
    data, _, client = loaded
    rows = dashboards.as_records(dashboards.run(client, "top_n", DashboardParams(top_n=15)))
    last = data.ticks[-1]
    want = sorted((p for p in data.predictions if p.tick == last), key=lambda p: p.rank)[:15]
    texts = {e.item_id: e.explanation for e in data.explanations if e.tick == last}
    assert [(r["rank"], r["item_id"]) for r in rows] == [(p.rank, p.item_id) for p in want]
    assert [r["explanation"] for r in rows] == [texts.get(p.item_id) for p in want]  # NULL past the top 10
    assert [r["faithful"] for r in rows[:10]] == [True] * 10 and rows[10]["faithful"] is None
    stated = {e.item_id: (e.forecast, e.reason, e.reason_source, e.driver) for e in data.explanations if e.tick == last}
    assert [(r["forecast"], r["reason"], r["reason_source"], r["driver"]) for r in rows] == [
        stated.get(p.item_id, (None, None, None, None)) for p in want]
    assert [(r["predicted_low"], r["predicted_high"], r["drivers"]) for r in rows] == [
        (p.predicted_low, p.predicted_high, p.drivers or {}) for p in want]
    assert any(r["predicted_low"] is not None for r in rows) and any(r["predicted_low"] is None for r in rows)
    assert rows[0]["signals"] == want[0].signals and rows[0]["score"] == pytest.approx(want[0].score)
    assert {naive(last)} == {r["tick"] for r in rows} and {MODEL} == {r["model_version"] for r in rows}
    # an unknown model version has nothing to show
    assert dashboards.run(client, "top_n", DashboardParams(model_version="nope")).result_rows == []


def test_movers_compare_the_last_two_ticks(loaded):
    data, _, client = loaded
    top_n = 20
    now = {p.item_id: p.rank for p in data.predictions if p.tick == data.ticks[-1]}
    before = {p.item_id: p.rank for p in data.predictions if p.tick == data.ticks[-2]}
    want = set()
    for item in now.keys() | before.keys():
        r_now, r_before = now.get(item), before.get(item)
        if min(r_now or 10**9, r_before or 10**9) > top_n or r_now == r_before:
            continue
        change = "new" if r_before is None else "dropped" if r_now is None else "up" if r_before > r_now else "down"
        want.add((item, r_now, r_before, change))
    rows = dashboards.as_records(dashboards.run(client, "movers", DashboardParams(top_n=top_n)))
    assert {(r["item_id"], r["rank_now"], r["rank_before"], r["change"]) for r in rows} == want
    assert want, "the data should have movers between two days"
    moves = [abs(r["moved_up"]) if r["moved_up"] is not None else math.inf for r in rows]
    assert moves == sorted(moves, reverse=True)
    assert rows[0]["previous_tick"] == naive(data.ticks[-2]) and rows[0]["tick"] == naive(data.ticks[-1])


def test_item_history_pairs_scores_with_realised_counts(loaded):
    data, _, client = loaded
    realised = realised_lookup(data)
    top_item = next(p.item_id for p in data.predictions if p.tick == data.ticks[-1] and p.rank == 1)
    ranks: dict[str, set[int]] = {}
    for p in data.predictions:
        ranks.setdefault(p.item_id, set()).add(p.rank)
    # an item that drops out of the top 50 at times: its realised counts come from the snapshots
    occasional = sorted(i for i, r in ranks.items() if 5 <= sum(1 for p in data.predictions if p.item_id == i) < 30)[0]
    items = (top_item, occasional)
    rows = dashboards.as_records(dashboards.run(client, "item_history", DashboardParams(items=items)))
    want = sorted(((p.item_id, p.tick) , p) for p in data.predictions if p.item_id in items)
    assert [(r["item_id"], r["tick"]) for r in rows] == [(i, naive(t)) for (i, t), _ in want]
    for r, (_, p) in zip(rows, want):
        assert (r["score"], r["rank"], r["predicted_count"], r["count_now"]) == \
            (pytest.approx(p.score), p.rank, p.predicted_count, p.signals["count_7d"])
        assert r["realised_count"] == realised(p.item_id, p.tick)
    assert any(r["realised_count"] is None for r in rows)  # the last week has not happened yet
    assert any(r["realised_count"] not in (None, 0) for r in rows)
    # the time range narrows it
    window = DashboardParams(items=items, time_from=data.ticks[-3], time_to=data.ticks[-1])
    assert {r[0] for r in dashboards.run(client, "item_history", window).result_rows} == \
        {naive(t) for t in data.ticks[-3:]}


def test_rolling_accuracy_matches_the_offline_metrics(loaded):
    data, _, client = loaded
    realised = realised_lookup(data)
    window = 5
    want = []
    for tick in data.ticks:
        pairs = [(p.predicted_count, realised(p.item_id, p.tick)) for p in data.predictions if p.tick == tick]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if not pairs:
            continue
        pred, real = np.array(pairs).T
        err = np.log1p(pred) - np.log1p(real)
        want.append((tick, len(pairs), np.abs(err).mean(), np.sqrt((err ** 2).mean()), spearmanr(pred, real).statistic))
    rows = dashboards.as_records(dashboards.run(client, "accuracy", DashboardParams(window_ticks=window)))
    assert len(want) == len(data.ticks) - 7 and len(rows) == len(want)
    for k, (r, (tick, n, mae, rmse, rho)) in enumerate(zip(rows, want)):
        assert r["tick"] == naive(tick) and r["items"] == n
        assert (r["mae_log1p"], r["rmse_log1p"], r["spearman"]) == (pytest.approx(mae), pytest.approx(rmse),
                                                                     pytest.approx(rho))
        recent = want[max(0, k - window + 1):k + 1]
        assert r["mae_log1p_rolling"] == pytest.approx(np.mean([w[2] for w in recent]))
        assert r["spearman_rolling"] == pytest.approx(np.mean([w[4] for w in recent]))


def test_realised_count_is_zero_for_an_item_missing_from_a_later_snapshot(loaded):
    data, _, client = loaded
    params = DashboardParams(items=("ghost",), model_version=GHOST_MODEL)
    rows = dashboards.run(client, "item_history", params).named_results()
    # a week after ticks[-12] a snapshot exists without the item: 0; after ticks[-3] none exists yet: NULL
    assert [(r["tick"], r["count_now"], r["realised_count"]) for r in rows] == [
        (naive(data.ticks[-12]), 1.0, 0.0), (naive(data.ticks[-3]), 1.0, None)]
    acc = list(dashboards.run(client, "accuracy", DashboardParams(model_version=GHOST_MODEL)).named_results())
    assert [(r["tick"], r["items"], r["realised_total"]) for r in acc] == [(naive(data.ticks[-12]), 1, 0.0)]
    assert acc[0]["mae_log1p"] == pytest.approx(math.log1p(2.0))


# ---- Grafana -----------------------------------------------------------------------------

GRAFANA_VALUES = {"${top_n}": "15", "${model_version}": "", "${count_signal}": "count_7d",
                  "${horizon_hours}": "168", "${window_ticks}": "5"}


def interpolate(sql: str, items: tuple[str, ...], start: datetime, end: datetime) -> str:
    """What Grafana and the ClickHouse data source make of a panel query before sending it."""
    sql = sql.replace("${items:singlequote}", ",".join(f"'{i}'" for i in items))
    sql = sql.replace("$__fromTime", f"toDateTime({int(start.timestamp())})")
    sql = sql.replace("$__toTime", f"toDateTime({int(end.timestamp())})")
    for var, value in GRAFANA_VALUES.items():
        sql = sql.replace(var, value)
    assert "$" not in sql, sql
    return sql


def test_grafana_json_is_generated_from_the_sql_files():
    committed = json.loads(dashboards.GRAFANA_JSON.read_text())
    assert committed == json.loads(dashboards.render_grafana_json()), "run: python -m stream.store.dashboards --write"
    assert dashboards.main(["--check"]) == 0
    panels = {p["title"]: p for p in committed["panels"]}
    assert len(panels) == 4
    variables = {v["name"] for v in committed["templating"]["list"]}
    datasource = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/clickhouse.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in committed["panels"]:
        target = panel["targets"][0]
        assert panel["datasource"]["uid"] == target["datasource"]["uid"] == uid
        assert target["datasource"]["type"] == datasource["datasources"][0]["type"] == "grafana-clickhouse-datasource"
        used = set(re.findall(r"\$\{(\w+)(?::\w+)?\}", target["rawSql"]))
        assert used <= variables, used - variables
        assert "{" + "top_n:" not in target["rawSql"]  # no ClickHouse parameter left


def test_grafana_panel_queries_run_and_agree_with_the_sql_files(loaded):
    data, _, client = loaded
    items = tuple(sorted({p.item_id for p in data.predictions if p.tick == data.ticks[-1] and p.rank <= 2}))
    params = DashboardParams(top_n=15, items=items, window_ticks=5, time_from=data.ticks[0], time_to=data.ticks[-1])
    dash = dashboards.grafana_dashboard()
    by_sql = {dashboards.grafana_sql(dashboards.load_sql(n)): n for n in dashboards.QUERIES}
    for panel in dash["panels"]:
        raw = panel["targets"][0]["rawSql"]
        name = by_sql[raw]
        got = client.query(interpolate(raw, items, data.ticks[0], data.ticks[-1])).result_rows
        want = dashboards.run(client, name, params).result_rows
        # ClickHouse sums floats in whatever order its threads finish: the last bits may differ.
        close = [tuple(pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for v in row) for row in want]
        assert got == close and got, name
    items_var = next(v for v in dash["templating"]["list"] if v["name"] == "items")
    offered = [r[0] for r in client.query(items_var["query"]).result_rows]
    latest = sorted((p for p in data.predictions if p.tick == data.ticks[-1]), key=lambda p: p.rank)
    assert offered == [p.item_id for p in latest]


# ---- python -m stream.tools.report -------------------------------------------------------------

def test_report_prints_the_top_n_and_draws_history(loaded, tmp_path, capsys):
    data, config, _ = loaded
    png = tmp_path / "history.png"
    last = sorted((p for p in data.predictions if p.tick == data.ticks[-1]), key=lambda p: p.rank)
    items = f"{last[0].item_id},{last[3].item_id}"
    rc = report.main(["--path", str(config.path), "--top", "5", "--png", str(png), "--items", items])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"model {MODEL}" in out and data.ticks[-1].strftime("%Y-%m-%d") in out
    lines = [ln.split() for ln in out.splitlines() if re.match(r"^\s+\d+\s", ln)]
    assert [(int(ln[0]), ln[1]) for ln in lines] == [(p.rank, p.item_id) for p in last[:5]]
    first_expl = next(e.explanation for e in data.explanations if e.tick == data.ticks[-1] and e.rank == 1)
    assert " ".join(first_expl.split()[:6]) in " ".join(out.split())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert f"wrote {png}" in out


def test_report_explains_a_missing_store(tmp_path, capsys):
    assert report.main(["--path", str(tmp_path / "none")]) == 2
    assert "no embedded store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--top", "0"])


def test_report_over_http(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from clickhouse_http import ClickHouseHTTPProcess

    tick = datetime(2011, 12, 9, tzinfo=timezone.utc)
    preds = [Prediction(f"sku{i}", tick, 1 - i / 10, 10.0 - i, i + 1, {"count_7d": 9.0 - i}, "m-http") for i in range(5)]
    expl = Explanation("sku0", tick, 1, "sku0 leads with 9 sales this week.", True, 1, "m-http")
    with ClickHouseHTTPProcess(tmp_path / "server") as srv:
        config = StoreConfig(url=srv.url)
        with ResultSink(config, SinkConfig(spill_dir=tmp_path / "spill")) as sink:
            assert sink.wait_durable_sync(sink.submit(preds + [expl]), timeout=30)
        assert report.main(["--url", srv.url, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "model m-http" in out and "sku0 leads with 9 sales this week." in out
    assert [ln.split()[1] for ln in out.splitlines() if re.match(r"^\s+\d+\s", ln)] == ["sku0", "sku1", "sku2"]
