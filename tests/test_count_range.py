"""The range head in the stream: its ONNX export at several shapes, the same range and drivers online as
offline, and the range and drivers carried through the ranking topic into the prediction records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from export.range import PARITY_FILE, export_range
from stream.core.attribution import DRIVER_GROUPS
from stream.core.drivers import PaceGap
from stream.core.features import HORIZON, Normalisation, predicted_count, week_of_year
from stream.core.forecast import pace
from stream.model.artefact import ONNX_DIR, ArtefactError
from stream.model.count_range import CountRange
from stream.serving.scorer import ScoredChunk, ScoredPart, rank_tick
from trainer.quantiles import RangeConfig, RangeHead, drivers, head_median, predict_range, save_range, RangeData

NAMES = ("count_7d", "velocity_7d", "count_28d", "total_count", HORIZON)
# the score head's normalisation (the manifest's): the drivers read each row's pace back through it
NORM = Normalisation(NAMES, (1.5, 0.0, 2.5, 3.5, 2.0), (0.9, 1.1, 1.0, 1.4, 0.3))


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    torch.manual_seed(0)
    head = RangeHead(RangeConfig(n_features=len(NAMES), hidden_size=6, item_dim=3, hidden=8, feature_names=NAMES))
    with torch.no_grad():  # a head whose quantiles move with every input group
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        head.z_ref.copy_(torch.randn(6) * 0.1)
    path = tmp_path_factory.mktemp("artefact")
    save_range(head, path)
    return path, head


def test_export_checks_parity_at_several_batch_sizes(artefact):
    path, _ = artefact
    record = export_range(path)
    assert record["batches"] == [1, 3, 257] and record["max_abs_diff"] < 1e-4
    # export outputs go to the git-ignored onnx/ folder; the artefact's own folder keeps the weights only
    assert json.loads((path / ONNX_DIR / PARITY_FILE).read_text())["feature_names"] == list(NAMES)
    assert sorted(p.name for p in path.iterdir() if p.is_file()) == ["range_head.json", "range_head.safetensors"]
    assert CountRange.open(path.parent / "nothing-here", NORM) is None
    with pytest.raises(ValueError, match="other inputs"):
        CountRange.open(path, Normalisation(NAMES[::-1], NORM.mean, NORM.std))


def test_the_stream_gives_the_trainers_range_and_drivers(artefact):
    path, head = artefact
    export_range(path)
    served = CountRange.open(path, NORM)
    assert served.sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, len(NAMES))).astype(np.float32)
    x[:, -1] = 0.3
    x[:, 0] = np.abs(x[:, 0])  # count_7d at or above its mean: a count, never negative
    z = rng.normal(size=(40, 6)).astype(np.float32)
    tick = pd.Timestamp("2011-09-14", tz="UTC").value // 10**6
    got = served(tick, x, z)
    cal = np.repeat(week_of_year(tick), 40, axis=0)
    offline = predict_range(head, RangeData(x, cal, np.arange(40), np.zeros(40, np.float32), np.zeros(40)),
                            torch.from_numpy(z))
    np.testing.assert_allclose(got.low, predicted_count(offline[:, 0].astype(np.float64)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.high, predicted_count(offline[:, 2].astype(np.float64)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.log_mid, offline[:, 1], atol=1e-4)  # the published count's log
    mid = predicted_count(got.log_mid)
    assert (got.low <= got.high).all() and (got.low <= mid + 1e-9).all() and (mid <= got.high + 1e-9).all()
    phi = drivers(head, x, cal, z, NORM)  # the trainer's torch head: the same drivers as the stream's ONNX head
    np.testing.assert_allclose(got.drivers, np.stack([phi[g] for g in DRIVER_GROUPS], 1), atol=1e-4)
    # exact: they add up to the gap between the median and the item's pace (read from the raw signals, as the
    # forecast's direction reads it), less the gap at the steady reference
    raw = NORM.invert(x)
    horizon = float(np.expm1(0.3 * 0.3 + 2.0))
    log_pace = np.log1p([pace(dict(zip(NAMES[:-1], r[:-1])), horizon) for r in raw])
    ref = PaceGap(NORM).steady_count(head_median(head), float(x[0, -1]), head.z_ref.numpy())
    with torch.no_grad():
        q_ref = head(torch.from_numpy(ref[None]), torch.zeros(1, 2), head.z_ref[None])[0, 1].item()
    g_ref = q_ref - np.log1p(pace(dict(zip(NAMES[:-1], NORM.invert(ref[None])[0, :-1])), horizon))
    np.testing.assert_allclose(got.drivers.sum(1), offline[:, 1] - log_pace - g_ref, atol=1e-4)
    assert (np.abs(got.drivers) > 1e-6).all(axis=0).any()
    some = served(tick, x, z, attribute=np.array([3, 7]))  # a worker attributes its top items only
    np.testing.assert_array_equal(some.low, got.low)
    np.testing.assert_allclose(some.drivers[[3, 7]], got.drivers[[3, 7]], atol=1e-6)
    assert np.isnan(np.delete(some.drivers, [3, 7], axis=0)).all()


def test_range_and_drivers_reach_the_prediction_records():
    n = 5
    part = ScoredPart(1_315_958_400_000, [f"i{k}" for k in range(n)], np.arange(n, dtype=float), np.log1p(np.arange(n)),
                      ("count_7d",), np.ones((n, 1)), low=np.arange(n) * 0.5, high=np.arange(n) * 2.0 + 1,
                      drivers=np.arange(n * 4, dtype=float).reshape(n, 4) / 10)
    chunks = [ScoredChunk.from_json(m) for m in part.messages(chunk=2)]
    back = ScoredPart.from_chunks(chunks)
    np.testing.assert_array_equal(back.high, part.high)
    np.testing.assert_array_equal(back.drivers, part.drivers)
    part.drivers[1] = np.nan  # not attributed: null on the topic, no drivers in the record
    back = ScoredPart.from_chunks([ScoredChunk.from_json(m) for m in part.messages(chunk=2)])
    assert np.isnan(back.drivers[1]).all() and not np.isnan(back.drivers[0]).any()
    preds = rank_tick([back], 0, "t")
    assert next(p for p in preds if p.item_id == "i1").drivers is None
    top = preds[0]
    assert top.item_id == "i4" and top.predicted_low == 2.0 and top.predicted_high == 9.0
    assert top.drivers == dict(zip(DRIVER_GROUPS, [1.6, 1.7, 1.8, 1.9]))
    plain = ScoredPart(part.as_of_ms, part.item_ids, part.score, part.log_count, part.names, part.values)
    again = rank_tick([ScoredPart.from_chunks([ScoredChunk.from_json(m) for m in plain.messages()])], 0, "t")
    assert again[0].predicted_low is None and again[0].drivers is None  # a model without a range head


def test_weights_without_their_export_are_refused(tmp_path):
    head = RangeHead(RangeConfig(n_features=len(NAMES), hidden_size=6, item_dim=3, hidden=8, feature_names=NAMES))
    save_range(head, tmp_path)
    with pytest.raises(ArtefactError, match="export.onnx"):
        CountRange.open(tmp_path, NORM)


def test_the_evaluation_scores_the_published_count():
    """trainer.evaluate's `trail` with a range head: the score head's ranking, the range head's median as the
    count (what the stream publishes); the score head's own count stays as `trail_score_head_count`."""
    from trainer.evaluate import Forecast, published_count

    calls = []

    def shipped(frame):
        calls.append(frame)
        return Forecast(count=frame["c"].to_numpy(float), score=frame["s"].to_numpy(float))

    frame = pd.DataFrame({"c": [1.0, 2.0, 3.0], "s": [0.3, 0.1, 0.2]})
    methods = published_count(shipped, lambda f: (f["c"].to_numpy() * 0.5, f["c"].to_numpy() + 10, f["c"].to_numpy() * 9))
    trail, head = methods["trail"](frame), methods["trail_score_head_count"](frame)
    np.testing.assert_array_equal(trail.count, [11.0, 12.0, 13.0])
    np.testing.assert_array_equal(trail.score, frame["s"].to_numpy())
    np.testing.assert_array_equal(head.count, frame["c"].to_numpy())
    assert len(calls) == 1  # one score-head pass serves both rows


def test_the_stream_serves_the_calibrated_range_of_its_horizon_as_the_trainer_does(artefact, tmp_path):
    """One function (stream.core.calibration.apply_offsets) online and offline: the served range is the trainer's
    calibrated range of the served horizon (pooled for a horizon not calibrated; offsets 0 without a record, which
    the start log states), the median and the drivers unchanged."""
    import shutil

    from structlog.testing import capture_logs

    from trainer.quantiles import calibrated_range, load_range

    path, _ = artefact
    calibrated = tmp_path / "calibrated"
    shutil.copytree(path, calibrated)
    record = {"by_horizon": {"3": {"low": 0.4, "high": 0.7}}, "pooled": {"low": 0.2, "high": -0.1}}
    raw = json.loads((calibrated / "range_head.json").read_text())
    (calibrated / "range_head.json").write_text(json.dumps(raw | {"calibration": record}))
    export_range(calibrated)
    head = load_range(calibrated)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, len(NAMES))).astype(np.float32)
    z = rng.normal(size=(30, 6)).astype(np.float32)
    tick = pd.Timestamp("2011-11-02", tz="UTC").value // 10**6
    cal = np.repeat(week_of_year(tick), 30, axis=0)
    q = predict_range(head, RangeData(x, cal, np.arange(30), np.zeros(30, np.float32), np.zeros(30)), torch.from_numpy(z))
    plain = CountRange.open(path, NORM, horizon_days=3)(tick, x, z)  # the fixture: no calibration record
    for horizon, key in ((3, "3"), (14, "pooled")):
        with capture_logs() as logs:
            served = CountRange.open(calibrated, NORM, horizon_days=horizon)
        assert [e["calibration"] for e in logs if e["event"] == "range.calibration"] == [key]
        got = served(tick, x, z)
        offline = calibrated_range(head, q.astype(np.float64), horizon)
        np.testing.assert_allclose(got.low, predicted_count(offline[:, 0]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.high, predicted_count(offline[:, 2]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.log_mid, plain.log_mid, atol=1e-6)  # the published median does not move
        np.testing.assert_allclose(got.drivers, plain.drivers, atol=1e-6)
        mid = predicted_count(got.log_mid)
        assert (got.low <= mid + 1e-9).all() and (mid <= got.high + 1e-9).all()
    assert (got.high != plain.high).any() and (served(tick, x, z).low <= plain.low + 1e-9).all()
    with capture_logs() as logs:
        CountRange.open(path, NORM, horizon_days=3)
    assert [e["calibration"] for e in logs if e["event"] == "range.calibration"] == ["none"]
