"""`trainer.fit --events` on a log of another shape, then `trainer.evaluate --events --model` on what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.odd_log import write_item_table, write_odd_log
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


def test_the_three_formats_give_the_same_events(tmp_path, cache_dir):
    # what the end-to-end runs below read: one log, three formats, each with its own column names and time types
    from stream.core.datasets import load_dataset

    first, *others = [load_dataset(write_odd_log(tmp_path / f"shop.{fmt}"), cache_dir=cache_dir).events for fmt in ("csv", "parquet", "jsonl")]
    assert first["user_id"].isna().any() and first["user_id"].nunique() <= 9  # guests, few users
    for events in others:
        pd.testing.assert_frame_equal(events, first)


# csv: the full run, joint training (a real LoRA step with the score term) and the tuned baselines;
# parquet / jsonl (the latter with a JSONL item table): the adapter as is, the untuned baselines, to stay quick;
# parquet with the range head's controls (trainer.controls)
RUNS = {"csv": (["--budget-minutes", "5", "--steps", "1", "--batch", "4", "--score-weight", "1"], [], False),
        "parquet": (["--budget-minutes", "0", "--range-controls", "numeric,random,bow"], ["--no-tuned"], False),
        "jsonl": (["--budget-minutes", "0"], ["--no-tuned", "--explain-sample", "2", "--explain-split", "valid"], True)}


@pytest.mark.slow
@pytest.mark.skipif(not (ADAPTER / "adapter").is_dir(), reason="needs the shipped adapter (models/trail-smollm2)")
@pytest.mark.parametrize("fmt", list(RUNS))
def test_fit_then_evaluate_a_log_of_another_shape(tmp_path, fmt):
    fit_args, eval_args, with_items = RUNS[fmt]
    events = write_odd_log(tmp_path / f"shop.{fmt}")  # own column names, empty weeks, guests, few users
    items = ["--items", str(write_item_table(tmp_path / "items.jsonl"))] if with_items else []
    out, report = tmp_path / "model", tmp_path / "report.json"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    fit = subprocess.run([sys.executable, "-m", "trainer.fit", "--events", str(events), *items, "--out", str(out),
                          "--init-adapter", str(ADAPTER), "--rank-epochs", "2", "--count-epochs", "2", "--range-epochs", "2",
                          *fit_args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    lists = manifest["training"]["phase3_head"]["rank_lists"]
    assert lists["skipped_without_a_pair"] > 0 and lists["kept"] > 0  # the empty weeks were skipped, not fatal
    prior = manifest["training"]["phase3_head"]["rank_prior"]
    assert prior["chosen_on"].startswith("the rolling-origin folds") and prior["chosen"]
    # phase 4: the range head, calibrated on this log's own folds
    range_cfg = json.loads((out / "range_head.json").read_text())
    assert (out / "range_head.safetensors").is_file() and range_cfg["calibration"]["method"] == "cqr"
    llm = manifest["training"]["phase1_llm"]
    if "--score-weight" in fit_args:  # joint: the score loss was part of the LLM steps
        assert llm["steps"] == 1 and llm["joint"]["w_score"] == 1.0 and llm["final_losses"]["score"] > 0
    else:
        assert llm["steps"] == 0 and llm.get("joint") is None
    evaluate = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--events", str(events), *items,
                               "--model", str(out), "--explain-sample", "0", "--n-boot", "100", "--json", str(report),
                               *eval_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    got = json.loads(report.read_text())
    # evaluate adapts the protocol to the log's span exactly as fit did: the model's horizon is the one scored
    assert manifest["horizon_days"] == {"shop": got["protocol"]["horizon_days"]}
    trail = got["methods"]["trail"]
    assert 0 <= trail["mae_log"] < 2 and trail["ndcg@10"] is not None
    assert 0 <= trail["interval_coverage"] <= 1 and trail["interval_width"] >= 1  # the range head was read
    assert set(got["ci"]) == {"ndcg@10", "mae_log"}
    assert ("lgbm_rank" in got["methods"]) == ("--no-tuned" not in eval_args)
    # the bag-of-words control: scored, with its interval, and how it was fitted
    assert got["methods"]["trail_bow"]["mae_log"] is not None
    with_controls = "--range-controls" in fit_args
    controls = {"trail_numeric_range", "trail_random_range", "trail_bow_range"} if with_controls else set()
    assert set(got["ci_ablations"]) == {"trail_numeric", "trail_text_shuffled", "trail_bow"} | controls
    for name in controls:  # the range head refitted with the item state replaced: its own count, trail's ranking
        assert got["methods"][name]["mae_log"] != trail["mae_log"]
        assert got["methods"][name]["ndcg@10"] == trail["ndcg@10"]
        ci = got["ci_ablations"][name]["mae_log"]
        assert ci["low"] <= ci["diff"] <= ci["high"] and "mae_log_score_head" not in got["ci_ablations"][name]
    if controls:
        kept = json.loads((out / "controls" / "range_head_bow.json").read_text())
        assert kept["control"]["datasets"] == [str(events)] and kept["trained"]["control"] == "bow"
    for ci in got["ci_ablations"]["trail_bow"].values():
        assert ci["low"] <= ci["diff"] <= ci["high"]
    assert got["ablations"]["trail_bow"]["vectors"]["width"] == manifest["item_state"]["hidden_size"]
    if "--explain-split" in eval_args:  # explanations drawn from the validation cut-offs: before every test one
        drawn = got["explanation_split"]
        assert drawn["split"] == "valid" and drawn["rows"] == 2 and len(got["explanation_samples"]) == 2
        assert drawn["last"] < got["protocol"]["test_first"]
        assert "base_zero_shot" not in got["explanations"]


def test_an_adapter_of_another_prompt_version_is_not_reused_without_steps(tmp_path):
    from stream.core.prompts import PROMPT_VERSION
    from trainer.fit import train

    old = tmp_path / "old"
    (old / "adapter").mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"model_version": "old", "prompt_version": "p0"}))
    with pytest.raises(SystemExit, match=f"prompt version 'p0', this code renders '{PROMPT_VERSION}'"):
        train(["--events", str(tmp_path / "log.csv"), "--out", str(tmp_path / "m"), "--init-adapter", str(old),
               "--budget-minutes", "0"])
