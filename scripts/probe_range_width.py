"""Probe on the rolling-origin folds (issue 19: the season; the range head's width): the range head trained
at each point of a grid of widths, learning rates and epoch caps, on the item states of `--model`. Each point's
figure is the folds' mean pinball at its best epoch count (what `trainer.quantiles.fit_range` chooses by); the
test MAE log of the median and the Christmas items' September-November bias are printed for the report only.

`PYTHONPATH=. python scripts/probe_range_width.py --model models/trail-smollm2 --json OUT \
    --grid '[{"item_dim": 32, "hidden": 128, "max_epochs": 16, "lr": 0.003, "seed": 0}]'`"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stream.core.features import predicted_count
from stream.settings import load_settings
from trainer.quantiles import RangeConfig, _load_model, _range_rows, fit_range, predict_range, range_data
from trainer.slices import seasonal_slice


def test_rows(model, name: str, cache_dir: Path) -> tuple[pd.DataFrame, float, np.ndarray, np.ndarray]:
    from stream.core.datasets import load_dataset
    from stream.core.trends import TrendConfig
    from trainer.examples import build_examples, split_cutoffs
    from trainer.inference import item_texts_of
    from trainer.protocol import DEFAULT_MIN_HISTORY_DAYS

    ex = build_examples(load_dataset(name, None, cache_dir=cache_dir), TrendConfig(),
                        min_history_days=DEFAULT_MIN_HISTORY_DAYS)
    test = ex.rows(split_cutoffs(ex.cutoffs, ex.horizon_ms).test).reset_index(drop=True)
    index, texts = item_texts_of(test)
    return test, ex.horizon_ms / 86_400_000, index, model.item_states(texts, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--grid", help="JSON list of {item_dim, hidden, lr, max_epochs, seed} tried in turn, each key "
                                   "defaulting to the v12 head's (16, 64, 0.003, 16 epochs, seed 0)")
    ap.add_argument("--dataset", default="retail,ml100k")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = load_settings().cache_dir
    names = args.dataset.split(",")
    model = _load_model(args.model, cache)
    rows = _range_rows(model, names, None, cache)
    tests = {name: test_rows(model, name, cache) for name in names}
    results = []
    for point in json.loads(args.grid) if args.grid else [{}]:
        cfg = RangeConfig(n_features=len(model.norm.names), hidden_size=int(model.lm.config.hidden_size),
                          feature_names=tuple(model.norm.names),
                          item_dim=point.get("item_dim", 16), hidden=point.get("hidden", 64))
        head, report = fit_range(cfg, rows.folds, rows.full, rows.states, max_epochs=point.get("max_epochs", 16),
                                 lr=point.get("lr", 3e-3), seed=point.get("seed", 0))
        results.append(scored(head, model, tests) | {"point": point,
                                                     "folds_best_pinball": min(report["folds_pinball_by_epoch"]),
                                                     **report})
        print(json.dumps(results[-1]), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def scored(head, model, tests) -> dict:
    """Test MAE log of the head's median, and the seasonal slice (trainer.slices) of it, per dataset."""
    out: dict = {"test": {}}
    for name, (test, horizon, index, states) in tests.items():
        q = predict_range(head, range_data(model.norm, test, horizon, index), torch.from_numpy(states))
        count = predicted_count(q[:, 1].astype(np.float64))
        got = seasonal_slice(test, {"range": count})
        out["test"][name] = {"mae_log": float(np.abs(test["label_log"].to_numpy(np.float64) - np.log1p(count)).mean()),
                             "xmas_bias_log": got and got["methods"]["range"]["bias_log"],
                             "other_bias_log": got and got["other_items"]["range"]["bias_log"]}
    return out


if __name__ == "__main__":
    main()
