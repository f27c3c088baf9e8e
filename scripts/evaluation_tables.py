"""Regenerate the TRAIL sections of docs/evaluation.md from docs/results/*.json (run after the two
`python -m trainer.evaluate --model ...` commands that section shows):

    python scripts/evaluation_tables.py

It rewrites the text between "## TRAIL (`--model models/trail-smollm2`)" and "### Against the targets"
(the per-dataset tables, intervals, cold-start slice and explanation figures); the targets section
below it is written by hand from the same JSON.
"""
import json, re
cols=["ndcg@5","hr@5","recall@5","ndcg@10","hr@10","recall@10","ndcg@20","hr@20","recall@20","mae_log","rmse_log","spearman"]
hdr="| method | NDCG@5 | HR@5 | R@5 | NDCG@10 | HR@10 | R@10 | NDCG@20 | HR@20 | R@20 | MAE log | RMSE log | Spearman |\n|"+"---|"*13
def table(methods):
    best={}
    base={k:v for k,v in methods.items() if k!="oracle"}
    for c in cols:
        vals=[v[c] for v in base.values() if v[c] is not None]
        if vals: best[c]=(min(vals) if c in("mae_log","rmse_log") else max(vals))
    out=[hdr]
    for m,v in methods.items():
        cells=[]
        for c in cols:
            x=v[c]
            s="-" if x is None else f"{x:.4f}"
            if x is not None and m!="oracle" and abs(x-best[c])<1e-12: s=f"**{s}**"
            cells.append(s)
        out.append(f"| {m} | "+" | ".join(cells)+" |")
    return "\n".join(out)
def expl(e):
    out=["| explanations (200 seeded test candidates) | faithful_share | claim_precision | distinct-2 (all 200 / per 50) | forecast_agreement | forecast_accuracy (majority) | repaired_share |","|---|---|---|---|---|---|---|"]
    for k in ("trail_raw","trail","trail_unconstrained","base_zero_shot"):
        if k not in e: continue
        v=e[k]; f=lambda n: "" if v.get(n) is None else f"{v[n]:.3f}"
        acc="" if v.get("forecast_accuracy") is None else f"{v['forecast_accuracy']:.3f} ({v['majority_accuracy']:.3f})"
        out.append(f"| {k} | {f('faithful_share')} | {f('claim_precision')} | {f('distinct_2')} / {f('distinct_2_per_50')} | {f('forecast_agreement')} | {acc} | {f('repaired_share')} |")
    raw=e.get("trail_raw",{})
    if raw.get("forecast_accuracy_all_candidates") is not None:
        out+=["",f"Forced forecast over all {raw['all_candidates']:,} test candidates (no text needed: it is outlook(predicted count)): accuracy {raw['forecast_accuracy_all_candidates']:.3f} vs majority {raw['majority_accuracy_all_candidates']:.3f}."]
    dec=raw.get("decoding")
    if dec:
        out+=["",f"Constrained decoding: {dec.get('mode')}"+(f", temperature {dec['temperature']:g}, top-p {dec['top_p']:g}, seed per explanation {dec['seed']}" if dec.get('mode')=='sampled' else "")+"; trail_unconstrained and base_zero_shot greedy."]
    return "\n".join(out)
def ci(r):
    out=[]
    for k,c in r["ci"].items():
        out.append(f"- trail − best baseline ({c['best_baseline']}) on {k}: {c['diff']:+.4f}, 95% interval [{c['low']:+.4f}, {c['high']:+.4f}] ({c['n_boot']} paired resamples of the {c['cutoffs']} test cut-offs)")
    for name,by in r["ci_ablations"].items():
        c=by["mae_log"]; n=by.get("ndcg@10") or {}
        rank=("NDCG@10 identical (no item term in the ranking score)" if not n.get("diff") else
              f"NDCG@10 {n['diff']:+.5f} [{n['low']:+.5f}, {n['high']:+.5f}]")
        out.append(f"- trail − {name} on mae_log: {c['diff']:+.5f} [{c['low']:+.5f}, {c['high']:+.5f}]; {rank}")
    return "\n".join(out)
m=json.load(open("models/trail-smollm2/manifest.json"))
llm=m["training"]["phase1_llm"]
MODEL_SENTENCE=(f"The committed model `{m['model_version']}` (docs/model.md): the LoRA adapter after {llm['total_steps']:,} LLM steps "
    "in all (its manifest's `training.phase1_llm`), item states encoded once per item with it, and the v2 score head "
    "(ranking: a validation-chosen decayed-count prior plus a guarded LambdaRank residual; count head with an item-state "
    "residual) trained on every row of every training cut-off.")
sec=["## TRAIL (`--model models/trail-smollm2`)","","```",
"python -m trainer.evaluate --dataset retail --model models/trail-smollm2 --explain-sample 200 --json docs/results/retail.json --plot docs/results/retail-ndcg.png",
"python -m trainer.evaluate --dataset ml100k --model models/trail-smollm2 --explain-sample 200 --json docs/results/ml100k.json --plot docs/results/ml100k-ndcg.png",
"```","",
MODEL_SENTENCE+" `trail_numeric` is the same head without the item "
"term, `trail_text_shuffled` with item states permuted across items. Ranking metrics use `score`, count metrics `log_count`. "
"Explanations: `trail_raw` is the model's constrained decoding (docs/explanations.md), `trail` the published text "
"(`repair` of the raw text), `trail_unconstrained` plain greedy decoding, `base_zero_shot` the base SmolLM2 given the same "
"prompt as an instruction. Every sample is in `docs/results/*.json`; ten seeded samples per dataset are in docs/explanations.md.",""]
for d,name in (("retail","Online Retail II"),("ml100k","MovieLens-100K")):
    r=json.load(open(f"docs/results/{d}.json"))
    cs=r["slices"]["cold_start"]
    sec+=[f"### {d} ({r['cutoffs']} test cut-offs)","",table(r["methods"]),"",ci(r),"",
          f"Cold start (items under {cs['max_age_days']} days old at the cut-off: {cs['items_per_cutoff']:.0f} items and {cs['users_per_cutoff']:.0f} scored users per cut-off, {cs['share_of_rows']:.1%} of rows; ranked among themselves):","",
          table(cs["methods"]),"",expl(r["explanations"]),"",f"Wall time {r['seconds']:.0f} s on the 2-core machine.",""]
new="\n".join(sec)+"\n"
p="docs/evaluation.md"; t=open(p).read()
a=t.index("## TRAIL (`--model models/trail-smollm2`)"); b=t.index("### Against the targets")
t=t[:a]+new+t[b:]
open(p,"w").write(t)
