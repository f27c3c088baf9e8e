"""The serving parts' configuration (stream.settings fills it from the environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stream.core.decoding import EXPLAIN_TEMPERATURE, EXPLAIN_TOP_P
from stream.model.item_states import DEFAULT_CACHE_ITEMS


@dataclass(frozen=True)
class ServingConfig:
    model_dir: Path = Path("models/trail-smollm2")
    publish_top: int = 0
    batch: int | None = None  # item texts per encoder run
    provider: str = "auto"
    cache_items: int = DEFAULT_CACHE_ITEMS  # item states kept (LRU); ~2.6 kB each for SmolLM2-135M
    warm_items: int = 20_000  # catalogue items encoded at start (~2 min on 2 CPU cores: under the consumer poll limit)
    item_store_dir: Path | None = None  # the item-state store's directory (settings: <TRAIL_CACHE>/item_states);
    # None: states are kept in memory only
    horizon_days: float | None = None
    threads: int | None = None
    explain_top: int = 5
    explain_by: str = "rise"
    explain_threads: int | None = None  # None: `explain_threads` below
    # added to the explainer threads' nice value: they decode with the CPU that ingest and scoring leave
    # (docs/serving.md, "Explainer"); 0 keeps the worker's priority
    explain_nice: int = 10
    explain_temperature: float = EXPLAIN_TEMPERATURE  # 0: greedy (stream.core.decoding)
    explain_top_p: float = EXPLAIN_TOP_P
    scores_topic: str = "trail.scores"
    ranker_group: str = "trail-ranker"
    grace_s: float = 10.0
    catalogue_wait_s: float = 30.0


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


# A shard holds its own session of the generator (~0.3 GB for the 8-bit one), and a tick's 5 movers give a fifth
# shard a single row: past 4, another core adds memory more than speed.
MAX_DEFAULT_EXPLAIN_THREADS = 4


def explain_threads(configured: int | None) -> int:
    """The explainer's CPU threads: TRAIL_EXPLAIN_THREADS, else every usable core, at most 4. They decode at a lower
    priority than the event loop (TRAIL_EXPLAIN_NICE, `ServingConfig.explain_nice`), so they take the CPU that ingest
    and scoring leave. On 2 cores two shards at nice 10 slowed ingest in the same process about as much as the one
    thread at the worker's priority that was the default before (the GIL they share), while making a third more
    explanations (docs/serving.md, "Explainer")."""
    return configured or min(usable_cores(), MAX_DEFAULT_EXPLAIN_THREADS)
