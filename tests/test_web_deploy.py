"""The operator side of deploy/: the workers' page and /health in the compose file, Prometheus scraping
their /metrics, and the Grafana operations dashboard asking only for series the worker exports."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import yaml

from stream.serving.explainer import ExplainerStats
from stream.serving.parts import ServingStats
from stream.settings import WorkerConfig
from stream.ingest.worker import TrendWorker
from stream.store.clickhouse import StoreConfig
from stream.store.sink import ResultSink, SinkConfig
from stream.web.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
WORKERS = ("trail-worker", "trail-worker-gpu")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_workers_serve_the_page_and_their_health(compose):
    for name in WORKERS:
        svc = compose["services"][name]
        port = svc["command"][svc["command"].index("--web-port") + 1]
        assert svc["environment"]["TRAIL_WEB_PORT"] == port, name  # the app's web server is on only with it
        assert f"{port}:{port}" in svc["ports"]
        probe = " ".join(svc["healthcheck"]["test"])
        assert f"http://localhost:{port}/health" in probe, probe


def test_prometheus_scrapes_every_worker(compose):
    prom = compose["services"]["prometheus"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in prom["volumes"] if v.startswith("."))
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "trail-worker")
    assert job["metrics_path"] == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{n}:{compose['services'][n]['environment']['TRAIL_WEB_PORT']}" for n in WORKERS}


def exported_series(tmp_path) -> set[str]:
    """The names /metrics gives, from the real parts' counters (a trend worker and a sink not yet started)."""
    serving = types.SimpleNamespace(stats=ServingStats(), explainer=types.SimpleNamespace(stats=ExplainerStats()))
    sink = ResultSink(StoreConfig(path=tmp_path / "ch"), SinkConfig(spill_dir=tmp_path / "spill"))
    parts = types.SimpleNamespace(worker=TrendWorker(WorkerConfig(state_dir=tmp_path / "state")), serving=serving,
                                  sink=sink)
    text = Metrics(parts).render().decode()
    names = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    out = set()
    for n in names:
        out |= {n, n + "_total", n + "_bucket", n + "_count", n + "_sum"}
    return out


def test_grafana_operations_dashboard_reads_exported_series(compose, tmp_path):
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    board = json.loads((DEPLOY / "grafana/dashboards/trail-operations.json").read_text())
    series = exported_series(tmp_path)
    assert {"trail_events_consumed_total", "trail_consumer_lag", "trail_tick_duration_seconds_bucket",
            "trail_dlq_records_total", "trail_sink_rows_written_total", "trail_sink_backlog_rows",
            "trail_explainer_queue", "trail_ticks_skipped_total", "trail_tick_items"} <= series
    asked = set()
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]
        for target in panel["targets"]:
            asked |= set(re.findall(r"\btrail_\w+", target["expr"]))
    assert asked and asked <= series, asked - series
    assert len(board["panels"]) >= 8
