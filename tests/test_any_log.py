"""trainer.any_log: the three logs derived from the public data have the promised shapes and load through the
generic loader as the same events as the built-in datasets' slices; the summary's comparison logic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stream.core.datasets import load_dataset
from trainer.any_log import SPECS, compare, derive_logs, main

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "models" / "trail-smollm2"
SCALE = 0.05  # a few days of each slice


@pytest.fixture(scope="module")
def logs(tmp_path_factory, cache_dir):
    return {d.name: d for d in derive_logs(tmp_path_factory.mktemp("logs"), cache_dir=cache_dir, scale=SCALE)}


def _builtin_slice(name: str, start: str, end: str, cache_dir: Path) -> pd.DataFrame:
    ev = load_dataset(name, cache_dir=cache_dir).events
    lo, hi = (pd.Timestamp(d, tz="UTC").value // 1_000_000 for d in (start, end))
    return ev[(ev["ts"] >= lo) & (ev["ts"] < hi)].reset_index(drop=True)


def _same_events(loaded: pd.DataFrame, source: pd.DataFrame, users: bool) -> None:
    assert len(loaded) == len(source) > 0
    assert (loaded["item_id"].to_numpy() == source["item_id"].to_numpy()).all()
    assert (loaded["ts"].to_numpy() == source["ts"].to_numpy()).all()
    if users:
        assert loaded["user_id"].equals(source["user_id"])
    else:
        assert loaded["user_id"].isna().all()


def test_the_specs_are_the_documented_slices():
    spans = {s.name: (pd.Timestamp(s.end) - pd.Timestamp(s.start)).days for s in SPECS}
    assert spans == {"retail_csv": 92, "retail_parquet": 91, "ml100k_jsonl": 45}
    assert [s.source for s in SPECS] == ["retail", "retail", "ml100k"]


def test_retail_csv_iso_ts_extra_column_partial_items(logs, cache_dir):
    d = logs["retail_csv"]
    raw = pd.read_csv(d.events, dtype=str)
    assert list(raw.columns) == ["StockCode", "Customer ID", "InvoiceDate", "action", "Quantity"]
    assert raw["InvoiceDate"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").all()
    assert raw["Customer ID"].isna().any() and raw["Customer ID"].notna().any()  # guest checkouts and customers
    table = pd.read_csv(d.items, dtype=str)
    assert list(table.columns) == ["StockCode", "product_name", "Price"]
    in_log = set(raw["StockCode"])
    assert set(table["StockCode"]) < in_log  # partial: some items of the log have no row
    assert d.items_in_table == len(table) < d.items_in_log == len(in_log)

    ds = load_dataset(d.events, d.items, cache_dir=cache_dir)
    source = _builtin_slice("retail", d.start, d.end, cache_dir)
    _same_events(ds.events, source, users=True)
    assert (ds.events["event_type"] == "purchase").all()
    assert (ds.events["weight"] == 1.0).all()  # Quantity is an extra column, not a weight
    assert not (raw["Quantity"].astype(int) == 1).all()
    titled = ds.items.set_index("item_id")["title"]
    missing = sorted(in_log - set(table["StockCode"]))
    assert (titled[missing] == pd.Index(missing)).all()  # no table row: the title is the id
    known = table["StockCode"].iloc[0]
    assert titled[known] == table["product_name"].iloc[0] != known


def test_retail_parquet_datetime64_without_event_type_or_weight(logs, cache_dir):
    d = logs["retail_parquet"]
    raw = pd.read_parquet(d.events)
    assert list(raw.columns) == ["product_id", "customer_id", "timestamp"]
    assert pd.api.types.is_datetime64_dtype(raw["timestamp"].dtype)
    table = pd.read_parquet(d.items)
    assert list(table.columns) == ["product_id", "name", "price"]
    assert set(table["product_id"]) == set(raw["product_id"])

    ds = load_dataset(d.events, d.items, cache_dir=cache_dir)
    _same_events(ds.events, _builtin_slice("retail", d.start, d.end, cache_dir), users=True)
    assert (ds.events["weight"] == 1.0).all() and ds.events["event_type"].nunique() == 1
    assert (ds.items["title"] != ds.items["item_id"]).all()


def test_ml100k_jsonl_epoch_seconds_no_user_no_items(logs, cache_dir):
    d = logs["ml100k_jsonl"]
    lines = [json.loads(line) for line in Path(d.events).read_text().splitlines()]
    assert all(set(r) == {"movie_id", "timestamp", "event", "rating"} for r in lines)  # no user key at all
    ts = np.array([r["timestamp"] for r in lines])
    assert ts.dtype.kind == "i" and 8e8 < ts.min() <= ts.max() < 1e10  # epoch seconds
    assert d.items is None and d.users == 0

    ds = load_dataset(d.events, cache_dir=cache_dir)
    _same_events(ds.events, _builtin_slice("ml100k", d.start, d.end, cache_dir), users=False)
    assert (ds.events["event_type"] == "rating").all() and (ds.events["weight"] == 1.0).all()
    assert (ds.items["title"] == ds.items["item_id"]).all()


def test_derivation_is_deterministic(logs, tmp_path, cache_dir):
    again = {d.name: d for d in derive_logs(tmp_path, cache_dir=cache_dir, scale=SCALE)}
    for name, d in logs.items():
        for a, b in ((d.events, again[name].events), (d.items, again[name].items)):
            if a is not None:
                assert Path(a).read_bytes() == Path(b).read_bytes(), a


def _report(trail_ndcg, trail_mae, ci_ndcg, ci_mae):
    base = {"most_pop": (0.10, 0.50), "gbm": (0.12, 0.40), "exp_decay": (0.11, 0.45)}
    methods = {n: {"ndcg@10": a, "mae_log": b} for n, (a, b) in base.items()}
    methods["trail"] = {"ndcg@10": trail_ndcg, "mae_log": trail_mae}
    return {"methods": methods, "ci": {
        "ndcg@10": {"best_baseline": "gbm", "diff": ci_ndcg[0], "low": ci_ndcg[1], "high": ci_ndcg[2], "level": 0.95,
                    "n_boot": 10},
        "mae_log": {"best_baseline": "gbm", "diff": ci_mae[0], "low": ci_mae[1], "high": ci_mae[2], "level": 0.95,
                    "n_boot": 10}}}


def test_compare_says_whether_trail_beats_every_baseline():
    got = compare(_report(0.13, 0.41, (0.01, -0.002, 0.02), (0.01, 0.002, 0.02)))
    assert got["ndcg@10"]["beats_every_baseline"] is True and got["ndcg@10"]["significant"] is False
    assert got["ndcg@10"]["best_value"] == 0.12 and got["ndcg@10"]["trail_minus_best"]["low"] == -0.002
    assert got["mae_log"]["beats_every_baseline"] is False  # 0.41 > gbm's 0.40: lower is better
    got = compare(_report(0.115, 0.30, (-0.005, -0.01, -0.001), (-0.1, -0.12, -0.08)))
    assert got["ndcg@10"]["beats_every_baseline"] is False
    assert got["mae_log"]["beats_every_baseline"] is True and got["mae_log"]["significant"] is True
    no_users = _report(None, 0.3, (None, None, None), (-0.1, -0.12, -0.08))
    for m in no_users["methods"].values():
        m["ndcg@10"] = None
    no_users["ci"]["ndcg@10"]["best_baseline"] = None
    got = compare(no_users)
    assert got["ndcg@10"]["comparable"] is False and got["ndcg@10"]["beats_every_baseline"] is None


@pytest.mark.slow
@pytest.mark.skipif(not (ADAPTER / "adapter").is_dir(), reason="needs the shipped adapter (models/trail-smollm2)")
def test_the_benchmark_runs_fit_and_evaluate_on_a_derived_log(tmp_path):
    # the no-user JSONL log, a third of its days: fit (phases 2-4) and evaluate as subprocesses, then the summary
    out = tmp_path / "summary.json"
    rc = main(["--model", str(ADAPTER), "--work", str(tmp_path / "work"), "--logs", "ml100k_jsonl", "--scale", "0.34",
               "--n-boot", "100", "--json", str(out)])
    assert rc == 0
    entry = json.loads(out.read_text())["logs"]["ml100k_jsonl"]
    assert set(entry["seconds"]) == {"fit", "evaluate"} and entry["cutoffs"]["test"] >= 1
    assert entry["metrics"]["ndcg@10"]["comparable"] is False  # no users: no truth pairs
    mae = entry["metrics"]["mae_log"]
    assert mae["comparable"] and 0 <= mae["trail"] < 2 and mae["best_baseline"] in mae["baselines"]
    assert re.match(r"-m trainer\.fit --events .*ml100k_jsonl\.jsonl .*--budget-minutes 0", entry["commands"]["fit"])
    assert mae["trail_minus_best"]["low"] <= mae["trail_minus_best"]["diff"] <= mae["trail_minus_best"]["high"]
