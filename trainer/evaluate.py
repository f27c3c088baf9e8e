"""Evaluate forecasters on the test cut-offs of a dataset: `python -m trainer.evaluate --help`.

Cut-offs are split in time order (trainer.examples.split_cutoffs); learned methods
train on the train cut-offs and early-stop on the validation ones; every method is
scored on the same test cut-offs by trainer.metrics. Any forecaster can join: a
method is a function from an examples frame to predicted counts (or to a
`Forecast`, when it ranks by a score that is not its count), so `evaluate_report`
serves the baselines and the TRAIL model alike.

The report (docs/evaluation.md has the JSON contract):
- `methods`: every method's metrics on the test cut-offs (with `--model`: `trail`
  and its ablations `trail_numeric`, `trail_text_shuffled`, `trail_bow` (trainer.bow; how it was
  fitted in `ablations.trail_bow`), and, for each control of the range head the artefact holds
  (trainer.controls), `trail_numeric_range`, `trail_random_range`, `trail_bow_range`);
- `slices.cold_start`: the same metrics over the candidates with under
  `cold_days` (28) days of history at the cut-off (age_h), ranked among
  themselves against the truth restricted to them;
- `slices.seasonal` (when the test period has them): items titled with a Christmas word at
  the September–November test cut-offs, per method `mae_log` and `bias_log` (trainer.slices);
- `protocol.folds`: the rolling-origin validation folds (trainer.folds) the tuned baselines
  (`exp_decay_tuned`, `gbm_l1`, `lgbm_rank`, trainer.tuned) make every choice on; their choices
  in `protocol.tuned`;
- `ci`: with `trail`, paired bootstrap over test cut-offs of trail minus the best
  baseline (by that metric on the test cut-offs) for NDCG@10 and MAE;
- `protocol`: the horizon, period, history and split actually used. For an event
  log the unset ones adapt to the log's span (`choose_protocol`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import structlog

from stream.core.decoding import EXPLAIN_TEMPERATURE, EXPLAIN_TOP_P
from stream.core.trends import TrendConfig
from stream.settings import load_settings
from trainer.baselines import make_baselines
from stream.core.datasets import DatasetError, load_dataset
from trainer.examples import (DAY_MS, Examples, ExamplesError, Split, Truth, build_examples,
                              split_cutoffs)
from trainer.folds import Fold, make_folds
from trainer.protocol import DEFAULT_MIN_HISTORY_DAYS, choose_protocol, count_cutoffs, is_builtin
from trainer.metrics import KS, aggregate, cutoff_metrics, paired_bootstrap
from trainer.slices import seasonal_slice

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Forecast:
    """A method's output when it ranks by something other than its count: both row-aligned."""

    count: np.ndarray  # predicted count in the horizon (MAE/RMSE on log1p)
    score: np.ndarray  # ranking score, higher = more popular (NDCG/HR/Recall, Spearman)
    low: np.ndarray | None = None  # the published 80% range (10% / 90%), for a method with a range head
    high: np.ndarray | None = None


Method = Callable[[pd.DataFrame], "np.ndarray | Forecast"]

UNTUNED = ("most_pop", "recent_pop", "exp_decay", "markov", "gbm")  # make_baselines' names
TUNED = ("exp_decay_tuned", "gbm_l1", "lgbm_rank")  # trainer.tuned: every choice on the folds
BASELINES = UNTUNED + TUNED
TRAIL_VARIANTS = {"trail": "full", "trail_numeric": "numeric", "trail_text_shuffled": "shuffled"}
# trail minus each, in `ci_ablations`; trail_bow: the item terms retrained on a bag-of-words vector (trainer.bow).
# The first three count with the score head; the `_range` ones are the range head's controls (trainer.controls:
# refitted with no item state, a random vector or a bag-of-words vector in place of it), counted as `trail` is
SCORE_HEAD_ABLATIONS = ("trail_numeric", "trail_text_shuffled", "trail_bow")
RANGE_ABLATIONS = ("trail_numeric_range", "trail_random_range", "trail_bow_range")
ABLATIONS = SCORE_HEAD_ABLATIONS + RANGE_ABLATIONS
CI_METRICS = {"ndcg@10": "max", "mae_log": "min"}  # metric -> which baseline is best
COLD_DAYS = 28.0
SCORE_DESIGN = "item-state-v2"



# --- predictions --------------------------------------------------------------------------------------

def predict_all(frame: pd.DataFrame, methods: dict[str, Method]) -> tuple[dict[str, Forecast], dict[str, float]]:
    """Each method's forecast of the frame's rows, and the seconds each took."""
    out, seconds = {}, {}
    for name, predict in methods.items():
        t = time.perf_counter()
        res = predict(frame)
        if isinstance(res, Forecast):
            fc = Forecast(np.asarray(res.count, np.float64), np.asarray(res.score, np.float64), res.low, res.high)
        else:
            count = np.asarray(res, np.float64)
            fc = Forecast(count, count)
        seconds[name] = time.perf_counter() - t
        out[name] = fc
    return out, seconds


def evaluate_methods(examples: Examples, split: Split, methods: dict[str, Method],
                     ks: Sequence[int] = KS) -> dict[str, dict[str, float | None]]:
    """Metrics of each method on the test cut-offs; a method maps frame rows to predicted counts."""
    test = examples.rows(split.test)
    preds, _ = predict_all(test, methods)
    return {name: aggregate(cutoff_metrics(test, fc.count, examples.truth, split.test, ks, rank_by=fc.score))
            for name, fc in preds.items()}


def fit_baselines(examples: Examples, split: Split, seed: int = 0, num_threads: int = 2,
                  folds: list[Fold] | None = None, tuning: dict | None = None) -> dict[str, Method]:
    """Fit the baselines on train (early stopping on validation) and return their predict functions.

    With `folds`, also the tuned baselines (trainer.tuned), every choice made on the folds;
    what each tried and chose goes into `tuning` when given."""
    train, valid = examples.rows(split.train), examples.rows(split.valid)
    fitted: dict[str, Method] = {}
    for name, model in make_baselines(examples.config, examples.horizon_ms, seed=seed,
                                      num_threads=num_threads).items():
        fitted[name] = model.fit(train, valid).predict
    if folds:
        from trainer.tuned import fit_tuned

        predictors, reports = fit_tuned(examples, folds, seed=seed, num_threads=num_threads)
        for name, predict in predictors.items():
            fitted[name] = lambda frame, predict=predict: Forecast(*predict(frame))
        if tuning is not None:
            tuning |= reports
    return fitted


# --- slices, bootstrap, report ------------------------------------------------------------------------

def restrict_truth(truth: Truth, frame: pd.DataFrame, mask: np.ndarray, cutoffs: Sequence[int]) -> Truth:
    """The truth pairs of `cutoffs` whose item is a selected (`mask`) candidate of that cut-off."""
    cut = frame["cutoff_ms"].to_numpy(np.int64)
    codes = truth.item_codes(frame["item_id"].to_numpy(dtype=object))
    pairs = {}
    for c in cutoffs:
        user, item = truth.at(c)
        keep = np.isin(item, codes[mask & (cut == int(c))])
        pairs[int(c)] = (user[keep], item[keep])
    return Truth(truth.items, pairs)


def cold_start_mask(frame: pd.DataFrame, cold_days: float = COLD_DAYS) -> np.ndarray:
    """Candidates with under `cold_days` of history at the cut-off (age_h: hours since first seen)."""
    return frame["age_h"].to_numpy(np.float64) < cold_days * 24.0


def best_baseline(results: dict[str, dict[str, float | None]], metric: str, better: str) -> str | None:
    """The baseline with the best value of `metric` (ties: report order); None when none has one."""
    scored = [(name, results[name][metric]) for name in BASELINES if results.get(name, {}).get(metric) is not None]
    if not scored:
        return None
    pick = max if better == "max" else min
    return pick(scored, key=lambda nv: nv[1])[0]


def confidence_intervals(results: dict[str, dict[str, float | None]], tables: dict[str, dict[str, np.ndarray]],
                         method: str = "trail", n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, dict]:
    """`ci`: per metric of CI_METRICS, `method` minus the best baseline, paired bootstrap over cut-offs."""
    out = {}
    for metric, better in CI_METRICS.items():
        best = best_baseline(results, metric, better)
        entry: dict = {"best_baseline": best, "diff": None, "low": None, "high": None, "n_boot": int(n_boot),
                       "seed": int(seed), "level": level}
        if best is not None and method in tables:
            entry |= paired_bootstrap(tables[method], tables[best], metric, n_boot=n_boot, seed=seed, level=level)
        out[metric] = entry
    return out


def ablation_intervals(tables: dict[str, dict[str, np.ndarray]], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> dict[str, dict]:
    """`ci_ablations`: trail minus each of its ablations, same bootstrap (what the LLM part adds).

    With a range head, trail's count is its median while the score head's ablations count with the score head, so
    each of those also has `mae_log_score_head`: trail_score_head_count minus the ablation, count against
    count from the same head (what the LLM's item term adds to it). The range head's controls (RANGE_ABLATIONS)
    count with their own refitted range head, so their `mae_log` is like against like."""
    out = {}
    for name in ABLATIONS:
        if name in tables and "trail" in tables:
            out[name] = {metric: paired_bootstrap(tables["trail"], tables[name], metric, n_boot=n_boot, seed=seed,
                                                  level=level) for metric in CI_METRICS}
            if "trail_score_head_count" in tables and name in SCORE_HEAD_ABLATIONS:
                out[name]["mae_log_score_head"] = paired_bootstrap(tables["trail_score_head_count"], tables[name],
                                                                   "mae_log", n_boot=n_boot, seed=seed, level=level)
    return out


def per_cutoff_json(tables: dict[str, dict[str, np.ndarray]]) -> dict:
    """`per_cutoff`: each test cut-off's NDCG@10 and MAE per method (what the bootstrap resamples)."""
    if not tables:
        return {"cutoff_ms": [], "users": [], "rows": [], "methods": {}}
    first = next(iter(tables.values()))
    nan_none = lambda xs: [None if np.isnan(x) else float(x) for x in xs]  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"cutoff_ms": first["cutoff_ms"].tolist(), "users": first["users"].tolist(),
                "rows": first["rows"].tolist(),
                "methods": {name: {"ndcg@10": nan_none(t["ndcg@10"]) if "ndcg@10" in t else None,
                                   "mae_log": nan_none(t["abs_err"] / t["rows"])} for name, t in tables.items()}}


def evaluate_report(examples: Examples, split: Split, methods: dict[str, Method], ks: Sequence[int] = KS,
                    cold_days: float = COLD_DAYS, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[dict, dict[str, Forecast]]:
    """`methods`, `slices`, `ci` (with trail) and `ci_ablations` of the report, and the test forecasts."""
    test = examples.rows(split.test)
    preds, seconds = predict_all(test, methods)
    tables = {name: cutoff_metrics(test, fc.count, examples.truth, split.test, ks, rank_by=fc.score)
              for name, fc in preds.items()}
    results = {name: aggregate(t) for name, t in tables.items()}

    cold = cold_start_mask(test, cold_days)
    cold_frame = test[cold].reset_index(drop=True)
    cold_truth = restrict_truth(examples.truth, test, cold, split.test)
    cold_tables = {name: cutoff_metrics(cold_frame, fc.count[cold], cold_truth, split.test, ks,
                                        rank_by=fc.score[cold]) for name, fc in preds.items()}
    n_cut = max(1, len(split.test))
    users = next(iter(cold_tables.values()))["users"] if cold_tables else np.zeros(0)
    report: dict = {
        "methods": results,
        "slices": {"cold_start": {
            "max_age_days": cold_days,
            "rows": int(cold.sum()),
            "share_of_rows": float(cold.mean()) if len(cold) else None,
            "items_per_cutoff": float(cold.sum() / n_cut),
            "users_per_cutoff": float(users.sum() / n_cut),
            "methods": {name: aggregate(t) for name, t in cold_tables.items()},
        }},
        "per_cutoff": per_cutoff_json(tables),
        "method_seconds": seconds,
    }
    seasonal = seasonal_slice(test, {name: fc.count for name, fc in preds.items()})
    if seasonal is not None:
        report["slices"]["seasonal"] = seasonal
    if "trail" in tables:
        report["ci"] = confidence_intervals(results, tables, "trail", n_boot=n_boot, seed=seed, level=level)
        report["ci_ablations"] = ablation_intervals(tables, n_boot=n_boot, seed=seed, level=level)
    return report, preds


# --- protocol -----------------------------------------------------------------------------------------

def _protocol_hint(ds, bucket_ms: int, horizon_days: float, period_days: float, min_history_days: float) -> str:
    ts = ds.events["ts"].to_numpy(np.int64)
    got = count_cutoffs(int(ts[0]), int(ts[-1]), horizon_days, period_days, min_history_days, bucket_ms)
    auto = choose_protocol(int(ts[0]), int(ts[-1]), bucket_ms)
    msg = (f"a {horizon_days:g}-day horizon every {period_days:g} days after {min_history_days:g} days of history "
           f"gives {got} cut-off(s) on this log; a train/validation/test split needs at least 3 (10 or more for "
           "stable figures)")
    if auto["n_cutoffs"] >= 3:
        msg += (f"; pass e.g. --horizon-days {auto['horizon_days']:g} --period-days {auto['period_days']:g} "
                f"--min-history-days {auto['min_history_days']:g} ({auto['n_cutoffs']} cut-offs)")
    else:
        msg += ("; the log is too short for any horizon down to one trend bucket (cut-offs fall on UTC "
                "midnights): use a longer log")
    return msg


# --- TRAIL --------------------------------------------------------------------------------------------

def load_trail(model_dir: str, config: TrendConfig, *, cache_dir: Path):
    """The TRAIL artefact, refused when it is not an item-state-v2 model or its features differ from these."""
    path = Path(model_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a TRAIL model directory (no manifest.json)")
    design = json.loads(path.read_text()).get("score_design")
    if design != SCORE_DESIGN:
        raise ValueError(f"{model_dir}: this artefact predates {SCORE_DESIGN}; retrain (python -m trainer.fit); "
                         f"its manifest has score_design {design!r}")
    from trainer.model import load

    model, manifest = load(model_dir, cache_dir=cache_dir)
    if manifest.feature_spec != config.spec():
        raise ValueError(f"{model_dir} was trained on other trend features ({manifest.feature_spec}) "
                         f"than this evaluation computes ({config.spec()})")
    return model


def trail_methods(model, horizon_days: float, seed: int = 0, score_frame: Callable | None = None
                  ) -> dict[str, Method]:
    """`trail`, `trail_numeric`, `trail_text_shuffled` from trainer.inference.score_frame's variants.

    score_frame(model, frame, horizon_days, *, variant, seed) -> (score, log_count):
    the ranking metrics use `score`, the count metrics predicted_count(log_count).
    """
    from stream.core.features import predicted_count

    if score_frame is None:
        from trainer.inference import score_frame
    params = inspect.signature(score_frame).parameters
    if "variant" not in params:
        raise ValueError("trainer.inference.score_frame has no `variant` argument: it predates "
                         f"{SCORE_DESIGN}; the ablations need score_frame(model, frame, horizon_days, *, "
                         "variant='full'|'numeric'|'shuffled', seed=0) -> (score, log_count)")

    def method(variant: str) -> Method:
        def predict(frame: pd.DataFrame) -> Forecast:
            kwargs = {"variant": variant} | ({"seed": seed} if "seed" in params else {})
            res = score_frame(model, frame, horizon_days, **kwargs)
            if not (isinstance(res, tuple) and len(res) == 2):
                raise ValueError(f"score_frame(variant={variant!r}) returned {type(res).__name__}; "
                                 "expected (score, log_count)")
            score, log_count = (np.asarray(r, np.float64).reshape(-1) for r in res)
            if score.shape != (len(frame),) or log_count.shape != (len(frame),):
                raise ValueError(f"score_frame(variant={variant!r}) returned shapes {score.shape}, "
                                 f"{log_count.shape} for {len(frame)} rows")
            return Forecast(count=predicted_count(log_count), score=score)
        return predict

    return {name: method(variant) for name, variant in TRAIL_VARIANTS.items()}


def _count_and_score(score: np.ndarray, log_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from stream.core.features import predicted_count

    return predicted_count(log_count), score


def has_range(model_dir: str | None) -> bool:
    from trainer.quantiles import RANGE_FILE

    return bool(model_dir) and (Path(model_dir) / RANGE_FILE).is_file()


def trail_range(model, model_dir: str | None, frame: pd.DataFrame, horizon_days: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(low, mid, high) counts of the artefact's range head (trainer.quantiles) for the frame's rows, the range
    calibrated for this horizon as the stream publishes it (trainer.quantiles.calibrated_range), or None when the
    artefact has none."""
    from trainer.quantiles import calibrated_range, counts_of, load_range, predict_frame

    head = load_range(model_dir) if model_dir else None
    if head is None:
        return None
    if tuple(head.cfg.feature_names) != tuple(model.norm.names):
        raise ValueError(f"{model_dir}: the range head reads other inputs than the model ({head.cfg.feature_names})")
    q = predict_frame(head, model.norm, frame, horizon_days, lambda texts: model.item_states(texts, progress=False))
    return counts_of(calibrated_range(head, q, horizon_days))


def range_drivers(model, model_dir: str, frame: pd.DataFrame, horizon_days: float) -> list[dict[str, float]]:
    """Each row's drivers as the stream publishes them: exact group Shapley values of the range head's median's gap
    from the item's pace (trainer.quantiles.drivers; stream.model.count_range online; stream.core.drivers)."""
    import torch

    from trainer.inference import item_texts_of
    from trainer.quantiles import drivers, load_range, range_data

    head = load_range(model_dir)
    index, texts = item_texts_of(frame)
    states = model.item_states(texts, progress=False)
    d = range_data(model.norm, frame, horizon_days, index)
    with torch.no_grad():
        phi = drivers(head, d.x, d.cal, np.asarray(states, np.float32)[d.item], model.norm)
    return [{g: float(v[i]) for g, v in phi.items()} for i in range(len(frame))]


def published_count(shipped: Method, ranges: Callable[[pd.DataFrame], tuple | None]) -> dict[str, Method]:
    """With a range head the stream publishes its median as the count (stream.model.scorer), so `trail`
    is scored on what is published: the score head's ranking score, the range head's median count.
    `trail_score_head_count` keeps the score head's own count (same ranking) beside it."""
    last: dict = {}

    def score_head(frame: pd.DataFrame) -> Forecast:
        if last.get("frame") is not frame:  # one score_frame pass per frame for both rows
            last.update(frame=frame, forecast=shipped(frame))
        return last["forecast"]

    def trail(frame: pd.DataFrame) -> Forecast:
        low, mid, high = ranges(frame)
        return Forecast(count=np.asarray(mid, np.float64), score=score_head(frame).score, low=low, high=high)

    return {"trail": trail, "trail_score_head_count": score_head}


def range_controls(model, model_dir: str, ranked: Method, horizon_days: float, cache_dir: Path) -> dict[str, Method]:
    """`trail_<kind>_range` for each control of the range head the artefact holds (trainer.controls): that head's
    median as the count, ranked as `ranked` (the score head's own forecast) ranks."""
    from stream.core.trends import TrendConfig
    from trainer.controls import ControlVectors, control_count, load_controls
    from trainer.inference import item_texts_of
    from trainer.quantiles import dataset_examples

    controls = load_controls(model_dir)
    every: list[str] | None = None
    if "bow" in controls:  # the texts its vectors were fitted on: every item of the datasets the head was fitted on
        record = controls["bow"][1]
        frames = (dataset_examples(n, record.get("items"), TrendConfig(), cache_dir).frame for n in record["datasets"])
        every = sorted(set().union(*(item_texts_of(f)[1] for f in frames)))
    out: dict[str, Method] = {}
    for kind, (head, record) in controls.items():
        if tuple(head.cfg.feature_names) != tuple(model.norm.names):
            raise ValueError(f"{model_dir}: the {kind} control reads other inputs than the model")
        vectors = ControlVectors(kind, int(head.cfg.hidden_size), scale=record.get("scale"), bow_texts=every)

        def method(frame: pd.DataFrame, head=head, vectors=vectors) -> Forecast:
            return Forecast(count=control_count(head, vectors, model, frame, horizon_days), score=ranked(frame).score)

        out[f"trail_{kind}_range"] = method
    return out


def _day(ms) -> str:
    return pd.Timestamp(int(ms), unit="ms", tz="UTC").isoformat()


# --- run ----------------------------------------------------------------------------------------------

def run(dataset: str, items: str | None = None, horizon_days: float | None = None, period_days: float | None = None,
        min_history_days: float | None = None, test_frac: float = 0.2, valid_frac: float = 0.1,
        config: TrendConfig | None = None, seed: int = 0, num_threads: int = 2, oracle: bool = False,
        progress: bool = False, model_dir: str | None = None, top_n: int = 100,
        explain_sample: int = 50, cold_days: float = COLD_DAYS, n_boot: int = 2000,
        extra_methods: dict[str, Method] | None = None, explain_temperature: float = EXPLAIN_TEMPERATURE,
        explain_top_p: float = EXPLAIN_TOP_P, tuned: bool = True, explain_split: str = "test", *,
        cache_dir: Path) -> tuple[dict, dict[str, float]]:
    """Load, build examples, fit and score the baselines (and TRAIL). Returns (report, seconds per stage).

    `oracle` adds a row scored with the true counts: the ceiling of any count forecast
    under this protocol (the shared list cannot fit every user). `extra_methods`
    join the baselines (tests use it for a stand-in `trail`). `tuned`: also fit the baselines tuned on
    rolling-origin folds (trainer.tuned; `protocol.folds` lists the folds). `explain_temperature` / `explain_top_p`:
    how the constrained explanations are sampled (the stream's defaults; temperature 0: greedy). `explain_split`:
    where the explanation sample is drawn, "test" (the report) or "valid" (the validation cut-offs: to choose an
    adapter or a decoding setting without looking at test; the metrics above stay the test's). `cache_dir`
    (`Settings.cache_dir`): the parsed built-in datasets, the base model and the item states; `config`: the trend
    features (main passes the settings'; default `TrendConfig()`).
    """
    t0 = time.perf_counter()
    config = config or TrendConfig()
    trail = load_trail(model_dir, config, cache_dir=cache_dir) if model_dir else None  # fail fast, before the examples
    builtin = is_builtin(str(dataset))
    ds = load_dataset(dataset, items, horizon_days=horizon_days, cache_dir=cache_dir)
    t1 = time.perf_counter()
    if builtin:
        proto = {"horizon_days": ds.horizon_days, "period_days": period_days or ds.horizon_days,
                 "min_history_days": DEFAULT_MIN_HISTORY_DAYS if min_history_days is None else min_history_days}
    else:
        ts = ds.events["ts"].to_numpy(np.int64)
        if len(ts) == 0:
            raise ExamplesError(f"{dataset}: the event log has no events")
        proto = choose_protocol(int(ts[0]), int(ts[-1]), config.bucket_ms, horizon_days, period_days,
                                min_history_days)
        proto.pop("n_cutoffs")
    try:
        examples = build_examples(ds, config, horizon_days=proto["horizon_days"], period_days=proto["period_days"],
                                  min_history_days=proto["min_history_days"], progress=progress)
        split = split_cutoffs(examples.cutoffs, examples.horizon_ms, test_frac=test_frac, valid_frac=valid_frac)
    except ExamplesError as e:
        if len(ds.events) == 0:
            raise
        raise ExamplesError(f"{e}; {_protocol_hint(ds, config.bucket_ms, **proto)}") from None
    t2 = time.perf_counter()
    folds = make_folds(split, examples.horizon_ms) if tuned else []
    tuning: dict = {}
    methods = fit_baselines(examples, split, seed=seed, num_threads=num_threads, folds=folds, tuning=tuning)
    if oracle:  # ranks by the metric's own per-item weight: the true ceiling of NDCG under this protocol
        methods["oracle"] = lambda frame: Forecast(frame["label_count"].to_numpy(np.float64),
                                                   frame["label_gain"].to_numpy(np.float64))
    horizon = examples.horizon_ms / DAY_MS
    ablations: dict = {}
    if trail is not None:
        from trainer.bow import bow_method
        from trainer.model import Manifest

        methods |= trail_methods(trail, horizon, seed=seed)
        bow, ablations["trail_bow"] = bow_method(trail, Manifest.load(model_dir), examples, split, seed=seed)
        methods["trail_bow"] = lambda frame: Forecast(*_count_and_score(*bow(frame)))
    ranged = trail is not None and has_range(model_dir)
    if ranged:
        methods |= published_count(methods["trail"], lambda frame: trail_range(trail, model_dir, frame, horizon))
        methods |= range_controls(trail, model_dir, methods["trail_score_head_count"], horizon, cache_dir)
    methods |= extra_methods or {}
    t3 = time.perf_counter()
    body, preds = evaluate_report(examples, split, methods, cold_days=cold_days, n_boot=n_boot, seed=seed)
    test = examples.rows(split.test)
    low = high = None  # the published range (the range head's 10% / 90%) of the test rows
    if ranged:
        from trainer.quantiles import interval_metrics

        low, high = preds["trail"].low, preds["trail"].high  # the test rows' range, as `trail` published it
        body["methods"]["trail"] |= interval_metrics(low, high, test["label_count"].to_numpy(np.float64))
    t4 = time.perf_counter()
    stages = {"load": t1 - t0, "examples": t2 - t1, "fit": t3 - t2, "predict+metrics": t4 - t3}
    extra = {}
    if trail is not None and explain_sample:
        from trainer.explain_eval import evaluate_explanations, forecast_accuracy_all, sample_rows

        pool, scores, counts = test, preds["trail"].score, preds["trail"].count
        if explain_split == "valid":  # choosing among adapters or decoding settings: never on test cut-offs
            pool = examples.rows(split.valid)
            shipped = methods["trail"](pool)
            scores, counts, low, high = shipped.score, shipped.count, shipped.low, shipped.high
        rows = sample_rows(pool, scores, explain_sample, top_n, seed=seed, counts=counts, low=low, high=high)
        if ranged:  # what moved each sampled row's median, as the stream publishes it
            rows = rows.assign(drivers=range_drivers(trail, model_dir, rows, horizon))
        # the base model is no candidate to choose: on validation cut-offs its zero-shot texts are skipped
        explained = evaluate_explanations(trail, rows, horizon, zero_shot_too=explain_split == "test",
                                          model_dir=model_dir, temperature=explain_temperature, top_p=explain_top_p)
        # the constrained forecast clause is outlook(predicted count) by construction (forecast_agreement
        # 1.0), so its accuracy over every candidate needs no text: beside the sample's
        explained["metrics"]["trail_raw"] |= forecast_accuracy_all(pool, counts, horizon)
        extra = {"explanations": explained["metrics"], "explanation_samples": explained["samples"],
                 "model": {"dir": str(model_dir), "top_n": top_n},
                 "explanation_split": {"split": explain_split, "rows": len(rows),
                                       "first": _day(rows["cutoff_ms"].min()), "last": _day(rows["cutoff_ms"].max())}}
        stages["explanations"] = time.perf_counter() - t4
    log.info("evaluate.done", dataset=ds.name, split=split.describe(), rows=len(examples.frame),
             **{k: round(v, 2) for k, v in stages.items()})
    protocol = {"horizon_days": horizon, "period_days": examples.period_ms / DAY_MS,
                "min_history_days": float(proto["min_history_days"]), "adaptive": not builtin,
                "split": split.describe(), "test_first": _day(split.test[0]), "test_last": _day(split.test[-1]),
                "test_rows": int(examples.frame["cutoff_ms"].isin(split.test).sum()),
                "folds": [f.describe() for f in folds], "tuned": tuning}
    report = {"dataset": ds.name, "cutoffs": int(len(split.test)), "methods": body["methods"],
              "slices": body["slices"]}
    for key in ("ci", "ci_ablations"):
        if key in body:
            report[key] = body[key]
    if ablations:  # how the retrained controls were fitted
        report["ablations"] = ablations
    report |= {"protocol": protocol, "per_cutoff": body["per_cutoff"], "method_seconds": body["method_seconds"],
               "seconds": time.perf_counter() - t0} | extra
    return report, stages


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

    def table(methods: dict) -> list[str]:
        width = max(10, *(len(m) for m in methods))
        lines = [f"{'method':<{width}} " + " ".join(f"{c:>9}" for c in cols)]
        for name, metrics in methods.items():
            cells = ["{:>9}".format("-" if metrics[c] is None else f"{metrics[c]:.4f}") for c in cols]
            lines.append(f"{name:<{width}} " + " ".join(cells))
        return lines

    lines = [f"{report['dataset']}: {report['cutoffs']} test cut-offs"]
    if not sum(report.get("per_cutoff", {}).get("users", [1])):
        lines.append("(ndcg, hr and recall are '-': they score each user's next-period items, and no test "
                     "cut-off has an event with a user_id; mae_log, rmse_log and spearman need none)")
    lines += table(report["methods"])
    cold = report.get("slices", {}).get("cold_start")
    if cold:
        lines += [f"cold start (age < {cold['max_age_days']:g} d): {cold['items_per_cutoff']:.1f} items and "
                  f"{cold['users_per_cutoff']:.1f} scored users per cut-off"] + table(cold["methods"])
    for metric, ci in report.get("ci", {}).items():
        if ci["diff"] is None:
            lines.append(f"trail - best baseline ({ci['best_baseline']}) {metric}: -")
        else:
            bounds = "-" if ci["low"] is None else f"[{ci['low']:+.4f}, {ci['high']:+.4f}]"
            lines.append(f"trail - best baseline ({ci['best_baseline']}) {metric}: {ci['diff']:+.4f}, "
                         f"{ci['level']:.0%} interval {bounds} ({ci['n_boot']} paired resamples of cut-offs)")
    for name, by_metric in report.get("ci_ablations", {}).items():
        cells = [f"{metric} {ci['diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]" for metric, ci in by_metric.items()
                 if ci["diff"] is not None and ci["low"] is not None]
        lines.append(f"trail - {name}: " + ("; ".join(cells) if cells else "-"))
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


def _temperature(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0: greedy), got {text}")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Score the popularity baselines (most_pop, recent_pop, exp_decay, markov, gbm; tuned on "
                    "rolling-origin folds: exp_decay_tuned, gbm_l1, lgbm_rank) and, with "
                    "--model, TRAIL and its ablations (trail_numeric, trail_text_shuffled, trail_bow) on the "
                    "time-ordered "
                    "test cut-offs of a dataset: MAE/RMSE on log1p(count), Spearman, global-ranking "
                    "HR/NDCG/Recall@{5,10,20}, the same over cold-start items, and paired-bootstrap intervals "
                    "of TRAIL minus the best baseline. Trend windows follow TRAIL_BUCKET_S / TRAIL_WINDOWS / "
                    "TRAIL_EMA_HALFLIFE_S like the stream.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="built-in dataset: retail (Online Retail II) or ml100k (MovieLens-100K)")
    src.add_argument("--events", help="event log (CSV/TSV/Parquet/JSONL with item_id, ts, optional user_id ...)")
    ap.add_argument("--items", help="item table for --events (item_id, title, category ...)")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--plot", help="draw NDCG@K per method into this PNG")
    ap.add_argument("--horizon-days", type=_positive,
                    help="forecast horizon h (default: retail 7, ml100k 3; an event log: the longest of 7, 3, 1, "
                         "0.5, 0.25 ... days giving at least 10 cut-offs over its span)")
    ap.add_argument("--period-days", type=_positive, help="spacing of cut-offs (default: the horizon)")
    ap.add_argument("--min-history-days", type=_positive,
                    help="history before the first cut-off (default 28; an event log shorter than 84 days: a "
                         "third of its span)")
    ap.add_argument("--test-frac", type=float, default=0.2, help="share of cut-offs for test, the last ones (0.2)")
    ap.add_argument("--valid-frac", type=float, default=0.1, help="share of cut-offs for validation, before test (0.1)")
    ap.add_argument("--oracle", action="store_true",
                    help="also score the true counts as a method named oracle (the protocol's ceiling)")
    ap.add_argument("--model", help="a TRAIL artefact directory: adds method 'trail' and an explanations section")
    ap.add_argument("--top-n", type=int, default=100,
                    help="explanations are sampled from each cut-off's top N by the TRAIL score (100)")
    ap.add_argument("--cold-days", type=_positive, default=COLD_DAYS,
                    help="cold-start slice: candidates with under this many days of history (28)")
    ap.add_argument("--n-boot", type=int, default=2000,
                    help="paired bootstrap resamples of the test cut-offs for the intervals (2000)")
    ap.add_argument("--explain-sample", type=int, default=50,
                    help="test candidates whose explanations are generated and checked, TRAIL and zero-shot (50)")
    ap.add_argument("--explain-split", choices=("test", "valid"), default="test",
                    help="draw the explanation sample from the test cut-offs (the report) or from the validation "
                         "ones (to choose among adapters or decoding settings without looking at test; no "
                         "zero-shot texts there; the score metrics and intervals stay on the test cut-offs, so a "
                         "choice reads only the report's explanations) (test)")
    ap.add_argument("--explain-temperature", type=_temperature, default=EXPLAIN_TEMPERATURE,
                    help="sampling temperature of the constrained explanations, seeded per item and cut-off as the "
                         f"stream samples; 0: greedy; the unconstrained and zero-shot ones stay greedy "
                         f"({EXPLAIN_TEMPERATURE:g})")
    ap.add_argument("--explain-top-p", type=_top_p, default=EXPLAIN_TOP_P,
                    help=f"nucleus (top-p) cut of that sampling ({EXPLAIN_TOP_P:g})")
    ap.add_argument("--no-tuned", action="store_true",
                    help="skip the baselines tuned on the rolling-origin folds (exp_decay_tuned, gbm_l1, lgbm_rank)")
    ap.add_argument("--seed", type=int, default=0, help="seed of gbm, the bootstrap and the text shuffle (0)")
    ap.add_argument("--threads", type=int, default=2, help="gbm threads (2)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.items and not args.events:
        print("error: --items goes with --events", file=sys.stderr)
        return 2
    settings = load_settings()  # the one environment read: the trend features and TRAIL_CACHE
    try:
        report, stages = run(args.dataset or args.events, args.items, horizon_days=args.horizon_days,
                             period_days=args.period_days, min_history_days=args.min_history_days,
                             test_frac=args.test_frac, valid_frac=args.valid_frac, seed=args.seed,
                             num_threads=args.threads, oracle=args.oracle, progress=sys.stderr.isatty(),
                             model_dir=args.model, top_n=args.top_n, explain_sample=args.explain_sample,
                             cold_days=args.cold_days, n_boot=args.n_boot,
                             explain_temperature=args.explain_temperature, explain_top_p=args.explain_top_p,
                             tuned=not args.no_tuned, explain_split=args.explain_split, config=settings.worker.trend,
                             cache_dir=settings.cache_dir)
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
