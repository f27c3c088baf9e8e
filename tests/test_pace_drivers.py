"""The drivers attribute the forecast's gap from the item's own pace (stream.core.drivers): the pace they read
back from the head's input is the forecast's pace, they add up to the gap, every rise or fall of the shipped
model has a driver its way, the stream's ONNX head and the trainer's torch head give the same drivers, and a
head with no steady reference says what is left (`baseline`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from stream.core.attribution import DRIVER_GROUPS, group_shapley
from stream.core.drivers import PaceGap, pace_drivers
from stream.core.faithfulness.grammar import top_driver
from stream.core.features import HORIZON, Normalisation, predicted_count
from stream.core.forecast import outlook, pace
from trainer.quantiles import RangeConfig, RangeHead, drivers, head_median, load_range, pace_drivers_of

from serving_artefact import COMMITTED

SIGNALS = ("count_1d", "prev_count_1d", "count_7d", "velocity_7d", "ema", "count_28d", "total_count", "age_h")
NAMES = SIGNALS + (HORIZON,)
NORM = Normalisation(NAMES, (0.3, 0.3, 1.0, 0.0, 0.8, 2.0, 3.7, 8.0, 1.9),
                     (0.5, 0.5, 0.9, 1.1, 0.7, 1.0, 1.5, 1.0, 0.3))


def raw_rows(norm: Normalisation, n: int, horizon: float, seed: int) -> np.ndarray:
    """(n, S-1) raw signals a stream could compute: whole non-negative counts, spread like the training rows."""
    rng = np.random.default_rng(seed)
    raw = norm.invert(rng.normal(size=(n, len(norm.names))))[:, :-1]
    return np.abs(raw).round()


def test_the_pace_read_back_from_the_input_is_the_forecasts_pace():
    gap = PaceGap(NORM)
    for horizon in (1.0, 3.0, 7.0, 28.0):  # main windows 1d, 1d, 7d, 28d (28d: a level input)
        raw = raw_rows(NORM, 50, horizon, seed=int(horizon))
        x = NORM.apply(NORM.with_horizon(raw, horizon))
        np.testing.assert_allclose(NORM.invert(x)[:, :-1], raw, rtol=2e-5, atol=2e-5)  # invert undoes apply
        np.testing.assert_array_equal(gap.horizons(x), horizon)
        want = np.log1p([pace(dict(zip(SIGNALS, r)), horizon) for r in raw])
        np.testing.assert_allclose(gap.log_pace(x), want, atol=2e-5)


@pytest.fixture(scope="module")
def shipped():
    """The committed model's range head and normalisation, and 300 of its real retail item states."""
    if not (COMMITTED / "range_head.safetensors").is_file():
        pytest.skip("the committed artefact has no range head")
    head = load_range(COMMITTED)
    norm = Normalisation.from_dict(json.loads((COMMITTED / "manifest.json").read_text())["normalisation"])
    states = np.load(COMMITTED / "item_states" / "retail.npz")["states"][:300].astype(np.float32)
    return head, norm, states


def rows_of(norm: Normalisation, states: np.ndarray, horizon: float, n: int, seed: int):
    raw = raw_rows(norm, n, horizon, seed)
    x = norm.apply(norm.with_horizon(raw, horizon))
    rng = np.random.default_rng(seed + 1)
    angle = rng.uniform(0, 2 * np.pi, n)
    cal = np.stack([np.sin(angle), np.cos(angle)], 1).astype(np.float32)
    return raw, x, cal, states[rng.integers(0, len(states), n)]


@pytest.mark.parametrize("horizon", [7.0, 3.0])  # retail's and ML-100K's
def test_every_rise_or_fall_of_the_shipped_model_has_a_driver_its_way(shipped, horizon):
    head, norm, states = shipped
    raw, x, cal, z = rows_of(norm, states, horizon, 300, seed=int(horizon))
    got = pace_drivers_of(head, norm, x, cal, z)
    np.testing.assert_allclose(got.baseline, 0.0, atol=1e-5)  # the steady reference: no gap of its own
    with torch.no_grad():
        q50 = head(torch.from_numpy(x), torch.from_numpy(cal), torch.from_numpy(z))[:, 1].numpy().astype(np.float64)
    paces = np.array([pace(dict(zip(norm.signal_names, r)), horizon) for r in raw])
    # efficiency: they add up to the median's gap from the pace the forecast's direction reads
    np.testing.assert_allclose(got.matrix().sum(1), q50 - np.log1p(paces), atol=1e-4)
    ways = [outlook(c, p) for c, p in zip(predicted_count(q50), paces)]
    movers = [i for i, w in enumerate(ways) if w != "steady"]
    assert sum(w == "rise" for w in ways) >= 10 and sum(w == "fall" for w in ways) >= 10
    for i in movers:
        d = {g: float(got.phi[g][i]) for g in DRIVER_GROUPS}
        top = top_driver(d, ways[i])
        assert top is not None, (ways[i], d)
        assert (d[top] > 0) == (ways[i] == "rise")
    # the drivers of the median's level (against the average item) leave movers with no driver their way
    groups = PaceGap(norm)
    inputs = {"trend": x[:, groups.cols["trend"]], "level": x[:, groups.cols["level"]], "season": cal, "text": z}
    reference = {"trend": np.zeros(len(groups.cols["trend"]), np.float32),
                 "level": np.zeros(len(groups.cols["level"]), np.float32), "season": np.zeros(2, np.float32),
                 "text": head.z_ref.numpy()}

    def median(batch):
        xb = np.empty((len(batch["trend"]), len(norm.names)), np.float32)
        xb[:, groups.cols["trend"]], xb[:, groups.cols["level"]] = batch["trend"], batch["level"]
        xb[:, groups.fixed] = batch["fixed"]
        return head_median(head)(xb, batch["season"], batch["text"])

    old, _, _ = group_shapley(median, inputs, reference, fixed={"fixed": x[:, groups.fixed]})
    lacking = sum(top_driver({g: float(old[g][i]) for g in DRIVER_GROUPS}, ways[i]) is None for i in movers)
    assert lacking > 0


def test_the_stream_and_the_trainer_give_the_shipped_heads_drivers(shipped, tmp_path):
    from export.range import export_range
    from stream.model.count_range import CountRange

    head, norm, states = shipped
    for name in ("range_head.safetensors", "range_head.json"):
        shutil.copy(COMMITTED / name, tmp_path / name)
    export_range(tmp_path)
    served = CountRange.open(tmp_path, norm)
    _, x, _, z = rows_of(norm, states, 7.0, 64, seed=5)
    tick = 1_323_648_000_000  # 2011-12-12: the stream's calendar input for every row of the tick
    online = served(tick, x, z)
    from stream.core.features import week_of_year

    cal = np.repeat(week_of_year(tick), len(x), axis=0)
    offline = drivers(head, x, cal, z, norm)
    np.testing.assert_allclose(online.drivers, np.stack([offline[g] for g in DRIVER_GROUPS], 1), atol=1e-4)
    assert np.abs(online.drivers).max() > 0.05


def test_a_head_with_no_steady_count_reports_its_baseline():
    torch.manual_seed(0)
    head = RangeHead(RangeConfig(n_features=len(NAMES), hidden_size=4, item_dim=2, hidden=8, feature_names=NAMES))
    with torch.no_grad():  # a median of 50 (e^50 events) whatever the input: above every pace it searches
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    raw = raw_rows(NORM, 20, 7.0, seed=3)
    x = NORM.apply(NORM.with_horizon(raw, 7.0))
    cal = np.zeros((20, 2), np.float32)
    z = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    got = pace_drivers_of(head, NORM, x, cal, z)
    log_pace = np.log1p([pace(dict(zip(SIGNALS, r)), 7.0) for r in raw])
    np.testing.assert_allclose(got.gap, 50.0 - log_pace, atol=1e-4)
    # the reference keeps the count with the smallest gap (the search's top, e^14 events in 7 days): not steady
    np.testing.assert_allclose(got.baseline, 50.0 - 14.0, atol=1e-3)
    np.testing.assert_allclose(got.matrix().sum(1), got.gap - got.baseline, atol=1e-4)
    # the pace's count is a trend input: only the trend group moved the gap
    np.testing.assert_allclose(got.phi["trend"], got.gap - got.baseline, atol=1e-4)
    for g in ("level", "season", "text"):
        np.testing.assert_allclose(got.phi[g], 0.0, atol=1e-5)
    empty = pace_drivers(head_median(head), NORM, x[:0], cal[:0], z[:0], head.z_ref.numpy())
    assert empty.matrix().shape == (0, len(DRIVER_GROUPS))
