"""The range head's controls (trainer.controls): the head fitted again with the item state replaced by nothing, by a
random vector or by a bag-of-words vector, saved beside the artefact for trainer.evaluate."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stream.core.features import HORIZON, Normalisation
from trainer.bow import bow_vectors
from trainer.controls import ControlVectors, fit_controls, load_controls, scale_of
from trainer.quantiles import RangeConfig, fit_range, predict_range
from test_range import synthetic

TEXTS = ["RED MUG", "BLUE MUG", "CHRISTMAS BAUBLE RED", "RED MUG", "BLUE CHRISTMAS MUG"]


def test_each_control_gives_an_item_the_same_vector_wherever_it_is_met():
    assert not ControlVectors("numeric", 8)(TEXTS).any()
    scale = {"mean": [1.0] * 64, "std": [2.0] * 64}
    rnd = ControlVectors("random", 64, scale=scale)
    v = rnd(TEXTS)
    assert v.shape == (5, 64) and v.dtype == np.float32
    np.testing.assert_array_equal(v[0], v[3])  # one text, one vector
    np.testing.assert_array_equal(rnd(TEXTS[::-1]), v[::-1])  # whatever else is in the call
    assert not np.allclose(v[0], v[1]) and 0.5 < v.mean() < 1.5 and 1.5 < v.std() < 2.5
    bow = ControlVectors("bow", 8, bow_texts=TEXTS)
    every = sorted(set(TEXTS))
    np.testing.assert_array_equal(bow(["BLUE MUG", "RED MUG"]),
                                  bow_vectors(every, 8)[[every.index("BLUE MUG"), every.index("RED MUG")]])
    with pytest.raises(ValueError, match="outside the bow control"):
        bow(["GREEN MUG"])  # its vectors were fitted on other texts: no silent zero vector
    with pytest.raises(ValueError, match="unknown control"):
        ControlVectors("llm", 8)
    with pytest.raises(ValueError, match="mean and std"):
        ControlVectors("random", 8)
    got = scale_of(np.array([[0.0, 1.0], [2.0, 3.0]]))
    assert got == {"mean": [1.0, 2.0], "std": [1.0, 1.0]}


def test_a_control_without_the_item_state_cannot_learn_what_the_state_carried(tmp_path):
    """The synthetic counts rise with the season only for items whose state's first coordinate is positive: the
    head on the real states learns it, the numeric control (no item input) cannot, on the same folds and widths.
    The controls are saved with how they were fitted and read back as they predicted."""
    (train, states), (valid, _) = synthetic(3000, 1), synthetic(3000, 2)
    full, _ = synthetic(4000, 3)
    names = ("count_7d", "count_28d", HORIZON)
    rows = SimpleNamespace(folds=[(train, valid)], full=full, states=states, texts=[f"item {i}" for i in range(20)],
                           every_text=[f"item {i}" for i in range(20)])
    model = SimpleNamespace(norm=Normalisation(names, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    reports = fit_controls(model, tmp_path, rows, ["numeric", "random"], 6, 0, [(4, 32)], datasets=["synthetic"],
                           batch=64)
    cfg = RangeConfig(n_features=3, hidden_size=8, feature_names=names)
    _, real = fit_range(cfg, rows.folds, full, states, 6, batch=64, shapes=[(4, 32)])
    best = lambda r: min(r["folds_pinball_by_epoch"])  # noqa: E731
    assert best(reports["numeric"]) > best(real) + 0.002  # 0.1189 against 0.1152 here
    kept = load_controls(tmp_path)
    assert set(kept) == {"numeric", "random"} and load_controls(tmp_path / "none") == {}
    head, record = kept["random"]
    assert record["kind"] == "random" and record["datasets"] == ["synthetic"] and len(record["scale"]["mean"]) == 8
    assert head.cfg.trained["control"] == "random" and head.cfg.trained["epochs"] == reports["random"]["epochs"]
    z = ControlVectors("random", 8, scale=record["scale"])(rows.texts)
    q = predict_range(head, valid, torch.from_numpy(z))
    assert (np.diff(q, axis=1) >= 0).all() and np.isfinite(q).all()
