"""A serving worker started as a user would, with relative paths from its own working directory,
runs through its sink's start-up (chdb changes the process's working directory for a moment while
it opens its first client) and keeps checkpointing: every configured path was made absolute once,
when the settings were read."""

from __future__ import annotations

import asyncio
import os

import pytest

from serving_artefact import exported_artefact
from stream.tools.replay import replay
from worker_helpers import FaustWorker, retail_slice, worker_config, worker_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_relative_paths_survive_the_sink_start_up(broker, topics, tmp_path):
    cwd = tmp_path / "run"
    cwd.mkdir()
    os.symlink(exported_artefact(), cwd / "model")
    config = worker_config(broker, topics, tmp_path / "unused", tick_s=0.3)
    env = worker_env(config, app_id=f"{topics.events}.app")
    env.update({"TRAIL_STATE_DIR": "var/state", "TRAIL_CLICKHOUSE_PATH": "var/clickhouse", "TRAIL_MODEL_DIR": "model",
                "TRAIL_SINK_SPILL_DIR": "var/spill", "TRAIL_SCORES_TOPIC": f"{topics.events}.scores",
                "TRAIL_RANKER_GROUP": f"{topics.events}.ranker", "TRAIL_EXPLAIN_TOP": "1", "TRAIL_ORT_THREADS": "1",
                "TRAIL_HORIZON_DAYS": "7"})
    env.pop("CLICKHOUSE_URL", None)
    events = retail_slice(days=20, start_day=300)
    asyncio.run(replay(events, None, broker, topics=topics, create_topics=False, progress=False))

    worker = FaustWorker(env, tmp_path / "worker.log", cwd=cwd).start()
    try:
        worker.wait_for("store.ddl_applied", timeout_s=240)  # the sink's first chdb client
        first = len(worker.events("tick"))
        worker.wait_for("tick", lambda e: len(worker.events("tick")) >= first + 5, timeout_s=120)
        worker.wait_for("ranker.tick", lambda e: e.get("predictions", 0) > 0, timeout_s=120)
    finally:
        rc = worker.stop(timeout_s=90)
    log = worker.log_path.read_text(errors="replace")
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log and "FileNotFoundError" not in log, log[-3000:]
    assert list((cwd / "var" / "state").glob("*.npz")), "checkpoints are under the worker's own cwd"
    assert (cwd / "var" / "clickhouse").is_dir()
