"""Every command-line entry point, run as a user runs it: `python -m ...` in a subprocess from the
repository root, against the real broker (Tansu) and the real ClickHouse engine (chdb behind its HTTP
interface) where the command talks to them. Where a full run takes minutes (the LoRA fit, the export and
its benchmark, the demo) the full run has its own test (test_export.py, test_demo.py) or is too long for
the suite, and `--help` shows the command at least starts and parses; the rest run for real on small inputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

ENTRY_POINTS = ["stream.tools.bench", "stream.tools.bench_checkpoints", "stream.tools.replay", "stream.tools.report",
                "stream.tools.broker", "stream.tools.demo", "stream.settings", "stream.store.dashboards",
                "stream.core.datasets", "trainer.fit", "trainer.evaluate", "trainer.explain_eval", "trainer.quantiles",
                "trainer.controls", "trainer.any_log", "export.onnx", "export.range", "export.bench", "export.item_states",
                "export.nbits"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_starts_and_explains_itself(module):
    out = run(module, "--help", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.lstrip().startswith("usage:"), out.stdout[:500]
    assert "--" in out.stdout  # it lists its options


def test_every_entry_point_is_listed_here():
    """A module with a `__main__` block is a command: it gets at least the --help run above."""
    mains = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for pkg in ("stream", "trainer", "export")
                   for p in (REPO / pkg).rglob("*.py") if 'if __name__ == "__main__":' in p.read_text())
    assert mains == sorted(ENTRY_POINTS)


def test_dashboards_cli_checks_the_committed_grafana_json():
    out = run("stream.store.dashboards", "--check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_tools_live_in_their_own_package():
    tools = sorted(p.stem for p in (REPO / "stream" / "tools").glob("*.py") if p.stem != "__init__")
    assert tools == ["bench", "bench_checkpoints", "bench_faust", "broker", "demo", "replay", "report"]
    assert not [p.name for p in (REPO / "stream").glob("*.py") if p.stem in tools]
    trail = (REPO / "trail").read_text()
    assert '-m stream.tools.demo "$@"' in trail
    from stream.tools.demo import DEFAULT_MODEL

    assert DEFAULT_MODEL == REPO / "models" / "trail-smollm2" and (DEFAULT_MODEL / "manifest.json").is_file()


def _consume(bootstrap: str, topic: str, expect: int) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_broker import consume_all

    return asyncio.run(consume_all(bootstrap, topic, expect))


def test_replay_publishes_the_deploy_readmes_command(broker, topics):
    """deploy/README.md's command, `python -m stream.tools.replay --dataset retail --bootstrap HOST:PORT`, with the
    topics from the environment (no --topic flags: the path that raised UnboundLocalError)."""
    readme = (REPO / "deploy" / "README.md").read_text()
    assert "python -m stream.tools.replay --bootstrap" in readme or "python -m stream.tools.replay --dataset" in readme
    out = run("stream.tools.replay", "--dataset", "retail", "--bootstrap", broker, "--limit", "300", "--quiet",
              env={"TRAIL_EVENTS_TOPIC": topics.events, "TRAIL_ITEMS_TOPIC": topics.items})
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"published ([\d,]+) items to (\S+) and ([\d,]+) events to (\S+) ", out.stdout)
    assert m, out.stdout
    assert (m.group(2), int(m.group(3).replace(",", "")), m.group(4)) == (topics.items, 300, topics.events)
    n_items = int(m.group(1).replace(",", ""))
    assert n_items > 1000  # Online Retail II's item table
    events = _consume(broker, topics.events, 300)
    assert len(events) == 300
    first = orjson.loads(events[0].value)
    assert set(first) >= {"item_id", "ts", "event_type"}
    assert len(_consume(broker, topics.items, n_items)) == n_items


def test_bench_runs_against_the_broker_and_reports_its_ratio(broker):
    out = run("stream.tools.bench", "--events", "3000", "--faust-events", "300", "--partitions", "2", "--repeat", "1",
              "--synthetic", "--bootstrap", broker, "--json", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["events"] == 3000 and report["pipeline"]["applied"] == 3000
    assert report["faust_events"] == 300 and report["faust_table_events_per_s"] > 0  # stream.tools.bench_faust ran
    assert report["pipeline_events_per_s"] > 0 and report["raw_consume_events_per_s"] > 0
    assert report["pipeline_vs_raw"] == pytest.approx(
        report["pipeline_events_per_s"] / report["raw_consume_events_per_s"], abs=0.01)
    assert len(report["runs"]["pipeline_vs_raw"]) == 1  # one round: its ratio is the median
    assert report["pipeline_vs_raw_median"] == pytest.approx(report["pipeline_vs_raw"], abs=0.01)


def test_bench_checkpoints_reloads_bit_for_bit(tmp_path):
    out = run("stream.tools.bench_checkpoints", "--events", "5000", "--ticks", "20", "--partitions", "2",
              "--state-dir", str(tmp_path / "state"), "--old-dir", str(tmp_path / "old"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["events"] == 5000
    assert report["reload_identical"] is True and report["after_bytes_per_tick"]["n"] == 20


def test_report_reads_the_store_over_http(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from clickhouse_http import ClickHouseHTTPProcess

    from stream.core.records import Explanation, Prediction
    from stream.store.clickhouse import StoreConfig
    from stream.store.sink import ResultSink, SinkConfig

    tick = datetime(2011, 12, 9, tzinfo=timezone.utc)
    preds = [Prediction(f"sku{i}", tick, 1 - i / 10, 10.0 - i, i + 1, {"count_7d": 9.0 - i}, "m-cli") for i in range(4)]
    expl = Explanation("sku0", tick, 1, "sku0 leads with 9 sales this week.", True, 1, "m-cli")
    with ClickHouseHTTPProcess(tmp_path / "server") as srv:
        with ResultSink(StoreConfig(url=srv.url), SinkConfig(spill_dir=tmp_path / "spill")) as sink:
            assert sink.wait_durable_sync(sink.submit(preds + [expl]), timeout=30)
        out = run("stream.tools.report", "--top", "3", env={"CLICKHOUSE_URL": srv.url})
        missing = run("stream.tools.report", "--path", str(tmp_path / "none"), env={"CLICKHOUSE_URL": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model m-cli" in out.stdout and "sku0 leads with 9 sales this week." in out.stdout
    assert [ln.split()[1] for ln in out.stdout.splitlines() if re.match(r"^\s+\d+\s", ln)] == ["sku0", "sku1", "sku2"]
    assert missing.returncode == 2 and "no embedded store" in missing.stderr


def test_evaluate_scores_the_baselines_of_an_event_log(tmp_path):
    rng = np.random.default_rng(0)
    n, items = 6000, [f"i{k}" for k in range(40)]
    p = 1 / np.arange(1, 41.0)
    t0 = pd.Timestamp("2024-01-01", tz="UTC").value // 10**6
    log = pd.DataFrame({"item_id": rng.choice(items, n, p=p / p.sum()),
                        "user_id": [f"u{x}" for x in rng.integers(0, 300, n)],
                        "ts": np.sort(rng.integers(t0, t0 + 120 * 86_400_000, n)), "event_type": "purchase"})
    log.to_csv(tmp_path / "log.csv", index=False)
    out = run("trainer.evaluate", "--events", str(tmp_path / "log.csv"), "--n-boot", "50", "--threads", "1",
              "--json", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {"most_pop", "recent_pop", "exp_decay", "markov", "gbm"} <= set(json.dumps(report).split('"'))
    assert "most_pop" in out.stdout and "wall time" in out.stdout
    bad = run("trainer.evaluate", "--events", str(tmp_path / "nope.csv"))
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_settings_cli_prints_the_settings():
    out = run("stream.settings", "--markdown")
    assert out.returncode == 0, out.stderr
    assert "KAFKA_BOOTSTRAP" in out.stdout


def test_the_trainers_command_line_is_generated_from_fit_config():
    from dataclasses import fields

    from trainer.fit import FitConfig, build_parser, fit_config

    base = ["--dataset", "retail", "--out", "x"]
    assert fit_config(build_parser().parse_args(base)) == FitConfig(negatives=min(FitConfig.negatives, FitConfig.batch))
    args = build_parser().parse_args(base + ["--digit-weight", "1.5", "--batch", "2", "--count-loss", "huber",
                                             "--rank-gain", "label_users", "--budget-minutes", "0", "--seed", "7"])
    assert fit_config(args) == FitConfig(w_digits=1.5, batch=2, negatives=2, count_loss="huber",
                                         rank_gain="label_users", budget_minutes=0.0, seed=7)
    flags = {f.metadata["flag"] for f in fields(FitConfig) if "flag" in f.metadata}
    assert {"--steps", "--budget-minutes", "--batch", "--digit-weight", "--seed", "--item-lr", "--rank-epochs",
            "--count-epochs", "--rank-gain", "--count-loss", "--score-weight"} == flags
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--count-loss", "l7"])
