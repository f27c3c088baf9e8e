"""Probe: does plain greedy copy a text's second fact right, when it writes one and when it is made to?

`PYTHONPATH=. python scripts/second_fact_probe.py N DIR [DIR ...] [--json OUT]`, each DIR an exported artefact (export.onnx,
export.nbits). On export.bench's N real rows (export.rows: each dataset's last cut-off, busiest half and a random
rest; the forecast `bench_size`), per model: the plain greedy text, faithful or not; then that text cut after its
main trend (the first ". ", "; " or ", but" after its first number), "; " appended and greedy continued, so every
text has a second fact, faithful or not. Writes JSON to OUT (or prints it). A diagnostic for docs/evaluation.md, not a metric a choice
is made on (the rows are the bench's, not validation's).
"""
import argparse
import json
import re
from pathlib import Path

from export.bench import _spec_trend
from export.rows import bench_size, explain_rows
from stream.core.faithfulness import check
from stream.model.artefact import Artefact
from stream.model.onnx_models import CPU, Generator
from stream.settings import load_settings

BATCH = 8


def greedy(gen: Generator, ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    return [x for i in range(0, len(ids), BATCH) for x in gen.generate_batch(ids[i : i + BATCH], max_tokens)]


def trend_end(text: str) -> int:
    d = re.search(r"\d", text)
    start = d.start() if d else 0
    return min([k for k in (text.find(". ", start), text.find("; ", start), text.find(", but", start)) if k > 0]
               or [len(text)])


def probe(model: Path, n: int) -> dict:
    art = Artefact.load(model, _spec_trend(model))
    tok = art.tokenizer()
    gen = Generator(art.path("generator"), [CPU], tok.end_id, 2)
    rows = explain_rows(art.manifest, n, cache_dir=load_settings().cache_dir)
    prompts = tok.ids([p for p, _, _ in rows])
    sizes = [bench_size(i, s, h) for i, (_, s, h) in enumerate(rows)]
    free = [tok.decode(x) for x in greedy(gen, prompts, art.max_explanation_tokens)]
    cut = [t[: trend_end(t)] + ";" for t in free]
    forced_ids = [p + tok.tok.encode(" " + c, add_special_tokens=False).ids for p, c in zip(prompts, cut)]
    forced = [c + " " + tok.decode(x) for c, x in zip(cut, greedy(gen, forced_ids, art.max_explanation_tokens))]
    free_ok = [check(t, r[1], prediction=z).faithful for t, r, z in zip(free, rows, sizes)]
    forced_checks = [check(t, r[1], prediction=z) for t, r, z in zip(forced, rows, sizes)]
    return {"rows": len(rows), "free_faithful": sum(free_ok),
            "free_with_second_fact": sum(t[trend_end(t):].startswith("; ") for t in free),
            "forced_faithful": sum(c.faithful for c in forced_checks),
            "forced_false_claims": [[t, [(c.kind, c.measure, c.window, c.stated, c.true) for c in r.claims if not c.ok]]
                                    for t, r in zip(forced, forced_checks) if not r.faithful],
            "forced_samples": forced[:8]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=int, help="bench rows (export.rows.explain_rows)")
    ap.add_argument("models", nargs="+", type=Path, help="exported artefact directories")
    ap.add_argument("--json", type=Path, help="write the JSON here (default: print it)")
    args = ap.parse_args()
    text = json.dumps({str(m): probe(m, args.rows) for m in args.models}, indent=1)
    args.json.write_text(text + "\n") if args.json else print(text)
