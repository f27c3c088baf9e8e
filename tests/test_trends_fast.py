"""The faster pieces of TrendTable.apply give what the straightforward ones gave: the head's ring
columns zeroed as slices, and the users' presence and hashes from one factorize."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.core.trends import TrendConfig, TrendTable, _hash_strings, _present_hashes

CONFIG = TrendConfig(windows=(("1d", 4),), decays=(), ema_halflife_buckets=2, tick_slack_buckets=1)


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**6, 10**6), st.lists(st.integers(0, 40), min_size=1, max_size=6))
def test_advance_head_zeroes_the_columns_it_passes(head, steps):
    table = TrendTable(CONFIG, capacity=3)
    ring = CONFIG.ring_buckets
    rng = np.random.default_rng(abs(head))
    table._advance_head(head)
    for step in steps:
        table._counts[:] = rng.integers(1, 9, table._counts.shape)
        expected = table._counts.copy()
        if step >= ring:
            expected[:] = 0
        elif step:
            expected[:, np.arange(table.head_bucket + 1, table.head_bucket + step + 1) % ring] = 0
        table._advance_head(table.head_bucket + step)
        assert np.array_equal(table._counts, expected)


_users = st.one_of(st.none(), st.just(float("nan")), st.sampled_from(["u1", "u2", "", "1", "True", "1.0"]),
                   st.text(max_size=3), st.integers(0, 2), st.floats(0, 2), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(_users, max_size=30))
def test_present_hashes_equal_notna_and_hashing_each(values):
    arr = np.empty(len(values), object)
    arr[:] = values
    present, hashes = _present_hashes(arr)
    expected = pd.notna(arr)
    assert np.array_equal(present, expected)
    assert hashes.dtype == np.uint64
    assert np.array_equal(hashes, _hash_strings(arr[expected]))
