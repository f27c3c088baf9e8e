"""Real rows for the explanation checks and benchmarks: prompts of real items, as the stream meets them.

`explain_rows` (export.bench's explanation speed, export.nbits' parity prompts) and `bench_size`, the
forecast each such row is explained with. Its own module so that export.onnx -> export.nbits and
export.bench -> export.onnx import no circle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream.core.trends import TrendConfig


def explain_rows(manifest: dict, n: int, seed: int = 0, events: str | None = None, items: str | None = None,
                 *, cache_dir: Path) -> list[tuple[str, dict[str, float], float]]:
    """(prompt, signals, horizon_days) of real items at each dataset's last cut-off: the busiest half and a
    random rest, as the stream would meet them (no torch: the prompt and the signals are all generation needs)."""
    from stream.core.datasets import load_dataset
    from trainer.examples import build_examples
    from trainer.inference import prompts_of

    trend = TrendConfig.from_spec(manifest["feature_spec"])
    if events:
        loaded = [(load_dataset(events, items, cache_dir=cache_dir),
                   float(next(iter(manifest["horizon_days"].values()), 7.0)))]
    else:
        loaded = [(load_dataset(name, cache_dir=cache_dir), float(manifest["horizon_days"].get(name, 7.0)))
                  for name in manifest["datasets"]]
    per = max(2, n // len(loaded))
    rng = np.random.default_rng(seed)
    out = []
    for ds, horizon in loaded:
        ex = build_examples(ds, trend, horizon_days=horizon)
        rows = ex.rows(ex.cutoffs[-1:])
        names = list(trend.signal_names) if hasattr(trend, "signal_names") else [
            c for c in rows.columns if c.split("_")[0] in ("count", "prev", "users", "velocity", "accel")
            or c in ("ema", "total_count", "age_h", "idle_h")]
        busy = rows[[c for c in names if c.startswith("count_")]].to_numpy(np.float64).sum(axis=1)
        order = np.argsort(-busy, kind="stable")
        top = order[: per // 2]
        rest = rng.choice(order[per // 2 :], size=min(per - len(top), len(order) - len(top)), replace=False)
        pick = rows.iloc[np.concatenate([top, rest])].reset_index(drop=True)
        signals = [dict(zip(names, r)) for r in pick[names].to_numpy(np.float64).tolist()]
        sizes = [bench_size(len(out) + j, s, horizon) for j, s in enumerate(signals)]
        out += [(p, s, horizon) for p, s in zip(prompts_of(pick, names, horizon, forecasts=sizes), signals)]
    return out


def bench_size(i: int, signals: dict[str, float], horizon: float):
    """The forecast the bench's row i is explained with (its prompt shows it, its grammar states it): each item's
    rise / steady / fall in turn (speed does not depend on which; the stream forces the score's direction), with
    a predicted count that gives it (1.6 / 1.0 / 0.4 x the pace) and an 80% range (0.7-1.4 x)."""
    from stream.core.forecast import OUTLOOKS, PredictedCount, pace

    count = max(pace(signals, horizon), 1.0) * {"rise": 1.6, "steady": 1.0, "fall": 0.4}[OUTLOOKS[i % 3]]
    return PredictedCount(count, horizon, 0.7 * count, 1.4 * count)
