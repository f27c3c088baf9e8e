"""Serving speed: a real tick scored by the stream's TickScorer, item encoding ONNX vs PyTorch, explanations.

    python -m export.bench --model models/trail-smollm2 --json
    python -m export.bench --model models/trail-smollm2 --json --batch 512 --rounds 20   # on a GPU

Tick: Online Retail II replayed through stream.core.trends to a late-2011 tick (TICK_AS_OF); its
active items (`tick_items`, ~2,600) scored by stream.serving.scorer.TickScorer, exactly as the stream
does: first cold (every item state encoded: `cold_tick_score_s`, `item_encode_per_s`), then warm
(states cached: `tick_score_s`, the median of --tick-rounds; the head on every item).

Item encoding: real item texts (the last cut-off of the training data, as export.onnx samples them),
cut into batches of --batch; every round runs each engine once over the same batches, in turn, so
that a busy machine slows all of them alike. PyTorch runs `Trail.item_state` with the LoRA merged
(what a PyTorch deployment would run); ONNX runs item_encoder.onnx. On a machine with CUDA
(onnxruntime-gpu installed instead of onnxruntime, and a CUDA build of torch) both sides run on the GPU.
Explanation speed: greedy tokens per second of the ONNX generator (and of PyTorch's
`generate`) on a few prompts; and `explanations_per_s` (explanation_bench): real prompts of
the manifest's datasets, a tick's movers as one batch of 5, constrained to their claim
grammars with fast-forward, on the stream's default explainer threads for this machine
(`explain_threads`: every usable core, at most 4, stream.serving.config.explain_threads), beside
one at a time (`explanations_per_s_single`), unconstrained batched greedy, the batch kept whole to its
last row (`explanations_per_s_uncompacted`), a batch of 10, and two threads: as the stream runs them
(TRAIL_EXPLAIN_THREADS=2: a single-thread session per shard of the rows, `explanations_per_s_threads2`) and
as one session with two onnxruntime threads (`explanations_per_s_threads2_intra_op`), and one thread
(`explanations_per_s_threads1`, TRAIL_EXPLAIN_THREADS=1); all with the
generator the stream serves (`explain_generator`: generator.nbits on CPU when exported, export.nbits),
and the fp32 generator's batched rate beside it (`explanations_per_s_fp32`).

Prints one JSON object: tick_items, tick_score_s, item_encode_per_s, provider, onnx_items_per_s (item
encodings/s), torch_items_per_s, batch, seq_len, ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from stream.model.artefact import Artefact
from stream.model.onnx_models import (CPU, CUDA, Generator, ItemEncoder, ShardedGenerator, available_providers,
                                      explain_generator)
from stream.serving.config import explain_threads
from export.rows import bench_size, explain_rows
from stream.core.trends import Signals, TrendConfig


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


TICK_AS_OF = "2011-11-15T00:00:00Z"  # a late-2011 Online Retail II tick (the busiest season of the data)


def retail_tick(trend: TrendConfig, as_of: str = TICK_AS_OF, *, cache_dir: Path):
    """(Signals, items) of a real tick: Online Retail II replayed through stream.core.trends up to `as_of`,
    every item active at that moment, with its catalogue record (title, category, description)."""
    import pandas as pd

    from stream.core.datasets import load_dataset
    from stream.core.events import EventBatch
    from stream.core.records import ItemInfo
    from stream.core.trends import TrendTable

    ds = load_dataset("retail", cache_dir=cache_dir)
    as_of_ms = int(pd.Timestamp(as_of).value // 1_000_000)
    events = ds.events[ds.events["ts"] < as_of_ms].sort_values("ts", kind="stable") if "ts" in ds.events \
        else ds.events
    table = TrendTable(trend, capacity=max(1024, int(events["item_id"].nunique())))
    signals = next(iter(table.signals_at_cutoffs(EventBatch.from_frame(events), [as_of_ms])))

    def text(v):
        return v if isinstance(v, str) and v.strip() else None

    cols = {c: ds.items[c] if c in ds.items else [None] * len(ds.items) for c in ("title", "category", "description")}
    items = {str(i): ItemInfo(text(t), text(c), text(d))
             for i, t, c, d in zip(ds.items["item_id"], cols["title"], cols["category"], cols["description"])}
    return signals, items


def tick_bench(art: Artefact, trend: TrendConfig, threads: int, provider: str, rounds: int = 5,
               max_items: int = 0, *, cache_dir: Path) -> dict:
    """The stream's own TickScorer on a real retail tick: every active item gets the full score.

    cold: the first tick of a fresh scorer, every item state encoded (item_encode_per_s);
    warm: the same tick again, states cached (tick_score_s: median of `rounds`)."""
    from stream.serving.scorer import TickScorer

    signals, items = retail_tick(trend, cache_dir=cache_dir)
    if max_items and len(signals) > max_items:
        signals = Signals(signals.as_of_ms, list(signals.item_ids[:max_items]), signals.names,
                          signals.values[:max_items])
    known = {int(round(float(v))) for v in art.manifest["horizon_days"].values()}
    horizon = int(round(float(art.manifest["horizon_days"].get("retail", 7.0)))) if len(known) > 1 else None
    scorer = TickScorer(art, provider=provider, horizon_days=horizon, threads=threads)
    t0 = time.perf_counter()
    part = scorer.score(signals.as_of_ms, signals, items)
    cold = time.perf_counter() - t0
    encoded = scorer.stats.last["encoded"]
    encode_s = scorer.stats.last["encode_seconds"]
    warm = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        again = scorer.score(signals.as_of_ms, signals, items)
        warm.append(time.perf_counter() - t0)
        assert scorer.stats.last["encoded"] == 0 and len(again.item_ids) == len(part.item_ids)
    return {
        "tick_as_of": TICK_AS_OF,
        "tick_items": len(signals),
        "tick_scored_items": len(part.item_ids),
        "tick_score_s": round(float(np.median(warm)), 4),
        "tick_score_s_max": round(max(warm), 4),
        "cold_tick_score_s": round(cold, 2),
        "item_encode_per_s": round(encoded / encode_s, 1) if encode_s > 0 else None,
        "items_encoded": encoded,
        "item_cache_bytes": scorer.cache.nbytes(),
        "tick_rounds": rounds,
        "scorer_provider": scorer.provider,
    }


def bench(model_dir: Path, batch: int = 32, batches: int = 2, rounds: int = 2, threads: int | None = None,
          explain_prompts: int = 2, provider: str = "auto", events: str | None = None,
          items: str | None = None, tick_rounds: int = 5, tick_items: int = 0, *, cache_dir: Path) -> dict:
    """`cache_dir` (`Settings.cache_dir`): the base model, the parsed datasets and the item states."""
    from export.onnx import sample_prompts
    from trainer.model import load

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    art = Artefact.load(model_dir, _spec_trend(model_dir))
    cuda = provider != "cpu" and CUDA in available_providers()
    providers = [CUDA, CPU] if cuda else [CPU]
    device = "cuda" if cuda and torch.cuda.is_available() else "cpu"

    tick = tick_bench(art, _spec_trend(model_dir), threads, "cuda" if cuda else "cpu", tick_rounds, tick_items,
                      cache_dir=cache_dir)

    model, manifest = load(model_dir, merge=True, cache_dir=cache_dir)
    tok = art.tokenizer()
    item_tok = art.item_tokenizer()
    sample = sample_prompts(model, manifest, batch * batches, events=events, items=items, cache_dir=cache_dir)
    model.to(device)
    rows = tok.ids(sample.prompts)  # prompts: the explanation part below
    item_rows = item_tok.ids(sample.texts)
    while len(item_rows) < batch * batches:  # fewer real items than asked: repeat them
        item_rows = item_rows + item_rows
    item_rows = item_rows[: batch * batches]
    order = np.argsort([len(r) for r in item_rows], kind="stable")  # length-bucketed batches, as the stream does
    batches_np = [item_tok.pad([item_rows[i] for i in order[b * batch : (b + 1) * batch]]) for b in range(batches)]
    batches_t = [tuple(torch.from_numpy(a).to(device) for a in bt) for bt in batches_np]

    engines: dict[str, object] = {"onnx_fp32": ItemEncoder(art.path("item_encoder"), providers, threads)}

    @torch.no_grad()
    def run_torch() -> None:
        for ids, mask in batches_t:
            model.item_state(ids, mask)
        _sync(device)

    def run_onnx(m: ItemEncoder) -> None:
        for ids, mask in batches_np:
            m(ids, mask)

    runs = {"torch": run_torch, **{k: (lambda m=m: run_onnx(m)) for k, m in engines.items()}}
    elapsed = {k: 0.0 for k in runs}
    for fn in runs.values():  # warm-up (session init, allocator, CUDA kernels)
        fn()
    for _ in range(rounds):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            elapsed[k] += time.perf_counter() - t0
    items = rounds * batch * batches
    rate = {k: items / v for k, v in elapsed.items()}

    # explanations: greedy tokens per second
    gen = Generator(art.path("generator"), providers, tok.end_id, threads)
    limit = art.max_explanation_tokens
    prompts = [rows[i] for i in range(min(explain_prompts, len(rows)))]
    gen.generate(prompts[0], 4)
    t0, tokens = time.perf_counter(), 0
    for ids in prompts:
        tokens += len(gen.generate(ids, limit))
    onnx_tps = tokens / (time.perf_counter() - t0)
    t0, t_tokens = time.perf_counter(), 0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            out = model.lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=limit,
                                    do_sample=False, eos_token_id=tok.end_id, pad_token_id=tok.end_id)
            t_tokens += out.shape[1] - x.shape[1]
    _sync(device)
    torch_tps = t_tokens / (time.perf_counter() - t0)

    seq = [b[0].shape[1] for b in batches_np]
    result = {
        **tick,
        "provider": engines["onnx_fp32"].provider,
        "onnx_items_per_s": round(rate["onnx_fp32"], 1),
        "torch_items_per_s": round(rate["torch"], 1),
        "batch": batch,
        "seq_len": int(round(float(np.mean(seq)))),
        "seq_len_range": [int(min(seq)), int(max(seq))],
        "speedup": round(rate["onnx_fp32"] / rate["torch"], 2),
        "torch_device": device,
        "threads": threads,
        "items_timed": items,
        "rounds": rounds,
        "explain_tokens_per_s": round(onnx_tps, 1),
        "torch_explain_tokens_per_s": round(torch_tps, 1),
        "explain_tokens": tokens,
        "model_version": art.model_version,
        "cpu": cpu_name(),
    }
    result["item_encoder_parity_max_abs_diff"] = art.parity("item_encoder").get("max_abs_diff")
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    result |= explanation_bench(art, explain_rows(json.loads((Path(model_dir) / "manifest.json").read_text()),
                                                  max(10, explain_prompts), events=events, items=items,
                                                  cache_dir=cache_dir),
                                providers, explain_threads(None))  # the stream's TRAIL_EXPLAIN_THREADS default here
    return result


@dataclass
class ConstrainedRows:
    """Bench rows as the explainer decodes them: prompt ids, the forecast each states (`bench_size`), its claim
    grammar, the constraint that holds a batch to them and the constrained token limit."""

    prompts: list[list[int]]
    sizes: list
    grammars: list[str]
    constraint: object  # stream.model.constraint.ClaimConstraint
    limit: int


def constrained_rows(art: Artefact, rows: list[tuple[str, dict[str, float], float]]) -> ConstrainedRows:
    from stream.core.faithfulness.grammar import CONSTRAINED_MAX_NEW_TOKENS, claim_grammar
    from stream.model.constraint import ClaimConstraint

    tok = art.tokenizer()
    sizes = [bench_size(i, s, h) for i, (_, s, h) in enumerate(rows)]
    return ConstrainedRows(tok.ids([p for p, _, _ in rows]), sizes,
                           [claim_grammar(s, h, z.direction(s), size=z).lark() for (_, s, h), z in zip(rows, sizes)],
                           ClaimConstraint(art.path("tokenizer"), tok.end_id),
                           max(art.max_explanation_tokens, CONSTRAINED_MAX_NEW_TOKENS))


def explanation_bench(art: Artefact, rows: list[tuple[str, dict[str, float], float]], providers: list[str],
                      threads: int | None, batch: int = 5, single: int = 5) -> dict:
    """Explanations per second as the stream makes them: the generator it serves (`explain_generator`: on CPU
    the quantised copy when the export wrote one, stream.model.teacher_forced.generator_role; the fp32 one beside it,
    `explanations_per_s_fp32`), the movers of a tick as one batch (`batch`, the
    default TRAIL_EXPLAIN_TOP), each row held to its claim grammar with fast-forward, against one at a time
    (the first `single` rows) and against unconstrained batched greedy. Row i's forecast is `bench_size(i, ...)`
    (its prompt, from export.rows.explain_rows, shows it), so each text states its size and range as a model with quantile
    heads makes the stream write them."""
    from stream.core.faithfulness import check
    from stream.model.teacher_forced import generator_role

    tok = art.tokenizer()
    role = generator_role(art, providers)  # what the stream's explainer runs: a quantised copy on CPU when exported
    threads = threads or 1
    gen = explain_generator(art.path(role), providers, tok.end_id, threads)
    held = constrained_rows(art, rows)
    cc, limit, prompts, sizes, grammars = held.constraint, held.limit, held.prompts, held.sizes, held.grammars
    gen.generate(prompts[0], 2)  # warm-up

    passes = Passes(gen)

    def run(b: int, n: int, constrained: bool, compact: bool = True, g: Generator = gen) -> dict:
        t0, c0, tokens, steps, guide_s, forced, faithful = time.perf_counter(), time.process_time(), 0, 0, 0.0, 0, 0
        passes.reset()
        for i in range(0, n, b):
            guide = cc.guide(grammars[i : i + b]) if constrained else None
            new = g.generate_batch(prompts[i : i + b], limit if constrained else art.max_explanation_tokens, guide,
                                   compact=compact)
            tokens += sum(len(x) for x in new)
            # every prompt shows its forecast (p3), so a free text is held to it too
            faithful += sum(check(tok.decode(x), rows[i + j][1], prediction=sizes[i + j]).faithful
                            for j, x in enumerate(new))
            if guide is not None:
                steps, guide_s, forced = steps + guide.steps, guide_s + guide.seconds, forced + guide.forced
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"per_s": n / dt, "per_cpu_s": n / cpu, "tokens_per_s": tokens / dt, "tokens": tokens, "steps": steps,
                "guide_ms_per_step": 1000 * guide_s / steps if steps else None,
                "forced_share": forced / tokens if tokens else None, "faithful_share": faithful / n,
                "guide_share": guide_s / dt, **passes.shares(dt)}

    n = len(rows) - len(rows) % batch or len(rows)
    batched = run(batch, n, True)
    one = run(1, min(single, len(rows)), True)
    free = run(batch, n, False)
    # the same rows with every row kept in the batch to the end (the loop before compaction), in one batch of
    # twice the stream's size, and with two onnxruntime threads (what a second core gives one explainer)
    full = run(batch, n, True, compact=False)
    wide = run(2 * batch, n, True)
    # two threads as the stream uses them (TRAIL_EXPLAIN_THREADS=2: a single-thread session per shard of the rows),
    # and as one session with two onnxruntime intra-op threads
    if threads == 2:  # the headline ran two shards already (the stream's default on 2 cores)
        two = batched
    else:
        gen2 = explain_generator(art.path(role), providers, tok.end_id, 2)
        gen2.generate(prompts[0], 2)
        two = run(batch, n, True, g=gen2)
        gen2.close()
        del gen2
    intra = Generator(art.path(role), providers, tok.end_id, 2)
    intra.generate(prompts[0], 2)
    two_intra = run(batch, n, True, g=intra)
    del intra
    one_thread = batched
    if threads != 1:  # one core's rate beside the default's (TRAIL_EXPLAIN_THREADS=1)
        gen1 = Generator(art.path(role), providers, tok.end_id, 1)
        gen1.generate(prompts[0], 2)
        one_thread = run(batch, n, True, g=gen1)
        del gen1
    fp32 = batched
    if role != "generator":  # the fp32 generator beside the quantised one the stream serves
        gen32 = explain_generator(art.path("generator"), providers, tok.end_id, threads)
        gen32.generate(prompts[0], 2)
        fp32 = run(batch, n, True, g=gen32)
        gen32.close()
    gen.close()
    return {
        "explain_generator": role,
        "explanations_per_s": round(batched["per_s"], 2),
        "explanations_per_s_fp32": round(fp32["per_s"], 2),
        "explanations_per_cpu_s_fp32": round(fp32["per_cpu_s"], 2),
        "explain_faithful_share_fp32": fp32["faithful_share"],
        # per CPU-second of this process: with one thread, what a machine nobody else loads would give
        "explanations_per_cpu_s": round(batched["per_cpu_s"], 2),
        # where the batched constrained run's seconds went: the prompt passes, the decoding passes (one per
        # chosen token, fed with the tokens the grammar then forces), the grammar's masks; the rest is Python
        "explain_prompt_pass_share": round(batched["prompt_share"], 3),
        "explain_decode_pass_share": round(batched["decode_share"], 3),
        "explain_guide_share": round(batched["guide_share"], 3),
        "explain_decode_passes": batched["decode_passes"],
        "explain_decode_pass_ms": round(batched["decode_pass_ms"], 1),
        "explain_decode_tokens_per_pass": round(batched["decode_width"], 2),
        "explain_batch": batch,
        "explain_threads": threads,
        "explain_rows": n,
        "explain_batched_tokens_per_s": round(batched["tokens_per_s"], 1),
        "explanations_per_s_single": round(one["per_s"], 2),
        "explain_single_tokens_per_s": round(one["tokens_per_s"], 1),
        "explanations_per_s_unconstrained": round(free["per_s"], 2),
        "explain_unconstrained_tokens_per_s": round(free["tokens_per_s"], 1),
        "explain_guide_ms_per_step": round(batched["guide_ms_per_step"] or 0.0, 2),
        "explain_forced_share": round(batched["forced_share"] or 0.0, 3),
        "explain_faithful_share": batched["faithful_share"],
        "explain_faithful_share_unconstrained": free["faithful_share"],
        "explanations_per_s_uncompacted": round(full["per_s"], 2),
        "explanations_per_cpu_s_uncompacted": round(full["per_cpu_s"], 2),
        f"explanations_per_s_batch{2 * batch}": round(wide["per_s"], 2),
        f"explanations_per_cpu_s_batch{2 * batch}": round(wide["per_cpu_s"], 2),
        "explanations_per_s_threads1": round(one_thread["per_s"], 2),
        "explanations_per_cpu_s_threads1": round(one_thread["per_cpu_s"], 2),
        "explanations_per_s_threads2": round(two["per_s"], 2),
        "explanations_per_cpu_s_threads2": round(two["per_cpu_s"], 2),
        "explanations_per_s_threads2_intra_op": round(two_intra["per_s"], 2),
        "explanations_per_cpu_s_threads2_intra_op": round(two_intra["per_cpu_s"], 2),
    }


class Passes:
    """Times each decoder pass of a Generator (a wrapper around its `_step`; each shard's of a ShardedGenerator,
    whose shards' seconds are then averaged): the prompt pass of each batch (no cache yet) apart from the decoding
    passes, and the decoding passes' width (tokens fed per row)."""

    def __init__(self, gen: Generator | ShardedGenerator) -> None:
        self.parts = gen.parts if isinstance(gen, ShardedGenerator) else [gen]
        self._lock = threading.Lock()
        for part in self.parts:
            part._step = self._timed(part._step)  # an instance attribute: this Generator only
        self.reset()

    def reset(self) -> None:
        self.prompt_s = self.decode_s = 0.0
        self.decode_passes = self.decode_columns = 0

    def _timed(self, step):
        def timed(feed: dict, past: dict):
            t0 = time.perf_counter()
            out = step(feed, past)
            dt = time.perf_counter() - t0
            first = next(iter(past.values()))
            with self._lock:  # shards time their passes from their own threads
                if isinstance(first, np.ndarray) and first.shape[2] == 0:  # no cache yet: the prompt pass (on CUDA
                    # the cache is an OrtValue from the second pass on)
                    self.prompt_s += dt
                else:
                    self.decode_s += dt
                    self.decode_passes += 1
                    self.decode_columns += feed["input_ids"].shape[1]
            return out
        return timed

    def shares(self, seconds: float) -> dict:
        n, k = self.decode_passes, len(self.parts)
        return {"prompt_share": self.prompt_s / k / seconds, "decode_share": self.decode_s / k / seconds,
                "decode_passes": n, "decode_pass_ms": 1000 * self.decode_s / n if n else 0.0,
                "decode_width": self.decode_columns / n if n else 0.0}


def _spec_trend(model_dir: Path) -> TrendConfig:
    """The trend config the artefact was trained with (the bench checks files, not this stream's settings)."""
    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    return TrendConfig.from_spec(manifest["feature_spec"])


def main(argv: list[str] | None = None) -> int:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: the JSON only
    ap = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="an exported artefact (python -m export.onnx first)")
    ap.add_argument("--batch", type=int, default=32, help="item texts per encoder run (default 32; try 512 on a GPU)")
    ap.add_argument("--batches", type=int, default=2, help="distinct batches per round (default 2)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both engines (default: all cores)")
    ap.add_argument("--explain", type=int, default=2, help="prompts for explanation tokens/s (default 2)")
    ap.add_argument("--provider", choices=("auto", "cpu"), default="auto", help="auto: CUDA when onnxruntime-gpu has it")
    ap.add_argument("--events", default=None, help="prompts from this event log instead of the training datasets")
    ap.add_argument("--items", default=None, help="item table for --events")
    ap.add_argument("--tick-rounds", type=int, default=5, help="warm rounds of the retail tick (default 5)")
    ap.add_argument("--tick-items", type=int, default=0, help="score only the first N items of the tick (default: all)")
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    args = ap.parse_args(argv)
    from stream.settings import load_settings

    result = bench(args.model, args.batch, args.batches, args.rounds, args.threads, args.explain, args.provider,
                   args.events, args.items, args.tick_rounds, args.tick_items,
                   cache_dir=load_settings().cache_dir)  # the one environment read: TRAIL_CACHE
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
