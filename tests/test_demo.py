"""The README's first command, end to end: the demo entry point on the real broker and the embedded store."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serving_artefact import exported_artefact
from stream.store.clickhouse import StoreConfig, connect

REPO = Path(__file__).resolve().parent.parent


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found


@pytest.mark.broker
@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_results_and_no_processes(tmp_path):
    model = exported_artefact()
    var = tmp_path / "var"
    env = dict(os.environ, TRAIL_EXPLAIN_TOP="2")
    # 120 s: a fresh cache dir means a cold item-state warm-up (4,725 items, ~35 s on 2 quiet cores) before
    # the first tick; 75 s left no prediction at all once the machine was busy
    proc = subprocess.run(
        [sys.executable, "-m", "stream.tools.demo", "--duration", "120", "--speed", "172800", "--warmup-days", "35",
         "--tick", "2", "--model", str(model), "--var", str(var)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final ranking" in proc.stdout
    for stage in ("dataset:", "broker:", "topics:", "replay:", "worker:", "first prediction:"):
        assert stage in proc.stderr, f"no progress line for {stage!r}:\n{proc.stderr[-3000:]}"
    log = (var / "worker.log").read_bytes()
    assert b"\x1b" not in log, "terminal control codes in the worker log"
    assert b"Unclosed" not in log and b"Traceback" not in log, log[-3000:].decode(errors="replace")
    assert not _processes_mentioning(str(var)), "the demo left a worker behind"
    assert not [c for c in _processes_mentioning("tansu") if "trail-tansu" in c and str(tmp_path) in c]

    client = connect(StoreConfig(path=var / "clickhouse"))
    try:
        ticks = client.query(
            "SELECT tick, count(), min(rank), max(rank), uniqExact(rank) FROM trail_predictions FINAL GROUP BY tick"
        ).result_rows
        assert len(ticks) >= 2, ticks
        for tick, n, lo, hi, distinct in ticks:
            assert (lo, hi, distinct) == (1, n, n), f"ranks of {tick} are not 1..{n}"
        first, last = min(t[0] for t in ticks), max(t[0] for t in ticks)
        assert first.year == 2010 and last > first  # the replayed period of Online Retail II
        explained = client.query(
            "SELECT e.item_id, e.faithful, e.claims_checked, p.rank FROM trail_explanations AS e FINAL "
            "JOIN trail_predictions AS p FINAL USING (item_id, tick, model_version)"
        ).result_rows
        assert explained, "no explanation of a top mover reached the store"
        assert all(isinstance(f, bool) for _, f, _, _ in explained)
    finally:
        client.close()

    # the README's SQL example, as written, on this store (chdb: one process per directory, so a child)
    snippet = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    out = subprocess.run([sys.executable, "-c", snippet], cwd=var.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # the snippet prints the rows
    assert [r[0] for r in rows] == list(range(1, 11))


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"## Two commands\s+```bash\n(.*?)```", readme, re.S)
    assert first_block, "README must lead with the two set-up commands"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["./trail demo", "./trail test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^exec \./trail test\b", ci, re.M), "CI must run the README's test command"
    trail = (REPO / "trail").read_text()
    assert "demo) setup; exec \"$PY\" -m stream.tools.demo" in trail and "test) setup; exec \"$PY\" -m pytest" in trail


@pytest.mark.broker
@pytest.mark.slow
def test_demo_stops_with_the_workers_last_errors_when_the_worker_dies(tmp_path):
    model = exported_artefact()
    var = tmp_path / "var"
    var.mkdir()
    (var / "worker.log").write_text("the previous run\n")
    env = dict(os.environ, TRAIL_TICK_HOOKS="stream.no_such_module:hook")  # the worker fails at start
    proc = subprocess.run(
        [sys.executable, "-m", "stream.tools.demo", "--duration", "120", "--warmup-days", "1", "--model", str(model),
         "--var", str(var)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "final ranking" not in proc.stdout
    assert "the worker stopped unexpectedly" in proc.stderr and "stream.no_such_module:hook" in proc.stderr
    assert f"full log: {var / 'worker.log'}" in proc.stderr
    assert (var / "worker.prev.log").read_text() == "the previous run\n"  # kept beside the new one
    assert not _processes_mentioning(str(var)), "the demo left a process behind"


def test_worker_log_helpers(tmp_path):
    from stream.tools.demo import fresh_log, last_errors

    log = tmp_path / "worker.log"
    log.write_text("old\n")
    assert fresh_log(log) == log and not log.exists() and (tmp_path / "worker.prev.log").read_text() == "old\n"
    log.write_text('{"event": "tick", "level": "info"}\n'
                   '{"event": "boom", "level": "error", "exception": "Traceback (most recent call last):\\nX"}\n'
                   '{"event": "worker.stopped", "level": "info"}\n')
    lines = last_errors(log)
    assert lines[0].startswith("error boom") and "Traceback" in lines[0] and lines[-1] == "info worker.stopped"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    assert last_errors(log, n=5) == [f"line {i}" for i in range(35, 40)]


def test_the_board_marks_repaired_texts_and_disagreeing_forecasts():
    from stream.tools.demo import Board

    board = Board()
    board.add_prediction({"item_id": "a", "tick": "2011-12-01T00", "rank": 1, "score": 2.0, "predicted_count": 9})
    board.add_prediction({"item_id": "b", "tick": "2011-12-01T00", "rank": 2, "score": 1.0, "predicted_count": 3})
    base = {"tick": "2011-12-01T00", "explanation": "Bought 9 times.", "faithful": True}
    board.add_explanation(base | {"item_id": "a", "rank": 1, "repaired": True, "forecast": "rise", "forecast_agrees": True})
    board.add_explanation(base | {"item_id": "b", "rank": 2, "repaired": False, "forecast": "fall", "forecast_agrees": False})
    lines = board.render(5, {}, "status").splitlines()
    row_a = next(line for line in lines if line.startswith("  1"))
    row_b = next(line for line in lines if line.startswith("  2"))
    assert "✎ Bought" in row_a and "✓! Bought" in row_b
    assert "~9 " in row_a and "~3 " in row_b  # the size as the explanations state it


def test_the_board_and_the_report_show_size_range_and_reason():
    from datetime import datetime, timezone

    from stream.tools.demo import Board
    from stream.tools.report import format_top

    board = Board()
    board.add_prediction({"item_id": "a", "tick": "2011-12-01T00", "rank": 1, "score": 2.0, "predicted_count": 38.6,
                          "predicted_low": 27.6, "predicted_high": 54.1})
    board.add_explanation({"item_id": "a", "rank": 1, "tick": "2011-12-01T00", "explanation": "Likely to rise: ...",
                           "faithful": True, "reason": "neighbourhood", "reason_source": "drivers",
                           "driver": "neighbourhood"})
    text = board.render(5, {}, "status")
    assert "~40 (25–55)" in text and "[why: neighbourhood (top driver)]" in text
    row = {"rank": 1, "item_id": "a", "score": 2.0, "predicted_count": 38.6, "predicted_low": None,
           "predicted_high": None, "signals": {}, "faithful": True, "claims_checked": 4, "reason": "level",
           "reason_source": "rule", "driver": "text", "explanation": "Likely to fall: ...",
           "tick": datetime(2011, 12, 1, tzinfo=timezone.utc), "model_version": "m"}
    out = format_top([row])
    assert "~40" in out and "why: level (rule); top driver text" in out
