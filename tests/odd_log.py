"""A small event log of another shape than the built-in ones, for the fit-on-any-log tests.

CSV with its own column names (sku / customer / event_time / action), ISO timestamps, no item
table, weeks with no event at all, few users per cut-off, guest events without a user."""

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
    pd.DataFrame(rows).to_csv(path, index=False)
    return path
