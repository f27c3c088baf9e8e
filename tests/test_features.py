"""Online/offline feature parity (as a feature store tests it): the model input the trainer builds
from its examples frame equals, bit for bit, what the stream builds from its per-partition
`Signals` at the same cut-offs, through the normalisation as the manifest carries it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from stream.core import features
from stream.core.features import HORIZON, MAX_LOG_COUNT, FeatureError, Normalisation, predicted_count, season_of
from stream.core.records import ItemInfo
from stream.core.trends import Signals, TrendConfig
from stream.model.artefact import Artefact, ArtefactError
from test_parity_offline import stream_snapshots


def test_trainer_and_stream_compute_the_same_features(retail_slice):
    from trainer.examples import build_examples
    from trainer.fit import fit_normalisation
    from trainer.inference import features_of, prompts_of
    from stream.core.forecast import PredictedCount
    from stream.serving.scorer import prompt_for

    config = TrendConfig()
    examples = build_examples(retail_slice, config)
    horizon = examples.horizon_ms / 86_400_000
    frame = examples.frame
    names = list(config.signal_names)
    # the trainer: a normalisation fitted on its rows, features of an examples frame
    norm = fit_normalisation([SimpleNamespace(train=frame, horizon_days=horizon)], names)
    trained = SimpleNamespace(norm=norm)
    # the stream: the normalisation read back from the manifest, features of a tick's Signals
    served = Artefact(Path("."), {"model_version": "t", "normalisation": json.loads(json.dumps(norm.to_dict()))})
    served_norm = served.features()
    assert served_norm == norm and served_norm.signal_names == tuple(names)
    online = stream_snapshots(retail_slice.events, examples.cutoffs.tolist(), config)
    for t, signals in online.items():
        rows = frame[frame["cutoff_ms"] == t]
        order = sorted(range(len(signals)), key=signals.item_ids.__getitem__)
        tick = Signals(t, [signals.item_ids[i] for i in order], signals.names, signals.values[order])
        assert tick.item_ids == rows["item_id"].tolist(), t
        offline_x = features_of(trained, rows, horizon)
        online_x = served_norm.of_signals(tick, horizon)
        assert offline_x.dtype == online_x.dtype == np.float32
        np.testing.assert_array_equal(offline_x, online_x, err_msg=str(t))
        # and the prompts the two sides render for the same items (month from the cut-off)
        h = int(round(horizon))
        head = rows.head(5)
        items = {i: ItemInfo(ti if isinstance(ti, str) else None, c if isinstance(c, str) else None)
                 for i, ti, c in zip(head["item_id"], head["title"], head["category"])}
        assert prompts_of(head, norm.signal_names, horizon) == [
            prompt_for(i, items[i], tick.row(k), h, season_of(t)) for k, i in enumerate(head["item_id"])]
        # with the model's forecast of each item (p3's forecast line), as the explainer renders its movers
        sizes = [PredictedCount(3.0 * k, horizon, 2.0 * k, 5.0 * k, drivers={"trend": 0.2, "level": -0.1 * k})
                 for k in range(len(head))]
        with_forecast = prompts_of(head, norm.signal_names, horizon, forecasts=sizes)
        assert with_forecast == [prompt_for(i, items[i], tick.row(k), h, season_of(t), sizes[k])
                                 for k, i in enumerate(head["item_id"])]
        assert all("\nForecast: " in p for p in with_forecast)


def test_the_signals_reorder_to_model_order_and_the_horizon_comes_last():
    norm = Normalisation(("b", "a", HORIZON), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    sig = Signals(0, ["x", "y"], ("a", "b", "c"), np.array([[1.0, 2.0, 3.0], [0.0, -5.0, 9.0]]))
    raw = np.array([[2.0, 1.0, 7.0], [-5.0, 0.0, 7.0]])
    assert np.array_equal(norm.of_signals(sig, 7), features.signal_transform(raw).astype(np.float32))
    with pytest.raises(FeatureError, match="does not compute"):
        Normalisation(("d", HORIZON), (0.0, 0.0), (1.0, 1.0)).of_signals(sig, 7)


def test_a_normalisation_is_checked_and_round_trips():
    with pytest.raises(FeatureError, match="inconsistent"):
        Normalisation(("a", HORIZON), (0.0,), (1.0, 1.0))
    with pytest.raises(ArtefactError, match="normalisation"):
        Artefact(Path("."), {"model_version": "t", "normalisation": {"names": ["a"], "mean": [], "std": []}}).features()
    n = Normalisation.fit(["a", HORIZON], np.array([[1.0, 7.0], [1.0, 7.0], [3.0, 7.0]]))
    assert n.std[1] == features.MIN_STD  # a constant column does not divide by ~0
    assert Normalisation.from_dict(json.loads(json.dumps(n.to_dict()))) == n


def test_predicted_count_is_clipped_and_season_is_the_utc_month():
    counts = predicted_count(np.array([-3.0, 0.0, np.log1p(41.0), 1e6]))
    assert counts[0] == 0.0 and counts[1] == 0.0 and counts[2] == pytest.approx(41.0)
    assert np.isfinite(counts[3]) and counts[3] == np.expm1(MAX_LOG_COUNT)
    assert season_of(1_322_697_600_000) == "Dec"  # 2011-12-01T00:00Z
    assert season_of(1_322_697_599_999) == "Nov"


def test_the_trainer_and_the_stream_import_the_one_definition():
    import stream.model.artefact
    import stream.serving.scorer
    import trainer.inference
    import trainer.model

    assert trainer.model.Normalisation is Normalisation
    assert trainer.inference.season_of is season_of
    assert stream.serving.scorer.item_text is trainer.inference.item_text  # the item block both encode
    assert stream.serving.scorer.predicted_count is predicted_count
    for module in (trainer.model, trainer.inference, stream.model.artefact, stream.serving.scorer):
        assert not hasattr(module, "signal_transform") and not hasattr(module, "Features"), module
        assert not hasattr(module, "MAX_LOG_COUNT"), module
