"""Validation + test NDCG@10 / MAE log of a v2 artefact (full / numeric / shuffled) vs exp_decay, gbm, recent_pop.

    python scripts/score_v2_check.py models/trail-smollm2-v2 [retail,ml100k]
"""
import json, sys, time
import numpy as np
from stream.core.datasets import load_dataset
from stream.core.features import predicted_count
from stream.settings import load_settings
from trainer.evaluate import fit_baselines
from trainer.examples import build_examples, split_cutoffs
from trainer.inference import score_frame
from trainer.metrics import evaluate_predictions, log_errors
from trainer.model import load

model_dir = sys.argv[1]
datasets = sys.argv[2].split(",") if len(sys.argv) > 2 else ["retail", "ml100k"]
model, manifest = load(model_dir)
out = {}
for name in datasets:
    t0 = time.time()
    ds = load_dataset(name)
    config = load_settings().worker.trend
    ex = build_examples(ds, config)
    split = split_cutoffs(ex.cutoffs, ex.horizon_ms)
    h = ex.horizon_ms / 86_400_000
    base = fit_baselines(ex, split)
    res = {}
    for part, cut in (("valid", split.valid), ("test", split.test)):
        rows = ex.rows(cut)
        r = {}
        for b in ("exp_decay", "gbm", "recent_pop"):
            m = evaluate_predictions(rows, base[b](rows), ex.truth, cutoffs=cut)
            r[b] = {"ndcg@10": m["ndcg@10"], "mae_log": m["mae_log"]}
        for v in ("full", "numeric", "shuffled"):
            s, c = score_frame(model, rows, h, variant=v, progress=False)
            m = evaluate_predictions(rows, s, ex.truth, cutoffs=cut)
            mae, rmse = log_errors(predicted_count(c), rows["label_count"].to_numpy())
            r["trail" if v == "full" else f"trail_{v}"] = {"ndcg@10": m["ndcg@10"], "mae_log": mae}
        res[part] = r
    out[name] = res
    print(name, f"{time.time()-t0:.0f}s")
    for part in ("valid", "test"):
        for k, v in res[part].items():
            print(f"  {part:5} {k:16} ndcg@10 {v['ndcg@10']:.4f}  mae_log {v['mae_log']:.4f}")
print(json.dumps(out))
