"""Probe on the rolling-origin folds: does the week of year (stream.core.features.week_of_year) help gbm_l1?

`PYTHONPATH=. python scripts/probe_week_of_year.py retail`. The choice is read off the folds' mean MAE;
the test MAE and the Christmas items' Sep-Nov bias are printed for the report only."""
import json
import sys

import pandas as pd
import numpy as np, lightgbm as lgb
from stream.core.datasets import load_dataset
from stream.core.trends import TrendConfig
from stream.settings import load_settings
from stream.core.features import week_of_year
from trainer.examples import build_examples, split_cutoffs
from trainer.folds import make_folds
from trainer.slices import christmas_title
name = sys.argv[1]
ex = build_examples(load_dataset(name, cache_dir=load_settings().cache_dir), TrendConfig())
f = ex.frame
cal = week_of_year(f["cutoff_ms"].to_numpy(np.int64)); f["woy_sin"], f["woy_cos"] = cal[:, 0], cal[:, 1]
sp = split_cutoffs(ex.cutoffs, ex.horizon_ms); folds = make_folds(sp, ex.horizon_ms)
base = list(ex.config.signal_names)
P = {"objective": "l1", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 50, "feature_fraction": 0.9,
     "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "seed": 0, "deterministic": True,
     "force_row_wise": True, "num_threads": 2, "verbosity": -1}
out = {}
for label, feats in (("signals", base), ("signals+week_of_year", base + ["woy_sin", "woy_cos"])):
    maes, rounds = [], []
    for fo in folds:
        tr, va = ex.rows(fo.train), ex.rows(fo.valid)
        dtr = lgb.Dataset(tr[feats].to_numpy(np.float32), tr["label_log"]); dva = lgb.Dataset(va[feats].to_numpy(np.float32), va["label_log"], reference=dtr)
        b = lgb.train(P, dtr, 2000, valid_sets=[dva], callbacks=[lgb.early_stopping(50, verbose=False)])
        maes.append(float(np.abs(np.maximum(b.predict(va[feats].to_numpy(np.float32), num_iteration=b.best_iteration), 0) - va["label_log"]).mean()))
        rounds.append(b.best_iteration)
    pre = ex.rows(np.concatenate([sp.train, sp.valid])); te = ex.rows(sp.test)
    b = lgb.train(P, lgb.Dataset(pre[feats].to_numpy(np.float32), pre["label_log"]), int(np.median(rounds)))
    pt = np.maximum(b.predict(te[feats].to_numpy(np.float32)), 0)
    month = pd.to_datetime(te["cutoff_ms"], unit="ms", utc=True).dt.month.to_numpy()
    xm = christmas_title(te["title"]) & np.isin(month, (9, 10, 11))
    err = te["label_log"].to_numpy() - pt
    out[label] = {"folds_mae_log": [round(v, 5) for v in maes], "folds_mean": round(float(np.mean(maes)), 5),
                  "test_mae_log": round(float(np.abs(err).mean()), 5),
                  "test_xmas_sep_nov_bias_log": round(float(err[xm].mean()), 4) if xm.any() else None}
    print(label, out[label], flush=True)
print(json.dumps(out))
