"""A small event log of another shape than the built-in ones, for the fit-on-any-log tests.

CSV with its own column names (sku / customer / event_time / action), ISO timestamps, no item
table, weeks with no event at all, few users per cut-off, guest events without a user. The same
events as Parquet (typed timestamps, other column names) or JSONL (epoch seconds) by the suffix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def write_odd_log(path: Path, days: int = 70, items: int = 24, users: int = 9, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-03-01", tz="UTC")
    rows = []
    for day in range(days):
        if (day // 7) % 3 == 2:  # every third week is empty: sparse weeks
            continue
        for item in range(items):
            rate = 0.05 + 0.6 * (item % 5 == 0) + 0.02 * item * (day / days)
            for _ in range(rng.poisson(rate)):
                user = f"c{rng.integers(users)}" if rng.random() < 0.7 else ""  # 30% guest events
                when = start + pd.Timedelta(days=day, seconds=int(rng.integers(86_400)))
                rows.append({"sku": f"SKU-{item:03d}", "customer": user, "event_time": when.isoformat(),
                             "action": "purchase"})
    frame = pd.DataFrame(rows)
    if path.suffix == ".parquet":  # typed timestamps, and the loader's other names for the columns
        # guests as nulls: the loader reads an empty string in a Parquet/JSONL column as a user named ""
        frame = frame.assign(event_time=pd.to_datetime(frame["event_time"]),
                             customer=frame["customer"].replace("", None)).rename(
            columns={"sku": "product_id", "customer": "user", "event_time": "timestamp"})
        frame.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":  # epoch seconds, guests without a user key at all
        frame["event_time"] = (pd.to_datetime(frame["event_time"]) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        frame.to_json(path, orient="records", lines=True)
        path.write_text("".join(line.replace(',"customer":""', "") + "\n" for line in path.read_text().splitlines()))
    else:
        frame.to_csv(path, index=False)
    return path


def write_item_table(path: Path, items: int = 24) -> Path:
    """A JSONL item table for the odd log's SKUs (name / genre: the loader's other names), one SKU left out."""
    pd.DataFrame({"sku": [f"SKU-{i:03d}" for i in range(1, items)],
                  "name": [f"{('Red', 'Blue', 'Green')[i % 3]} {('mug', 'lamp', 'scarf', 'bag')[i % 4]} {i}"
                           for i in range(1, items)],
                  "genre": [("Kitchen", "Home", "Clothing")[i % 3] for i in range(1, items)]}
                 ).to_json(path, orient="records", lines=True)
    return path
