"""`PYTHONPATH=. python scripts/driver_coverage.py DATASET N [OUT.json]`. Grammar coverage of the model's top driver on a bigger sample, without decoding: trainer.evaluate's own sample
(same seed, same rows, same drivers), then for each rise/fall row whether the claim grammar forces the top driver's
words (reason_plan source "drivers"), and a random sentence of each row's grammar checked (faithful, reason_of)."""
import json
import random
import sys
from collections import Counter

import trainer.explain_eval as ee
from stream.core.faithfulness import check
from stream.core.faithfulness.grammar import claim_grammar, reason_of, reason_plan, top_driver

dataset, n = sys.argv[1], int(sys.argv[2])
target = sys.argv[3] if len(sys.argv) > 3 else None
out = {}


def plan_only(model, rows, horizon_days, **kw):
    names = list(model.norm.signal_names)
    signals = [dict(zip(names, r)) for r in rows[names].to_numpy(float).tolist()]
    sizes = ee.predicted_sizes(rows, rows["predicted_count"].to_numpy(float), horizon_days)
    rng = random.Random(0)
    c = Counter({"driven": 0, "against": 0})  # rise/fall rows with a top driver / with none (reported even when 0)
    tops, sources = Counter(), Counter()
    for s, z in zip(signals, sizes):
        fc = z.direction(s)
        c[fc] += 1
        if fc not in ("rise", "fall") or not z.drivers:
            continue
        td = top_driver(z.drivers, fc)
        if td is None:
            c["against"] += 1
            continue
        c["driven"] += 1
        tops[td] += 1
        plan = reason_plan(s, horizon_days, fc, z.drivers)
        sources[(td, None if plan is None else plan.source)] += 1
        text = claim_grammar(s, horizon_days, fc, size=z, drivers=z.drivers).sample(rng)
        r = check(text, s, prediction=z)
        c["sampled_faithful"] += r.faithful
        c["sampled_agree"] += r.faithful and reason_of(r.claims, s, horizon_days, fc, z.drivers) == td
    out.update(rows=len(rows), counts=dict(c), top_drivers=dict(tops),
               plan_sources={f"{k[0]}:{k[1]}": v for k, v in sources.items()},
               forced_agreement=(sum(v for k, v in sources.items() if k[1] == "drivers") / c["driven"]) if c["driven"] else None)
    return {"metrics": {"trail_raw": {}}, "samples": []}


ee.evaluate_explanations = plan_only
from stream.settings import load_settings  # noqa: E402
from trainer.evaluate import run  # noqa: E402

settings = load_settings()
run(dataset, model_dir="models/trail-smollm2", explain_sample=n, n_boot=200, num_threads=1, tuned=False,
    config=settings.worker.trend, cache_dir=settings.cache_dir)
out = {"dataset": dataset, "sample": n, "model": "models/trail-smollm2"} | out
print(json.dumps(out, indent=1))
if target:
    with open(target, "w") as f:
        f.write(json.dumps(out, indent=1) + "\n")
