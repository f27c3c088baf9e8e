"""The count's range head: 10/50/90% quantiles of log1p(next-period count), with the calendar, and
the drivers of each prediction.

    p     = Linear(LayerNorm(z))                      (item_dim,) the item state, projected
    h     = [x, cal, p, p * sin, p * cos]             the signals + horizon, week of year, the item,
                                                       and the item meeting the calendar
    (m, a, b) = MLP(h);  q50 = m, q10 = m - softplus(a), q90 = m + softplus(b)   (ordered by construction)

x is the main head's normalised input (stream.core.features.Normalisation), cal is
stream.core.features.week_of_year of the cut-off / tick, z the cached LLM item state. It is
trained with the pinball loss at (0.1, 0.5, 0.9) on the training cut-offs; its width (item_dim x hidden,
`RANGE_SHAPES`) and number of epochs are chosen on the rolling-origin folds (trainer.folds: each fold trains
from scratch on its past and is scored on its validation block; the width and epoch count with the best mean
fold pinball loss win), then it is refitted on every pre-test cut-off. The LLM is not touched (item states are
frozen).

Calibration (`calibrate`, stream.core.calibration): the fold heads' validation quantiles at the chosen
epoch count are out-of-fold predictions; conformalised quantile regression sets per horizon (and pooled)
one offset for each bound from the latest fold's rows, aimed at the coverage that, replayed fold by fold
(calibrated on one fold, scored on the next: `choose_nominal`), lands nearest 80%, stored in range_head.json
`calibration`, applied by `calibrated_range` here and by stream.model.count_range online (the same function). `--calibrate-only`
recalibrates an existing head without retraining it. Its controls (the same fit with the item state
replaced) are trainer.controls'.

Drivers: what moved the forecast away from the item's current pace (stream.core.drivers, the one definition
the stream shares): exact Shapley values (stream.core.attribution) of the gap g = q50 - log1p(pace) over
the input groups trend / level (the signals by window, `signal_group`), season (week of year) and text (the
item state), against the steady reference "an average item at an average time": the normalised signals at their
training mean (0) but for the main window's count, set where the model forecasts that item to hold its pace
(g = 0), the calendar at the circle's centre (0, 0), the mean training item state (`z_ref`); the horizon is
held at its value. They add up to the gap (a rise has a driver > 0, a fall one < 0). 2^4 = 16 head
evaluations per prediction, batched. The head has no neighbourhood input, so no "neighbourhood" driver.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import structlog
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stream.core.attribution import DRIVER_GROUPS, signal_group
from stream.core.calibration import (CONTINUOUS, MISS, POOLED, WHOLE, Offsets, RangeCalibration, apply_offsets, coverage,
                                     fit_offsets, horizon_key, whole_bounds, whole_counts)
from stream.core.drivers import PaceDrivers, pace_drivers
from stream.core.features import Normalisation, predicted_count, week_of_year
from trainer.examples import RowLimits

log = structlog.get_logger(__name__)

QUANTILES = (0.1, 0.5, 0.9)
RANGE_STEM = "range_head"
RANGE_FILE = f"{RANGE_STEM}.safetensors"
RANGE_CONFIG = f"{RANGE_STEM}.json"
GROUPS = DRIVER_GROUPS


@dataclass
class RangeConfig:
    n_features: int
    hidden_size: int
    item_dim: int = 16
    hidden: int = 64
    quantiles: tuple[float, ...] = QUANTILES
    feature_names: tuple[str, ...] = ()
    trained: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # stream.core.calibration.RangeCalibration's record


class RangeHead(nn.Module):
    def __init__(self, cfg: RangeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Sequential(nn.LayerNorm(cfg.hidden_size), nn.Linear(cfg.hidden_size, cfg.item_dim))
        n_in = cfg.n_features + 2 + 3 * cfg.item_dim
        self.mlp = nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.hidden, 3))
        self.register_buffer("z_ref", torch.zeros(cfg.hidden_size))  # the drivers' reference item state

    def forward(self, x: torch.Tensor, cal: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, 3) log1p-count quantiles (10%, 50%, 90%), low <= mid <= high."""
        p = self.proj(z)
        h = torch.cat([x, cal, p, p * cal[:, :1], p * cal[:, 1:]], dim=-1)
        o = self.mlp(h)
        mid = o[:, 0]
        return torch.stack([mid - F.softplus(o[:, 1]), mid, mid + F.softplus(o[:, 2])], dim=-1)


def pinball(pred: torch.Tensor, y: torch.Tensor, quantiles=QUANTILES) -> torch.Tensor:
    q = torch.tensor(quantiles, dtype=pred.dtype)
    err = y.unsqueeze(-1) - pred  # (B, 3)
    return torch.maximum(q * err, (q - 1) * err).mean()


@dataclass
class RangeData:
    """Rows as arrays: x (N, S) normalised input, cal (N, 2), item index (N,) into states, y (N,)."""

    x: np.ndarray
    cal: np.ndarray
    item: np.ndarray
    y: np.ndarray
    count: np.ndarray


def range_data(norm: Normalisation, frame: pd.DataFrame, horizon_days: float, item_index: np.ndarray) -> RangeData:
    return RangeData(norm.of_frame(frame, horizon_days), week_of_year(frame["cutoff_ms"].to_numpy(np.int64)),
                     np.asarray(item_index, np.int64), frame["label_log"].to_numpy(np.float32),
                     frame["label_count"].to_numpy(np.float64))


def _tensors(d: RangeData, rows: np.ndarray, states: torch.Tensor):
    return (torch.from_numpy(d.x[rows]), torch.from_numpy(d.cal[rows]), states[torch.from_numpy(d.item[rows])],
            torch.from_numpy(d.y[rows]))


@torch.no_grad()
def predict_range(head: RangeHead, d: RangeData, states: torch.Tensor, batch: int = 8192) -> np.ndarray:
    head.eval()
    out = [head(*_tensors(d, np.arange(a, min(a + batch, len(d.y))), states)[:3]).numpy()
           for a in range(0, len(d.y), batch)]
    return np.concatenate(out) if out else np.zeros((0, 3), np.float32)


def train_epochs(cfg: RangeConfig, d: RangeData, states: torch.Tensor, epochs: int, seed: int, lr: float = 3e-3,
                 batch: int = 1024, valid: RangeData | None = None,
                 valid_preds: list[np.ndarray] | None = None) -> tuple[RangeHead, list[float]]:
    """A fresh head trained `epochs` epochs on d; the validation pinball loss after each (with `valid`),
    and its validation quantiles after each appended to `valid_preds` (the calibration's out-of-fold rows)."""
    torch.manual_seed(seed)
    head = RangeHead(cfg)
    head.z_ref.copy_(states[torch.from_numpy(np.unique(d.item))].mean(dim=0))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        head.train()
        for rows in torch.randperm(len(d.y), generator=gen).split(batch):
            x, cal, z, y = _tensors(d, rows.numpy(), states)
            loss = pinball(head(x, cal, z), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for g in opt.param_groups:
            g["lr"] *= 0.8
        if valid is not None:
            q = predict_range(head, valid, states)
            history.append(float(pinball(torch.from_numpy(q), torch.from_numpy(valid.y))))
            if valid_preds is not None:
                valid_preds.append(q)
    return head, history


# The head widths (item_dim, hidden) phase 4 chooses among on the folds, and the most epochs. Probed on v12's
# item states (scripts/probe_range_width.py; docs/evaluation.md "Shipped v13"), the folds' best mean pinball:
# 16x64 0.1324 at 8 epochs, the cap v7-v12 trained under (0.1317 at 10 of 16), 32x128 0.1276, 32x256 0.1273,
# 64x128 0.1311, 64x256 0.1284: the narrow head had been kept by its epoch cap, not chosen by the folds.
RANGE_SHAPES: tuple[tuple[int, int], ...] = ((16, 64), (32, 128), (32, 256))
RANGE_EPOCHS = 16


def fold_curves(cfg: RangeConfig, folds: list[tuple[RangeData, RangeData]], states: torch.Tensor, max_epochs: int,
                seed: int, lr: float, batch: int) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Each fold's fresh head trained `max_epochs` on its past: the mean validation pinball after each epoch
    (over the folds), and each fold's validation quantiles after each epoch."""
    curves, preds = [], []
    for i, (tr, va) in enumerate(folds):
        preds.append([])
        _, hist = train_epochs(cfg, tr, states, max_epochs, seed, lr, batch=batch, valid=va, valid_preds=preds[-1])
        curves.append(hist)
        log.info("range.fold", fold=i, item_dim=cfg.item_dim, hidden=cfg.hidden, pinball=[round(h, 5) for h in hist])
    return np.mean(np.array(curves), axis=0), preds


def fit_range(cfg: RangeConfig, folds: list[tuple[RangeData, RangeData]], full: RangeData, states: np.ndarray,
              max_epochs: int = RANGE_EPOCHS, seed: int = 0, batch: int = 1024,
              oof: list[np.ndarray] | None = None, lr: float = 3e-3,
              shapes: Sequence[tuple[int, int]] | None = None) -> tuple[RangeHead, dict]:
    """The width (`shapes`: (item_dim, hidden) pairs; None: cfg's own) and the epoch count chosen on the folds
    (the lowest mean validation pinball over every shape and epoch), then refitted on `full` (every pre-test
    row). `oof` receives each fold's validation quantiles of the chosen shape at the chosen epoch count (what
    `calibrate` reads)."""
    t0 = time.time()
    st = torch.from_numpy(np.asarray(states, np.float32))
    tried = []
    for item_dim, hidden in shapes or [(cfg.item_dim, cfg.hidden)]:
        shaped = replace(cfg, item_dim=item_dim, hidden=hidden, trained={}, calibration={})
        mean, preds = fold_curves(shaped, folds, st, max_epochs, seed, lr, batch)
        tried.append((float(mean.min()), int(np.argmin(mean)) + 1, shaped, mean, preds))
    _, epochs, cfg, mean, preds = min(tried, key=lambda t: t[0])
    if oof is not None:
        oof.extend(p[epochs - 1] for p in preds)
    head, _ = train_epochs(cfg, full, st, epochs, seed, lr, batch=batch)
    report = {"epochs": epochs, "item_dim": cfg.item_dim, "hidden": cfg.hidden, "max_epochs": max_epochs,
              "folds_pinball_by_epoch": [round(float(v), 5) for v in mean],
              "rows": int(len(full.y)), "minutes": round((time.time() - t0) / 60, 2)}
    if shapes:
        report["shapes"] = [{"item_dim": c.item_dim, "hidden": c.hidden, "epochs": e, "folds_pinball": round(b, 5)}
                            for b, e, c, _, _ in tried]
    head.cfg.trained = report
    log.info("range.fit", **{k: v for k, v in report.items() if k not in ("folds_pinball_by_epoch", "shapes")})
    return head, report


def save_range(head: RangeHead, directory: Path, stem: str = RANGE_STEM, extra: dict | None = None) -> None:
    """DIR/<stem>.safetensors and DIR/<stem>.json (the config, and `extra`'s keys beside it)."""
    directory = Path(directory)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(asdict(head.cfg) | (extra or {}), indent=2) + "\n")


def read_range(directory: str | Path, stem: str = RANGE_STEM) -> tuple[RangeHead, dict] | None:
    """The head saved by `save_range` (in eval mode) and the JSON's keys that are not its config (`extra`), or
    None when DIR has no <stem>.safetensors."""
    directory = Path(directory)
    if not (directory / f"{stem}.safetensors").is_file():
        return None
    raw = json.loads((directory / f"{stem}.json").read_text())
    known = {f.name for f in fields(RangeConfig)}
    cfg = {k: v for k, v in raw.items() if k in known}
    head = RangeHead(RangeConfig(**(cfg | {"quantiles": tuple(cfg["quantiles"]),
                                           "feature_names": tuple(cfg["feature_names"])})))
    head.load_state_dict(load_file(str(directory / f"{stem}.safetensors")))
    return head.eval(), {k: v for k, v in raw.items() if k not in known}


def load_range(directory: str | Path) -> RangeHead | None:
    """The artefact's range head, or None when it has none (older artefacts). One without a calibration
    record (before calibration was added) loads with offsets 0 (`calibrated_range`)."""
    got = read_range(directory)
    if got is None:
        return None
    head, extra = got
    if extra:  # the artefact's head has its config alone
        raise ValueError(f"{directory}/{RANGE_CONFIG} has keys a range head's config does not: {sorted(extra)}")
    if not RangeCalibration.of(head.cfg.calibration).calibrated:
        log.info("range.uncalibrated", directory=str(directory), why="no calibration record: offsets 0")
    return head


def predict_frame(head: RangeHead, norm: Normalisation, frame: pd.DataFrame, horizon_days: float,
                  states_of: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """(N, 3) raw log1p quantiles of the frame's rows, each item's state from `states_of(its item texts)`."""
    from trainer.inference import item_texts_of

    index, texts = item_texts_of(frame)
    return predict_range(head, range_data(norm, frame, horizon_days, index), torch.from_numpy(states_of(texts)))


def calibrated_range(head: RangeHead, q: np.ndarray, horizon_days: float) -> np.ndarray:
    """The head's raw (N, 3) log1p quantiles -> the published range at this horizon (stream.core.calibration:
    the same `apply_offsets` and offsets the stream uses; the median unchanged)."""
    return apply_offsets(q, RangeCalibration.of(head.cfg.calibration).offsets(horizon_days))


CALIBRATION_FOLDS = 1  # the latest fold(s) whose out-of-fold rows choose the offsets
TARGET = 1.0 - 2 * MISS  # the published range's aimed coverage: 80%
# the coverage the offsets aim at on the latest fold, one chosen per horizon by the backtest (`choose_nominal`)
NOMINALS = tuple(round(0.70 + 0.02 * i, 2) for i in range(11))  # 0.70 ... 0.90


def backtest(q: np.ndarray, y: np.ndarray, fold: np.ndarray, nominal: float, whole: bool = False) -> list[float]:
    """Coverage on fold k of the offsets fitted at `nominal` on fold k - 1, for each fold k >= 1: what the
    final head's range, calibrated on the latest fold, does on the test block that follows it, replayed on
    the folds alone."""
    out = []
    for k in sorted(set(fold.tolist()))[1:]:
        prev, this = fold == k - 1, fold == k
        if not prev.any() or not this.any():
            continue
        r = fit_offsets(q[prev], y[prev], (1.0 - nominal) / 2, whole)
        out.append(coverage(apply_offsets(q[this], Offsets(r["low"], r["high"], "", whole)), y[this])["inside"])
    return out


def choose_nominal(q: np.ndarray, y: np.ndarray, fold: np.ndarray, target: float = TARGET,
                   nominals: tuple[float, ...] = NOMINALS, whole: bool = False) -> tuple[float, dict[str, float]]:
    """The aimed coverage whose backtested coverage (mean over the fold pairs, `backtest`) comes nearest the
    target, the smallest on a tie; the target itself when there is no pair to backtest (one fold).

    Why: a range calibrated to 80% on one block covers the next one less when the head grows more confident
    over time than the data deserves (ML-100K's folds: raw coverage 0.71, 0.79, 0.64, 0.58; its test rows
    got 0.733 from offsets aimed at 0.80), more when the next block is calmer. Aiming higher or lower by what
    the folds' own succession shows corrects that without looking at a test cut-off."""
    means = {}
    for n in nominals:
        got = backtest(q, y, fold, n, whole)
        if not got:
            return target, {}
        means[f"{n:.2f}"] = round(float(np.mean(got)), 4)
    best = min(nominals, key=lambda n: (abs(means[f"{n:.2f}"] - target), n))
    return best, means


def calibrate(oof: list[np.ndarray], folds: list[tuple[RangeData, RangeData]], horizons: np.ndarray,
              sources: np.ndarray, last: int = CALIBRATION_FOLDS) -> dict:
    """The calibration record from the folds' out-of-fold quantiles (`oof`, one per fold, aligned with its
    validation rows; `horizons` in days and `sources` (dataset names) per validation row of every fold,
    concatenated): CQR offsets per horizon and pooled over every horizon, chosen on the `last` folds' rows, at
    the aimed coverage the backtest over consecutive folds chooses for that horizon (`choose_nominal`).

    Why the latest fold only: its head is the nearest to the final one (trained on the most cut-offs, ~88% of
    the refit's rows on the shipped data, and the latest season), while the earlier folds' heads had not seen the
    season their block falls in (retail's Aug–Nov 2010 and Nov 2010–Feb 2011 blocks, trained on less than a year:
    their raw 80% ranges held 0.68 and 0.60): calibrated on every fold, the final head's range over-covered
    retail's test rows (0.87). Backtested on the folds alone (offsets of the folds before fold k, scored on fold k),
    the previous fold alone came nearer 0.80 than all previous folds together on retail (mean |coverage - 0.8| 0.094
    against 0.104) and about as near on ML-100K (0.033 against 0.030). Every fold's raw coverage is recorded."""
    q = np.concatenate(oof).astype(np.float64)
    counts = np.concatenate([va.count for _, va in folds]).astype(np.float64)
    whole = whole_counts(counts)  # events are whole: so are the bounds (stream.core.calibration)
    # whole bounds sit exactly on a count: y as log1p of it in float64 (`RangeData.y` is float32)
    y = np.log1p(counts) if whole else np.concatenate([va.y for _, va in folds]).astype(np.float64)
    fold = np.concatenate([np.full(len(p), i) for i, p in enumerate(oof)])
    used = fold >= len(oof) - last
    record: dict = {"method": "cqr", "counts": WHOLE if whole else CONTINUOUS, "target": TARGET, "folds": len(folds),
                    "folds_used": sorted(set(range(len(oof))[-last:])), "by_horizon": {}}

    def fit(rows: np.ndarray) -> dict:
        by_fold = [round(coverage(q[rows & (fold == i)], y[rows & (fold == i)])["inside"], 4)
                   for i in range(len(oof)) if (rows & (fold == i)).any()]
        nominal, tried = choose_nominal(q[rows], y[rows], fold[rows], whole=whole)
        miss = (1.0 - nominal) / 2
        return fit_offsets(q[rows & used], y[rows & used], miss, whole) | {
            "nominal": nominal, "miss_each_side": round(miss, 4), "backtest_inside_by_nominal": tried,
            "fold_inside_raw_by_fold": by_fold}

    for h in np.unique(horizons):
        rows = horizons == h
        record["by_horizon"][horizon_key(h)] = fit(rows) | {"datasets": sorted(set(sources[rows].tolist()))}
    record[POOLED] = fit(np.ones(len(y), bool))
    for key, r in [*record["by_horizon"].items(), (POOLED, record[POOLED])]:
        log.info("range.calibration", horizon=key, nominal=r["nominal"], low=r["low"], high=r["high"], rows=r["rows"],
                 fold_inside_before=r["fold_coverage_before"]["inside"],
                 fold_inside_after=r["fold_coverage_after"]["inside"], by_fold=r["fold_inside_raw_by_fold"],
                 backtest=r["backtest_inside_by_nominal"])
    return record


def counts_of(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, mid, high) counts from (N, 3) log1p quantiles (clipped like every predicted count; whole-count
    bounds read back whole)."""
    return whole_bounds(predicted_count(q[:, 0])), predicted_count(q[:, 1]), whole_bounds(predicted_count(q[:, 2]))


def interval_metrics(low: np.ndarray, high: np.ndarray, actual: np.ndarray) -> dict[str, float | None]:
    """`interval_coverage`: share of rows whose realised count lies in [low, high];
    `interval_coverage_rounded`: the same with the range rounded outward to whole counts (as a text states it);
    `interval_width`: median of (high + 1) / (low + 1) (the ratio on counts + 1: a low of 0 is common)."""
    if not len(actual):
        return {"interval_coverage": None, "interval_coverage_rounded": None, "interval_width": None}
    inside = (actual >= low) & (actual <= high)
    rounded = (actual >= np.floor(low + 1e-9)) & (actual <= np.ceil(high - 1e-9))
    return {"interval_coverage": float(inside.mean()), "interval_coverage_rounded": float(rounded.mean()),
            "interval_width": float(np.median((high + 1) / (low + 1)))}


def head_median(head: RangeHead) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The torch head's median log1p(count) as stream.core.drivers reads a model: numpy in, numpy out."""

    @torch.no_grad()
    def median(x: np.ndarray, cal: np.ndarray, z: np.ndarray) -> np.ndarray:
        return head(torch.from_numpy(x), torch.from_numpy(cal), torch.from_numpy(z))[:, 1].numpy()

    return median


def pace_drivers_of(head: RangeHead, norm: Normalisation, x: np.ndarray, cal: np.ndarray, z: np.ndarray) -> PaceDrivers:
    """The drivers of each row with their gap and baseline (stream.core.drivers.pace_drivers, the torch head)."""
    if tuple(head.cfg.feature_names) != tuple(norm.names):
        raise ValueError(f"the range head reads {list(head.cfg.feature_names)}, the normalisation {list(norm.names)}")
    head.eval()
    return pace_drivers(head_median(head), norm, x, cal, z, head.z_ref.numpy())


def drivers(head: RangeHead, x: np.ndarray, cal: np.ndarray, z: np.ndarray,
            norm: Normalisation) -> dict[str, np.ndarray]:
    """Exact group Shapley values of the forecast's gap from the item's pace over GROUPS for each row (see the
    module doc); the stream computes the same with the ONNX head (stream.model.count_range)."""
    return pace_drivers_of(head, norm, x, cal, z).phi


# ---- CLI: python -m trainer.quantiles --model DIR [--dataset retail,ml100k] [--out DIR2] [--calibrate-only] ----

def dataset_examples(name: str, items: str | None, config, cache_dir: Path):
    """The examples phase 4 reads of one dataset or event log (the built-in protocol, or the one a log's span
    gives, trainer.protocol.choose_protocol)."""
    from trainer.protocol import DEFAULT_MIN_HISTORY_DAYS, choose_protocol, is_builtin
    from trainer.examples import build_examples
    from stream.core.datasets import load_dataset

    ds = load_dataset(name, items, cache_dir=cache_dir)
    if is_builtin(name):
        proto = {"min_history_days": DEFAULT_MIN_HISTORY_DAYS}
    else:
        ts = ds.events["ts"].to_numpy(np.int64)
        proto = choose_protocol(int(ts[0]), int(ts[-1]), config.bucket_ms)
        proto.pop("n_cutoffs")
    return build_examples(ds, config, **proto)


def _dataset_rows(model, name: str, items: str | None, config, cache_dir: Path, limits: RowLimits = RowLimits()):
    """(examples, folds, pre-test frame, its item index, its item texts, item states) of one dataset, the frame cut
    to `limits` (the fit's --max-* slice, as its score head read it)."""
    from trainer.examples import split_cutoffs
    from trainer.folds import make_folds
    from trainer.inference import item_texts_of

    ex = dataset_examples(name, items, config, cache_dir)
    split = split_cutoffs(ex.cutoffs, ex.horizon_ms)
    folds = make_folds(split, ex.horizon_ms)
    pre = pd.concat(limits.apply(ex.rows(split.train), ex.rows(split.valid)), ignore_index=True)
    index, texts = item_texts_of(pre)
    return ex, folds, pre, index, texts, model.item_states(texts, progress=False)


@dataclass
class RangeRows:
    """Every dataset's rows for the range head: the pooled folds, all pre-test rows, the item states, and per
    validation row of the folds (concatenated in fold order) its horizon in days and dataset."""

    folds: list[tuple[RangeData, RangeData]]
    full: RangeData
    states: np.ndarray
    valid_horizon: np.ndarray
    valid_source: np.ndarray
    texts: list[str]  # the item text of each row of `states`
    every_text: list[str]  # every item text of the datasets' examples, test cut-offs included (the bow control's)


def _range_rows(model, names: list[str], items: str | None, cache_dir: Path,
                limits: RowLimits = RowLimits()) -> RangeRows:
    from stream.core.trends import TrendConfig
    from trainer.inference import item_texts_of

    config = TrendConfig()
    fold_parts: list[list[tuple[RangeData, RangeData]]] = []
    full_parts, all_states, horizons, offset = [], [], [], 0
    all_texts: list[str] = []
    every: set[str] = set()
    for name in names:
        ex, folds, pre, index, texts, states = _dataset_rows(model, name, items, config, cache_dir, limits)
        all_texts += texts
        every.update(item_texts_of(ex.frame)[1])
        horizon = ex.horizon_ms / 86_400_000
        cut = pre["cutoff_ms"].to_numpy(np.int64)

        def part(mask: np.ndarray) -> RangeData:
            return range_data(model.norm, pre[mask].reset_index(drop=True), horizon, index[mask] + offset)

        full_parts.append(part(np.ones(len(pre), bool)))
        fold_parts.append([(part(np.isin(cut, f.train)), part(np.isin(cut, f.valid))) for f in folds])
        all_states.append(states)
        horizons.append(horizon)
        offset += len(states)
    n_folds = min(len(f) for f in fold_parts)
    cat = lambda ds: RangeData(*(np.concatenate([getattr(d, k) for d in ds])  # noqa: E731
                                 for k in ("x", "cal", "item", "y", "count")))
    # a fold with no rows on either side (a --max-* slice keeps a few cut-offs) has nothing to choose by
    kept = [i for i in range(n_folds)
            if all(sum(len(fp[-n_folds + i][side].y) for fp in fold_parts) for side in (0, 1))]
    if not kept:
        raise ValueError(f"{', '.join(names)}: no validation fold has rows on both sides for the range head "
                         f"(--max-train-cutoffs / --max-valid-cutoffs keep too few cut-offs; raise them, or fit "
                         f"without it: --no-range-head)")
    folds = [(cat([fp[-n_folds + i][0] for fp in fold_parts]), cat([fp[-n_folds + i][1] for fp in fold_parts]))
             for i in kept]
    sizes = [[len(fp[-n_folds + i][1].y) for fp in fold_parts] for i in kept]
    valid_horizon = np.concatenate([np.repeat(horizons, s) for s in sizes])
    valid_source = np.concatenate([np.repeat(np.array(names, dtype=object), s) for s in sizes])
    return RangeRows(folds, cat(full_parts), np.concatenate(all_states), valid_horizon, valid_source, all_texts,
                     sorted(every))


def _load_model(model_dir: str, cache_dir: Path):
    from stream.core.trends import TrendConfig
    from trainer.model import load

    model, manifest = load(model_dir, cache_dir=cache_dir)
    if manifest.feature_spec != TrendConfig().spec():
        raise ValueError(f"{model_dir} was trained on other trend features than these")
    return model


def _target(model_dir: str, out: str | None) -> Path:
    import shutil

    target = Path(out or model_dir)
    if out and Path(out).resolve() != Path(model_dir).resolve():
        shutil.copytree(model_dir, target, dirs_exist_ok=True)
    return target


def train_range(model_dir: str, names: list[str], items: str | None = None, out: str | None = None,
                max_epochs: int = RANGE_EPOCHS, seed: int = 0, limits: RowLimits = RowLimits(),
                shapes: Sequence[tuple[int, int]] = RANGE_SHAPES, *, cache_dir: Path) -> dict:
    """Train the range head of the artefact at `model_dir` on cached item states (under `cache_dir`,
    `Settings.cache_dir`, with the base model and the parsed datasets), calibrate it on the folds'
    out-of-fold predictions (`calibrate`), and save it into `out`."""
    model = _load_model(model_dir, cache_dir)
    rows = _range_rows(model, names, items, cache_dir, limits)
    cfg = RangeConfig(n_features=len(model.norm.names), hidden_size=int(model.lm.config.hidden_size),
                      feature_names=tuple(model.norm.names))
    oof: list[np.ndarray] = []
    head, report = fit_range(cfg, rows.folds, rows.full, rows.states, max_epochs=max_epochs, seed=seed, oof=oof,
                             shapes=shapes)
    report |= {"datasets": names, "folds": len(rows.folds), "model_dir": str(model_dir), "seed": seed}
    if limits != RowLimits():
        report["limits"] = asdict(limits)
    head.cfg.trained = report
    head.cfg.calibration = calibrate(oof, rows.folds, rows.valid_horizon, rows.valid_source)
    save_range(head, _target(model_dir, out))
    return report | {"calibration": head.cfg.calibration}


def calibrate_only(model_dir: str, names: list[str], items: str | None = None, out: str | None = None,
                   seed: int | None = None, *, cache_dir: Path) -> dict:
    """Calibrate the artefact's existing range head without retraining it: each fold's head is trained again
    from scratch for the head's own epoch count (recorded in range_head.json `trained`; same seed, same folds,
    so the same out-of-fold predictions its training saw), and only range_head.json's `calibration` changes."""
    head = load_range(model_dir)
    if head is None:
        raise FileNotFoundError(f"{model_dir}: no range head to calibrate (train one: python -m trainer.quantiles "
                                f"--model {model_dir})")
    model = _load_model(model_dir, cache_dir)
    if tuple(head.cfg.feature_names) != tuple(model.norm.names):
        raise ValueError(f"{model_dir}: the range head reads other inputs than the model ({head.cfg.feature_names})")
    epochs = int(head.cfg.trained.get("epochs", 0))
    if epochs < 1:
        raise ValueError(f"{model_dir}/{RANGE_CONFIG} records no epoch count (trained.epochs)")
    seed = int(head.cfg.trained.get("seed", 0)) if seed is None else seed
    rows = _range_rows(model, names, items, cache_dir)
    st = torch.from_numpy(np.asarray(rows.states, np.float32))
    cfg = RangeConfig(**{**asdict(head.cfg), "trained": {}, "calibration": {}})
    oof = []
    for i, (tr, va) in enumerate(rows.folds):
        fold_head, _ = train_epochs(cfg, tr, st, epochs, seed)
        oof.append(predict_range(fold_head, va, st))
        log.info("range.fold", fold=i, epochs=epochs, rows=len(va.y))
    head.cfg.calibration = calibrate(oof, rows.folds, rows.valid_horizon, rows.valid_source) | {
        "calibrate_only": {"datasets": names, "epochs": epochs, "seed": seed}}
    (_target(model_dir, out) / RANGE_CONFIG).write_text(json.dumps(asdict(head.cfg), indent=2) + "\n")  # weights kept
    return {"calibration": head.cfg.calibration}


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'16x64,32x128' -> ((16, 64), (32, 128)): the --shapes of trainer.quantiles and trainer.fit."""
    import argparse

    try:
        shapes = tuple((int(a), int(b)) for a, b in (part.strip().lower().split("x") for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ITEM_DIMxHIDDEN pairs, e.g. 16x64,32x128") from None
    if not shapes or min(min(s) for s in shapes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: widths must be positive")
    return shapes


def add_fit_arguments(ap) -> None:
    """--items, --max-epochs, --shapes, --seed: how a range head is fitted (here, and its controls in
    trainer.controls)."""
    ap.add_argument("--items", help="item table for an event log")
    ap.add_argument("--max-epochs", type=int, default=RANGE_EPOCHS, help="most epochs (the count chosen on the folds)")
    ap.add_argument("--shapes", type=parse_shapes, default=RANGE_SHAPES,
                    help="head widths to choose among on the folds, ITEM_DIMxHIDDEN comma-separated (default: "
                         + ",".join(f"{a}x{b}" for a, b in RANGE_SHAPES) + ")")
    ap.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainer.quantiles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a TRAIL artefact directory (its item states are reused)")
    ap.add_argument("--dataset", default="retail,ml100k", help="comma-separated datasets or one event log")
    ap.add_argument("--out", help="write the artefact with its range head here (default: into --model)")
    add_fit_arguments(ap)
    ap.add_argument("--calibrate-only", action="store_true",
                    help="keep the range head's weights; recompute its fold predictions and write its calibration")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.dataset.split(",") if n.strip()]
    from stream.settings import load_settings

    cache_dir = load_settings().cache_dir  # the one environment read: TRAIL_CACHE
    if args.calibrate_only:
        report = calibrate_only(args.model, names, args.items, args.out, cache_dir=cache_dir)
    else:
        report = train_range(args.model, names, args.items, args.out, args.max_epochs, args.seed,
                             shapes=args.shapes, cache_dir=cache_dir)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
