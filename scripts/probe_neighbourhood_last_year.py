"""Probe on the rolling-origin folds (issue 19 item 2): gbm_l1 on the signals + week of year, then
+ the semantic neighbourhood's momentum (10 nearest items by cosine of the tuned LLM's item state,
pooled counts), + last year (the item's count at the cut-off 52 weeks earlier and in the week after
it), + both. Each set's choice is read off the folds' mean MAE; the test MAE and the Christmas items'
Sep-Nov bias are printed for the report only. Controls: the neighbourhood from random vectors.

`PYTHONPATH=. python scripts/probe_neighbourhood_last_year.py --model models/trail-smollm2 [--dataset retail]`"""

from __future__ import annotations

import argparse
import json

import lightgbm as lgb
import numpy as np
import pandas as pd

from stream.core.datasets import load_dataset
from stream.core.features import week_of_year
from stream.core.trends import TrendConfig
from trainer.examples import build_examples, split_cutoffs
from trainer.folds import make_folds
from trainer.inference import item_texts_of
from trainer.slices import christmas_title

P = {"objective": "l1", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 50, "feature_fraction": 0.9,
     "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "seed": 0, "deterministic": True,
     "force_row_wise": True, "num_threads": 2, "verbosity": -1}
K = 10


def neighbourhood(frame: pd.DataFrame, vectors: np.ndarray, items: list[str]) -> pd.DataFrame:
    """nbr_count_7d, nbr_prev_7d (sums over the K nearest items), nbr_momentum per row."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-9)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    nbr = np.argpartition(-sim, K, axis=1)[:, :K]
    pos = {it: i for i, it in enumerate(items)}
    cut = np.sort(frame["cutoff_ms"].unique())
    cpos = {c: j for j, c in enumerate(cut)}
    out = {}
    for col in ("count_7d", "prev_count_7d"):
        grid = np.zeros((len(items), len(cut)))
        grid[frame["item_id"].map(pos).to_numpy(), frame["cutoff_ms"].map(cpos).to_numpy()] = frame[col].to_numpy()
        pooled = grid[nbr].sum(axis=1)  # (items, cutoffs)
        out[f"nbr_{col}"] = pooled[frame["item_id"].map(pos).to_numpy(), frame["cutoff_ms"].map(cpos).to_numpy()]
    res = pd.DataFrame(out, index=frame.index)
    res["nbr_momentum"] = np.log1p(res["nbr_count_7d"]) - np.log1p(res["nbr_prev_count_7d"])
    return res


def last_year(frame: pd.DataFrame) -> pd.DataFrame:
    """ly_count (count_7d at the cut-off 52 weeks earlier) and ly_next (its label: the week after)."""
    prev = frame[["item_id", "cutoff_ms", "count_7d", "label_count"]].copy()
    prev["cutoff_ms"] = prev["cutoff_ms"] + 364 * 86_400_000
    prev = prev.rename(columns={"count_7d": "ly_count", "label_count": "ly_next"})
    got = frame[["item_id", "cutoff_ms"]].merge(prev, on=["item_id", "cutoff_ms"], how="left")
    return got[["ly_count", "ly_next"]].set_index(frame.index)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/trail-smollm2")
    ap.add_argument("--dataset", default="retail")
    args = ap.parse_args()
    from stream.settings import load_settings
    from trainer.model import load

    cache_dir = load_settings().cache_dir
    ex = build_examples(load_dataset(args.dataset, cache_dir=cache_dir), TrendConfig())
    f = ex.frame
    cal = week_of_year(f["cutoff_ms"].to_numpy(np.int64))
    f["woy_sin"], f["woy_cos"] = cal[:, 0], cal[:, 1]
    model, _ = load(args.model, cache_dir=cache_dir)
    index, texts = item_texts_of(f)
    states = model.item_states(texts, progress=False)
    items = f[["item_id"]].drop_duplicates()["item_id"].tolist()
    assert len(items) == len(states)
    nb = neighbourhood(f, states, items)
    rnd = neighbourhood(f, np.random.default_rng(0).normal(size=states.shape), items).add_prefix("rnd_")
    ly = last_year(f)
    f = pd.concat([f, nb, rnd, ly], axis=1)
    ex.frame = f
    sp = split_cutoffs(ex.cutoffs, ex.horizon_ms)
    folds = make_folds(sp, ex.horizon_ms)
    base = list(ex.config.signal_names) + ["woy_sin", "woy_cos"]
    nbr = ["nbr_count_7d", "nbr_prev_count_7d", "nbr_momentum"]
    sets = {"signals+woy": base, "+nbr": base + nbr, "+nbr(random vectors)": base + ["rnd_" + c for c in nbr],
            "+last_year": base + ["ly_count", "ly_next"], "+nbr+last_year": base + nbr + ["ly_count", "ly_next"]}
    out = {}
    te = ex.rows(sp.test)
    month = pd.to_datetime(te["cutoff_ms"], unit="ms", utc=True).dt.month.to_numpy()
    xm = christmas_title(te["title"]) & np.isin(month, (9, 10, 11))
    for label, feats in sets.items():
        maes, rounds = [], []
        for fo in folds:
            tr, va = ex.rows(fo.train), ex.rows(fo.valid)
            dtr = lgb.Dataset(tr[feats].to_numpy(np.float32), tr["label_log"])
            dva = lgb.Dataset(va[feats].to_numpy(np.float32), va["label_log"], reference=dtr)
            b = lgb.train(P, dtr, 2000, valid_sets=[dva], callbacks=[lgb.early_stopping(50, verbose=False)])
            pv = np.maximum(b.predict(va[feats].to_numpy(np.float32), num_iteration=b.best_iteration), 0)
            maes.append(float(np.abs(pv - va["label_log"]).mean()))
            rounds.append(b.best_iteration)
        pre = ex.rows(np.concatenate([sp.train, sp.valid]))
        b = lgb.train(P, lgb.Dataset(pre[feats].to_numpy(np.float32), pre["label_log"]), int(np.median(rounds)))
        err = te["label_log"].to_numpy() - np.maximum(b.predict(te[feats].to_numpy(np.float32)), 0)
        out[label] = {"folds_mae_log": [round(v, 5) for v in maes], "folds_mean": round(float(np.mean(maes)), 5),
                      "test_mae_log": round(float(np.abs(err).mean()), 5),
                      "test_xmas_sep_nov_bias_log": round(float(err[xm].mean()), 4) if xm.any() else None}
        print(label, out[label], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
