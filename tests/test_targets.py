"""The LLM's training targets state the model's own prediction (issue 20.2): trainer.targets gives each row the
committed artefact's range-head count, range and drivers, and the targets written with them state that size and
range, give the top driver as a mover's reason, and pass the checker held to that prediction."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch

from stream.core.faithfulness import check
from stream.core.faithfulness.grammar import reason_of, reason_plan, top_driver
from stream.core.forecast import stated_size
from trainer.explanations import target_explanation
from trainer.targets import PredictionSource

from serving_artefact import COMMITTED


def _rows() -> pd.DataFrame:
    """Six retail-like rows: quiet and busy items, rising and falling weeks, in November and in May."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(6):
        c7, p7 = int(rng.integers(0, 60)), int(rng.integers(0, 60))
        c28 = c7 + p7 + int(rng.integers(0, 80))
        rows.append({
            "count_1d": c7 // 5, "prev_count_1d": c7 // 6, "users_1d": c7 // 6, "velocity_1d": 1.0, "accel_1d": 0.0,
            "count_7d": c7, "prev_count_7d": p7, "users_7d": max(c7 - 3, 0), "velocity_7d": c7 - p7, "accel_7d": 2.0,
            "count_28d": c28, "prev_count_28d": c28 - 10 if c28 > 10 else 0, "users_28d": c28 // 2,
            "velocity_28d": 10.0, "accel_28d": 1.0, "ema": c7 / 7, "ema_7d": c7 / 7, "ema_14d": c28 / 28,
            "total_count": 4 * c28, "age_h": 24.0 * (30 + 40 * i), "idle_h": 3.0,
            "cutoff_ms": pd.Timestamp("2011-11-20" if i % 2 else "2011-05-15", tz="UTC").value // 10**6,
            "label_count": float(c7), "label_log": float(np.log1p(c7)),
            "item_id": f"item-{i}", "title": ["WHITE METAL LANTERN", "PAPER CHAIN KIT 50'S CHRISTMAS",
                                              "JUMBO BAG RED RETROSPOT", "REGENCY CAKESTAND 3 TIER",
                                              "PARTY BUNTING", "LUNCH BAG BLACK SKULL."][i],
            "category": "home",
        })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def source(cache_dir):
    if not (COMMITTED / "range_head.safetensors").is_file():
        pytest.skip("the committed artefact has no range head")
    return PredictionSource.open(COMMITTED, cache_dir=cache_dir)


def test_targets_state_the_source_prediction_and_its_top_driver(source):
    from trainer.quantiles import drivers, range_data

    rows = _rows()
    preds = source.predictions(rows, 7.0)
    assert len(preds) == len(rows)
    # the same numbers as the range head itself, on the artefact's own item states
    d = range_data(source.model.norm, rows, 7.0, np.arange(len(rows)))
    with torch.no_grad():
        z = np.stack([source._states[t] for t in _texts(rows)]).astype(np.float32)
        phi = drivers(source.head, d.x, d.cal, z, source.model.norm)
    for i, p in enumerate(preds):
        assert p.low <= p.count <= p.high and p.has_range
        assert p.drivers == pytest.approx({g: float(v[i]) for g, v in phi.items()})
    names = list(source.model.norm.signal_names)
    rng = random.Random(0)
    driven = 0
    for (_, row), p in zip(rows.iterrows(), preds):
        signals = {n: float(row[n]) for n in names}
        fc = p.direction(signals)
        for _ in range(5):
            text = target_explanation(signals, 7, rng, outlook=fc, size=p, drivers=p.drivers)
            r = check(text, signals, prediction=p)
            assert r.faithful and r.outlook == fc, (text, [c for c in r.claims if not c.ok])
            assert str(stated_size(p.count)) in text
            plan = reason_plan(signals, 7, fc, p.drivers) if fc in ("rise", "fall") else None
            if plan is not None and plan.source == "drivers":  # the top driver, in the words the grammar forces
                driven += 1
                assert reason_of(r.claims, signals, 7, fc, p.drivers) == top_driver(p.drivers, fc), text
                assert any(ph in text for ph in plan.phrases), text
    assert driven > 0


def _texts(rows: pd.DataFrame) -> list[str]:
    from trainer.inference import item_texts_of

    return item_texts_of(rows)[1]
