"""`trainer.fit --events` on a log of another shape, then `trainer.evaluate --events --model` on what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.odd_log import write_odd_log
from trainer.model import lambda_rank_loss

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "models" / "trail-smollm2"


def test_a_cutoff_without_gain_gives_a_loss_with_a_grad_fn():
    # a cut-off whose candidates no user touched next period: nothing to order, but backward() must not fail
    score = torch.randn(5, requires_grad=True)
    loss = lambda_rank_loss(score, torch.zeros(5))
    loss.backward()
    assert loss.item() == 0.0 and score.grad is not None and float(score.grad.abs().sum()) == 0.0
    score.grad = None
    loss = lambda_rank_loss(score, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.5]))
    loss.backward()
    assert loss.item() > 0 and float(score.grad.abs().sum()) > 0


@pytest.mark.slow
@pytest.mark.skipif(not (ADAPTER / "adapter").is_dir(), reason="needs the shipped adapter (models/trail-smollm2)")
def test_fit_then_evaluate_a_log_of_another_shape(tmp_path):
    events = write_odd_log(tmp_path / "shop.csv")  # sku/customer/event_time, no item table, empty weeks
    out, report = tmp_path / "model", tmp_path / "report.json"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    fit = subprocess.run([sys.executable, "-m", "trainer.fit", "--events", str(events), "--out", str(out),
                          "--init-adapter", str(ADAPTER), "--budget-minutes", "0", "--rank-epochs", "2",
                          "--count-epochs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    lists = manifest["training"]["phase3_head"]["rank_lists"]
    assert lists["skipped_without_a_pair"] > 0 and lists["kept"] > 0  # the empty weeks were skipped, not fatal
    prior = manifest["training"]["phase3_head"]["rank_prior"]
    assert prior["chosen_on"].startswith("the rolling-origin folds") and prior["chosen"]
    evaluate = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--events", str(events), "--model", str(out),
                               "--explain-sample", "0", "--n-boot", "100", "--json", str(report)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    got = json.loads(report.read_text())
    # evaluate adapts the protocol to the log's span exactly as fit did: the model's horizon is the one scored
    assert manifest["horizon_days"] == {"shop": got["protocol"]["horizon_days"]}
    trail = got["methods"]["trail"]
    assert 0 <= trail["mae_log"] < 2 and trail["ndcg@10"] is not None
    assert set(got["ci"]) == {"ndcg@10", "mae_log"}
