"""Evaluate forecasters on the test cut-offs of a dataset: `python -m trainer.evaluate --help`.

Cut-offs are split in time order (trainer.examples.split_cutoffs); learned methods
train on the train cut-offs and early-stop on the validation ones; every method is
scored on the same test cut-offs by trainer.metrics. Any forecaster can join: a
method is just a function from an examples frame to predicted counts, so
`evaluate_methods` serves the baselines here and later models alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import structlog

from stream.core.trends import TrendConfig
from trainer.baselines import make_baselines
from stream.core.datasets import DatasetError, load_dataset
from trainer.examples import Examples, ExamplesError, Split, build_examples, split_cutoffs
from trainer.metrics import KS, evaluate_predictions

log = structlog.get_logger(__name__)

Method = Callable[[pd.DataFrame], np.ndarray]


def evaluate_methods(examples: Examples, split: Split, methods: dict[str, Method],
                     ks: Sequence[int] = KS) -> dict[str, dict[str, float | None]]:
    """Metrics of each method on the test cut-offs; a method maps frame rows to predicted counts."""
    test = examples.rows(split.test)
    results = {}
    for name, predict in methods.items():
        pred = np.asarray(predict(test), np.float64)
        results[name] = evaluate_predictions(test, pred, examples.truth, cutoffs=split.test, ks=ks)
    return results


def fit_baselines(examples: Examples, split: Split, seed: int = 0, num_threads: int = 2) -> dict[str, Method]:
    """Fit the baselines on train (early stopping on validation) and return their predict functions."""
    train, valid = examples.rows(split.train), examples.rows(split.valid)
    fitted = {}
    for name, model in make_baselines(examples.config, examples.horizon_ms, seed=seed,
                                      num_threads=num_threads).items():
        fitted[name] = model.fit(train, valid).predict
    return fitted


def run(dataset: str, items: str | None = None, horizon_days: float | None = None, period_days: float | None = None,
        min_history_days: float = 28.0, test_frac: float = 0.2, valid_frac: float = 0.1,
        config: TrendConfig | None = None, seed: int = 0, num_threads: int = 2, oracle: bool = False,
        progress: bool = False, model_dir: str | None = None, top_n: int = 100,
        explain_sample: int = 50) -> tuple[dict, dict[str, float]]:
    """Load, build examples, fit and score the baselines. Returns (report, seconds per stage).

    `oracle` adds a row scored with the true counts: the ceiling of any count forecast
    under this protocol (the shared list cannot fit every user).
    """
    t0 = time.perf_counter()
    ds = load_dataset(dataset, items, horizon_days=horizon_days)
    t1 = time.perf_counter()
    examples = build_examples(ds, config or TrendConfig.from_env(), period_days=period_days,
                              min_history_days=min_history_days, progress=progress)
    split = split_cutoffs(examples.cutoffs, examples.horizon_ms, test_frac=test_frac, valid_frac=valid_frac)
    t2 = time.perf_counter()
    methods = fit_baselines(examples, split, seed=seed, num_threads=num_threads)
    if oracle:
        methods["oracle"] = lambda frame: frame["label_count"].to_numpy(np.float64)
    trail = None
    if model_dir:
        trail = load_trail(model_dir, config or TrendConfig.from_env())
        horizon = examples.horizon_ms / 86_400_000
        methods["trail"] = lambda frame: trail_counts(trail, frame, horizon, top_n)
    t3 = time.perf_counter()
    results = evaluate_methods(examples, split, methods)
    t4 = time.perf_counter()
    stages = {"load": t1 - t0, "examples": t2 - t1, "fit": t3 - t2, "predict+metrics": t4 - t3}
    extra = {}
    if trail is not None and explain_sample:
        from trainer.explain_eval import evaluate_explanations, sample_rows
        from trainer.inference import numeric_scores

        test = examples.rows(split.test)
        rows = sample_rows(test, numeric_scores(trail, test, horizon), explain_sample, top_n, seed=seed)
        explained = evaluate_explanations(trail, rows, horizon)
        extra = {"explanations": explained["metrics"], "explanation_samples": explained["samples"],
                 "model": {"dir": str(model_dir), "top_n": top_n}}
        stages["explanations"] = time.perf_counter() - t4
    log.info("evaluate.done", dataset=ds.name, split=split.describe(), rows=len(examples.frame),
             **{k: round(v, 2) for k, v in stages.items()})
    report = {"dataset": ds.name, "cutoffs": int(len(split.test)), "methods": results,
              "seconds": time.perf_counter() - t0} | extra
    return report, stages


def load_trail(model_dir: str, config: TrendConfig):
    """The TRAIL artefact, refused when its features are not the ones computed here."""
    from trainer.model import load

    model, manifest = load(model_dir)
    if manifest.feature_spec != config.spec():
        raise ValueError(f"{model_dir} was trained on other trend features ({manifest.feature_spec}) "
                         f"than this evaluation computes ({config.spec()})")
    return model


def trail_counts(model, frame: pd.DataFrame, horizon_days: float, top_n: int) -> np.ndarray:
    from trainer.inference import score_frame
    from trainer.model import predicted_count

    return predicted_count(score_frame(model, frame, horizon_days, top_n=top_n))


def format_explanations(report: dict) -> str:
    lines = ["explanations (sample of test candidates)",
             f"{'model':<16} {'n':>4} {'faithful':>9} {'claim_prec':>10} {'claims/expl':>11} {'distinct_2':>10}"]
    for name, m in report.get("explanations", {}).items():
        cells = [f"{m[k]:.3f}" if m[k] is not None else "-" for k in
                 ("faithful_share", "claim_precision", "claims_per_explanation", "distinct_2")]
        lines.append(f"{name:<16} {m['n']:>4} {cells[0]:>9} {cells[1]:>10} {cells[2]:>11} {cells[3]:>10}")
    return "\n".join(lines)


def format_table(report: dict, ks: Sequence[int] = KS) -> str:
    cols = [f"{m}@{k}" for k in ks for m in ("ndcg", "hr", "recall")] + ["mae_log", "rmse_log", "spearman"]
    width = max(10, *(len(m) for m in report["methods"]))
    lines = [f"{report['dataset']}: {report['cutoffs']} test cut-offs",
             f"{'method':<{width}} " + " ".join(f"{c:>9}" for c in cols)]
    for name, metrics in report["methods"].items():
        cells = ["{:>9}".format("-" if metrics[c] is None else f"{metrics[c]:.4f}") for c in cols]
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def plot_ndcg(report: dict, path: str | Path, ks: Sequence[int] = KS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, metrics in report["methods"].items():
        ys = [metrics[f"ndcg@{k}"] for k in ks]
        ax.plot(list(ks), [np.nan if y is None else y for y in ys], marker="o", label=name)
    ax.set_xticks(list(ks))
    ax.set_xlabel("K")
    ax.set_ylabel("NDCG@K")
    ax.set_title(f"{report['dataset']}: NDCG@K over {report['cutoffs']} test cut-offs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Score the popularity baselines (most_pop, recent_pop, exp_decay, markov, gbm) on the "
                    "time-ordered test cut-offs of a dataset: MAE/RMSE on log1p(count), Spearman, and "
                    "global-ranking HR/NDCG/Recall@{5,10,20}. Trend windows follow TRAIL_BUCKET_S / "
                    "TRAIL_WINDOWS / TRAIL_EMA_HALFLIFE_S like the stream.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="built-in dataset: retail (Online Retail II) or ml100k (MovieLens-100K)")
    src.add_argument("--events", help="event log (CSV/TSV/Parquet/JSONL with item_id, ts, optional user_id ...)")
    ap.add_argument("--items", help="item table for --events (item_id, title, category ...)")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--plot", help="draw NDCG@K per method into this PNG")
    ap.add_argument("--horizon-days", type=_positive, help="forecast horizon h (default: the dataset's; retail 7, "
                                                           "ml100k 3, event logs 7)")
    ap.add_argument("--period-days", type=_positive, help="spacing of cut-offs (default: the horizon)")
    ap.add_argument("--min-history-days", type=_positive, default=28.0,
                    help="history before the first cut-off (default 28)")
    ap.add_argument("--test-frac", type=float, default=0.2, help="share of cut-offs for test, the last ones (0.2)")
    ap.add_argument("--valid-frac", type=float, default=0.1, help="share of cut-offs for validation, before test (0.1)")
    ap.add_argument("--oracle", action="store_true",
                    help="also score the true counts as a method named oracle (the protocol's ceiling)")
    ap.add_argument("--model", help="a TRAIL artefact directory: adds method 'trail' and an explanations section")
    ap.add_argument("--top-n", type=int, default=100,
                    help="per cut-off, candidates the LLM scores (the rest keep the numeric-branch score; 100)")
    ap.add_argument("--explain-sample", type=int, default=50,
                    help="test candidates whose explanations are generated and checked, TRAIL and zero-shot (50)")
    ap.add_argument("--seed", type=int, default=0, help="gbm seed (0)")
    ap.add_argument("--threads", type=int, default=2, help="gbm threads (2)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.items and not args.events:
        print("error: --items goes with --events", file=sys.stderr)
        return 2
    try:
        report, stages = run(args.dataset or args.events, args.items, horizon_days=args.horizon_days,
                             period_days=args.period_days, min_history_days=args.min_history_days,
                             test_frac=args.test_frac, valid_frac=args.valid_frac, seed=args.seed,
                             num_threads=args.threads, oracle=args.oracle, progress=sys.stderr.isatty(),
                             model_dir=args.model, top_n=args.top_n, explain_sample=args.explain_sample)
    except (DatasetError, ExamplesError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if "explanations" in report:
        print(format_explanations(report))
    print(f"wall time {report['seconds']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_ndcg(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
